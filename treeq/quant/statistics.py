"""Running the calibration set through a quantized model and collecting what each layer's input looks like.

Statistics are taken in full precision (every quantizer off), so they describe the model the
methods are fitted to, not one distorted by whatever bits happen to be set, and one statistic
serves every bit-width a search may switch to. A layer's statistic sees its input as the
quantized path does: after the layer's input transform.

They are collected block by block (`fit_block_by_block`): one block's statistics are held at a time
(a real FLUX.1 has 494 linears; their Hessians at once would take 20 GB), and the block's inputs
come either from the full-precision blocks before it or, as GPTQ does for LLMs, from those blocks
already fitted and quantized.
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
    fit_block_by_block(model, statistics.get, lambda name, statistic: None, calibration, batch_size)
    return statistics


BLOCK_INPUTS = ("fp", "quantized")  # where fit_block_by_block takes a block's inputs from


@torch.no_grad()
def fit_block_by_block(model, statistic, fit, calibration, batch_size=16, bits=None, progress=False):
    """For each block in order: collect `statistic(name)` of the input of each layer it gives one for (None:
    skipped) on the block's calibration inputs, call `fit(name, statistic)`, then pass the block's outputs on.

    bits: None: the next block's inputs are this block's full-precision outputs (every layer's statistic is
    then exactly the full-precision model's). {name: (w_bits, a_bits)}: the block is run again at these
    bits once fitted, so later blocks are fitted to the inputs the quantized model gives them.
    """
    from tqdm import tqdm

    adapter, layers = adapter_for(model), quantized_layers(model)
    check_calibration(model, calibration)
    by_block = {}
    for name, index in adapter.block_of(model).items():
        if name in layers:
            by_block.setdefault(index, []).append(name)
    device, training = next(model.parameters()).device, model.training
    model.eval()
    try:
        with full_precision(model):
            states = [_moved(adapter.embed(model, inputs), "cpu")
                      for inputs in adapter.batches(calibration, batch_size, device)]
        for index in tqdm(range(len(adapter.block_names(model))), desc="calibration block by block", unit="block",
                          disable=not progress, leave=False):
            statistics = {name: statistic(name) for name in by_block.get(index, [])}
            statistics = {name: value for name, value in statistics.items() if value is not None}
            names = list(statistics)
            with _collecting(layers, statistics), full_precision(model):
                outputs = [_run_block(adapter, model, state, index, device) for state in states]
            for name in names:
                fit(name, statistics.pop(name))
            if bits is not None and names:
                with _at_bits(layers, {name: bits[name] for name in names}):
                    outputs = [_run_block(adapter, model, state, index, device) for state in states]
            states = outputs
    finally:
        model.train(training)


def _run_block(adapter, model, state, index, device):
    """Block `index` on one batch's state, brought to the model's device; its output kept on the host (every
    row's states on a GPU would outweigh the model at real size: docs/RESULTS.md, memory plan)."""
    return _moved(adapter.run_blocks(model, _moved(state, device), index, index + 1), "cpu")


def _moved(state, device):
    """A block state (a tensor, or a tuple or dict of them and other values) on `device`."""
    if torch.is_tensor(state):
        return state.to(device)
    if isinstance(state, (tuple, list)):
        return type(state)(_moved(part, device) for part in state)
    if isinstance(state, dict):
        return {key: _moved(value, device) for key, value in state.items()}
    return state


@contextmanager
def _collecting(layers, statistics):
    """Each named layer's transformed input goes to its statistic's `.add` while inside."""
    def hook(layer, args, statistic):
        statistic.add(args[0] if layer.input_transform is None else layer.input_transform(args[0]))

    handles = [layers[name].register_forward_pre_hook(lambda module, args, s=statistic: hook(module, args, s))
               for name, statistic in statistics.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _at_bits(layers, bits):
    """The named layers at their (w_bits, a_bits) inside; bits restored after."""
    saved = {name: (layers[name].w_bits, layers[name].a_bits) for name in bits}
    for name, (w_bits, a_bits) in bits.items():
        layers[name].set_bits(w_bits, a_bits)
    try:
        yield
    finally:
        for name, (w_bits, a_bits) in saved.items():
            layers[name].w_bits, layers[name].a_bits = w_bits, a_bits


def check_calibration(model, calibration):
    """Raise ValueError unless `calibration` is the input form of `model`'s family: (x_t, t, y) for our
    DiT, recorded CallInputs for a diffusers transformer."""
    if isinstance(adapter_for(model), DiTAdapter):
        return check_dit_calibration(calibration)
    if not isinstance(calibration, CallInputs):
        raise ValueError(f"calibration of a {type(model).__name__} is the CallInputs its pipeline recorded "
                         "(treeq.calibrate)")
    return calibration
