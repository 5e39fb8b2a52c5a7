"""Sharding a command over processes started by `torchrun`: rank, world size, device and barriers.

Without torchrun's environment (WORLD_SIZE unset or 1) everything is a no-op, so the same code
runs in one process. Processes talk over gloo on the CPU and NCCL on GPUs.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

# Ranks that finish their share early wait at the final barrier for the slowest; a 50K-sample run
# on a few devices can take hours, far past torch's 30-minute default.
TIMEOUT = timedelta(hours=48)


def world():
    """(rank, world_size) from torchrun's environment; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_device(device):
    """torch.device(device), refusing one this machine lacks in one line that names what it has."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = "cpu" + (f", cuda:0..{count - 1}" if count else "")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device} is not a device; available here: {available}") from None
    if parsed.type not in ("cpu", "cuda") or (parsed.type == "cuda" and (parsed.index or 0) >= count):
        raise ValueError(f"--device {device} is not available here; available: {available}")
    return parsed


def setup(device):
    """Join the process group when started by torchrun; returns (rank, world_size, device), the device
    made per-process (cuda:LOCAL_RANK) for CUDA."""
    rank, world_size = world()
    device = check_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return rank, world_size, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def _group():
    """(rank, world_size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def image_share(num_images):
    """The images (indices, contiguous, in order) this rank records when a recording is split over the process
    group; all of them alone or when there are fewer images than ranks."""
    rank, world_size = _group()
    if world_size == 1 or num_images < world_size:
        return torch.arange(num_images)
    return torch.tensor_split(torch.arange(num_images), world_size)[rank]


def split_recording(num_images):
    """Whether image_share splits a recording of `num_images` over ranks."""
    return len(image_share(num_images)) < num_images


def gather_steps(steps):
    """Every rank's records of a split recording, step by step: [[rank 0's step s, rank 1's step s, ...], ...]
    (all ranks record the same steps); [[step s]] alone."""
    _, world_size = _group()
    if world_size == 1:
        return [[step] for step in steps]
    everyone = [None] * world_size
    dist.all_gather_object(everyone, steps)
    if len({len(records) for records in everyone}) != 1:
        raise RuntimeError("the ranks of a split recording recorded different numbers of steps")
    return [list(parts) for parts in zip(*everyone)]


def join_steps(inputs, weights, concat):
    """A split recording's kept steps joined over ranks: (inputs, weights) per step, each step's states rank after
    rank (states are state-major); `concat` joins a list of ranks' inputs of one step."""
    steps = gather_steps(list(zip(inputs, weights)))
    return ([concat([rank[0] for rank in ranks]) for ranks in steps],
            [torch.cat([rank[1] for rank in ranks]) for ranks in steps])


def merge_halves(parts, halves):
    """One tensor from each rank's rows of one model call, as the whole batch would hold them: each part is
    `halves` blocks of its images' rows (a guided batch: conditional and null, or null and conditional); the
    blocks are joined over ranks, half by half."""
    if halves == 1:
        return torch.cat(parts)
    return torch.cat([torch.cat([part.chunk(halves)[half] for part in parts]) for half in range(halves)])


def decide(value):
    """Rank 0's `value` on every rank (e.g. whether a cache file exists: every rank then takes the same path)."""
    _, world_size = _group()
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_writer():
    return _group()[0] == 0
