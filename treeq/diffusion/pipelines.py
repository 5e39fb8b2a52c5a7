"""Text-to-image (and text-to-video) families through their own diffusers pipeline: loading, calibration
and sampling.

The quantized model is the diffusers transformer itself with QuantLinear swapped in, so the family's
pipeline runs it unchanged: calibration records the transformer's keyword inputs at evenly spaced
denoising steps (both halves of a guided batch, whether the pipeline runs them as one batch or, as Wan,
as two calls), and sampling is the pipeline's own call.

Pipeline settings TreeQ fixes: PixArt and Sana without resolution binning (sample at the height and width
asked) or caption cleaning (it needs bs4/ftfy); Sana without its "complex human instruction" (a long
instruction prepended to every prompt for Gemma: prompts are used as given, so the text tokens a linear
sees are max_sequence_length). Wan samples `num_frames` frames (videos, (N, F, H, W, 3)).
"""
import inspect
import json
from pathlib import Path

import numpy as np
import torch

from ..distributed import gather_steps, image_share, merge_halves, split_recording
from ..models.adapters import CallInputs, adapter_for
from .sampling import kept_steps, sample_generators

# Prompts used when none are given: short, varied scenes (a user's own list comes with --prompts FILE).
DEFAULT_PROMPTS = (
    "a red fox in fresh snow", "a lighthouse on a cliff at sunset", "a bowl of ramen, top view",
    "an astronaut riding a horse", "a watercolor of a mountain lake", "a city street in the rain at night",
    "a close-up of a honeybee on a flower", "a wooden cabin in a pine forest",
)


def read_prompts(path):
    """One prompt a line (blank lines skipped); a file with none is refused."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file (one prompt a line)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path} is not UTF-8 text (one prompt a line)") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one a line)")
    return prompts


def is_pipeline_model(model):
    """A diffusers text-to-image transformer (sampled and calibrated through its pipeline)."""
    return bool(getattr(adapter_for(model), "pipeline", ""))


def has_pipeline_folder(transformer):
    """Whether `transformer` knows the pipeline folder it came from (load_pipeline can rebuild its pipeline)."""
    folder = getattr(transformer, "source", {}).get("path")
    return folder is not None and (Path(folder) / "model_index.json").exists()


def load_pipeline(transformer):
    """The family's pipeline from the folder the transformer came from, running `transformer` itself."""
    import diffusers

    folder = getattr(transformer, "source", {}).get("path")
    if not has_pipeline_folder(transformer):
        raise ValueError(f"{type(transformer).__name__} needs the pipeline folder it came from (model_index.json "
                         "beside transformer/, vae/, text encoders) to calibrate or sample")
    diffusers.utils.logging.disable_progress_bar()
    # the folder's own pipeline class, not DiffusionPipeline: where the transformer is an optional component
    # (Wan: transformer, transformer_2) DiffusionPipeline.from_pretrained loads it from disk over the one given
    name = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name")
    pipeline_class = getattr(diffusers, name, None) if name else None
    dtype = next(transformer.parameters()).dtype  # text encoders and VAE in the transformer's dtype, as diffusers runs them
    pipeline = (pipeline_class or diffusers.DiffusionPipeline).from_pretrained(folder, transformer=transformer,
                                                                               dtype=dtype)
    if pipeline.transformer is not transformer:
        raise RuntimeError(f"{type(pipeline).__name__} loaded its own transformer from {folder} instead of the "
                           "one given")
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
    if "num_frames" in settings and "num_frames" in inspect.signature(pipeline.__call__).parameters:
        kwargs["num_frames"] = settings["num_frames"]
    return {**fixed_call_settings(pipeline), **kwargs}


def fixed_call_settings(pipeline):
    """The call keywords TreeQ fixes for a pipeline (see the module docstring): resolution binning and
    caption cleaning off for PixArt and Sana (binning refuses any transformer not of a published size), and
    Sana's complex human instruction off."""
    parameters = inspect.signature(pipeline.__call__).parameters
    fixed = {"use_resolution_binning": False, "clean_caption": False, "complex_human_instruction": None}
    return {key: value for key, value in fixed.items() if key in parameters}


def pipeline_output(output, pipeline):
    """What a pipeline call made: its images, or for a video pipeline its frames (videos)."""
    return output.frames if is_video_pipeline(pipeline) else output.images


