"""`treeq bench kernels`: is the deployed integer layer faster than FP32, bf16 and PyTorch's dynamic int8?

For the testbed's and DiT-XL/2's linear shapes, times in one run: FP32 and bf16 `F.linear`, quantize_dynamic
with FBGEMM and with oneDNN, and the deployed IntLinear at each setting with its method's online transform
(a rotated layer includes its Hadamard), on every exact backend, prepacked and with packed resident weights.
Kernels run in a new random order every round; rows give medians and the interquartile range.
"""
import random
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..deploy.backends import available_backends, choose_backend
from ..deploy.fold import transform_macs
from ..deploy.integer import IntLinear
from ..memory import keep_freed_memory
from ..methods.rotation import rotate_linear_
from ..models.registry import TESTBED, config_for
from ..quant.linear import QuantLinear


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
# (setting, method): the transform each setting deploys with; W4A4 needs the rotation (see bench ptq).
SETTINGS = (("W8A8", "rtn"), ("W4A8", "hadamard"), ("W4A4", "hadamard"))
PEERS = ("fp32", "bf16", "dynamic_fbgemm", "dynamic_onednn")
# One timed call of a kernel is repeated until it lasts this long, so millisecond kernels are measurable.
_MIN_MEASURE_SECONDS = 0.005
# torch._int_mm has no fast CPU kernel without VNNI/AMX (a plain loop, ~35x FP32 on AVX2): benched only
# below this many multiply-accumulates, so a run stays minutes long.
_INT_MM_MAX_MACS = 2 ** 24


def machine():
    """CPU model, its int8/bf16-relevant flags, threads, torch version and load: the header of a bench."""
    model, flags = "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = sorted(flag for flag in flags if flag in ("avx2", "fma", "f16c", "avx_vnni") or
                    flag.startswith(("avx512", "amx")))
    load = " ".join(f"{value:.2f}" for value in __import__("os").getloadavg())
    return {"cpu": model, "flags": " ".join(wanted) or "-", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(), "load": load}


def print_machine(**extra):
    """The machine header on stderr (stdout stays one JSON document with --json)."""
    info = {**machine(), **extra}
    print("# " + "; ".join(f"{key} {value}" for key, value in info.items()), file=sys.stderr)


