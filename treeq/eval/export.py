"""Writing samples to disk: ADM-suite `.npz` batches and PNG grids for a quick look.

Both writes are atomic (temporary file, then rename), so an interrupted run never leaves a
truncated file that a later evaluation would read.
"""
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write


def _check_images(images):
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"need images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")


def to_uint8(images):
    """(N, C, H, W) in [-1, 1] -> uint8 NHWC RGB; rounds like DiT's sample_ddp.py (127.5 x + 128, truncated)."""
    _check_images(images)
    pixels = (127.5 * images.detach().float().cpu() + 128.0).clamp(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()  # ADM's evaluator expects RGB


def save_adm_npz(images, path):
    """Save samples as the `arr_0` uint8 NHWC array that ADM's evaluator (evaluator.py) reads."""
    arrays = to_uint8(images)

    def write(tmp):
        with open(tmp, "wb") as file:  # a file object, or numpy would append `.npz` to the temporary name
            np.savez(file, arr_0=arrays)

    atomic_write(path, write)
    return Path(path)


def image_grid(images, nrow, padding=2):
    """uint8 (rows * (H + padding) + padding, ...) RGB grid, `nrow` images per row, on white separators."""
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    pixels = to_uint8(images)
    count, height, width, _ = pixels.shape
    rows = -(-count // nrow)
    grid = np.full((rows * (height + padding) + padding, nrow * (width + padding) + padding, 3), 255, np.uint8)
    for index, image in enumerate(pixels):
        top = padding + (index // nrow) * (height + padding)
        left = padding + (index % nrow) * (width + padding)
        grid[top:top + height, left:left + width] = image
    return grid


def save_grid_png(images, path, nrow=8):
    """Write a PNG grid of samples for eyeballing (figures, run folders)."""
    from matplotlib.image import imsave

    grid = image_grid(images, nrow)
    atomic_write(path, lambda tmp: imsave(tmp, grid, format="png"))
    return Path(path)


def save_comparison_png(rows, path, per_row=10):
    """One labelled strip of samples per (title, images) pair, stacked: settings side by side at a glance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(rows), 1, figsize=(per_row * 0.55 + 1.5, len(rows) * 0.75 + 0.2), squeeze=False)
    for axis, (title, images) in zip(axes[:, 0], rows):
        axis.imshow(image_grid(images[:per_row], per_row))
        axis.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)
    return Path(path)
