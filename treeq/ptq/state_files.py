"""A run's state on disk: one safetensors file, or shards written one at a time.

safetensors serialises a file's tensors as one buffer in memory, so writing a real model's state as one
file would hold a second copy of it. Shards of at most SHARD_BYTES bound that copy; a state below it
stays the single `state.safetensors` runs have always had.
"""
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..io import atomic_write
from ..models.checkpoint import CheckpointError

STATE_FILE = "state.safetensors"
SHARD_BYTES = 2 ** 29  # 512 MiB: the serialised shard sits beside the weights and codes (RESULTS, issue 30)
_SHARD = re.compile(r"state-(\d{5})-of-(\d{5})\.safetensors")


def shard_name(index, count):
    return f"state-{index + 1:05d}-of-{count:05d}.safetensors"


def write_state(folder, state, shard_bytes=SHARD_BYTES):
    """Write `state` ({key: tensor}) into `folder` in shards of at most `shard_bytes` (a tensor larger than
    that is a shard alone); returns the files written. Older state files of the folder are removed first."""
    folder = Path(folder)
    for path in state_files(folder, required=False):
        path.unlink()
    shards, size = [[]], 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = [STATE_FILE] if len(shards) == 1 else [shard_name(i, len(shards)) for i in range(len(shards))]
    for name, keys in zip(names, shards):
        tensors = _writable({key: state[key] for key in keys})
        atomic_write(folder / name, lambda p, tensors=tensors: save_file(tensors, str(p)))
    return [folder / name for name in names]


def _writable(tensors):
    """Detached, contiguous CPU tensors, each with its own storage (safetensors refuses shared ones):
    copies only where one of those does not hold already."""
    seen, out = set(), {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def state_files(folder, required=True):
    """The state file, or every shard in order; `required`: a folder with none (or missing shards) raises."""
    folder = Path(folder)
    shards = sorted(path for path in folder.glob("state-*-of-*.safetensors") if _SHARD.fullmatch(path.name))
    files = ([folder / STATE_FILE] if (folder / STATE_FILE).exists() else []) + shards
    if required:
        counts = {int(_SHARD.fullmatch(path.name).group(2)) for path in shards}
        if not files:
            raise FileNotFoundError(f"no such file: {folder / STATE_FILE} (the run folder is incomplete: "
                                    "quantize again)")
        if shards and (len(counts) != 1 or counts.pop() != len(shards)):
            raise CheckpointError(f"{folder}: state shards are missing or from two runs (the run folder is "
                                  "damaged; quantize again)")
    return files


def read_state(folder, device="cpu"):
    """The run's state dict from its file or shards; each problem one CheckpointError line."""
    state = {}
    for path in state_files(folder):
        try:
            state.update(load_file(str(path), device=str(device)))
        except Exception as error:  # safetensors raises its own types beside OSError and SafetensorError
            raise CheckpointError(f"{path} is not a readable safetensors file ({str(error).splitlines()[0]}): "
                                  "the run folder is damaged; quantize again") from None
    return state


def state_shapes(folder):
    """{key: shape} of the run's state, read off the files' headers (nothing loaded)."""
    shapes = {}
    for path in state_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})  # noqa: SIM118
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({str(error).splitlines()[0]})") from None
    return shapes


def state_bytes(folder):
    """Bytes the run's state files take on disk."""
    return sum(path.stat().st_size for path in state_files(folder))
