"""Atomic file writes: a failure never leaves half a file where a good one was expected."""
import json
import os
from pathlib import Path


def atomic_write(path, write):
    """Call `write(tmp_path)`, then rename the finished file onto `path` (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: torchrun ranks may write one cache file
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# What each command writes into its --out folder: a folder holding any of these is of that kind.
FOLDER_KINDS = {
    "run": ("config.json", "state.safetensors", "bits.json", "finetune_checkpoint.pt"),  # quantize, finetune
    "export": ("packed.json", "packed.safetensors", "torchao.json", "torchao.pt"),    # export
    "samples": ("sampling.json", "samples.npz", "parts"),                              # sample
    "training": ("checkpoint.pt", "model.safetensors", "model.json", "log.jsonl"),     # train
    "demo": ("report.html", "comparison.png"),                                          # demo
}


# Names other tools use too: they mark a folder's kind (check_output's same-kind rule) but not, alone,
# a TreeQ output to keep other outputs out of (a search's bits.json may stand in any folder).
COMMON_NAMES = {"bits.json", "config.json", "log.jsonl", "parts"}


def folder_kinds(folder, certain=False):
    """The kinds of TreeQ output whose files `folder` holds (empty for an empty or foreign folder); with
    `certain`, only by the files that command alone writes (not COMMON_NAMES)."""
    folder = Path(folder)
    return {kind for kind, names in FOLDER_KINDS.items()
            if any((folder / name).exists() for name in names if not (certain and name in COMMON_NAMES))}


# Files that make a folder a model: a diffusers pipeline, a transformer or VAE folder, weights.
MODEL_FILES = ("model_index.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
               "diffusion_pytorch_model.safetensors.index.json", "scheduler_config.json")
# Outputs that may be one file: kind -> (the command that writes it, how to tell a file it wrote (it may
# replace those), whether the output may be a folder instead: then the folder rules apply).
FILE_KINDS = {"bits": ("search", lambda path: _is_bit_config(path), False),   # a bit configuration (below)
              "model": ("init", lambda path: False, True)}                    # a checkpoint file or a folder


def is_model_folder(folder):
    """A diffusers pipeline, transformer, VAE or scheduler folder: a model's files, never an output."""
    folder = Path(folder)
    if any((folder / name).exists() for name in MODEL_FILES):
        return True
    config = folder / "config.json"
    try:
        return config.is_file() and "_class_name" in json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        return False


def _is_bit_config(path):
    from .bits import load_config  # bits writes through this module

    try:
        load_config(path)
    except (ValueError, OSError):
        return False
    return True


def check_output(out, kind, inputs=(), overwrite=False):
    """Refuse an --out that would destroy inputs or mix runs, before any work (one check for every command):
    - one that is, holds or lies inside an input of the command;
    - one that is or lies inside a model or pipeline folder, or lies inside a TreeQ output folder;
    - a file of a one-file kind (FILE_KINDS) that this kind did not write, unless `overwrite`;
    - a file where a folder goes, or a non-empty folder of another kind unless `overwrite`, which then
      removes it. A folder of the same kind is accepted: the commands resume or rewrite it themselves."""
    import shutil

    out = Path(out)
    resolved = out.resolve()
    for source in (Path(i) for i in inputs if i):
        if source.exists():
            source_path = source.resolve()
            if source_path == resolved or resolved in source_path.parents or source_path in resolved.parents:
                raise ValueError(f"--out {out} is, holds or lies inside its own input {source}; choose another --out")
    for folder in (resolved, *resolved.parents):
        if folder.is_dir() and is_model_folder(folder):
            raise ValueError(f"--out {out} would write into the model folder {folder}; choose another --out")
    for folder in resolved.parents:
        kinds = folder_kinds(folder, certain=True)
        if kinds:
            raise ValueError(f"--out {out} lies inside the TreeQ {', '.join(sorted(kinds))} folder {folder}; choose "
                             "another --out")
    if kind in FILE_KINDS and not (out.is_dir() and FILE_KINDS[kind][2]):
        command, ours, _ = FILE_KINDS[kind]
        if out.is_dir():
            raise ValueError(f"--out {out} is a directory; give a file, e.g. {out / 'bits.json'}")
        if out.exists() and not ours(out) and not overwrite:
            raise ValueError(f"--out {out} exists and is not a file `treeq {command}` wrote; choose another --out "
                             "or pass --overwrite to replace it")
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if not out.exists() or not any(out.iterdir()) or kind in folder_kinds(out):
        return
    held = ", ".join(sorted(folder_kinds(out))) or "other files"
    if not overwrite:
        raise ValueError(f"--out {out} already holds {held}, not a {kind} folder; choose another --out "
                         "or pass --overwrite to replace it")
    if resolved in (Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)):
        raise ValueError(f"--overwrite will not remove {out}: the working, home or root directory")
    shutil.rmtree(out)
