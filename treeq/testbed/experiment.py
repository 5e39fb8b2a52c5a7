"""Sample a model with its own sampling defaults and measure it: the loop every command and benchmark shares.

Samples are drawn with balanced labels and per-sample seeds, so a quantized model and the
full-precision model see identical noise and `psnr_vs_fp` compares like with like.
"""
import time

import torch

from ..diffusion.defaults import resolve_sampling
from ..diffusion.sampling import balanced_labels, sample


def generate(model, num_samples, seed=0, progress=True, **overrides):
    """(images, labels, seconds): `num_samples` model-space samples with balanced labels, drawn with
    the model's sampling defaults (treeq.diffusion.defaults) and `overrides` on top."""
    settings = resolve_sampling(model, **overrides)
    labels = balanced_labels(num_samples, model.config.num_classes)
    started = time.perf_counter()
    images = sample(model, labels, seed=seed, progress=progress, **settings)
    return images, labels, time.perf_counter() - started


def measure(images, labels, fp_images=None):
    """The paper-style metrics of a sample set (see treeq.eval.metrics.evaluate)."""
    from ..eval.metrics import evaluate
    return evaluate(images.clamp(-1, 1), labels, fp_images=None if fp_images is None else fp_images.clamp(-1, 1))


@torch.no_grad()
def sample_and_measure(model, num_samples, seed=0, fp_images=None, progress=True, **overrides):
    """(metrics, images, seconds) of `model`'s samples."""
    images, labels, seconds = generate(model, num_samples, seed, progress, **overrides)
    return measure(images, labels, fp_images), images, seconds
