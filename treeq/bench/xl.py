"""`treeq bench xl` and `treeq bench gpu-kernels`: DiT-XL/2 at its real size, on the CPU or a GPU.

`bench xl` times sampling steps (one guided model call each) at batch 1 and 8 of the full-precision
model in float32 and bfloat16 (eager and compiled), of the fake-quant W4A4 model (Hadamard + GPTQ,
per-token asymmetric activations, calibrated on one short trajectory), of the exported W8A8 integer
model (round to nearest, per-token activations, `torch._int_mm`), of the torchao export of the W4A4
run (deploy/torchao_export.py: at its bits, and as W4A8 eager and compiled) and of the run's weights
on the fused W4A8 Triton kernel (CUDA), and reports the GPU memory each phase peaked at.
Random weights by default: speed and memory do not depend on the values.
`bench gpu-kernels` times DiT-XL/2's linear shapes on CUDA: float32, TF32, bf16, the int8 path a
deployed W8A8 layer runs (per-token quantization of the input + `torch._int_mm` + rescale) and, where
Triton imports, the fused W4A8 Triton kernel (deploy/triton_w4a8.py) bare and with a rank-32 low-rank
branch, in interleaved rounds.
"""
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from ..bits import preset_config, quantizable_layers
from ..deploy.gemm import int_matmul
from ..diffusion.sampling import balanced_labels, sample
from ..models.init import random_dit
from ..models.registry import config_for
from ..ptq.apply import quantize
from ..ptq.calibration import collect_calibration
from ..ptq.recipe import Recipe
from ..quant.quantizers import quantize_weight, token_quant_params
from .kernels import dit_linear_shapes

W4A4_RECIPE = Recipe(methods=("hadamard", "gptq"), activations="dynamic-asym")
SETTINGS = ("fp32", "bf16", "bf16+compile", "W4A4", "W8A8-int", "W4A4-torchao", "W4A8-torchao",
            "W4A8-torchao+compile", "W4A8-triton")


