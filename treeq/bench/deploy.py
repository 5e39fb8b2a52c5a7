"""`treeq bench deploy`: end-to-end sampling speed and resident memory of a deployed quantized DiT.

In one run, interleaved: the exported testbed at W8A8 and W4A4 (export -> load_exported: smoothing folded,
integer layers on the machine's fastest exact backend) and a random-weight DiT-XL/2 (a few steps, batch 8),
against FP32, bf16 and quantize_dynamic (oneDNN) of the same model's block linears, and the fake-quantized
model whose outputs ours must reproduce. The torchao export of the same run (deploy/torchao_export.py) runs
beside them where torchao is installed: at the run's bits, as W4A8, and compiled (`torch.compile`, testbed).
"""
import copy
import random
import statistics
import tempfile
import warnings

import torch
import torch.nn as nn

from ..bits import preset_config, quantizable_layers
from ..deploy.export import export, load_exported
from ..deploy.fold import fold_smoothing_
from ..deploy.integer import IntLinear
from ..deploy.torchao_export import to_torchao_, torchao_available
from ..memory import keep_freed_memory
from ..testbed.experiment import generate
from ..models.load import load
from ..models.registry import create_model
from ..ptq.apply import quantize
from ..ptq.recipe import Recipe
from ..quant.linear import QuantLinear
from .kernels import print_machine

# (setting, methods) deployed; W4A4 needs the rotation (see `treeq bench ptq`).
SETTINGS = (("W8A8", ("rtn",)), ("W4A4", ("hadamard",)))
XL_SAMPLING = dict(steps=2, cfg_scale=1.0)  # one model call per step: 8 images x 256 tokens per call


def bench_deploy(num_samples=64, seed=0, repeats=3, xl=True, xl_samples=8):
    """Rows {model, setting, runtime, images_per_second, resident_mb, ...}: the testbed, then DiT-XL/2."""
    keep_freed_memory()
    print_machine()
    rows = _bench_model("testbed", load("default"), num_samples, seed, repeats, {}, exported=True)
    if xl:
        torch.manual_seed(seed)
        model = create_model("DiT-XL/2").eval()
        with torch.no_grad():  # adaLN-Zero starts every block as the identity: random weights make them count
            for name, parameter in model.named_parameters():
                if "adaLN_modulation" in name or "final_layer.linear" in name:
                    parameter.normal_(std=0.02)
        rows += _bench_model("DiT-XL/2", model, xl_samples, seed, 1, XL_SAMPLING, exported=False)
    return rows


def _bench_model(name, model, num_samples, seed, repeats, sampling, exported):
    """Time every runtime of `model`, interleaved in random order, and measure quality against fake quant.

    exported: deploy through a packed export and compare whole sample sets; otherwise (DiT-XL/2)
    convert each fake-quantized model in place, comparing one model call, so that no more than one
    fake-quantized copy (FP32 weights held twice over) is alive at a time.
    """
    def outputs(module):
        if exported:
            return generate(module, num_samples, seed, progress=False, **sampling)[0].float()
        return _one_call(module, seed).float()

    runtimes = {("FP32", "fp32"): model, ("BF16", "bf16"): _bf16(model),
                ("W8A8", "dynamic_onednn"): _dynamic(model, "onednn")}
    with torch.no_grad():
        reference = outputs(model)
        quality = {key: {"psnr_vs_fp32": _psnr(reference if module is model else outputs(module), reference)}
                   for key, module in runtimes.items()}
        for setting, methods in SETTINGS:
            quantized = quantize(model, preset_config(model, setting), Recipe(methods=methods))
            target = outputs(quantized)
            quality[(setting, "fake_quant")] = {"psnr_vs_fp32": _psnr(target, reference)}
            converted = _torchao_runtimes(quantized, setting, compiled=exported)
            runtimes.update({(setting, runtime): module for runtime, module in converted.items()})
            if exported:
                runtimes[(setting, "ours")] = _exported(quantized, "prepacked")
                runtimes[(setting, "ours+packed")] = _exported(quantized, "packed")
                runtimes[(setting, "fake_quant")] = quantized
            else:
                runtimes[(setting, "ours")], runtimes[(setting, "ours+packed")] = _converted(quantized)
            for runtime in ("ours", "ours+packed", *converted):
                out = outputs(runtimes[(setting, runtime)])
                quality[(setting, runtime)] = {"psnr_vs_fp32": _psnr(out, reference),
                                               "rel_error_vs_fake_quant": ((out - target).norm() / target.norm()).item()}
    seconds = {key: [] for key in runtimes}
    order = random.Random(seed)
    with torch.no_grad():
        for _ in range(repeats):
            keys = list(seconds)
            order.shuffle(keys)
            for key in keys:
                seconds[key].append(generate(runtimes[key], num_samples, seed, progress=False, **sampling)[2])
    rows = []
    for (setting, runtime), values in seconds.items():
        median = statistics.median(values)
        rows.append({"model": name, "setting": setting, "runtime": runtime,
                     "images_per_second": num_samples / median, "spread_s": max(values) - min(values),
                     "resident_mb": resident_bytes(runtimes[(setting, runtime)]) / 2 ** 20,
                     **quality[(setting, runtime)]})
    return rows


