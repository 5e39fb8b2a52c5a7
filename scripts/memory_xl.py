"""Resident memory of a fake-quantized DiT by component (treeq.memory.resident_bytes) against the
per-layer formula's projection from its shapes, and the process's peak RSS, after `--forwards` forwards
at batch 1 (round-to-nearest codes are made by the first forward).

    PYTHONPATH=. python scripts/memory_xl.py --model xl.pt [--config W4A4] [--cache] [--forwards 2]

The code measured is whatever `treeq` imports; for a commit before treeq.memory.resident_bytes
existed, put this commit's treeq/memory.py into that tree (it reads QuantLinear's attributes, old
or new, and counts every tensor storage once).
"""
import argparse
import ctypes
import json
import time

import torch

from treeq.bits import preset_config, quantizable_layers
from treeq.memory import model_shapes, peak_memory, project_resident_bytes, resident_bytes
from treeq.models.load import load
from treeq.ptq.apply import quantize
from treeq.ptq.recipe import Recipe


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", default="W4A4")
    parser.add_argument("--cache", action="store_true", help="keep the dequantized weights between forwards")
    parser.add_argument("--forwards", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load(args.model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    shapes, other = model_shapes(model, quantizable_layers(model))
    quantized = quantize(model, preset_config(model, args.config), Recipe(), inplace=True)  # RTN, no copy
    try:
        from treeq.quant.linear import cache_dequantized_
        cache_dequantized_(quantized, args.cache)
    except ImportError:  # before the switch existed: always cached
        args.cache = True
    config = model.config
    x = torch.randn(1, config.in_channels, config.input_size, config.input_size)
    t, y = torch.tensor([500]), torch.tensor([1])
    seconds = []
    with torch.no_grad():
        for _ in range(args.forwards):
            start = time.perf_counter()
            quantized(x, t, y)
            seconds.append(round(time.perf_counter() - start, 2))
    held = resident_bytes(quantized)
    projected = project_resident_bytes(shapes, other, code_widths=1, cache_dequantized=args.cache)
    fp32 = sum(p.numel() * p.element_size() for p in model.parameters())
    gb = lambda counts: {key: round(value / 1e9, 3) for key, value in counts.items()}  # noqa: E731
    print(json.dumps({"model": args.model, "config": args.config, "cache_dequantized": args.cache,
                      "forward_seconds": seconds, "fp32_parameters_gb": round(fp32 / 1e9, 3),
                      "resident_gb": gb(held), "resident_over_fp32": round(held["total"] / fp32, 3),
                      "projected_gb": gb(projected), "projected_minus_measured_bytes":
                      projected["total"] - held["total"], **peak_memory(), "rss_now_mb": _rss_mb(),
                      "rss_after_malloc_trim_mb": _rss_mb(trim=True)}, indent=1))


def _rss_mb(trim=False):
    """The process's resident set now (after glibc returns its freed heap to the OS, with trim)."""
    if trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return round(int(status["VmRSS"].split()[0]) / 1024, 1)


if __name__ == "__main__":
    main()
