"""Peak memory of the running command, reported at its end: what a user sizes a machine by.

Peak resident set size of the process (Linux reports ru_maxrss in KiB) and, where CUDA was
used, the peak GPU memory that PyTorch's allocator held.
"""
import resource

import torch


def peak_memory():
    """{"peak_rss_mb": ..., "peak_gpu_mb": ... or None} of this process so far."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu_mb = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2 ** 20
    return {"peak_rss_mb": round(rss_mb, 1), "peak_gpu_mb": None if gpu_mb is None else round(gpu_mb, 1)}


def describe_peak_memory():
    """One line: 'peak memory: RSS 3.70 GB, GPU 12.1 GB'."""
    peak = peak_memory()
    text = f"peak memory: RSS {peak['peak_rss_mb'] / 1024:.2f} GB"
    return text if peak["peak_gpu_mb"] is None else f"{text}, GPU {peak['peak_gpu_mb'] / 1024:.2f} GB"
