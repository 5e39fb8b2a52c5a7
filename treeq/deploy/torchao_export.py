"""torchao export: a quantized DiT whose quantized linears hold torchao tensors made of the run's own codes.

Why: torchao's quantized tensors are what PyTorch's serving stack runs and compiles (`torch.compile`,
int8 tensor cores through `torch._int_mm`), so a searched mixed-precision run should become one without
being quantized again: every layer keeps its own bits and the codes and scales of the run (GPTQ codes
of rotated weights), carried over by a config of torchao's own `quantize_` (`TreeQCodesConfig`,
registered with its handler), one layer at a time.

Per layer, at its bits:
- quantized weight (symmetric, per output channel) and dynamic per-token inputs: a torchao `Int8Tensor`
  holding the b-bit codes in int8 with their per-channel scales, its inputs quantized per token to int8
  by torchao (asymmetric) before `torch._int_mm`. With `activation_bits="run"` (the default) inputs are
  first rounded to the run's own a-bit per-token grid, which int8 holds exactly (up to float rounding),
  so the export computes the run's W4A4 or W3A3; `activation_bits=8` skips that rounding: W4A8, the
  more accurate form Hopper's int8 tensor cores serve (there are no 4-bit ones there).
- quantized weight with full-precision inputs: a weight-only `Int8Tensor`.
- full-precision weight: a plain `nn.Linear`, its transform and branch folded in (export.float_weight).
- no torchao form (group-wise or asymmetric weights, static activation scales: `Int8Tensor`'s dynamic
  path has one scale per output row and no weight zero point): our integer layer (`IntLinear`), named
  in the JSON as `"kind": "treeq"`.
Input transforms stay modules: a DiT linear's input comes from adaLN's per-sample modulation,
attention's softmax-weighted sum or GELU, none a fixed linear map a rotation could fold into (the packed
export folds smoothing into adaLN and qkv; torchao's weights cannot absorb a row scale, so here it stays
one multiply per feature). Branches (low-rank, Monarch) stay float modules added to the output.

Files: `torchao.pt` (the state dict, torchao tensors included; `torch.load(..., weights_only=True)` reads
it once torchao is imported) and `torchao.json` (model config, per-layer kinds and settings, checksum).
"""
import copy
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..bits import is_full_precision
from ..diffusion.defaults import sampling_defaults, set_sampling_defaults_
from ..models.checkpoint import CheckpointError, load_state_strict
from ..models.dit import DiT, DiTConfig
from ..quant.linear import QuantLinear
from ..quant.quantizers import fake_quantize_activation
from .export import BRANCHES_SPEC, TRANSFORMS, describe_module, float_weight, rebuild_module
from .integer import IntLinear

FORMAT, FORMAT_VERSION = "treeq-torchao", 1
WEIGHTS_FILE, META_FILE = "torchao.pt", "torchao.json"
ACTIVATION_BITS = ("run", 8)


def import_torchao():
    """torchao's quantization API, or a one-line error: it is an optional extra (`pip install torchao`).

    torchao logs a warning for each of its CUDA extensions a CPU machine cannot load; those are silenced."""
    import logging
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise ImportError("the torchao export needs torchao: pip install torchao (make install does)") from None
    return quantization


