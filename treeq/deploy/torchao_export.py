"""torchao export: a quantized DiT whose quantized linears hold torchao tensors made of the run's own codes.

Why: torchao's quantized tensors are what PyTorch's serving stack runs and compiles (`torch.compile`,
int8 tensor cores through `torch._int_mm`), so a searched mixed-precision run should become one without
being quantized again: every layer keeps its own bits and the codes and scales of the run (GPTQ codes
of rotated weights), carried over by a config of torchao's own `quantize_` (`TreeQCodesConfig`,
registered with its handler), one layer at a time.

Per layer, at its bits:
- quantized weight (symmetric, per output channel) and dynamic per-token inputs: a torchao `Int8Tensor`
  holding the b-bit codes in int8 with their per-channel scales, run by torchao's int8 GEMM
  (`torch._int_mm`). With `activation_bits="run"` (the default) the layer feeds it the run's own
  per-token input codes, which torchao's int8 quantization passes through unchanged (TorchaoLinear
  says how), so the export computes the run's W4A4 or W3A3 up to float rounding; `activation_bits=8`
  lets torchao quantize the float input to int8 itself: W4A8, the more accurate form Hopper's int8
  tensor cores serve (there are no 4-bit ones there).
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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..bits import is_full_precision
from ..diffusion.defaults import sampling_defaults
from ..io import atomic_write
from ..models.checkpoint import CheckpointError, load_state_strict
from ..models.dit import DiT, DiTConfig
from ..quant.linear import QuantLinear
from ..quant.quantizers import quantize_activation_per_token
from .export import BRANCHES_SPEC, TRANSFORMS, describe_module, float_weight, read_meta, rebuild_module, restore_origin_
from .integer import IntLinear

FORMAT, FORMAT_VERSION = "treeq-torchao", 1
WEIGHTS_FILE, META_FILE = "torchao.pt", "torchao.json"
ACTIVATION_BITS = ("run", 8)
# Columns appended to the input codes (and zero columns to the weight) of a layer fed the run's codes:
# -128 and 127, then zeros to keep the GEMM's inner size a multiple of 8 (what torch._int_mm needs on GPUs).
ANCHOR_COLUMNS = 8


def torchao_available():
    """Whether torchao imports here (benches leave its rows out where it does not)."""
    try:
        import_torchao()
    except ImportError:
        return False
    return True


def import_torchao():
    """torchao's quantization API, or a one-line error: it is an optional extra (`pip install torchao`).

    torchao logs a warning for each of its CUDA extensions a CPU machine cannot load; those are silenced."""
    import logging
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # torchao's import also registers an enum in a way torch 2.13 warns about
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise ImportError("the torchao export needs torchao: pip install torchao (make install does)") from None
    finally:
        quiet[1].setLevel(levels[1])
    return quantization


class TorchaoLinear(nn.Module):
    """y = s_x * linear([c_x | anchors]) + bias + branch(T(x)), or linear(T(x)) + bias + branch(T(x)) when
    `input_bits` is None. T: the input transform; `linear.weight`: a torchao Int8Tensor.

    With input_bits b, c_x are the run's own per-token b-bit input codes of T(x) (shifted by their zero
    point, so integers within int8) and s_x their scales. The anchor columns (-128 and 127, then zeros
    to ANCHOR_COLUMNS, against zero weight columns) give every row the range [-128, 127], for which
    torchao's per-token int8 quantization is the identity (scale 1, zero point 0): its int8 GEMM then
    sums exactly the run's codes, whatever b and whether the run's inputs are symmetric. Without
    input_bits torchao quantizes T(x) to int8 itself (W4A8), or the weight is weight-only.
    """

    def __init__(self, in_features, out_features, *, bias=True, input_bits=None, symmetric_inputs=False,
                 input_transform=None, branch=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_bits, self.symmetric_inputs = input_bits, symmetric_inputs
        width = in_features + (0 if input_bits is None else ANCHOR_COLUMNS)
        self.linear = nn.Linear(width, out_features, bias=False, device="meta")
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_module("input_transform", input_transform)
        self.register_module("branch", branch)

    def forward(self, x):
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.input_bits is None:
            out = self.linear(x)
        else:
            codes, scale, zero_point = quantize_activation_per_token(x, self.input_bits, symmetric=self.symmetric_inputs)
            codes = codes.to(x.dtype) if zero_point is None else codes.to(x.dtype) - zero_point.to(x.dtype)
            anchors = _anchors(x).expand(*codes.shape[:-1], ANCHOR_COLUMNS)
            out = self.linear(torch.cat([codes, anchors], dim=-1)) * scale.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out if self.branch is None else out + self.branch(x)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, input_bits={self.input_bits}"


def _anchors(x):
    anchors = torch.zeros(ANCHOR_COLUMNS, dtype=x.dtype, device=x.device)
    anchors[0], anchors[1] = -128, 127
    return anchors


def layer_kind(layer):
    """How a QuantLinear at its current bits exports: "float", "torchao" or "treeq" (no torchao form:
    Int8Tensor has one scale per output row, no weight zero point, and per-token inputs only)."""
    if is_full_precision(layer.w_bits):
        return "float"
    per_channel = layer.symmetric and layer.group_size is None
    per_token_inputs = is_full_precision(layer.a_bits) or layer.activations != "static"
    return "torchao" if per_channel and per_token_inputs else "treeq"


def _torchao_weight(layer, quantized_inputs, anchored):
    """The layer's codes and per-channel scales as a torchao Int8Tensor: inputs quantized per token to int8
    or not, and (anchored) ANCHOR_COLUMNS zero columns appended for TorchaoLinear's anchors."""
    quantization = import_torchao()
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

    quantized = layer.quantized_weight()
    codes = quantized.codes
    if anchored:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], ANCHOR_COLUMNS)], dim=1)
    inputs = QuantizeTensorToInt8Kwargs(PerRow(), MappingType.ASYMMETRIC) if quantized_inputs else None
    return quantization.Int8Tensor(codes.clone(), quantized.scale.float().clone(), [1, codes.shape[1]],
                                   layer.weight.dtype, act_quant_kwargs=inputs)


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
    input_bits = _input_bits(layer, activation_bits)
    module = TorchaoLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           input_bits=input_bits, symmetric_inputs=layer.activations == "dynamic",
                           input_transform=_copy(layer.input_transform), branch=_copy(layer.branch))
    weight = _torchao_weight(layer, not is_full_precision(layer.a_bits), anchored=input_bits is not None)
    module.linear.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        module.bias = layer.bias.detach().clone()
    return module


