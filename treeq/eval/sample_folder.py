"""`treeq sample` at scale: a model (latents decoded through its VAE) sampled into a folder of parts,
resumable and shardable over torchrun processes, then gathered into ADM's `.npz`.

The run is cut into batches of consecutive sample indices; batch b belongs to rank b % world_size.
A batch's images depend only on its indices (per-sample seeds, fixed batch composition), so any
number of processes writes the same parts, bit for bit. Each part is renamed into place when
complete, so an interrupted run resumes at the parts still missing.
"""
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..diffusion.sampling import progress_bar, sample
from ..distributed import barrier
from .export import save_adm_npz, save_adm_npz_parts, save_grid_png, to_uint8
from ..io import atomic_write

RECORD = "sampling.json"  # the run's settings; a resumed run must match them
PARTS = "parts"           # parts/<first index>.npz: images (uint8 NHWC) and labels of one batch
SAMPLES = "samples.npz"   # arr_0: uint8 NHWC images, arr_1: labels (as ADM's image_sample.py writes)
def latent_decoder(model, vae_path, device):
    """(VAE or None, its path): `vae_path`, else the VAE the model's pipeline folder brought, in the model's
    dtype. A model that samples latents without one is an error; pixel-space models need none."""
    from ..diffusion.vae import load_vae

    vae_path = vae_path or getattr(model, "source", {}).get("vae")
    if vae_path is None:
        if model.config.in_channels not in (1, 3):
            raise ValueError(f"the model samples {model.config.in_channels}-channel latents; give --vae FOLDER "
                             "(a diffusers AutoencoderKL such as stabilityai/sd-vae-ft-ema) to decode them")
        return None, None
    # nn.Module.to: diffusers' own `to` warns about dtype casts that this plain VAE does not need
    vae = torch.nn.Module.to(load_vae(vae_path), device=device, dtype=next(model.parameters()).dtype)
    if vae.config.latent_channels != model.config.in_channels:
        raise ValueError(f"the VAE at {vae_path} has {vae.config.latent_channels} latent channels, "
                         f"the model samples {model.config.in_channels}")
    return vae, str(vae_path)


def resolve_classes(classes, num_classes, id2label=None):
    """Class ids from a comma-separated list of ids and/or label names (any synonym in id2label)."""
    if not classes:
        return None
    names = {}
    for index, label in (id2label or {}).items():
        for synonym in label.split(","):
            names[synonym.strip().lower()] = int(index)
    ids = []
    for item in (part.strip() for part in classes.split(",")):
        if item.isdigit():
            ids.append(int(item))
        elif item.lower() in names:
            ids.append(names[item.lower()])
        else:
            raise ValueError(f"unknown class {item!r}: give class ids or names of the model's id2label")
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f"class ids must be in 0..{num_classes - 1}, got {bad}")
    return ids


def run_labels(indices, num_classes, classes=None):
    """Labels of sample indices: balanced over all classes (i mod num_classes), or cycling `classes`."""
    indices = torch.as_tensor(indices)
    if classes is None:
        return indices % num_classes
    return torch.tensor(classes)[indices % len(classes)]


def check_room(out, num_samples, sample_bytes, in_memory=False):
    """Refuse, before any sampling, a sample count whose files (the parts and samples.npz: twice the pixels)
    do not fit the disk under `out`, or whose pixels, where a pipeline holds them all, the free memory."""
    import os
    import shutil

    folder = Path(out).resolve()
    while not folder.exists():
        folder = folder.parent
    need = 2 * num_samples * sample_bytes
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ValueError(f"--num-samples {num_samples} needs about {need / 1e9:.3g} GB on disk for its parts and "
                         f"samples.npz; {folder} has {free / 1e9:.3g} GB free")
    memory = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if in_memory and num_samples * sample_bytes > memory:
        raise ValueError(f"--num-samples {num_samples} holds about {num_samples * sample_bytes / 1e9:.3g} GB of "
                         f"pixels in memory; {memory / 1e9:.3g} GB are free: sample in several runs")


def batches(num_samples, batch_size):
    return [(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def _part_path(out, start):
    return Path(out) / PARTS / f"{start:08d}.npz"


def _check_record(out, record, rank):
    """Write the run's record, or check that a resumed run asks for the same one."""
    path = Path(out) / RECORD
    text = json.dumps(record, indent=2, sort_keys=True)
    if rank == 0 and not path.exists():
        atomic_write(path, lambda p: p.write_text(text))
    barrier()
    if not path.exists():  # a rank run by hand, outside a process group (as tests do)
        atomic_write(path, lambda p: p.write_text(text))
    stored = json.loads(path.read_text())
    changed = sorted(k for k in set(stored) | set(record) if stored.get(k) != record.get(k))
    if changed:
        raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)}); "
                         "resume with the same flags or choose another --out")


