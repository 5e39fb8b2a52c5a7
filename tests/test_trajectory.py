"""Trajectory states and the sampler-step objective: guidance as the sampler applies it, only the channels it
reads, weighted by the step; every search method scores it."""
import copy

import pytest
import torch
from diffusers import DDIMScheduler

from treeq.bits import uniform_config
from treeq.diffusion.sampling import _SCHEDULE
from treeq.diffusion.trajectory import TrajectoryStates, record_states
from treeq.ptq.apply import quantize
from treeq.ptq.calibration import split_rows
from treeq.search.objective import ModelObjective, output_error

SETTINGS = dict(steps=4, cfg_scale=3.0, guidance_channels=None, clip_sample=False, scheduler=None)


def states_of(model, sampler, images=2, timesteps=4, **overrides):
    return record_states(model, num_images=images, num_timesteps=timesteps, seed=7,
                         **{**SETTINGS, "sampler": sampler, **overrides})


def outputs(model, states):
    with torch.no_grad():
        return model(*states.inputs)


def test_states_pair_each_conditional_row_with_its_null_row(tiny_dit):
    states = states_of(tiny_dit, "dpm++", images=3)
    x, t, y = states.inputs
    assert len(states) == 3 * 4 and states.rows_per_state == 2 and len(x) == 2 * len(states)
    assert torch.equal(x[0::2], x[1::2]) and torch.equal(t[0::2], t[1::2])
    assert (y[1::2] == tiny_dit.config.num_classes).all() and (y[0::2] < tiny_dit.config.num_classes).all()
    # every kept step, in sampling order: 4 distinct timesteps, 3 images each
    assert t[0::2].unique().numel() == 4 and torch.equal(t[0::2], t[0::2].sort(descending=True).values)
    chosen = states.select(torch.tensor([2, 5]))
    assert torch.equal(chosen.inputs[0], x[[4, 5, 10, 11]]) and torch.equal(chosen.weights, states.weights[[2, 5]])


def test_an_error_in_the_variance_channel_counts_only_where_the_sampler_reads_it(tiny_dit):
    """DPM-Solver++ never reads the learned variance; DDPM with the learned range does."""
    for sampler, reads_variance in (("dpm++", False), ("ddim", False), ("ddpm", True)):
        states = states_of(tiny_dit, sampler)
        fp = outputs(tiny_dit, states)
        noisy = fp.clone()
        noisy[:, 1:] += 0.1 * torch.randn_like(noisy[:, 1:])  # channel 0: noise, channel 1: variance
        moved = states.consumed(noisy, states.weights) - states.consumed(fp, states.weights)
        assert (moved.abs().max() > 1e-4) == reads_variance, sampler
        noisy = fp.clone()
        noisy[:, :1] += 0.1 * torch.randn_like(noisy[:, :1])
        assert (states.consumed(noisy, states.weights) - states.consumed(fp, states.weights)).abs().max() > 1e-4


