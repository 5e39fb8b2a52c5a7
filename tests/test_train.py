"""Training: the objective is sane and a resumed run continues the same sequence."""
import torch

from treeq.diffusion.loss import GaussianDiffusion
from treeq.diffusion.train import TrainConfig, lr_at, train


def test_vb_term_is_nonnegative_and_zero_for_the_true_posterior():
    diffusion = GaussianDiffusion()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t = torch.tensor([1, 10, 100, 999])
    noise = torch.randn_like(x0)
    xt = diffusion.q_sample(x0, t, noise)
    # with the true noise and the posterior variance (var_values = -1), the KL is exactly zero
    kl = diffusion.vb_term(x0, xt, t, noise, -torch.ones_like(x0))
    assert kl.abs().max() < 1e-3
    wrong = diffusion.vb_term(x0, xt, t, noise + 0.5, torch.zeros_like(x0))
    assert (wrong > kl).all()


def test_lr_schedule_warms_up_then_stays_constant():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1e-3)
    assert lr_at(0, config) < lr_at(9, config) == 1e-3 == lr_at(99, config)


def _tiny_run(tmp_path, steps, resume=False):
    images = torch.rand((16, 1, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(16) % 10
    config = TrainConfig(steps=steps, batch_size=4, warmup_steps=2, checkpoint_every=2, threads=1)
    return train(config, images, labels, tmp_path, resume=resume, log=lambda *_: None)


def test_resume_with_more_steps_reproduces_an_uninterrupted_run(tmp_path):
    """A 2-step run resumed to 4 steps equals a 4-step run: training can span sessions."""
    straight = _tiny_run(tmp_path / "a", steps=4)
    _tiny_run(tmp_path / "b", steps=2)
    resumed = _tiny_run(tmp_path / "b", steps=4, resume=True)
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
    assert (tmp_path / "b" / "model.safetensors").exists()


def test_snr_weighting_caps_low_noise_and_floors_high_noise():
    """Weight of the epsilon MSE is clamp(SNR, floor, gamma) / SNR; probe it with a constant-error model."""
    diffusion = GaussianDiffusion()
    x0 = torch.zeros(3, 1, 4, 4)
    noise = torch.zeros_like(x0)
    t = torch.tensor([0, 300, 999])  # SNR ~ 1e4, ~ 1, ~ 4e-5

    def model(x, t, y):  # epsilon off by exactly 1 everywhere; no variance channels
        return torch.ones_like(x)

    plain = diffusion.training_losses(model, x0, t, None, noise)
    weighted = diffusion.training_losses(model, x0, t, None, noise, min_snr_gamma=5.0, snr_floor=1.0)
    snr = diffusion.snr[t]
    assert torch.allclose(plain, torch.ones(3))
    expected = torch.clamp(snr, 1.0, 5.0) / snr
    assert torch.allclose(weighted, expected, rtol=1e-5)
    assert weighted[0] < 1e-3 and weighted[2] > 1e3