def _input_bits(layer, activation_bits):
    """The bits of the run's input codes a torchao layer feeds its int8 GEMM (None: torchao's own int8
    quantization of the float input, the W4A8 form, or float inputs)."""
    if is_full_precision(layer.a_bits) or activation_bits != "run":
        return None
    return layer.a_bits


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
    """Write the torchao export of a quantized transformer (QuantLinear layers, e.g. a run folder's model: our
    DiT or a diffusers family's transformer, which is rebuilt from its class and config) to `path`."""
    layers = {name: _describe_layer(name, module, activation_bits) for name, module in model.named_modules()
              if isinstance(module, QuantLinear)}
    if not layers:
        raise ValueError("the model has no quantized linears: export a run written by `treeq quantize`")
    converted = to_torchao_(copy.deepcopy(model), activation_bits)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": _config(model),
            "transformer_class": type(model).__name__, "activation_bits": activation_bits, "layers": layers, "sampling": sampling_defaults(model),
            "bits": {name: {"w_bits": layer["w_bits"], "a_bits": layer["a_bits"]} for name, layer in layers.items()},
            "source": getattr(model, "source", None)}
    if not isinstance(model.config, DiTConfig):  # a family samples by its folder's settings (model.sampling)
        meta["sampling"] = dict(getattr(model, "sampling", {}))
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
    """The state file, then the JSON with its checksum (a folder with the JSON holds a whole export)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    meta["state_bytes"], meta["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    atomic_write(folder / WEIGHTS_FILE, lambda path: path.write_bytes(data))
    atomic_write(folder / META_FILE, lambda path: path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))


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
    model = _structure(meta, meta_path)
    for name, layer in meta["layers"].items():
        _install(model, name, layer, meta_path)
    model = load_state_strict(model, state, weights_path, assign=True).eval()
    if isinstance(model, DiT):
        return restore_origin_(model, meta)
    model.source, model.sampling = meta["source"], meta["sampling"]
    return model


def _config(model):
    """The model's config as JSON: our DiTConfig, or a diffusers transformer's (its private keys dropped)."""
    if isinstance(model.config, DiTConfig):
        return model.config.to_dict()
    return {key: value for key, value in dict(model.config).items() if not key.startswith("_")}


def _structure(meta, meta_path):
    """The empty transformer an export's state loads into: our DiT, or the family's class from its config."""
    name = meta.get("transformer_class", "DiT")
    try:
        if name == "DiT":
            return DiT(DiTConfig(**meta["model"]))
        import diffusers
        return getattr(diffusers, name).from_config(meta["model"])
    except (TypeError, AttributeError, ValueError) as error:
        raise CheckpointError(f"{meta_path} holds no valid {name} config: {error}") from None


def _read_meta(meta_path):
    return read_meta(meta_path, FORMAT, (FORMAT_VERSION,), ("model", "layers", "state_bytes", "sha256"), "torchao")


def _install(model, name, layer, source):
    """Put the empty module of one exported layer at `name`; load_state_dict(assign=True) fills it."""
    try:
        model.set_submodule(name, _empty(layer))
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
