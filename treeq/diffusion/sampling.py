"""Sampling a class-conditional DiT with diffusers' schedulers and classifier-free guidance.

Four samplers share one loop: DDPM with the learned-range variance DiT was trained for,
DDIM, DPM-Solver++ (2nd order: 20 steps suffice) on DiT's linear schedule, and "pipeline",
the scheduler a diffusers pipeline saved. Sample i draws all its noise from its own
generator seeded by (seed, i), so a sample does not depend on the batch size, the batch it
lands in or the process that draws it: the full-precision and a quantized model see
identical noise (PSNR-vs-FP needs that), and sharded runs reproduce a single process.
"""
import copy

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tqdm import tqdm

from .loss import NUM_TRAIN_TIMESTEPS

SAMPLERS = ("dpm++", "ddim", "ddpm", "pipeline")
_SCHEDULE = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def kept_steps(steps, num_timesteps):
    """The indices of `num_timesteps` evenly spaced steps of `steps` (first and last kept): where calibration
    and trajectory states are recorded."""
    if not 1 <= num_timesteps <= steps:
        raise ValueError(f"num_timesteps must be in 1..{steps} (the sampler's steps), got {num_timesteps}")
    return set(torch.linspace(0, steps - 1, num_timesteps).round().long().tolist())


def make_scheduler(sampler, clip_sample=False, scheduler=None, learn_sigma=True):
    """A fresh diffusers scheduler: `sampler` on DiT's 1000-step linear schedule, or for
    sampler "pipeline" the scheduler described by the diffusers config dict `scheduler`."""
    if sampler == "pipeline":
        return scheduler_from_config(scheduler)
    if sampler == "ddpm":
        # "linspace" keeps 0 and 999 and strides evenly between, as ADM's space_timesteps("250") does
        return DDPMScheduler(**_SCHEDULE, variance_type="learned_range" if learn_sigma else "fixed_small",
                             clip_sample=clip_sample, timestep_spacing="linspace")
    if sampler == "ddim":
        return DDIMScheduler(**_SCHEDULE, clip_sample=clip_sample, set_alpha_to_one=False)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(**_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def scheduler_from_config(config):
    """The diffusers scheduler a saved `scheduler_config.json` (as a dict) names, built from it."""
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ValueError("sampler 'pipeline' needs a diffusers scheduler config with a _class_name")
    cls = getattr(diffusers, config["_class_name"], None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"{config['_class_name']!r} is not a diffusers scheduler")
    return cls.from_config(config)


def sample_seed(seed, index):
    """The generator seed of sample `index` in a run seeded `seed`: a hash of the pair (seed, index)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and sample index must be non-negative, got ({seed}, {index})")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def sample_generators(seed, indices):
    """One CPU generator per sample: CPU draws are the same on every device and thread count."""
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]


def initial_noise(generators, shape):
    """(N, *shape) float32 standard normal on the CPU, row i from generators[i] (as diffusers'
    randn_tensor draws with a list of generators)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


@torch.no_grad()
def denoise_loop(model, noise, labels, *, sampler="dpm++", steps=20, cfg_scale=1.0, null_class=None,
                 clip_sample=False, guidance_channels=None, scheduler=None, generator=None,
                 on_model_input=None, on_step=None, bar=None):
    """One batch from noise to model-space samples (pixels or latents). `on_model_input(x, t, y)`
    sees every model call's inputs (calibration collects them there); with guidance these are the
    doubled cond + null batch. `on_step(x, t, out, advance)` sees each step before it is taken: the
    sampler's latent, the (guided) model output and `advance(o)`, the latent this step would reach from
    output o, on a copy of the sampler's state (trajectory states are measured there). The scheduler
    runs in float32 whatever the model's dtype."""
    learn_sigma = getattr(model.config, "learn_sigma", True)
    scheduler = make_scheduler(sampler, clip_sample, scheduler, learn_sigma)
    scheduler.set_timesteps(steps)
    model_dtype = next(model.parameters()).dtype
    x = noise.float() * scheduler.init_noise_sigma
    # DDPM with a learned variance reads the variance channels; every other step takes epsilon only
    full_output = scheduler.config.get("variance_type") in ("learned", "learned_range")
    guided = cfg_scale != 1.0
    if guided:
        y_in = torch.cat([labels, torch.full_like(labels, null_class)])
    for t in scheduler.timesteps:
        x_model = scheduler.scale_model_input(x, t)
        t_batch = torch.as_tensor(t, device=x.device).expand(len(x))
        if guided:
            x_in, t_in = torch.cat([x_model, x_model]), torch.cat([t_batch, t_batch])
            if on_model_input is not None:
                on_model_input(x_in, t_in, y_in)
            out = model.forward_with_cfg(x_in.to(model_dtype), t_in, y_in, cfg_scale, guidance_channels)[: len(x)]
        else:
            if on_model_input is not None:
                on_model_input(x_model, t_batch, labels)
            out = model(x_model.to(model_dtype), t_batch, labels)
        out = out.float()
        if on_step is not None:
            on_step(x, t, out, lambda o, x=x, t=t: _advance(copy.deepcopy(scheduler), o, t, x, _cloned(generator),
                                                             full_output))
        x = _advance(scheduler, out, t, x, generator, full_output)
        if bar is not None:
            bar.update(len(x))
    return x.clamp(-1, 1) if clip_sample else x


def _advance(scheduler, out, t, x, generator, full_output):
    """The step the sampler takes from model output `out`: DDPM with a learned variance reads the variance
    channels, every other sampler the first len(x's channels) (epsilon) only."""
    if not full_output:
        out = out[:, :x.shape[1]]
    return scheduler.step(out, t, x, generator=generator).prev_sample


def _cloned(generators):
    """Copies of the samples' generators: a probed step draws the noise the real step will draw."""
    if generators is None:
        return None
    return [torch.Generator().set_state(g.get_state()) for g in generators]


@torch.no_grad()
def sample(model, labels, *, sampler="dpm++", steps=20, cfg_scale=1.0, seed=0, batch_size=250,
           clip_sample=False, guidance_channels=None, scheduler=None, indices=None, progress=True,
           on_model_input=None, on_step=None, bar=None):
    """Model-space samples (float32) for `labels` (N,), in batches on the model's device.

    Sample k is the run's sample number `indices[k]` (default k) and draws its noise from seed
    (seed, indices[k]), so any batching or sharding of a run gives the same samples. `bar`: an
    open progress_bar to advance instead of a new one.
    """
    config = model.config
    shape = (config.in_channels, config.input_size, config.input_size)
    device = next(model.parameters()).device
    indices = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices)
    if len(indices) != len(labels):
        raise ValueError(f"{len(indices)} sample indices for {len(labels)} labels")
    images = []
    with progress_bar(len(labels), steps, f"sample ({sampler}, {steps} steps)", disable=not progress) as own_bar:
        bar = own_bar if bar is None else bar
        for start in range(0, len(labels), batch_size):
            y = labels[start:start + batch_size].to(device)
            generators = sample_generators(seed, indices[start:start + batch_size])
            noise = initial_noise(generators, shape).to(device)
            images.append(denoise_loop(model, noise, y, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                       null_class=config.num_classes, clip_sample=clip_sample,
                                       guidance_channels=guidance_channels, scheduler=scheduler,
                                       generator=generators, on_model_input=on_model_input, on_step=on_step,
                                       bar=bar))
    return torch.cat(images)


def progress_bar(num_images, steps, desc, disable=False, initial_images=0):
    """A bar in images (images/s and ETA) that moves with every sampling step: it counts image-steps
    and tqdm's unit_scale divides them by `steps`."""
    return tqdm(total=num_images * steps, initial=initial_images * steps, desc=desc, unit="img",
                unit_scale=1 / steps, disable=disable, dynamic_ncols=True)


def balanced_labels(num_samples, num_classes, start=0):
    """start, start+1, ... modulo num_classes: equal counts per class, as papers sample for FID."""
    return torch.arange(start, start + num_samples) % num_classes
