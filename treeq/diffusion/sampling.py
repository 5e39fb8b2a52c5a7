"""Sampling a class-conditional DiT with diffusers' schedulers and classifier-free guidance.

Three samplers share one loop: DDPM with the learned-range variance DiT was trained
for, DDIM, and DPM-Solver++ (2nd order, the default: 20 steps suffice). All noise
comes from one seeded generator, so a seed and a batch size fix the samples: the
full-precision and a quantized model see identical noise, which PSNR-vs-FP needs.
"""
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tqdm import tqdm

from .loss import NUM_TRAIN_TIMESTEPS

SAMPLERS = ("dpm++", "ddim", "ddpm")
_SCHEDULE = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def make_scheduler(sampler, clip_sample=False):
    """A fresh diffusers scheduler for `sampler` on DiT's 1000-step linear schedule."""
    if sampler == "ddpm":
        return DDPMScheduler(**_SCHEDULE, variance_type="learned_range", clip_sample=clip_sample)
    if sampler == "ddim":
        return DDIMScheduler(**_SCHEDULE, clip_sample=clip_sample, set_alpha_to_one=False)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(**_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


@torch.no_grad()
def denoise_loop(model, noise, labels, *, sampler="dpm++", steps=20, cfg_scale=1.0, null_class=None,
                 clip_sample=False, guidance_channels=None, generator=None, on_model_input=None, bar=None):
    """One batch from noise to images. `on_model_input(x, t, y)` sees every model call's inputs
    (calibration collects them there); with guidance these are the doubled cond + null batch."""
    scheduler = make_scheduler(sampler, clip_sample)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    channels = noise.shape[1]
    guided = cfg_scale != 1.0
    if guided:
        y_in = torch.cat([labels, torch.full_like(labels, null_class)])
    for t in scheduler.timesteps:
        t_batch = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
        if guided:
            x_in, t_in = torch.cat([x, x]), torch.cat([t_batch, t_batch])
            if on_model_input is not None:
                on_model_input(x_in, t_in, y_in)
            out = model.forward_with_cfg(x_in, t_in, y_in, cfg_scale, guidance_channels)[: len(x)]
        else:
            if on_model_input is not None:
                on_model_input(x, t_batch, labels)
            out = model(x, t_batch, labels)
        if sampler != "ddpm":
            out = out[:, :channels]  # DDIM and DPM-Solver++ use epsilon only
        x = scheduler.step(out, t, x, generator=generator).prev_sample
        if bar is not None:
            bar.update(len(x))
    return x.clamp(-1, 1) if clip_sample else x


@torch.no_grad()
def sample(model, labels, *, sampler="dpm++", steps=20, cfg_scale=1.0, seed=0, batch_size=250,
           clip_sample=False, guidance_channels=None, progress=True, on_model_input=None):
    """Images for `labels` (N,), generated in batches; noise drawn from `seed` batch by batch."""
    config = model.config
    shape = (config.in_channels, config.input_size, config.input_size)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    images = []
    # counts image-steps, so the bar moves within a batch too
    with tqdm(total=len(labels) * steps, desc=f"sample ({sampler}, {steps} steps)", unit="img-step",
              unit_scale=True, disable=not progress) as bar:
        for start in range(0, len(labels), batch_size):
            y = labels[start:start + batch_size].to(device)
            noise = torch.randn((len(y), *shape), generator=generator, device=device)
            images.append(denoise_loop(model, noise, y, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                       null_class=config.num_classes, clip_sample=clip_sample,
                                       guidance_channels=guidance_channels, generator=generator,
                                       on_model_input=on_model_input, bar=bar))
    return torch.cat(images)


def balanced_labels(num_samples, num_classes):
    """0, 1, ..., num_classes-1, 0, 1, ...: equal counts per class, as papers sample for FID."""
    return torch.arange(num_samples) % num_classes