def bench_xl(device="cpu", model=None, batches=(1, 8), steps=3, settings=SETTINGS, seed=0):
    """Rows {setting, batch, device, seconds_per_step, min, max, peak_gpu_mb}; building a quantized model
    gets rows of its own (seconds, peak_gpu_mb) with batch None; a setting this machine cannot run (no
    torchao, no Triton or CUDA) gets one row with its `error`.

    Settings: FP32, bf16 (eager and compiled), the fake-quant W4A4 model (Hadamard + GPTQ, calibrated on
    one short trajectory), the packed W8A8 export on torch._int_mm, the torchao export of that W4A4 run
    at its bits and as W4A8 (eager and compiled), and its W4A8 layers on the fused Triton kernel."""
    unknown = [setting for setting in settings if setting not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown bench xl setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
    device = torch.device(device)
    built = {"base": _xl(model, seed)}  # the FP32 model on the CPU, and quantized models other settings reuse
    rows = []
    for setting in settings:
        try:
            model_ = _BUILDERS[setting](built, device, rows)
        except ImportError as error:
            rows.append({"setting": setting, "batch": None, "device": str(device), "error": str(error)})
            continue
        for batch in batches:
            _reset_peak(device)
            times = step_seconds(model_, batch, steps)
            rows.append({"setting": setting, "batch": batch, "device": str(device),
                         "seconds_per_step": statistics.median(times), "min": min(times), "max": max(times),
                         "peak_gpu_mb": _peak_mb(device)})
        del model_
    return rows


def _phase(name, rows, device, build):
    """build() timed as a phase row (seconds, peak GPU memory)."""
    _reset_peak(device)
    start = time.perf_counter()
    model = build()
    rows.append(_phase_row(name, start, device))
    return model


def _float(built, device, rows, dtype=torch.float32):
    """The FP model on `device` in `dtype` (a bf16 copy: the FP32 weights stay unrounded for the rest)."""
    base = built["base"] if dtype == torch.float32 else copy.deepcopy(built["base"])
    return base.to(device=device, dtype=dtype)


def _w4a4(built, device, rows):
    """The fake-quant W4A4 model on `device` (built once; kept on the CPU between settings)."""
    if "W4A4" not in built:
        fp = built["base"].to(device)
        calibration = _phase("calibrate", rows, device,
                             lambda: collect_calibration(fp, num_images=1, num_timesteps=2, steps=2))
        built["W4A4"] = _phase("quantize W4A4", rows, device,
                               lambda: quantize(fp, preset_config(fp, "W4A4"), W4A4_RECIPE, calibration=calibration))
        built["base"] = built["base"].cpu()
    return built["W4A4"].to(device)


def _torchao(activation_bits, compiled=False):
    def build(built, device, rows):
        from ..deploy.torchao_export import to_torchao_
        quantized = _w4a4(built, device, rows)
        label = "W4A4 run bits" if activation_bits == "run" else "W4A8"
        model = _phase(f"torchao export ({label})", rows, device,
                       lambda: to_torchao_(copy.deepcopy(quantized), activation_bits))
        built["W4A4"] = quantized.cpu()
        return torch.compile(model) if compiled else model
    return build


def _triton(built, device, rows):
    """The W4A4 run's weights with 8-bit inputs, every block linear on the fused Triton kernel."""
    from ..deploy import triton_w4a8
    if device.type != "cuda" or not triton_w4a8.triton_available():
        raise ImportError("the fused W4A8 kernel runs on CUDA with Triton")
    quantized = _w4a4(built, device, rows)

    def convert():
        model = copy.deepcopy(quantized)
        for name in quantizable_layers(model):
            layer = model.get_submodule(name)
            layer.set_bits(4, 8)
            model.set_submodule(name, triton_w4a8.TritonW4A8Linear.from_quant_linear(layer))
        return model
    model = _phase("triton W4A8 layers", rows, device, convert)
    built["W4A4"] = quantized.cpu()
    return model


def _w8a8_int(built, device, rows):
    return _phase("quantize + export + load W8A8", rows, device,
                  lambda: _exported_w8a8(built["base"].cpu()).to(device))


# setting -> build(built, device, rows) -> the model to time (phase rows appended to `rows`)
_BUILDERS = {
    "fp32": _float,
    "bf16": lambda built, device, rows: _float(built, device, rows, torch.bfloat16),
    "bf16+compile": lambda built, device, rows: torch.compile(_float(built, device, rows, torch.bfloat16)),
    "W4A4": _w4a4,
    "W8A8-int": _w8a8_int,
    "W4A4-torchao": _torchao("run"),
    "W4A8-torchao": _torchao(8),
    "W4A8-torchao+compile": _torchao(8, compiled=True),
    "W4A8-triton": _triton,
}


def _exported_w8a8(model):
    """The packed-export round trip of a W8A8 round-to-nearest model, its layers on torch._int_mm."""
    import tempfile

    from ..deploy.export import export, load_exported
    quantized = quantize(model, preset_config(model, "W8A8"), Recipe(methods=("rtn",), activations="dynamic"))
    with tempfile.TemporaryDirectory() as folder:
        export(quantized, folder)
        return load_exported(folder, backend=None)


def step_seconds(model, batch, steps):
    """Seconds between consecutive model calls of an official-settings sample (cfg 1.5: 2 x batch rows),
    the first call (warm-up) left out."""
    device = next(model.parameters()).device
    stamps = []

    def stamp(*_):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    labels = balanced_labels(batch, model.config.num_classes)
    sample(model, labels, sampler="ddpm", steps=steps + 2, cfg_scale=1.5, guidance_channels=3, batch_size=batch,
           progress=False, on_model_input=stamp)
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def bench_gpu_kernels(batch=8, repeats=7, iterations=20, seed=0):
    """Rows {shape, runtime, ms, min_ms, max_ms, speedup_vs_fp32, speedup_vs_bf16} on the current CUDA device.

    Each round runs every runtime once (`iterations` calls timed by CUDA events), in a new random order;
    the median over `repeats` rounds is reported with its range."""
    if not torch.cuda.is_available():
        raise ValueError("bench gpu-kernels needs a CUDA device")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for shape, m, k, n in dit_linear_shapes("xl", config_for("DiT-XL/2"), batch):
        x = torch.randn(m, k, generator=generator).cuda()
        weight = torch.randn(n, k, generator=generator).cuda() / k ** 0.5
        runtimes = _gpu_runtimes(x, weight)
        for name, fn in list(runtimes.items()):
            try:
                fn()
            except Exception as error:  # a kernel this GPU, torch or Triton build lacks (or fails to compile): say so, time the rest
                rows.append({"shape": shape, "rows": m, "runtime": name, "error": str(error).splitlines()[0]})
                del runtimes[name]
        times = {name: [] for name in runtimes}
        for _ in range(repeats):
            for index in torch.randperm(len(runtimes), generator=generator).tolist():
                name = list(runtimes)[index]
                times[name].append(_cuda_ms(runtimes[name], iterations))
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, values in times.items():
            rows.append({"shape": shape, "rows": m, "runtime": name, "ms": medians[name], "min_ms": min(values),
                         "max_ms": max(values), "speedup_vs_fp32": medians["fp32"] / medians[name],
                         "speedup_vs_bf16": medians["bf16"] / medians[name]})
    return rows


def _gpu_runtimes(x, weight):
    """name -> zero-argument call computing x @ weight.T as each runtime would inside a deployed layer."""
    weight_codes = quantize_weight(weight, 8)
    codes_w, scale_w = weight_codes.codes, weight_codes.scale[:, 0]
    x16, w16 = x.bfloat16(), weight.bfloat16()

    def fp32():
        torch.backends.cuda.matmul.allow_tf32 = False
        return F.linear(x, weight)

    def tf32():
        torch.backends.cuda.matmul.allow_tf32 = True
        out = F.linear(x, weight)
        torch.backends.cuda.matmul.allow_tf32 = False
        return out

    def int8():  # per-token symmetric activations, int32 sums, one rescale: the W8A8 layer's work
        scale, _ = token_quant_params(x, 8, symmetric=True)
        codes = (x / scale).round_().to(torch.int8)
        return int_matmul(codes, codes_w.t()).float().mul_(scale).mul_(scale_w)

    runtimes = {"fp32": fp32, "tf32": tf32, "bf16": lambda: F.linear(x16, w16), "int8_w8a8": int8}
    if x.is_cuda:
        runtimes.update(_triton_runtimes(x, weight))
    return runtimes


def _triton_runtimes(x, weight, rank=32):
    """The fused W4A8 Triton kernel (per-token 8-bit activations quantized inside it, 4-bit weights
    unpacked inside it), bare and with a fused rank-`rank` low-rank branch (TF32 on tensor cores); none
    where Triton is missing. Random branch weights: the speed does not depend on them."""
    from ..deploy import triton_w4a8

    if not triton_w4a8.triton_available():
        return {}
    weight_codes = quantize_weight(weight, 4)
    packed = triton_w4a8.pack_w4(weight_codes.codes, weight_codes.scale)
    down = torch.randn(rank, weight.shape[1], device=x.device) / weight.shape[1] ** 0.5
    up = torch.randn(weight.shape[0], rank, device=x.device) / rank ** 0.5
    return {"triton_w4a8": lambda: triton_w4a8.w4a8_linear(x, packed),
            "triton_w4a8_lowrank": lambda: triton_w4a8.w4a8_linear(x, packed, lowrank=(down, up),
                                                                  lowrank_precision="tf32")}


def _cuda_ms(fn, iterations):
    fn()  # warm-up (cuBLAS heuristics, allocator)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iterations


def _xl(model, seed):
    if model is None:
        return random_dit("DiT-XL/2", seed)
    from ..models.load import load
    return load(model)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def _phase_row(setting, start, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"setting": setting, "batch": None, "device": str(device), "seconds": time.perf_counter() - start,
            "peak_gpu_mb": _peak_mb(device)}
