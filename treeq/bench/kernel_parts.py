"""`treeq bench kernel-parts`: where a deployed W4A4 layer's time goes on this CPU, against quantize_dynamic.

Our rotated W4A4 layer trails `quantize_dynamic` on the CPU (`treeq bench kernels`). This bench splits
its call into the steps IntLinear.forward runs, each timed alone on the same input, interleaved with the
whole layer, the same layer without its rotation, quantize_dynamic and the torchao export's layer, so the
gap is measured rather than guessed. Shapes: DiT-XL/2's block linears at one image (256 tokens).
"""
import random
import statistics

import torch
import torch.nn as nn

from ..deploy.backends import available_backends
from ..deploy.torchao_export import to_torchao_, torchao_available
from ..memory import keep_freed_memory
from ..methods.rotation import rotate_linear_
from ..models.registry import config_for
from ..quant.linear import QuantLinear
from .kernels import _copy, _deployed, _dynamic, _quartiles, _samples, dit_linear_shapes, print_machine

SHAPES = tuple(shape for shape in dit_linear_shapes("xl", config_for("DiT-XL/2"), 1) if shape[1] > 1)


def layer_parts(layer, x):
    """name -> zero-argument call: each step of a deployed IntLinear's forward on `x`, on the inputs it gets.

    rotation: the Hadamard transform; quantize_input: per-token codes of the rotated input; gemm: the
    backend's integer product with the weight scale applied; epilogue: the input zero point's correction
    and the token scale and bias, on a copy of the GEMM's output (the layer does them in place)."""
    rotated = layer.input_transform(x) if layer.input_transform is not None else x
    codes, scale, zero_point = layer.quantize_input(rotated.reshape(-1, layer.in_features))
    product = layer.integer_matmul(codes)
    row_sums = layer._weight_row_sums

    def epilogue():
        out = product.clone()
        if zero_point is not None:
            out.addr_(zero_point.squeeze(-1), row_sums, alpha=-1)
        return torch.addcmul(layer.bias, out, scale, out=out)

    parts = {"rotation": lambda: layer.input_transform(x)} if layer.input_transform is not None else {}
    return {**parts, "quantize_input": lambda: layer.quantize_input(rotated.reshape(-1, layer.in_features)),
            "gemm": lambda: layer.integer_matmul(codes), "epilogue": epilogue}


def bench_kernel_parts(shapes=SHAPES, repeats=15, seed=0, activations="dynamic-asym"):
    """Rows {shape, kernel, ms, iqr_ms, share_of_ours}: quantize_dynamic (its faster engine), our whole
    W4A4 layer (Hadamard, `activations`), the same without rotation, the torchao export's layer (where
    torchao is installed), and each part of ours; share_of_ours = ms / our whole layer's ms."""
    keep_freed_memory()
    print_machine(backends=",".join(available_backends()))
    generator = torch.Generator().manual_seed(seed)
    order = random.Random(seed)
    rows = []
    for name, m, k, n in shapes:
        linear = nn.Linear(k, n)
        with torch.no_grad():
            linear.weight.normal_(std=k ** -0.5, generator=generator)
        x = torch.randn(m, k, generator=generator)
        ours = _deployed(linear, 4, 4, "hadamard", "auto", "prepacked", activations=activations)
        kernels = {"dynamic_fbgemm": _dynamic(linear, x, "fbgemm"), "dynamic_onednn": _dynamic(linear, x, "onednn"),
                   "ours": lambda: ours(x),
                   "ours_without_rotation": _call(_deployed(linear, 4, 4, "rtn", "auto", "prepacked",
                                                            activations=activations), x),
                   **{f"part:{part}": call for part, call in layer_parts(ours, x).items()},
                   **_torchao_kernels(linear, x, activations)}
        with torch.no_grad():
            samples = _samples(kernels, repeats, order)
        whole = statistics.median(samples["ours"])
        for kernel, values in samples.items():
            low, median, high = _quartiles(values)
            rows.append({"shape": name, "m": m, "k": k, "n": n, "kernel": kernel, "backend": ours.backend,
                         "ms": median * 1e3, "iqr_ms": (high - low) * 1e3, "share_of_ours": median / whole})
    return rows


def _call(layer, x):
    return lambda: layer(x)


def _torchao_kernels(linear, x, activations):
    """The torchao export of the same rotated W4A4 layer, at the run's bits and as W4A8 (none without torchao)."""
    if not torchao_available():
        return {}
    kernels = {}
    for label, activation_bits in (("torchao", "run"), ("torchao_w4a8", 8)):
        layer = rotate_linear_(QuantLinear.from_linear(_copy(linear), 4, 4, activations=activations))
        holder = to_torchao_(nn.Sequential(layer), activation_bits)
        kernels[label] = _call(holder, x)
    return kernels
