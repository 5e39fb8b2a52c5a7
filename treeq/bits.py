"""Bit configurations: which quantizable layer runs at which (w_bits, a_bits), and what that costs.

A configuration is a plain JSON-serialisable mapping `{layer name: {"w_bits": int, "a_bits": int}}`
keyed by module name in the model (`blocks.3.attn.qkv`); a layer absent from it stays in full
precision. Layers are the linears inside the transformer blocks (models/adapters says where, per
family); the embedders and the final layer are never quantized (TreeQ paper). The cost axis of the search is the BOPs-weighted
average bit-width.
"""
import json
import math
from pathlib import Path

from .io import atomic_write
from .models.adapters import adapter_for

QUANTIZED_BITS = (2, 3, 4, 5, 6, 7, 8)
FULL_PRECISION_BITS = (16, 32)  # either value means "leave this tensor in floating point"
SUPPORTED_BITS = QUANTIZED_BITS + FULL_PRECISION_BITS
PRESETS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4), "W3A3": (3, 3)}
# A layer left in floating point is deployed in half precision, so it costs 16 bits in every average.
FULL_PRECISION_COST_BITS = 16
_ENTRY_KEYS = ("a_bits", "w_bits")


def check_bits(bits):
    """Return `bits` if it is a supported bit-width (2..8 quantize, 16 or 32 leave as float)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def is_full_precision(bits):
    return bits in FULL_PRECISION_BITS


def quantizable_layers(model):
    """Names of the linears inside the model's blocks, in execution order (its family's adapter says where)."""
    return adapter_for(model).layers(model)


def layer_macs(model):
    """Multiply-accumulates per image of each quantizable layer.

    Token-wise linears run once per token; adaLN modulation runs once per image on the conditioning.
    """
    return _per_image(model, lambda layer: layer.in_features * layer.out_features)


def layer_overhead_macs(model):
    """Floating-point multiply-accumulates per image that each layer adds beside its quantized GEMM: its
    online input transform and its full-precision branch (each module's `macs_per_token()`).

    Kept apart from layer_macs, the BOPs axis: this work runs in float whatever the layer's bits."""
    return _per_image(model, lambda layer: sum(
        module.macs_per_token() for module in (getattr(layer, "input_transform", None), getattr(layer, "branch", None))
        if module is not None))


def _per_image(model, per_token):
    """{layer: per_token(layer) x the rows it runs on per sample}: image or text tokens, or 1 for modulation."""
    rows = adapter_for(model).layer_rows(model)
    return {name: per_token(model.get_submodule(name)) * rows[name] for name in rows}


def layer_weight_sizes(model):
    """Weight entries (in_features x out_features) of each quantizable layer: the memory cost axis."""
    return {name: _weight_size(model.get_submodule(name)) for name in quantizable_layers(model)}


def uniform_config(model, w_bits, a_bits):
    """Every quantizable layer at the same bits."""
    entry = {"w_bits": w_bits, "a_bits": a_bits}
    _check_entry("uniform_config", entry)
    return {name: dict(entry) for name in quantizable_layers(model)}


def preset_config(model, name):
    """uniform_config of a named preset such as "W4A4"."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return uniform_config(model, *PRESETS[name])


def validate_config(config, model):
    """Raise ValueError unless `config` is a well-formed bit configuration for `model`'s layers."""
    _check_structure(config)
    layers = quantizable_layers(model)
    unknown = sorted(set(config) - set(layers))
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
        raise ValueError(f"unknown layer names: {shown}; it may be a config for "
                         f"another model (this one has {len(layers)} quantizable layers, {layers[0]} .. {layers[-1]})")


def average_bits(config, model, *, cost="bops"):
    """Average bit-width of the quantizable layers under `config`.

    cost="bops": sqrt(sum MACs * w_bits * a_bits / sum MACs), so uniform W4A4 is 4.0.
    cost="memory": weight entries-weighted mean of w_bits.
    Absent and full-precision layers count as FULL_PRECISION_COST_BITS.
    """
    validate_config(config, model)
    if cost == "bops":
        sizes = layer_macs(model)
        total = sum(sizes[name] * math.prod(_cost_bits(config.get(name))) for name in sizes)
        return math.sqrt(total / sum(sizes.values()))
    if cost == "memory":
        sizes = layer_weight_sizes(model)
        total = sum(sizes[name] * _cost_bits(config.get(name))[0] for name in sizes)
        return total / sum(sizes.values())
    raise ValueError(f"cost must be 'bops' or 'memory', got {cost!r}")


def save_config(config, path):
    """Write sorted, indented JSON holding only the mapping; atomic (temporary file, then rename)."""
    _check_structure(config)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda p: p.write_text(text))


def load_config(path):
    """Read a configuration written by save_config (checked for form; validate_config checks layer names)."""
    try:
        config = json.loads(Path(path).read_text())
        _check_structure(config)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}: not a bit configuration: {error}") from None
    return config


def _weight_size(layer):
    return layer.in_features * layer.out_features


def _cost_bits(entry):
    if entry is None:
        return FULL_PRECISION_COST_BITS, FULL_PRECISION_COST_BITS
    return tuple(FULL_PRECISION_COST_BITS if is_full_precision(entry[key]) else entry[key]
                 for key in ("w_bits", "a_bits"))


def _check_structure(config):
    if not isinstance(config, dict):
        raise ValueError(f"a bit configuration is a dict of layer name -> bits, got {type(config).__name__}")
    for name, entry in config.items():
        _check_entry(name, entry)


def _check_entry(name, entry):
    if not isinstance(entry, dict) or tuple(sorted(entry)) != _ENTRY_KEYS:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{name}: expected exactly the keys w_bits and a_bits, got {keys}")
    for key in _ENTRY_KEYS:
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int) or value not in SUPPORTED_BITS:
            raise ValueError(f"{name}: {key} must be an int in {SUPPORTED_BITS}, got {value!r}")