class TorchaoLinear(nn.Module):
    """y = linear(R_b(T(x))) + branch(T(x)): `linear.weight` a torchao tensor, R_b the per-token round to
    the run's input bits b (None: none), T the input transform."""

    def __init__(self, in_features, out_features, *, bias=True, input_bits=None, symmetric_inputs=False,
                 input_transform=None, branch=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_bits, self.symmetric_inputs = input_bits, symmetric_inputs
        self.linear = nn.Linear(in_features, out_features, bias=bias, device="meta")
        self.register_module("input_transform", input_transform)
        self.register_module("branch", branch)

    def forward(self, x):
        if self.input_transform is not None:
            x = self.input_transform(x)
        rounded = x if self.input_bits is None else fake_quantize_activation(x, self.input_bits,
                                                                             symmetric=self.symmetric_inputs)
        out = self.linear(rounded)
        return out if self.branch is None else out + self.branch(x)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, input_bits={self.input_bits}"


def layer_kind(layer):
    """How a QuantLinear at its current bits exports: "float", "torchao" or "treeq" (no torchao form)."""
    if is_full_precision(layer.w_bits):
        return "float"
    if is_full_precision(layer.a_bits):
        return "torchao" if layer.symmetric and layer.group_size is None else "treeq"
    dynamic = layer.activations in ("dynamic", "dynamic-asym")
    return "torchao" if dynamic and layer.symmetric and layer.group_size is None else "treeq"


def _torchao_weight(layer, quantized_inputs):
    """The layer's codes and scales as a torchao Int8Tensor (inputs quantized per token to int8, or not)."""
    quantization = import_torchao()
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

    quantized = layer.quantized_weight()
    inputs = QuantizeTensorToInt8Kwargs(PerRow(), MappingType.ASYMMETRIC) if quantized_inputs else None
    return quantization.Int8Tensor(quantized.codes.clone(), quantized.scale.float().clone(),
                                   [1, layer.in_features], layer.weight.dtype, act_quant_kwargs=inputs)


def _convert(layer, activation_bits):
    """The export module of one QuantLinear at its current bits."""
    kind = layer_kind(layer)
    if kind == "float":
        module = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device)
        with torch.no_grad():
            module.weight.copy_(float_weight(layer))
            if layer.bias is not None:
                module.bias.copy_(layer.bias)
        return module
    if kind == "treeq":
        return IntLinear.from_quant_linear(layer)
    module = TorchaoLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           input_bits=_input_bits(layer, activation_bits),
                           symmetric_inputs=layer.activations == "dynamic",
                           input_transform=_copy(layer.input_transform), branch=_copy(layer.branch))
    module.linear.weight = nn.Parameter(_torchao_weight(layer, not is_full_precision(layer.a_bits)),
                                        requires_grad=False)
    if layer.bias is not None:
        module.linear.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return module


def _input_bits(layer, activation_bits):
    """The bits a torchao layer rounds its inputs to before torchao's int8 (None: int8 alone is the run's)."""
    below_int8 = not is_full_precision(layer.a_bits) and layer.a_bits < 8
    return layer.a_bits if below_int8 and activation_bits == "run" else None


def _copy(module):
    return None if module is None else copy.deepcopy(module)


def _register_config():
    """TreeQCodesConfig: torchao's config for a TreeQ layer, handled by `_convert` through torchao's quantize_."""
    quantization = import_torchao()
    from torchao.core.config import AOBaseConfig
    from torchao.quantization.transform_module import register_quantize_module_handler

    @dataclass
    class TreeQCodesConfig(AOBaseConfig):
        """A QuantLinear becomes the torchao form of its own codes at its bits (see the module docstring)."""
        activation_bits: object = "run"

    register_quantize_module_handler(TreeQCodesConfig)(lambda module, config: _convert(module, config.activation_bits))
    return quantization, TreeQCodesConfig


_CONFIG = None


def codes_config(activation_bits="run"):
    """(torchao's quantization module, a TreeQCodesConfig instance); the config class is registered once."""
    global _CONFIG
    if _CONFIG is None:
        _CONFIG = _register_config()
    quantization, config = _CONFIG
    return quantization, config(activation_bits=activation_bits)


def to_torchao_(model, activation_bits="run"):
    """Swap every QuantLinear of `model` for its torchao (or float, or integer) form; returns the model."""
    if activation_bits not in ACTIVATION_BITS:
        raise ValueError(f"activation_bits must be one of {ACTIVATION_BITS}, got {activation_bits!r}")
    quantization, config = codes_config(activation_bits)
    quantization.quantize_(model, config, filter_fn=lambda module, name: isinstance(module, QuantLinear))
    return model


def export_torchao(model, path, activation_bits="run"):
    """Write the torchao export of a quantized DiT (QuantLinear layers, e.g. a run folder's model) to `path`."""
    if not isinstance(getattr(model, "config", None), DiTConfig):
        raise ValueError(f"the torchao export holds our DiT only, not a {type(model).__name__}")
    layers = {name: _describe_layer(name, module, activation_bits) for name, module in model.named_modules()
              if isinstance(module, QuantLinear)}
    if not layers:
        raise ValueError("the model has no quantized linears: export a run written by `treeq quantize`")
    converted = to_torchao_(copy.deepcopy(model), activation_bits)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(),
            "activation_bits": activation_bits, "layers": layers,
            "bits": {name: {"w_bits": layer["w_bits"], "a_bits": layer["a_bits"]} for name, layer in layers.items()}, "sampling": sampling_defaults(model),
            "source": getattr(model, "source", None)}
    _write(Path(path), {key: value.detach().cpu() for key, value in converted.state_dict().items()}, meta)
    return converted


