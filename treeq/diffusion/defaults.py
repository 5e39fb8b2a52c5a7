"""Sampling defaults that travel with a model: the testbed's, the official DiT's FID settings, a pipeline's own.

Loaders store them on the model as `model.sampling`, a plain dict of `sample()` keywords, so a
deep copy (as `quantize` makes) keeps them. `sampling_defaults(model)` reads them back; for a
model built elsewhere it infers them from the config (pixel space: testbed, latent: official DiT).
"""
import copy

# Every key is a keyword of treeq.diffusion.sampling.sample; flags override them one by one.
KEYS = ("sampler", "steps", "cfg_scale", "guidance_channels", "clip_sample", "scheduler")

# The embedded MNIST testbed: DPM-Solver++ in 20 steps; pixel samples clipped to the data range.
TESTBED = dict(sampler="dpm++", steps=20, cfg_scale=4.0, guidance_channels=None, clip_sample=True, scheduler=None)

# facebookresearch/DiT sample_ddp.py, the settings behind the paper's FID-50K: 250 DDPM steps with
# the learned variance, cfg 1.5, and guidance on the first three of the four latent channels
# (models.py forward_with_cfg guides `model_out[:, :3]`, a quirk the FID numbers include).
OFFICIAL = dict(sampler="ddpm", steps=250, cfg_scale=1.5, guidance_channels=3, clip_sample=False, scheduler=None)


def pipeline_defaults(scheduler_config):
    """A diffusers DiTPipeline's own behaviour: its saved scheduler, its call defaults
    (50 steps, guidance 4.0) and guidance on every latent channel."""
    return dict(sampler="pipeline", steps=50, cfg_scale=4.0, guidance_channels=None, clip_sample=False,
                scheduler=dict(scheduler_config))


def check_sampling(settings):
    """`settings` if it holds exactly the sampling keys with usable values, else ValueError."""
    from .sampling import SAMPLERS

    if set(settings) != set(KEYS):
        raise ValueError(f"sampling defaults need exactly the keys {', '.join(KEYS)}; got {', '.join(sorted(settings))}")
    if settings["sampler"] not in SAMPLERS:
        raise ValueError(f"unknown sampler {settings['sampler']!r}; choose one of {', '.join(SAMPLERS)}")
    if settings["sampler"] == "pipeline" and not isinstance(settings["scheduler"], dict):
        raise ValueError("sampler 'pipeline' needs the pipeline's scheduler config; this model carries none")
    if not isinstance(settings["steps"], int) or settings["steps"] < 1:
        raise ValueError(f"steps must be a positive integer, got {settings['steps']!r}")
    cfg = settings["cfg_scale"]  # NaN would pass every comparison and be recorded as a setting no run matches
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not 0 <= cfg < float("inf"):
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg!r}")
    return settings


def set_sampling_defaults_(model, settings):
    """Store `settings` (a dict with every key of KEYS) on `model` as `model.sampling`; returns `model`."""
    model.sampling = check_sampling(copy.deepcopy(dict(settings)))
    return model


def sampling_defaults(model):
    """A fresh dict of `model`'s sampling defaults: those its loader stored, else inferred from its config."""
    stored = getattr(model, "sampling", None)
    if stored is not None:
        return copy.deepcopy(stored)
    pixel_space = model.config.in_channels in (1, 3)
    return copy.deepcopy(TESTBED if pixel_space else OFFICIAL)


def resolve_sampling(model, **overrides):
    """`model`'s defaults with every override that is not None applied: the settings a run uses."""
    settings = sampling_defaults(model)
    unknown = sorted(set(overrides) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown sampling settings: {', '.join(unknown)}")
    settings.update({key: value for key, value in overrides.items() if value is not None})
    channels = settings["guidance_channels"]
    if channels is not None and not 1 <= channels <= model.config.in_channels:
        raise ValueError(f"guidance_channels must be in 1..{model.config.in_channels} (the model's noise channels), "
                         f"got {channels}")
    return check_sampling(settings)
