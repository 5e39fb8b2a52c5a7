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
