"""The Python API, in the style of torchao's `quantize_(model, config)`.

    pipe = FluxPipeline.from_pretrained("path/to/flux")             # any supported family, or our DiT
    calibration = treeq.calibrate(pipe, ["a red fox", "a lighthouse"], num_inference_steps=4)
    treeq.quantize_(pipe.transformer, treeq.Recipe(bits="W4A4", methods=("hadamard", "gptq")), calibration)
    image = treeq.generate(pipe, ["a red fox"], num_inference_steps=4)[0]  # the pipeline runs the quantized module
"""
import tempfile
from pathlib import Path

from .diffusion.pipelines import fixed_call_settings, pipeline_output, record_calibration
from .ptq.apply import quantize
from .ptq.recipe import Recipe


def calibrate(pipeline, prompts, num_timesteps=None, **call):
    """Calibration inputs of `pipeline.transformer`: what it sees while `pipeline(prompts, **call)` samples,
    at `num_timesteps` evenly spaced steps (None: every step). `call` takes the pipeline's own keywords
    (num_inference_steps, height, width, guidance_scale, generator, ...), over the settings `treeq sample`
    fixes (fixed_call_settings: resolution binning off, so any height and width the transformer takes)."""
    steps = call.pop("num_inference_steps", 28)
    return record_calibration(pipeline, num_timesteps, steps=steps, prompt=list(prompts), output_type="latent",
                              **{**fixed_call_settings(pipeline), **call})


def generate(pipeline, prompts, **call):
    """`pipeline(prompts, **call)` with the settings `treeq sample` fixes, as calibrate; returns its images, or
    a video pipeline's videos (frames), one per prompt."""
    return pipeline_output(pipeline(prompt=list(prompts), **{**fixed_call_settings(pipeline), **call}), pipeline)


def quantize_(transformer, recipe="W4A4", calibration=None):
    """Quantize `transformer` in place by `recipe` (a Recipe, or a preset name such as "W4A4"); returns it.

    The recipe's `bits` may be a preset, a bits .json, or a mapping {layer name: {w_bits, a_bits}}; methods
    with a statistic (gptq, smooth) and static activations need `calibration` (see `calibrate`)."""
    recipe = Recipe(bits=recipe) if isinstance(recipe, str) else recipe
    bits = recipe.bits if isinstance(recipe.bits, dict) else recipe.resolve_bits(transformer)
    return quantize(transformer, bits, recipe, calibration=calibration, inplace=True)


def search_bits(transformer, calibration, target="W4A4", recipe=None, method="tss", out=None, max_cost=None,
                **options):
    """A mixed-precision bit configuration for `transformer` at the `target` budget (TreeQ's tree search by
    default (not named `search`: the package treeq.search would shadow it once imported), or ilp, evo, greedy, random, uniform); `transformer` itself is left as it is. Returns the
    search result (`.config` is the mapping `quantize_` takes as a recipe's bits). The search's files
    (state, log, plots) go beside `out`, or into a temporary folder. max_cost: a tree search planned above
    this many image equivalents (its block-row runs over those of sampling one image) raises ValueError
    before anything is quantized or scored; its results file says what it ran (`compute`). `options`:
    queue_size, env_bits, calibration_rows, candidates, ... as `treeq search` takes them."""
    from .search.run import SEARCH_RECIPE, run_search

    with tempfile.TemporaryDirectory() as folder:
        out = Path(out) if out is not None else Path(folder) / "bits.json"
        return run_search(recipe or SEARCH_RECIPE, target, method, out=out, model=transformer,
                          calibration=calibration, progress=False, max_cost=max_cost, **options)


def load_run(folder):
    """The quantized model a `treeq quantize` / `finetune` run folder (or a packed export) holds."""
    from .ptq.run import load_quantized
    return load_quantized(folder)


__all__ = ["Recipe", "calibrate", "generate", "load_run", "quantize_", "search_bits"]
