"""A text-to-image family's search objective is what its pipeline's sampler consumes: the transformer's rows
guided as the pipeline guides them, on the channels its scheduler reads, times the step's J probed on the
scheduler; recorded from the pipeline itself and checked against what its scheduler received."""
import pytest
import torch

import treeq.diffusion.pipeline_states as pipeline_states
from treeq.diffusion.pipelines import load_pipeline
from treeq.diffusion.sampling import kept_steps
from treeq.models.adapters import adapter_for
from treeq.models.families import init_pipeline_folder
from treeq.models.load import load
from treeq.search.objective import ModelObjective

STATES = {"num_images": 2, "num_timesteps": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-states")
    return {name: load(init_pipeline_folder(name, root / name)) for name in ("sd3", "pixart", "flux")}


def _outputs(model, states):
    adapter = adapter_for(model)
    with torch.no_grad():
        return torch.cat([adapter.forward(model, inputs).float() for inputs, _ in states.batches(64)])


def test_sd3_objective_is_a_hand_computed_guided_euler_step(models):
    model = models["sd3"]
    states = pipeline_states.record_pipeline_states(model, **STATES)
    steps = model.sampling["steps"]
    scheduler = load_pipeline(model).scheduler
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas
    dt = torch.stack([sigmas[k + 1] - sigmas[k] for k in sorted(kept_steps(steps, 2))])  # per kept step
    assert states.rows_per_state == 2 and len(states) == 2 * 2
    torch.testing.assert_close(states.weights, dt.repeat_interleave(2)[:, None, None, None].expand_as(states.weights),
                               rtol=1e-3, atol=1e-5)
    output = _outputs(model, states)
    cond, null = output[0::2], output[1::2]
    by_hand = dt.repeat_interleave(2)[:, None, None, None] * (null + states.cfg_scale * (cond - null))
    # J is probed by central differences of 1e-2 on float32 latents of unit scale: about 1e-5 of it is rounding
    torch.testing.assert_close(states.consumed(output, states.weights), by_hand, rtol=1e-3,
                               atol=1e-4 * by_hand.abs().max().item())


def test_pixart_variance_channels_do_not_count_and_null_rows_do(models):
    model = models["pixart"]
    states = pipeline_states.record_pipeline_states(model, **STATES)
    output = _outputs(model, states)
    assert output.shape[1] == 2 * states.guidance_channels  # noise and learned variance
    base = states.consumed(output, states.weights)
    variance = output.clone()
    variance[:, states.guidance_channels:] += 1.0
    assert torch.equal(states.consumed(variance, states.weights), base)
    null = output.clone()
    null[1::2, :states.guidance_channels] += 1.0
    moved = states.consumed(null, states.weights) - base
    torch.testing.assert_close(moved, states.weights * (1 - states.cfg_scale), rtol=1e-3, atol=1e-4)


def test_a_pipeline_guided_otherwise_is_refused(models, monkeypatch):
    swapped = pipeline_states.sampler_input
    monkeypatch.setattr(pipeline_states, "sampler_input",
                        lambda output, rows, scale, channels: swapped(output.flip(0), rows, scale, channels))
    with pytest.raises(ValueError, match="not its transformer's rows guided as diffusers guides them"):
        pipeline_states.record_pipeline_states(models["sd3"], **STATES)


def test_flux_states_have_no_null_row_and_the_objective_reads_them(models):
    model = models["flux"]
    states = pipeline_states.record_pipeline_states(model, **STATES)
    assert states.rows_per_state == 1
    from treeq.bits import uniform_config
    from treeq.ptq.apply import quantize
    from treeq.ptq.recipe import Recipe
    quantized = quantize(model, uniform_config(model, 8, 8), Recipe(methods=("rtn",), switch_bits=((3, 3), (8, 8))))
    objective = ModelObjective(quantized, states, 8, readout_blocks=None)
    assert objective.settings["objective"] == "sampler_step"
    low, high = (objective.score(0, 1, [((3, 3),), ((8, 8),)]))
    assert low > high >= 0


def test_a_search_scoring_every_state_holds_none_out(models, tmp_path, monkeypatch):
    """4 images x 4 steps record 16 states; a search scoring all 16 has no held-out figure (and no error)."""
    import dataclasses

    from treeq.search.run import SEARCH_RECIPE, run_search

    monkeypatch.chdir(tmp_path)
    model = models["flux"]
    recipe = dataclasses.replace(SEARCH_RECIPE, model=model.source["path"], calibration_images=4)
    run_search(recipe, "W4A4", "greedy", out=tmp_path / "bits.json", calibration_rows=16, model=model,
               progress=False)
    import json
    results = json.loads((tmp_path / "bits.results.json").read_text())
    assert results["held_out_metric"] is None and results["held_out_rows"] == 0
    assert results["settings"]["objective"] == "sampler_step"
