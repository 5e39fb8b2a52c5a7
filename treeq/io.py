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
