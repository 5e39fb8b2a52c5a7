"""Apply a bit configuration to a DiT: swap linears for QuantLinear and run a PTQ method.

Methods: "rtn" (round to nearest), "hadamard" (online rotation), "smooth" (SmoothQuant),
"gptq" (Hessian-aware rounding) and "lowrank" (SVDQuant-style branch). Calibration statistics
come from forward hooks on the full-precision model. `set_bits_` and `quantization_map` switch
and read back bits of a quantized model as the same JSON mapping.
"""
import copy

import torch

from ..bits import quantizable_layers, validate_config
from ..branches.lowrank import LowRankBranch
from .gptq import HessianAccumulator, gptq_linear_
from .linear import QuantLinear
from .quantizers import code_range, is_full_precision
from .rotation import rotate_linear_
from .smooth import InputAbsMax, smooth_linear_

METHODS = ("rtn", "hadamard", "smooth", "gptq", "lowrank")
# Statistic each calibrated method collects on the input of every configured linear.
_CALIBRATION_STATISTICS = {"smooth": InputAbsMax, "gptq": HessianAccumulator}
CALIBRATED_METHODS = tuple(_CALIBRATION_STATISTICS)


def quantize(model, config, *, method="rtn", calibration=None, inplace=False, symmetric=True, group_size=None,
             clip="minmax", alpha=0.5, rank=32, damp=0.01, block_size=128, batch_size=16):
    """Return `model` with every layer of `config` a QuantLinear at its bits, prepared by `method`.

    calibration: (x_t, t, y), inputs of model(x_t, t, y), needed by "smooth" and "gptq" and run in
    batches of `batch_size`. symmetric/group_size/clip set the weight quantizer of every layer;
    alpha is SmoothQuant's migration strength, rank the low-rank branch's rank (capped by the layer
    shape), damp and block_size GPTQ's dampening and column block. Deep-copies unless inplace.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    validate_config(config, model)
    if method in _CALIBRATION_STATISTICS and calibration is None:
        raise ValueError(f"method {method!r} needs calibration=(x_t, t, y)")
    already = [name for name in config if isinstance(model.get_submodule(name), QuantLinear)]
    if already:
        raise ValueError(f"{already[0]} is already quantized; switch bits of a quantized model with set_bits_")
    if not inplace:
        model = copy.deepcopy(model)
    statistics = {}
    if method in _CALIBRATION_STATISTICS:
        statistics = collect_input_statistics(model, list(config), calibration, _CALIBRATION_STATISTICS[method],
                                              batch_size)
    for name, bits in config.items():
        layer = QuantLinear.from_linear(model.get_submodule(name), bits["w_bits"], bits["a_bits"],
                                        symmetric=symmetric, group_size=group_size, clip=clip)
        if method == "hadamard":
            rotate_linear_(layer)
        elif method == "smooth":
            smooth_linear_(layer, statistics[name].value, alpha)
        elif method == "gptq":
            gptq_linear_(layer, statistics[name].hessian(), damp=damp, block_size=block_size)
        elif method == "lowrank":
            layer.attach_branch(LowRankBranch.from_weight(layer.weight, min(rank, *layer.weight.shape)))
        _set_submodule(model, name, layer)
    return model


def set_bits_(model, config):
    """Switch every quantized layer to its bits in `config` (absent layers to full precision), using the caches."""
    validate_config(config, model)
    for name in quantizable_layers(model):
        layer = model.get_submodule(name)
        entry = config.get(name)
        if not isinstance(layer, QuantLinear):
            if entry is not None:
                raise ValueError(f"{name} is not quantized; call quantize on the model first")
            continue
        layer.set_bits(*((entry["w_bits"], entry["a_bits"]) if entry else (32, 32)))
    return model


def quantization_map(model):
    """The bit configuration of a quantized model; layers with both quantizers off are left out (full precision)."""
    config = {}
    for name in quantizable_layers(model):
        layer = model.get_submodule(name)
        if isinstance(layer, QuantLinear) and not (is_full_precision(layer.w_bits) and is_full_precision(layer.a_bits)):
            config[name] = {"w_bits": layer.w_bits, "a_bits": layer.a_bits}
    return config


def calibrate_activations_(model, calibration, batch_size=16):
    """Give every activation-quantized layer a static per-tensor input scale from the calibration set.

    The scale is max |T(x)| over the set divided by the largest code at the layer's current
    a_bits; after `set_bits_` changes a_bits, call this again (static scales do not follow the bits).
    """
    layers = {name: model.get_submodule(name) for name in quantizable_layers(model)}
    layers = {name: layer for name, layer in layers.items()
              if isinstance(layer, QuantLinear) and not is_full_precision(layer.a_bits)}
    for layer in layers.values():
        layer.act_scale = None  # collect under dynamic scales, as a fresh model runs
    transformed = {name: _TransformedAbsMax(layer.input_transform) for name, layer in layers.items()}
    hooks = [layer.register_forward_pre_hook(lambda module, args, stat=transformed[name]: stat.add(args[0]))
             for name, layer in layers.items()]
    try:
        run_calibration(model, calibration, batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    for name, layer in layers.items():
        qmax = code_range(layer.a_bits, symmetric=True)[1]
        layer.act_scale = (transformed[name].value.max() / qmax).clamp(min=1e-8)
    return model


class _TransformedAbsMax(InputAbsMax):
    """InputAbsMax of the input after the layer's transform: what the activation quantizer sees."""

    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def add(self, x):
        super().add(x if self.transform is None else self.transform(x))


def collect_input_statistics(model, names, calibration, statistic, batch_size=16):
    """Run the calibration set through `model` and feed each named layer's inputs to a new `statistic()`."""
    statistics = {name: statistic() for name in names}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, accumulator=statistics[name]: accumulator.add(args[0])) for name in names]
    try:
        run_calibration(model, calibration, batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    return statistics


def run_calibration(model, calibration, batch_size=16):
    """Forward the calibration (x_t, t, y) in eval mode and in batches, on the model's device."""
    x_t, t, y = _check_calibration(calibration)
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(x_t), batch_size):
                batch = slice(start, start + batch_size)
                model(x_t[batch].to(device), t[batch].to(device), y[batch].to(device))
    finally:
        model.train(training)


def _check_calibration(calibration):
    if not (isinstance(calibration, (tuple, list)) and len(calibration) == 3
            and all(torch.is_tensor(part) for part in calibration)):
        raise ValueError("calibration must be a tuple of three tensors (x_t, t, y)")
    if len({len(part) for part in calibration}) != 1 or len(calibration[0]) == 0:
        raise ValueError(f"calibration tensors need one equal, non-zero batch size, got "
                         f"{[len(part) for part in calibration]}")
    return calibration


def _set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
