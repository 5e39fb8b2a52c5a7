"""Writing samples to disk: ADM-suite `.npz` batches and PNG grids for a quick look.

Every write is atomic (temporary file, then rename), so an interrupted run never leaves a
truncated file that a later evaluation would read. Part files gather into one `.npz` by
streaming, so 50K ImageNet samples never sit in memory at once.
"""
import zipfile
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


def save_adm_npz_parts(paths, path):
    """One ADM `.npz` (arr_0: uint8 NHWC images, arr_1: labels) from part files holding `images` and
    `labels`, streamed part by part into the archive's arr_0.npy."""
    paths = [Path(p) for p in paths]
    labels, shape = [], None
    for part_path in paths:
        with np.load(part_path) as part:
            labels.append(part["labels"])
            images = part["images"]
            if images.dtype != np.uint8 or images.ndim != 4 or (shape is not None and images.shape[1:] != shape):
                raise ValueError(f"{part_path}: images {images.dtype} {images.shape} do not match the other parts")
            shape = images.shape[1:]
    labels = np.concatenate(labels)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(labels), *shape)}

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for part_path in paths:
                    with np.load(part_path) as part:
                        member.write(np.ascontiguousarray(part["images"]).tobytes())
            with archive.open("arr_1.npy", "w") as member:
                np.lib.format.write_array(member, labels)

    atomic_write(path, write)
    return Path(path)


def image_grid(images, nrow, padding=2):
    """uint8 (rows * (H + padding) + padding, ...) RGB grid, `nrow` images per row, on white separators.
    `images`: (N, C, H, W) floats in [-1, 1], or uint8 NHWC RGB as to_uint8 returns."""
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    pixels = images if isinstance(images, np.ndarray) else to_uint8(images)
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
