"""Running the calibration set through a quantized model and collecting what each layer's input looks like.

Statistics are taken in full precision (every quantizer off), so they describe the model the
methods are fitted to, not one distorted by whatever bits happen to be set, and one statistic
serves every bit-width a search may switch to. A layer's statistic sees its input as the
quantized path does: after the layer's input transform.
"""
from contextlib import contextmanager

import torch

from ..bits import quantizable_layers
from ..models.adapters import CallInputs, adapter_for
from ..models.adapters.dit import DiTAdapter, check_dit_calibration
from .linear import QuantLinear


def quantized_layers(model):
    """{name: QuantLinear} of `model`'s quantizable layers, in execution order."""
    layers = {name: model.get_submodule(name) for name in quantizable_layers(model)}
    return {name: layer for name, layer in layers.items() if isinstance(layer, QuantLinear)}


@contextmanager
def full_precision(model):
    """Every QuantLinear of `model` at 32/32 bits inside the block; the bits are restored after."""
    layers = quantized_layers(model)
    saved = {name: (layer.w_bits, layer.a_bits) for name, layer in layers.items()}
    for layer in layers.values():
        layer.w_bits = layer.a_bits = 32  # direct: 32 bits needs no per-bit state
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.w_bits, layer.a_bits = saved[name]


def collect_statistics(model, statistics, calibration, batch_size=16):
    """Feed the transformed input of each layer named in `statistics` to its `.add`; return `statistics`."""
    def hook(layer, args, statistic):
        x = args[0] if layer.input_transform is None else layer.input_transform(args[0])
        statistic.add(x)

    layers = quantized_layers(model)
    hooks = [layers[name].register_forward_pre_hook(lambda module, args, s=statistic: hook(module, args, s))
             for name, statistic in statistics.items()]
    try:
        with full_precision(model):
            run_calibration(model, calibration, batch_size)
    finally:
        for handle in hooks:
            handle.remove()
    return statistics


def run_calibration(model, calibration, batch_size=16):
    """Forward the calibration inputs in eval mode and in batches, on the model's device."""
    adapter = adapter_for(model)
    check_calibration(model, calibration)
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inputs in adapter.batches(calibration, batch_size, device):
                adapter.forward(model, inputs)
    finally:
        model.train(training)


def check_calibration(model, calibration):
    """Raise ValueError unless `calibration` is the input form of `model`'s family: (x_t, t, y) for our
    DiT, recorded CallInputs for a diffusers transformer."""
    if isinstance(adapter_for(model), DiTAdapter):
        return check_dit_calibration(calibration)
    if not isinstance(calibration, CallInputs):
        raise ValueError(f"calibration of a {type(model).__name__} is the CallInputs its pipeline recorded "
                         "(treeq.calibrate)")
    return calibration