def _describe_layer(name, layer, activation_bits):
    kind = layer_kind(layer)
    entry = {"kind": kind, "w_bits": layer.w_bits, "a_bits": layer.a_bits, "in_features": layer.in_features,
             "out_features": layer.out_features, "bias": layer.bias is not None}
    if kind == "float":
        return entry
    entry.update(activations=layer.activations, symmetric=layer.symmetric, group_size=layer.group_size,
                 input_transform=describe_module(name, layer.input_transform, TRANSFORMS, "input transform"),
                 branch=describe_module(name, layer.branch, BRANCHES_SPEC, "branch"))
    if kind == "torchao":
        entry["input_bits"] = _input_bits(layer, activation_bits)
    return entry


def _write(folder, state, meta):
    """The state file, then the JSON with its checksum, each under a temporary name renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    meta["state_bytes"], meta["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    for name, payload in ((WEIGHTS_FILE, data), (META_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())):
        temporary = folder / (name + ".tmp")
        try:
            temporary.write_bytes(payload)
            os.replace(temporary, folder / name)
        finally:
            temporary.unlink(missing_ok=True)


def load_torchao(path):
    """The DiT of a torchao export folder: TorchaoLinear, IntLinear and float layers as exported."""
    import_torchao()
    folder = Path(path)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    for file in (meta_path, weights_path):
        if not file.exists():
            raise FileNotFoundError(f"no such file: {file}")
    meta = _read_meta(meta_path)
    data = weights_path.read_bytes()
    if len(data) != meta["state_bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{weights_path} does not match the checksum its export recorded: truncated or corrupt")
    state = torch.load(io.BytesIO(data), weights_only=True)
    try:
        model = DiT(DiTConfig(**meta["model"]))
    except TypeError as error:
        raise CheckpointError(f"{meta_path} holds no valid DiT config: {error}") from None
    for name, layer in meta["layers"].items():
        _install(model, name, layer, meta_path)
    model = load_state_strict(model, state, weights_path, assign=True).eval()
    if meta.get("sampling") is not None:
        set_sampling_defaults_(model, meta["sampling"])
    if meta.get("source") is not None:
        model.source = meta["source"]
    return model


def _read_meta(meta_path):
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{meta_path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a TreeQ torchao export (format {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} has format version {meta.get('format_version')!r}; "
                              f"this TreeQ reads {FORMAT_VERSION}")
    missing = [key for key in ("model", "layers", "state_bytes", "sha256") if key not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} lacks {', '.join(missing)}")
    return meta


def _install(model, name, layer, source):
    """Put the empty module of one exported layer at `name`; load_state_dict(assign=True) fills it."""
    try:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _empty(layer))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: layer {name} cannot be rebuilt: {error}") from None


def _empty(layer):
    shape = layer["in_features"], layer["out_features"]
    if layer["kind"] == "float":
        return nn.Linear(*shape, bias=layer["bias"], device="meta")
    transform = rebuild_module(layer["input_transform"], TRANSFORMS, layer)
    branch = rebuild_module(layer["branch"], BRANCHES_SPEC, layer)
    if layer["kind"] == "treeq":
        return IntLinear(*shape, w_bits=layer["w_bits"], a_bits=layer["a_bits"], bias=layer["bias"],
                         symmetric=layer["symmetric"], group_size=layer["group_size"],
                         activations=layer["activations"], input_transform=transform, branch=branch)
    if layer["kind"] != "torchao":
        raise ValueError(f"unknown layer kind {layer['kind']!r}")
    return TorchaoLinear(*shape, bias=layer["bias"], input_bits=layer["input_bits"],
                         symmetric_inputs=layer["activations"] == "dynamic", input_transform=transform, branch=branch)
