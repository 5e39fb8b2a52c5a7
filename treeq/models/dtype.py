"""The floating-point type a run computes and stores in: named by a flag, or read from the checkpoint.

Published DiT checkpoints are bf16 or fp16; loading them in float32 doubles the memory of the largest
thing a run holds. "auto" keeps what the checkpoint's files hold, read from their safetensors headers
(nothing loaded); a checkpoint without one (an official `.pt`) loads in float32, as it is stored.
"""
from pathlib import Path

import torch

from ..flags import DTYPE_CHOICES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def torch_dtype(name):
    """torch dtype of a name in DTYPES."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def dtype_name(dtype):
    """The name of a torch floating dtype in DTYPES."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def checkpoint_dtype(spec):
    """The dtype name most of the checkpoint's floating tensors are stored in ("float32" when unknown)."""
    from safetensors import safe_open

    counts = {}
    for path in _weight_files(spec):
        with safe_open(str(path), framework="pt") as file:
            for key in file.keys():
                name = _SAFETENSORS_NAMES.get(file.get_slice(key).get_dtype())
                if name:
                    counts[name] = counts.get(name, 0) + 1
    return max(counts, key=counts.get) if counts else "float32"


def resolve_dtype(name, spec):
    """A concrete dtype name: `name`, or for "auto"/None the checkpoint's own."""
    if name in (None, "auto"):
        return checkpoint_dtype(spec)
    torch_dtype(name)
    return name


def check_device_dtype(name, device):
    """Refuse, before any weight loads, a dtype the device cannot compute in."""
    device = torch.device(device)
    if device.type == "cuda" and name == "bfloat16" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{device} cannot compute in bfloat16 (it needs compute capability 8.0 or newer); "
                         "use --dtype float16 or float32")
    if device.type == "cpu" and name == "float16" and not _cpu_runs_float16():
        raise ValueError("this CPU build of PyTorch cannot run float16 matrix products; use --dtype bfloat16 or "
                         "float32")


def _cpu_runs_float16():
    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
    except RuntimeError:
        return False
    return True


def _weight_files(spec):
    """The safetensors files of a model spec (an embedded testbed name, a TreeQ file, a diffusers folder)."""
    from ..testbed import EMBEDDED

    if spec in EMBEDDED:
        return [Path(EMBEDDED[spec]).with_suffix(".safetensors")]
    path = Path(spec)
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        return sorted(folder.glob("*.safetensors"))
    if path.with_suffix(".safetensors").exists():
        return [path.with_suffix(".safetensors")]
    return []
