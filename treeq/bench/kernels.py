"""`treeq bench kernels`: does the integer path beat FP32 on the linears TreeQ quantizes?

For the testbed's and DiT-XL/2's linear shapes, times in one run, interleaved: FP32 `F.linear`,
IntLinear's whole forward (per-token activation quantization, int8 GEMM, rescale, bias) at each
bit-width, and two references, bf16 `F.linear` and PyTorch's dynamic int8 linear (quantize_dynamic).
"""
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.registry import TESTBED, config_for
from ..quant.integer import IntLinear
from ..quant.linear import QuantLinear
from ..quant.pack import packed_size


def dit_linear_shapes(prefix, config, batch):
    """(name, rows M, in_features K, out_features N) of a DiT block's linears for `batch` images.

    Token-wise linears see batch x tokens rows; adaLN modulation runs once per image (M = batch).
    """
    width, hidden = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    tokens = batch * (config.input_size // config.patch_size) ** 2
    return ((f"{prefix}.qkv", tokens, width, 3 * width), (f"{prefix}.proj", tokens, width, width),
            (f"{prefix}.fc1", tokens, width, hidden), (f"{prefix}.fc2", tokens, hidden, width),
            (f"{prefix}.adaLN", batch, width, 6 * width))


# The testbed at a training batch of 64 images (64 tokens each); DiT-XL/2 at 256x256, one image of 256 tokens.
DEFAULT_SHAPES = dit_linear_shapes("testbed", TESTBED, 64) + dit_linear_shapes("xl", config_for("DiT-XL/2"), 1)
# One timed call of a kernel is repeated until it lasts this long, so millisecond kernels are measurable.
_MIN_MEASURE_SECONDS = 0.005


def bench_kernels(shapes=None, bits=(8, 4), repeats=15, seed=0):
    """One row per (shape, bits): median milliseconds of each kernel, speedups over FP32 and packed size.

    Kernels are timed round-robin, `repeats` rounds after a warm-up, so background load hits them
    alike; rows record the thread count they ran with. WbAb at b < 8 runs the same int8 GEMM (no
    narrower kernel on CPU): its gain over W8A8 is size, not speed.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for name, m, k, n in shapes or DEFAULT_SHAPES:
        linear = nn.Linear(k, n)
        with torch.no_grad():
            linear.weight.normal_(std=k ** -0.5, generator=generator)
        x = torch.randn(m, k, generator=generator)
        kernels = _kernels(linear, x, bits)
        with torch.no_grad():
            seconds = _median_seconds(kernels, repeats)
        for b in bits:
            rows.append(_row(name, m, k, n, b, seconds))
    return rows


def _kernels(linear, x, bits):
    """name -> zero-argument callable, each computing the same linear on `x`."""
    with warnings.catch_warnings():  # quantize_dynamic's quantized tensors are deprecated; it is only a reference
        warnings.simplefilter("ignore")
        dynamic = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)
    x_bf16, weight_bf16, bias_bf16 = x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16()
    kernels = {
        "fp32": lambda: F.linear(x, linear.weight, linear.bias),
        "bf16": lambda: F.linear(x_bf16, weight_bf16, bias_bf16),
        "dynamic_int8": lambda: dynamic(x),
    }
    for b in bits:
        integer = IntLinear.from_quant_linear(QuantLinear.from_linear(linear, b, b))
        kernels[f"int{b}"] = lambda layer=integer: layer(x)
    return kernels


def _median_seconds(kernels, repeats):
    """name -> median seconds per call over `repeats` interleaved rounds."""
    calls = {name: _calls_per_measure(fn) for name, fn in kernels.items()}
    samples = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, fn in kernels.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def _calls_per_measure(fn):
    """Warm up `fn` and return how many calls make one measurement of at least _MIN_MEASURE_SECONDS."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(1000, round(_MIN_MEASURE_SECONDS / once)))


def _row(name, m, k, n, b, seconds):
    fp32, ours = seconds["fp32"], seconds[f"int{b}"]
    # Packed codes plus one fp16 scale per output channel (what export stores), against fp32 weights.
    size_ratio = (packed_size(n * k, b) + 2 * n) / (4 * n * k)
    return {"shape": name, "m": m, "k": k, "n": n, "bits": f"W{b}A{b}", "threads": torch.get_num_threads(),
            "fp32_ms": fp32 * 1e3, "int_ms": ours * 1e3, "speedup_vs_fp32": fp32 / ours,
            "bf16_speedup_vs_fp32": fp32 / seconds["bf16"],
            "dynamic_int8_speedup_vs_fp32": fp32 / seconds["dynamic_int8"],
            "size_ratio_vs_fp32": size_ratio}
