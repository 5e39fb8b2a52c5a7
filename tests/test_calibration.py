"""Calibration sets: seeded, shaped as the model's inputs, cached on disk."""
import torch

from treeq.ptq.calibration import collect_calibration, load_or_collect, model_fingerprint


def test_calibration_is_deterministic_and_covers_timesteps(tiny_dit):
    a = collect_calibration(tiny_dit, num_images=2, num_timesteps=3, steps=5)
    b = collect_calibration(tiny_dit, num_images=2, num_timesteps=3, steps=5)
    x, t, y = a
    assert x.shape == (3 * 4, 1, 32, 32)  # 3 kept steps x (2 conditional + 2 null-class rows)
    assert len(t.unique()) == 3
    assert (y == tiny_dit.config.num_classes).sum() == 6  # the null halves of the guided batch
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    c = collect_calibration(tiny_dit, num_images=2, num_timesteps=3, steps=5, seed=99)
    assert not torch.equal(c[0], x)


def test_calibration_cache_round_trip(tiny_dit, tmp_path):
    first = load_or_collect(tiny_dit, tmp_path, num_images=2, num_timesteps=2, steps=3)
    assert len(list(tmp_path.iterdir())) == 1
    second = load_or_collect(tiny_dit, tmp_path, num_images=2, num_timesteps=2, steps=3)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_fingerprint_changes_with_weights(tiny_dit):
    before = model_fingerprint(tiny_dit)
    with torch.no_grad():
        tiny_dit.blocks[0].attn.qkv.weight[0, 0] += 1e-3
    assert model_fingerprint(tiny_dit) != before


def test_calibration_keeps_the_model_inputs_of_evenly_spaced_steps(tiny_dit):
    """Rows are exactly the model's inputs at steps 0, 2 and 4 of 5 (both halves of the guided batch)."""
    from treeq.diffusion.defaults import sampling_defaults
    from treeq.diffusion.sampling import balanced_labels, sample

    calls = []
    settings = {**sampling_defaults(tiny_dit), "steps": 5}
    sample(tiny_dit, balanced_labels(2, tiny_dit.config.num_classes), seed=1234, progress=False, batch_size=2,
           on_model_input=lambda x, t, y: calls.append((x.clone(), t.clone(), y.clone())), **settings)
    x, t, y = collect_calibration(tiny_dit, num_images=2, num_timesteps=3, steps=5)
    for part, kept in zip((x, t, y), zip(*(calls[i] for i in (0, 2, 4)))):
        assert torch.equal(part, torch.cat(kept))
    assert len(set(t.tolist())) == 3 and not torch.equal(x[:4], x[4:8])