def bench_kernels(shapes=None, settings=SETTINGS, repeats=15, seed=0, backends=None):
    """Rows per (shape, setting, backend, residency): median ms of ours and FP32, speedups over FP32 of
    ours, bf16 and the faster quantize_dynamic engine, and resident bytes over FP32's weight and bias.

    backends: which exact backends to time (default: all, torch._int_mm only on small shapes); the
    backend `choose_backend` picks is marked `chosen` and also timed with packed resident weights.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    keep_freed_memory()
    print_machine(backends=",".join(available_backends()))
    generator = torch.Generator().manual_seed(seed)
    order = random.Random(seed)
    rows = []
    for name, m, k, n in shapes or DEFAULT_SHAPES:
        linear = nn.Linear(k, n)
        with torch.no_grad():
            linear.weight.normal_(std=k ** -0.5, generator=generator)
        x = torch.randn(m, k, generator=generator)
        kernels, layers = _peers(linear, x), {}
        for setting, method in settings:
            w_bits, a_bits = _bits(setting)
            chosen = choose_backend(k, n, w_bits)
            names = [b for b in backends or available_backends() if b != "int_mm" or m * k * n <= _INT_MM_MAX_MACS]
            variants = [(b, "prepacked") for b in names] + [(chosen, "packed")]
            for backend, resident in variants:
                layer = _deployed(linear, w_bits, a_bits, method, backend, resident)
                key = (setting, method, backend, resident, backend == chosen)
                layers[key] = layer
                kernels[key] = lambda layer=layer: layer(x)
        with torch.no_grad():
            samples = _samples(kernels, repeats, order)
        fp32 = statistics.median(samples["fp32"])
        dynamic = min(("fbgemm", "onednn"), key=lambda engine: statistics.median(samples[f"dynamic_{engine}"]))
        for (setting, method, backend, resident, chosen), layer in layers.items():
            ours = samples[(setting, method, backend, resident, chosen)]
            low, median, high = _quartiles(ours)
            rows.append({"shape": name, "m": m, "k": k, "n": n, "bits": setting, "method": method,
                         "backend": backend if resident == "prepacked" else f"{backend}+packed",
                         "chosen": chosen, "threads": torch.get_num_threads(), "fp32_ms": fp32 * 1e3,
                         "ms": median * 1e3, "iqr_ms": (high - low) * 1e3, "speedup_vs_fp32": fp32 / median,
                         "bf16_speedup_vs_fp32": fp32 / statistics.median(samples["bf16"]),
                         "dynamic_int8_speedup_vs_fp32": fp32 / statistics.median(samples[f"dynamic_{dynamic}"]),
                         "dynamic_engine": dynamic,
                         "resident_bytes_ratio_vs_fp32": layer.resident_bytes() / (4 * (n * k + n)),
                         "transform_macs_ratio": transform_macs(layer) / k / n})
    return rows


def _bits(setting):
    w_bits, a_bits = setting.removeprefix("W").split("A")
    return int(w_bits), int(a_bits)


def _deployed(linear, w_bits, a_bits, method, backend, resident, activations="dynamic"):
    """The IntLinear a `method` export of `linear` deploys to (transform included)."""
    layer = QuantLinear.from_linear(linear, w_bits, a_bits, activations=activations)
    if method == "hadamard":
        layer = rotate_linear_(QuantLinear.from_linear(_copy(linear), w_bits, a_bits, activations=activations))
    elif method != "rtn":
        raise ValueError(f"the kernel bench deploys rtn or hadamard layers, got {method!r}")
    return IntLinear.from_quant_linear(layer).deploy_(backend, resident)


def _copy(linear):
    clone = nn.Linear(linear.in_features, linear.out_features)
    clone.load_state_dict(linear.state_dict())
    return clone


def _peers(linear, x):
    """The reference kernels, each computing `linear` on `x`."""
    x_bf16, weight_bf16, bias_bf16 = x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16()
    kernels = {"fp32": lambda: F.linear(x, linear.weight, linear.bias),
               "bf16": lambda: F.linear(x_bf16, weight_bf16, bias_bf16)}
    for engine in ("fbgemm", "onednn"):
        kernels[f"dynamic_{engine}"] = _dynamic(linear, x, engine)
    return kernels


def _dynamic(linear, x, engine):
    """quantize_dynamic's int8 linear, prepacked and run with `engine` (the engine is process-wide)."""
    with warnings.catch_warnings():  # quantized tensors are deprecated; quantize_dynamic is only a reference
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = engine
        module = torch.ao.quantization.quantize_dynamic(nn.Sequential(_copy(linear)), {nn.Linear}, dtype=torch.qint8)

    def run():
        torch.backends.quantized.engine = engine
        return module(x)
    return run


def _samples(kernels, repeats, order):
    """key -> seconds per call in each of `repeats` rounds; every round runs the kernels in a new order."""
    calls = {key: _calls_per_measure(fn) for key, fn in kernels.items()}
    samples = {key: [] for key in kernels}
    keys = list(kernels)
    for _ in range(repeats):
        order.shuffle(keys)
        for key in keys:
            fn = kernels[key]
            start = time.perf_counter()
            for _ in range(calls[key]):
                fn()
            samples[key].append((time.perf_counter() - start) / calls[key])
    return samples


def _calls_per_measure(fn):
    """Warm up `fn` and return how many calls make one measurement of at least _MIN_MEASURE_SECONDS."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(1000, round(_MIN_MEASURE_SECONDS / once)))


def _quartiles(values):
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high
