"""Atomic file writes: a failure never leaves half a file where a good one was expected."""
import os
from pathlib import Path


def atomic_write(path, write):
    """Call `write(tmp_path)`, then rename the finished file onto `path` (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
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
}


def folder_kinds(folder):
    """The kinds of TreeQ output whose files `folder` holds (empty for an empty or foreign folder)."""
    folder = Path(folder)
    return {kind for kind, names in FOLDER_KINDS.items() if any((folder / name).exists() for name in names)}


def check_output(out, kind, inputs=(), overwrite=False):
    """Refuse an --out that would destroy or mix runs, before any work: one that is (or holds) an input of
    the command, a file, or a non-empty folder of another kind unless `overwrite`, which then removes it.
    A folder of the same kind is accepted: the commands resume or rewrite it themselves."""
    import shutil

    out = Path(out)
    resolved = out.resolve()
    for source in (Path(i) for i in inputs if i):
        if source.exists() and (source.resolve() == resolved or resolved in source.resolve().parents):
            raise ValueError(f"--out {out} is or holds its own input {source}; choose another --out")
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