def test_ddim_weights_and_guided_step_equal_the_hand_computed_step(tiny_dit):
    """x_prev = sqrt(a') x0 + sqrt(1 - a') eps with x0 = (x - sqrt(1 - a) eps) / sqrt(a): its derivative in the
    guided eps is sqrt(1 - a') - sqrt(a' (1 - a) / a), and the guided eps is u + s (c - u)."""
    states = states_of(tiny_dit, "ddim")
    scheduler = DDIMScheduler(**_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(SETTINGS["steps"])
    alphas = scheduler.alphas_cumprod.double()
    t = states.inputs[1][0::2]
    previous = t - 1000 // SETTINGS["steps"]
    a = alphas[t]
    a_prev = torch.where(previous >= 0, alphas[previous.clamp(min=0)], alphas[0])
    expected = (1 - a_prev).sqrt() - (a_prev * (1 - a) / a).sqrt()
    assert torch.allclose(states.weights[:, 0].flatten(1).double(), expected[:, None].expand(-1, 32 * 32), atol=1e-3)
    assert states.weights[:, 1].abs().max() == 0
    out = outputs(tiny_dit, states)
    cond, uncond = out[0::2, :1], out[1::2, :1]
    guided = uncond + SETTINGS["cfg_scale"] * (cond - uncond)
    assert torch.allclose(states.consumed(out, states.weights), states.weights[:, 0] * guided, atol=1e-6)


def test_the_objective_is_the_error_of_the_latent_after_one_guided_step(tiny_dit):
    states = states_of(tiny_dit, "dpm++")
    quantized = quantize(tiny_dit, uniform_config(tiny_dit, 8, 8))
    config = uniform_config(tiny_dit, 3, 3)
    fp = outputs(tiny_dit, states)

    def step_change(out):
        cond, uncond = out[0::2, :1], out[1::2, :1]
        return states.weights[:, 0] * (uncond + SETTINGS["cfg_scale"] * (cond - uncond))
    error = output_error(quantized, states, config)
    by_hand = (step_change(outputs(quantized, states)) - step_change(fp)).pow(2).flatten(1).mean(1).mean().item()
    assert error == pytest.approx(by_hand, rel=1e-4) and error > 0
    # the tree's scorer reads the same at the output, under ENG with the whole model in its segment
    objective = ModelObjective(quantized, states, 32, readout_blocks=None, batch_size=3)
    whole = objective.score(0, len(objective.layers), [((3, 3),) * len(objective.layers)])[0]
    assert whole == pytest.approx(by_hand, rel=1e-4)
    assert objective.settings["objective"] == "sampler_step"


def test_a_weightless_step_reads_no_error():
    """consumed() multiplies by J: a sampler that ignores the output (J = 0) sees no error."""
    states = TrajectoryStates((torch.zeros(2, 1, 2, 2), torch.zeros(2), torch.zeros(2)), torch.zeros(1, 2, 1, 2, 2),
                              2, 4.0, 1)
    assert states.consumed(torch.randn(2, 2, 2, 2), states.weights).abs().max() == 0


def test_lens_readout_reads_the_head_a_block_past_the_segment(tiny_dit):
    states = states_of(tiny_dit, "dpm++")
    quantized = quantize(tiny_dit, uniform_config(tiny_dit, 8, 8))
    lens = ModelObjective(quantized, states, 32, readout_blocks=0, readout="lens")
    hidden = ModelObjective(quantized, states, 32, readout_blocks=0, readout="hidden")
    output = ModelObjective(quantized, states, 32, readout_blocks=None)
    # a segment in the last block reads the output whatever the readout
    last = [((3, 3),) * 5]
    assert lens.score(5, 10, last) == output.score(5, 10, last)
    # in block 0 the lens reads the head on block 0's tokens: not the hidden MSE, not the output
    first = lens.score(0, 5, last)[0]
    assert first != hidden.score(0, 5, last)[0] and first != output.score(0, 5, last)[0] and first > 0
    with pytest.raises(ValueError, match="readout"):
        ModelObjective(quantized, states, 32, readout="logits")


def test_split_rows_keeps_states_whole(tiny_dit):
    states = states_of(tiny_dit, "dpm++", images=4)
    scored, held_out = split_rows(states, (5,))
    assert len(scored) == 5 and len(held_out) == len(states) - 5
    assert torch.equal(scored.inputs[0][0::2], scored.inputs[0][1::2])


def test_every_search_method_scores_the_sampler_step(tiny_dit, tmp_path, monkeypatch):
    """run_search builds every scorer (search, refinement, held-out figure) on trajectory states."""
    from treeq.search import objective, run

    seen = []
    original = objective.ModelObjective.__init__

    def spy(self, model, calibration, *args, **kwargs):
        seen.append(type(calibration).__name__)
        original(self, model, calibration, *args, **kwargs)
    held_out = []
    monkeypatch.setattr(objective.ModelObjective, "__init__", spy)
    monkeypatch.setattr(run, "output_error", lambda model, rows, config: held_out.append(type(rows).__name__) or 0.0)
    monkeypatch.chdir(tmp_path)  # the calibration cache
    recipe = run.Recipe(methods=("rtn",), calibration_images=3, calibration_timesteps=2)
    model = copy.deepcopy(tiny_dit)
    model.sampling = {"sampler": "dpm++", **SETTINGS}
    for method in ("ilp", "greedy", "uniform", "tss"):
        run.run_search(recipe, "W4A4", method, out=tmp_path / f"{method}.json", model=model, calibration_rows=2,
                       refine_rows=2, refine_sweeps=1, queue_size=2, progress=False)
    assert seen and set(seen) == {"TrajectoryStates"} and set(held_out) == {"TrajectoryStates"}
