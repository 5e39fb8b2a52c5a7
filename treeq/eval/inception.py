"""Optional Inception-v3 FID, for comparing with numbers reported on ImageNet-scale models, and the
measuring of a sample folder written by `treeq sample`.

Wraps torchmetrics' FrechetInceptionDistance with a local weights file (torch-fidelity's
`pt_inception-2015-12-05-6726825d.pth`); nothing is downloaded. torchmetrics builds its Inception
from torch-fidelity, which depends on torchvision, so this works only where both are installed
(`pip install treeq[fid]`). Without them the ADM `.npz` is the interface: ADM's evaluator reads it.
"""
from pathlib import Path

import numpy as np
import torch


def _to_unit_rgb(images):
    """[-1, 1] (N, 1 or 3, H, W) -> [0, 1] RGB floats; Inception resizes to 299x299 itself."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"need images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    return ((images.float() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)


def inception_fid(images, reference_images, weights_path, batch_size=100):
    """FID between two image sets in [-1, 1], on Inception pool features loaded from `weights_path`."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"no Inception weights at {weights_path}")
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics builds its Inception from it)
    except ImportError:
        raise ModuleNotFoundError("Inception FID needs torch-fidelity (and the torchvision it depends on); "
                                  "install both in an environment with a matching torch") from None
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights_path))
    for batch in _to_unit_rgb(reference_images).split(batch_size):
        metric.update(batch, real=True)
    for batch in _to_unit_rgb(images).split(batch_size):
        metric.update(batch, real=False)
    return metric.compute().item()


def from_uint8(pixels):
    """uint8 NHWC -> (N, C, H, W) floats in [-1, 1] (the inverse of to_uint8 up to its truncation)."""
    return (torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() - 127.5) / 127.5


def evaluate_folder(samples, inception_weights=None, reference=None):
    """Metrics of the images in a sample folder (or ADM .npz): Inception FID against `reference` when
    weights are given; else, for testbed-sized digits, the reference-classifier metrics."""
    from .sample_folder import read_samples

    images, labels, _ = read_samples(samples)
    result = {"num_samples": len(images)}
    if inception_weights:
        if not reference:
            raise ValueError("Inception FID needs --reference (an ADM reference .npz or a sample folder)")
        reference_images = read_samples(reference)[0]
        try:
            result["inception_fid"] = inception_fid(from_uint8(images), from_uint8(reference_images),
                                                    inception_weights)
        except ModuleNotFoundError as error:  # an expected failure: one line from the CLI, not a traceback
            raise ValueError(f"{error} (pip install treeq[fid])") from None
        return result
    height, width, channels = images.shape[1:]
    if (height, width) != (32, 32) or labels is None:
        raise ValueError(f"no built-in metric for {height}x{width} samples: give --inception-weights and "
                         "--reference, or run ADM's evaluator (python evaluator.py REF.npz SAMPLES.npz)")
    from .metrics import evaluate
    digits = from_uint8(images)[:, :1]  # the testbed's grey digits were written as three equal channels
    return {**result, **evaluate(digits, torch.from_numpy(labels).long())}