def sample_to_folder(model, out, *, num_samples, settings, seed=0, batch_size=16, vae=None, classes=None,
                     record=None, rank=0, world_size=1, progress=True):
    """Sample `num_samples` images into `out` (see module docstring); rank 0 gathers samples.npz and
    grid.png once every part exists. Returns {"written": images this process drew, "seconds": ...}."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples} and {batch_size}")
    side = model.config.input_size * (1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1))
    check_room(out, num_samples, side * side * 3)
    record = {**(record or {}), "num_samples": num_samples, "seed": seed, "batch_size": batch_size,
              "classes": classes, "sampling": settings}
    _check_record(out, record, rank)
    mine = [b for b in batches(num_samples, batch_size)[rank::world_size] if not _part_path(out, b[0]).exists()]
    todo = sum(end - start for start, end in mine)
    desc = f"sample ({settings['sampler']}, {settings['steps']} steps)" + (f" rank 0/{world_size}" if world_size > 1 else "")
    started = time.perf_counter()
    with progress_bar(todo, settings["steps"], desc, disable=not progress or rank != 0) as bar:
        for start, end in mine:
            indices = torch.arange(start, end)
            labels = run_labels(indices, model.config.num_classes, classes)
            images = sample(model, labels, seed=seed, indices=indices, batch_size=end - start, progress=False,
                            bar=bar, **settings)
            if vae is not None:
                from ..diffusion.vae import decode
                images = decode(vae, images, batch_size=end - start)
            pixels = to_uint8(images)
            atomic_write(_part_path(out, start), lambda p: _save_part(p, pixels, labels.numpy()))
    seconds = time.perf_counter() - started
    barrier()
    if rank == 0:
        parts = [_part_path(out, start) for start, _ in batches(num_samples, batch_size)]
        save_adm_npz_parts(parts, Path(out) / SAMPLES)
        with np.load(parts[0]) as first:
            grid = first["images"][:100]
        for path in parts[1:]:
            if len(grid) >= 100:
                break
            with np.load(path) as part:
                grid = np.concatenate([grid, part["images"][:100 - len(grid)]])
        save_grid_png(grid, Path(out) / "grid.png", nrow=min(10, len(grid)))
    return {"written": todo, "seconds": seconds}


def sample_family_to_folder(model, out, *, num_samples, seed=0, batch_size=8, prompts=None, record=None,
                            **sampling):
    """A text-to-image family's samples through its own pipeline: samples.npz (ADM's arr_0), grid.png,
    prompts.txt and sampling.json (settings and prompts), each written atomically.

    A video family (Wan) also writes videos.npz (arr_0: every frame, uint8 (N, F, H, W, 3)); samples.npz and
    grid.png then hold each video's middle frame, so image tools (FID, the grid) read one image per sample."""
    from ..diffusion.pipelines import pipeline_settings, sample_pipeline

    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples} and {batch_size}")
    settings = pipeline_settings(model, **sampling)
    check_room(out, num_samples, settings.get("num_frames", 1) * settings["height"] * settings["width"] * 3,
               in_memory=True)
    started = time.perf_counter()
    pixels, used = sample_pipeline(model, num_samples, seed, prompts, batch_size, **sampling)
    out, videos = Path(out), pixels.ndim == 5
    if videos:  # (N, F, H, W, 3)
        atomic_write(out / "videos.npz", lambda p: _save_npz(p, arr_0=pixels))
        pixels = np.ascontiguousarray(pixels[:, pixels.shape[1] // 2])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # back to [-1, 1] for the writers
    save_adm_npz(images, out / SAMPLES)
    save_grid_png(pixels[:100], out / "grid.png", nrow=min(10, num_samples))
    atomic_write(out / "prompts.txt", lambda p: p.write_text("\n".join(used) + "\n"))
    settings = {**(record or {}), "num_samples": num_samples, "seed": seed, "batch_size": batch_size,
                "sampling": pipeline_settings(model, **sampling), "prompts": used}
    atomic_write(out / "sampling.json", lambda p: p.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n"))
    return {"written": num_samples, "seconds": time.perf_counter() - started, "videos": videos}


def _save_npz(path, **arrays):
    with open(path, "wb") as file:  # a file object, or numpy would append `.npz` to the temporary name
        np.savez(file, **arrays)


def _save_part(path, pixels, labels):
    with open(path, "wb") as file:  # a file object, or numpy would append `.npz` to the temporary name
        np.savez(file, images=pixels, labels=labels)


def read_samples(folder):
    """(images uint8 NHWC, labels or None, record or None) of a sample folder or an ADM .npz file."""
    path = Path(folder)
    npz = path / SAMPLES if path.is_dir() else path
    if not npz.exists():
        raise FileNotFoundError(f"no samples at {npz} (run `treeq sample --out {folder}` first)")
    with np.load(npz) as data:
        images = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data.files else None
    record_path = npz.parent / RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    return images, labels, record