def _exported(quantized, resident):
    """The integer model a packed export of `quantized` loads as."""
    with tempfile.TemporaryDirectory() as folder:
        export(quantized, folder, scale_dtype=torch.float32)
        return load_exported(folder, resident=resident)


def _torchao_runtimes(quantized, setting, compiled):
    """{runtime: model} of the torchao export of `quantized` (none without torchao): at the run's bits, as
    W4A8 (4-bit settings), and the first compiled (its compilation happens in the untimed quality pass)."""
    if not torchao_available():
        return {}
    runtimes = {"torchao": to_torchao_(copy.deepcopy(quantized))}
    if setting != "W8A8":
        runtimes["torchao_w4a8"] = to_torchao_(copy.deepcopy(quantized), activation_bits=8)
    if compiled:
        runtimes["torchao+compile"] = torch.compile(runtimes["torchao"])
    return runtimes


def _converted(quantized):
    """(prepacked, packed) integer models of `quantized`, whose layers are converted in place."""
    for name in quantizable_layers(quantized):
        layer = quantized.get_submodule(name)
        if isinstance(layer, QuantLinear):
            parent, _, child = name.rpartition(".")
            setattr(quantized.get_submodule(parent), child, IntLinear.from_quant_linear(layer))
    fold_smoothing_(quantized)
    packed = copy.deepcopy(quantized)  # integer codes only: about a quarter of the FP32 model
    for model, resident in ((quantized, "prepacked"), (packed, "packed")):
        for module in model.modules():
            if isinstance(module, IntLinear):
                module.deploy_("auto", resident)
    return quantized, packed


def _one_call(model, seed):
    """One model call on a batch of two noised latents (DiT-XL/2: whole sampling runs are too slow to compare)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    x = torch.randn(2, config.in_channels, config.input_size, config.input_size, generator=generator)
    return model(x, torch.tensor([10.0, 500.0]), torch.tensor([1, 2]))


def _psnr(images, reference):
    """PSNR in dB of outputs against the FP32 ones, over the FP32 outputs' peak-to-peak range."""
    mse = (images - reference).square().mean().item()
    peak = (reference.max() - reference.min()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak ** 2 / mse)).item()


def _bf16(model):
    """The model in bf16: the patch embedding casts the float noise in, the final layer's output back."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    model.x_embedder.register_forward_pre_hook(lambda module, args: (args[0].to(torch.bfloat16),))
    model.final_layer.register_forward_hook(lambda module, args, out: out.float())
    return model


def _dynamic(model, engine):
    """quantize_dynamic (per-tensor dynamic int8 activations, per-channel int8 weights) of the block linears."""
    with warnings.catch_warnings():  # quantized tensors are deprecated; quantize_dynamic is only a reference
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = engine
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), set(quantizable_layers(model)),
                                                      dtype=torch.qint8)


def resident_bytes(model):
    """Bytes a model holds for inference: parameters, buffers, backend-prepacked weights, packed params."""
    if model is None:
        return float("nan")
    total = sum(_tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))
    for module in model.modules():
        if isinstance(module, IntLinear):
            total += sum(kernel.resident_bytes() for kernel in module.kernels or [] if kernel.handle is not None)
        packed = getattr(module, "_packed_params", None)
        if isinstance(packed, nn.Module):  # quantize_dynamic's linear: int8 weight and float bias, packed
            weight, bias = packed._weight_bias()
            total += weight.numel() + (0 if bias is None else bias.numel() * 4) + 8 * weight.shape[0]
    return total


def _tensor_bytes(tensor):
    """Bytes a tensor holds: a torchao quantized tensor's own parts (its int8 data and scales), not the
    float tensor it stands for."""
    parts = [getattr(tensor, name, None) for name in ("qdata", "scale", "zero_point")]
    if parts[0] is None:
        return tensor.numel() * tensor.element_size()
    return sum(part.numel() * part.element_size() for part in parts if part is not None)
