"""Calibration data: (x_t, t, y) model inputs recorded along full-precision sampling trajectories.

The quantizers, smoothing and GPTQ see what the model sees at inference: noisy inputs
at every stage of sampling, conditional and null-class halves of the guided batch.
Sets are deterministic under a seed and cached on disk, keyed by the model weights
and the settings, so repeated runs skip the sampling.
"""
import hashlib
import json
from pathlib import Path

import torch

from ..io import atomic_write
from ..diffusion.defaults import sampling_defaults
from ..diffusion.sampling import balanced_labels, sample

DEFAULT_CACHE = Path("runs") / "calibration"
# Part of every cache key: bump it when the collection changes (2: per-sample noise seeds), so a
# cache written by older code is never read as this code's set.
COLLECTION_VERSION = 2


def model_fingerprint(model):
    """A short hash of a model's weights and config: a cache key that changes with any weight."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def collect_calibration(model, num_images=32, num_timesteps=10, seed=1234, **sampling):
    """(x_t, t, y) at `num_timesteps` evenly spaced steps of the sampling trajectories of
    `num_images` images (labels balanced). With guidance each kept step adds 2 * num_images rows.
    Sampled on the model's device, kept on the CPU (the set is fed back in batches)."""
    settings = {**sampling_defaults(model), **sampling}
    if not 1 <= num_timesteps <= settings["steps"]:
        raise ValueError(f"num_timesteps must be in 1..{settings['steps']} (the sampler's steps), got {num_timesteps}")
    keep = set(torch.linspace(0, settings["steps"] - 1, num_timesteps).round().long().tolist())
    records, call = [], [0]

    def record(x, t, y):
        if call[0] % settings["steps"] in keep:
            records.append((x.cpu(), t.cpu(), y.cpu()))
        call[0] += 1

    labels = balanced_labels(num_images, model.config.num_classes)
    sample(model, labels, seed=seed, progress=False, on_model_input=record, batch_size=num_images, **settings)
    return tuple(torch.cat(parts) for parts in zip(*records))


def load_or_collect(model, cache_dir=DEFAULT_CACHE, **options):
    """`collect_calibration(model, **options)`, read from / written to a cache file keyed by both."""
    keyed = {**options, "collection_version": COLLECTION_VERSION}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    path = Path(cache_dir) / f"{model_fingerprint(model)}-{key}.pt"
    if path.exists():
        return tuple(torch.load(path, weights_only=True))
    calibration = collect_calibration(model, **options)
    atomic_write(path, lambda p: torch.save(list(calibration), p))
    return calibration


def spread_rows(calibration, rows):
    """`rows` calibration rows spread evenly over the set (it is ordered by sampling step)."""
    total = len(calibration[0])
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= total:
        raise ValueError(f"calibration_rows must be in 1..{total}, got {rows!r}")
    index = torch.linspace(0, total - 1, rows).round().long()
    return tuple(part[index] for part in calibration)
