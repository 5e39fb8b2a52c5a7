"""Text-to-image families through their own diffusers pipeline: loading, calibration and sampling.

The quantized model is the diffusers transformer itself with QuantLinear swapped in, so the family's
pipeline runs it unchanged: calibration records the transformer's keyword inputs at evenly spaced
denoising steps (both halves of a guided batch), and sampling is the pipeline's own call.
"""
import inspect
from pathlib import Path

import numpy as np
import torch

from ..models.adapters import CallInputs, adapter_for
from .sampling import sample_generators

# Prompts used when none are given: short, varied scenes (a user's own list comes with --prompts FILE).
DEFAULT_PROMPTS = (
    "a red fox in fresh snow", "a lighthouse on a cliff at sunset", "a bowl of ramen, top view",
    "an astronaut riding a horse", "a watercolor of a mountain lake", "a city street in the rain at night",
    "a close-up of a honeybee on a flower", "a wooden cabin in a pine forest",
)


def read_prompts(path):
    """One prompt a line (blank lines skipped); a file with none is refused."""
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one a line)")
    return prompts


def is_pipeline_model(model):
    """A diffusers text-to-image transformer (sampled and calibrated through its pipeline)."""
    return bool(getattr(adapter_for(model), "pipeline", ""))


def load_pipeline(transformer):
    """The family's pipeline from the folder the transformer came from, running `transformer` itself."""
    import diffusers

    folder = getattr(transformer, "source", {}).get("path")
    if folder is None or not (Path(folder) / "model_index.json").exists():
        raise ValueError(f"{type(transformer).__name__} needs the pipeline folder it came from (model_index.json "
                         "beside transformer/, vae/, text encoders) to calibrate or sample")
    diffusers.utils.logging.disable_progress_bar()
    pipeline = diffusers.DiffusionPipeline.from_pretrained(folder, transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)
    try:  # the tokenizers' truncation notices would repeat for every batch
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    return pipeline


def pipeline_settings(transformer, **overrides):
    """Sampling settings: the folder's (treeq.json), then the flags given (None leaves a setting)."""
    settings = dict(getattr(transformer, "sampling", {}))
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return settings


def _call_kwargs(pipeline, settings, prompts, generators):
    kwargs = {"prompt": list(prompts), "height": settings["height"], "width": settings["width"],
              "num_inference_steps": settings["steps"], "guidance_scale": settings["cfg_scale"],
              "generator": generators, "output_type": "np"}
    if "max_sequence_length" in settings:
        kwargs["max_sequence_length"] = settings["max_sequence_length"]
    if type(pipeline).__name__.startswith("PixArt"):
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    return kwargs


@torch.no_grad()
def collect_pipeline_calibration(transformer, num_images=8, num_timesteps=4, seed=1234, prompts=None, **sampling):
    """CallInputs of the transformer at `num_timesteps` evenly spaced steps of `num_images` samples
    (prompts cycled from `prompts`, default DEFAULT_PROMPTS), through the pipeline of its folder."""
    settings = pipeline_settings(transformer, **sampling)
    pipeline = load_pipeline(transformer)
    prompts = _cycled(prompts or DEFAULT_PROMPTS, num_images)
    return record_calibration(pipeline, num_timesteps, steps=settings["steps"],
                              **_call_kwargs(pipeline, settings, prompts, sample_generators(seed, range(num_images))))


@torch.no_grad()
def record_calibration(pipeline, num_timesteps=None, *, steps, **call):
    """CallInputs of `pipeline.transformer` at `num_timesteps` evenly spaced of its `steps` denoising steps
    (None: every step) while `pipeline(**call)` runs; both halves of a guided batch are kept."""
    num_timesteps = steps if num_timesteps is None else num_timesteps
    if not 1 <= num_timesteps <= steps:
        raise ValueError(f"num_timesteps must be in 1..{steps} (the sampler's steps), got {num_timesteps}")
    keep = set(torch.linspace(0, steps - 1, num_timesteps).round().long().tolist())
    transformer = pipeline.transformer
    adapter, calls, step = adapter_for(transformer), [], [0]
    signature = inspect.signature(transformer.forward)

    def record(module, args, kwargs):
        if step[0] % steps in keep:
            named = signature.bind(*args, **kwargs).arguments
            calls.append(CallInputs.from_call({k: v for k, v in named.items() if k != "return_dict"},
                                              adapter.shared_keys))
        step[0] += 1

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipeline(**{**call, "num_inference_steps": steps})
    finally:
        handle.remove()
    return CallInputs.concat(calls)


@torch.no_grad()
def sample_pipeline(transformer, num_samples, seed=0, prompts=None, batch_size=8, **sampling):
    """(uint8 images (N, H, W, 3), prompts): sample i from its own generator seeded by (seed, i)."""
    settings = pipeline_settings(transformer, **sampling)
    pipeline = load_pipeline(transformer)
    prompts = _cycled(prompts or DEFAULT_PROMPTS, num_samples)
    images = []
    for start in range(0, num_samples, batch_size):
        indices = range(start, min(num_samples, start + batch_size))
        batch = [prompts[i] for i in indices]
        out = pipeline(**_call_kwargs(pipeline, settings, batch, sample_generators(seed, indices)))
        images.append(np.clip(out.images * 255 + 0.5, 0, 255).astype(np.uint8))
    return np.concatenate(images), prompts


def _cycled(prompts, count):
    return [prompts[i % len(prompts)] for i in range(count)]