def is_video_pipeline(pipeline):
    """A text-to-video pipeline (it takes num_frames and returns frames, not images)."""
    return "num_frames" in inspect.signature(pipeline.__call__).parameters


@torch.no_grad()
def collect_pipeline_calibration(transformer, num_images=8, num_timesteps=4, seed=1234, prompts=None, **sampling):
    """CallInputs of the transformer at `num_timesteps` evenly spaced steps of `num_images` samples
    (prompts cycled from `prompts`, default DEFAULT_PROMPTS), through the pipeline of its folder."""
    settings = pipeline_settings(transformer, **sampling)
    pipeline = load_pipeline(transformer)
    share = image_share(num_images)  # under torchrun each rank records its images, then the calls are joined
    cycled = _cycled(prompts or DEFAULT_PROMPTS, num_images)
    prompts = [cycled[i] for i in share]
    call = _call_kwargs(pipeline, settings, prompts, sample_generators(seed, share))
    if not split_recording(num_images):
        return record_calibration(pipeline, num_timesteps, steps=settings["steps"], **call)
    calls = record_calibration(pipeline, num_timesteps, steps=settings["steps"], joined=False, **call)
    halves = [len(own) // len(share) for own in calls]  # a guided call runs its null rows, then its conditional rows
    return CallInputs.concat([merge_calls(parts, half) for parts, half in zip(gather_steps(calls), halves)])


def merge_calls(parts, halves):
    """One call's CallInputs from each rank's share of its rows (`halves` blocks of images each)."""
    return CallInputs({key: merge_halves([part.batched[key] for part in parts], halves) for key in parts[0].batched},
                      parts[0].shared)


@torch.no_grad()
def record_calibration(pipeline, num_timesteps=None, *, steps, joined=True, **call):
    """CallInputs of `pipeline.transformer` at `num_timesteps` evenly spaced of its `steps` denoising steps
    (None: every step) while `pipeline(**call)` runs; both halves of a guided batch are kept. joined=False:
    the list of the kept calls' CallInputs."""
    num_timesteps = steps if num_timesteps is None else num_timesteps
    keep = kept_steps(steps, num_timesteps)
    transformer = pipeline.transformer
    adapter, calls, step, last = adapter_for(transformer), [], [-1], [None]
    signature = inspect.signature(transformer.forward)

    def record(module, args, kwargs):
        named = signature.bind(*args, **kwargs).arguments
        # a new denoising step begins when the timestep changes: Wan calls the transformer twice a step
        # (conditional, then unconditional), the others once on the doubled batch
        now = _timestep_key(named.get("timestep"))
        if now is None or now != last[0]:
            step[0] += 1
        last[0] = now
        if step[0] % steps in keep:
            calls.append(CallInputs.from_call({k: v for k, v in named.items() if k != "return_dict"},
                                              adapter.shared_keys))

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipeline(**{**call, "num_inference_steps": steps})
    finally:
        handle.remove()
    return CallInputs.concat(calls) if joined else calls


def _timestep_key(timestep):
    if torch.is_tensor(timestep):
        return float(timestep.flatten()[0]) if timestep.numel() else None
    return None if timestep is None else float(timestep)


@torch.no_grad()
def sample_pipeline(transformer, num_samples, seed=0, prompts=None, batch_size=8, **sampling):
    """(uint8 pixels, prompts): sample i from its own generator seeded by (seed, i). Pixels are images
    (N, H, W, 3), or for a video family (Wan) videos (N, F, H, W, 3)."""
    settings = pipeline_settings(transformer, **sampling)
    pipeline = load_pipeline(transformer)
    prompts = _cycled(prompts or DEFAULT_PROMPTS, num_samples)
    images = []
    for start in range(0, num_samples, batch_size):
        indices = range(start, min(num_samples, start + batch_size))
        batch = [prompts[i] for i in indices]
        out = pipeline(**_call_kwargs(pipeline, settings, batch, sample_generators(seed, indices)))
        pixels = pipeline_output(out, pipeline)
        images.append(np.clip(np.asarray(pixels) * 255 + 0.5, 0, 255).astype(np.uint8))
    return np.concatenate(images), prompts


def _cycled(prompts, count):
    return [prompts[i % len(prompts)] for i in range(count)]
