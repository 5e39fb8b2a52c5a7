"""Apply a bit configuration to a DiT: swap linears for QuantLinear and run a recipe's methods.

`quantize` builds every layer's per-bit state for the bits it is configured at and for the
recipe's `switch_bits`; `set_bits_` then switches bits from those caches, and
`quantization_map` reads the bits back as the same JSON mapping. `quantized_structure` builds
the same modules empty, for a saved state dict to load into.
"""
import copy

from ..bits import is_full_precision, quantizable_layers, validate_config
from ..quant.activations import calibrate_activations_
from ..quant.linear import QuantLinear
from ..quant.statistics import fit_block_by_block
from .recipe import Recipe


def quantize(model, config, recipe=None, *, calibration=None, inplace=False, progress=False):
    """Return `model` with every layer of `config` a QuantLinear at its bits, prepared by `recipe`'s methods.

    calibration: (x_t, t, y), inputs of model(x_t, t, y), needed by methods with a statistic
    (smooth, gptq) and by static activations. Deep-copies unless inplace.
    """
    recipe = recipe or Recipe()
    if recipe.needs_calibration() and calibration is None:
        raise ValueError(f"recipe {','.join(recipe.methods)} with {recipe.activations} activations needs "
                         "calibration=(x_t, t, y)")
    model, layers = _swap_layers(model, config, recipe, inplace)
    for _, method, options in recipe.steps():
        def fit(name, statistic, method=method, options=options):
            method.apply(layers[name], statistic, prepared_bits(config[name], recipe, 0), **options)

        if method.statistic is None:
            for name in layers:
                fit(name, None)
        else:
            fit_block_by_block(model, lambda name, m=method: m.statistic() if name in layers else None, fit,
                               calibration, recipe.batch_size, _input_bits(config, recipe), progress)
    if recipe.activations == "static":
        a_bits = {name: prepared_bits(config[name], recipe, 1) for name in layers}
        calibrate_activations_(model, calibration, a_bits, clip=recipe.activation_clip, percentile=recipe.percentile,
                               batch_size=recipe.batch_size)
    return set_bits_(model, config)


def quantized_structure(model, config, recipe=None, *, inplace=False):
    """A copy of `model` (`model` itself if inplace) with the QuantLinears, transforms and branches
    `quantize` would make, left empty (at full precision) for `load_state_dict` of a saved quantized model."""
    recipe = recipe or Recipe()
    model, layers = _swap_layers(model, config, recipe, inplace)
    for _, method, options in recipe.steps():
        for layer in layers.values():
            method.rebuild(layer, **options)
    return model


def _swap_layers(model, config, recipe, inplace):
    validate_config(config, model)
    already = [name for name in config if isinstance(model.get_submodule(name), QuantLinear)]
    if already:
        raise ValueError(f"{already[0]} is already quantized; switch bits of a quantized model with set_bits_")
    if not inplace:
        model = copy.deepcopy(model)
    layers = {}
    for name in config:  # at full precision while the methods run: their statistics are FP statistics
        layers[name] = QuantLinear.from_linear(model.get_submodule(name), activations=recipe.activations,
                                               **recipe.weight_options())
        _set_submodule(model, name, layers[name])
    return model, layers


def _input_bits(config, recipe):
    """fit_block_by_block's `bits`: None (inputs from full precision), or each layer's bits to run fitted
    blocks at (weights only under static activations: their scales are calibrated after every step)."""
    if recipe.block_inputs == "fp":
        return None
    static = recipe.activations == "static"
    return {name: (entry["w_bits"], 32 if static else entry["a_bits"]) for name, entry in config.items()}


def prepared_bits(entry, recipe, index):
    """The w_bits (index 0) or a_bits (1) a layer needs state for: its own and the recipe's switch bits."""
    wanted = {(entry["w_bits"], entry["a_bits"])[index]} | {pair[index] for pair in recipe.switch_bits}
    return sorted(bits for bits in wanted if not is_full_precision(bits))


def set_bits_(model, config):
    """Switch every quantized layer to its bits in `config` (absent layers to full precision), using the caches."""
    validate_config(config, model)
    for name in quantizable_layers(model):
        layer = model.get_submodule(name)
        entry = config.get(name)
        bits = (entry["w_bits"], entry["a_bits"]) if entry else (32, 32)
        if not hasattr(layer, "set_bits"):
            if entry is not None and bits != (getattr(layer, "w_bits", 32), getattr(layer, "a_bits", 32)):
                raise ValueError(f"{name} cannot switch to w_bits {bits[0]}, a_bits {bits[1]}: "
                                 + ("an exported layer holds codes at one bit-width" if hasattr(layer, "w_bits")
                                    else "it is not quantized; call quantize on the model first"))
            continue
        try:
            layer.set_bits(*bits)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    return model


def quantization_map(model):
    """The bit configuration of a quantized model (QuantLinear or exported IntLinear layers);
    layers with both quantizers off are left out (full precision)."""
    config = {}
    for name in quantizable_layers(model):
        layer = model.get_submodule(name)
        bits = getattr(layer, "w_bits", 32), getattr(layer, "a_bits", 32)
        if not all(is_full_precision(b) for b in bits):
            config[name] = {"w_bits": bits[0], "a_bits": bits[1]}
    return config


def _set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)

