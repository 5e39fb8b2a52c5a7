"""Packed deployment checkpoints: a quantized DiT written at its real bit-widths, loaded as integer layers.

`export` writes a folder: `packed.safetensors` (each quantized linear's weight codes packed at its
own bits, fp16 scales, bias, input-transform and branch tensors; every other parameter in its float
dtype) and `packed.json` (model config, bit configuration, per-layer quantizer settings, format
version, checksum). `load_exported` rebuilds the DiT with IntLinear layers that run integer GEMMs,
folds what smoothing the graph allows into adaLN and qkv, and deploys each layer on the fastest exact
backend of the machine.
"""
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..bits import is_full_precision
from ..branches import BRANCHES
from ..diffusion.defaults import sampling_defaults, set_sampling_defaults_
from ..methods.rotation import HadamardTransform
from ..methods.smooth import SmoothTransform
from ..models.checkpoint import CheckpointError, load_state_strict
from ..models.dit import DiT, DiTConfig
from ..quant.linear import QuantLinear
from .fold import fold_smoothing_
from .integer import IntLinear
from .pack import pack, unpack

FORMAT = "treeq-packed"
FORMAT_VERSION = 2  # 2 added per-layer `activations`; version 1 files (static_act_scale only) still load
_READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE, META_FILE = "packed.safetensors", "packed.json"
_FP16_NORMAL = (torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max)

# How each input transform and branch is described in the JSON and rebuilt (its tensors travel in
# the safetensors file under `<layer>.input_transform.*` / `<layer>.branch.*`).
TRANSFORMS = {
    "hadamard": (HadamardTransform, lambda module: {"width": module.width, "block_size": module.size},
                 lambda spec, layer: HadamardTransform(spec["width"])),
    "smooth": (SmoothTransform, lambda module: {},
               lambda spec, layer: SmoothTransform(torch.ones(layer["in_features"]))),
}
BRANCHES_SPEC = {name: (cls, lambda module: module.describe(),
                     lambda spec, layer, cls=cls: cls(layer["in_features"], layer["out_features"],
                                                      **{k: v for k, v in spec.items() if k != "type"}))
             for name, cls in BRANCHES.items()}


def export(model, path, *, scale_dtype=torch.float16):
    """Write the packed checkpoint of a quantized DiT (QuantLinear or IntLinear layers) to the folder `path`.

    scale_dtype: float16 halves the scale bytes (it matters for group-wise weights) at a relative
    rounding of <= 2^-11 per scale; float32 reproduces the fake-quantized model to float rounding.
    A QuantLinear with both quantizers off is stored as the plain float linear it computes. Both files
    are written under temporary names and renamed into place, so a failure leaves no half-written pair.
    """
    if scale_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"scale_dtype must be torch.float16 or torch.float32, got {scale_dtype!r}")
    if not isinstance(getattr(model, "config", None), DiTConfig):
        raise ValueError(f"the packed integer export holds our DiT only, not a {type(model).__name__}; "
                         "a text-to-image family's run folder loads as it is (treeq.load_run, or diffusers' "
                         "from_pretrained with treeq.TreeQConfig)")
    quantized = {name: module for name, module in model.named_modules() if isinstance(module, (QuantLinear, IntLinear))}
    tensors, layers = {}, {}
    for name, module in quantized.items():
        entry = _export_layer(name, module, tensors, scale_dtype)
        if entry is not None:
            layers[name] = entry
    owned = tuple(name + "." for name in quantized)
    for key, value in model.state_dict().items():
        if not key.startswith(owned):
            tensors[key] = value
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(),
            "bits": _bits(layers), "layers": layers, "sampling": sampling_defaults(model),
            "source": getattr(model, "source", None)}
    _write_pair(_paths(path), {key: value.detach().contiguous().cpu() for key, value in tensors.items()}, meta)


def load_exported(path, *, backend="auto", resident="prepacked", fold=True):
    """The inference DiT of a packed export folder (or either of its files): IntLinear layers, the rest strict.

    fold: fold smoothing transforms into the op before them (deploy/fold.py). backend / resident: where
    each IntLinear's GEMM runs and how its weight is held (IntLinear.deploy_); backend=None leaves the
    layers undeployed (int8 codes, torch._int_mm).
    """
    weights_path, meta_path = _paths(path)
    for file in (meta_path, weights_path):
        if not file.exists():
            raise FileNotFoundError(f"no such file: {file}")
    meta = _read_meta(meta_path)
    state = _read_tensors(weights_path, meta)
    try:
        model = DiT(DiTConfig(**meta["model"]))
    except TypeError as error:
        raise CheckpointError(f"{meta_path} holds no valid DiT config: {error}") from None
    for name, layer in meta["layers"].items():
        _install_layer(model, name, layer, state, meta_path)
    model = restore_origin_(load_state_strict(model, state, weights_path).eval(), meta)
    if fold:
        fold_smoothing_(model)
    if backend is not None:
        for module in model.modules():
            if isinstance(module, IntLinear):
                module.deploy_(backend, resident)
    return model


def _export_layer(name, module, tensors, scale_dtype):
    """Add one quantized linear's tensors; return its JSON entry (None when stored as a float linear)."""
    if isinstance(module, QuantLinear):
        if is_full_precision(module.w_bits):
            if not is_full_precision(module.a_bits):
                raise ValueError(f"{name}: w_bits {module.w_bits} with a_bits {module.a_bits} has no integer form; "
                                 "export quantizes weights whenever it quantizes inputs")
            tensors[name + ".weight"] = float_weight(module)
            if module.bias is not None:
                tensors[name + ".bias"] = module.bias
            return None
        module = IntLinear.from_quant_linear(module)
    quantized = module.quantized_weight()
    tensors[name + ".weight_packed"] = pack(quantized.codes, quantized.bits)
    tensors[name + ".weight_scale"] = _scale(quantized.scale, scale_dtype)
    if quantized.zero_point is not None:
        tensors[name + ".weight_zero_point"] = quantized.zero_point.half()  # integers within +-128: exact
    for key, value in module.state_dict().items():
        if not key.startswith("weight_"):
            tensors[f"{name}.{key}"] = value
    return {"in_features": module.in_features, "out_features": module.out_features, "w_bits": module.w_bits,
            "a_bits": module.a_bits, "symmetric": module.symmetric, "group_size": module.group_size,
            "bias": module.bias is not None, "activations": module.activations,
            "input_transform": describe_module(name, module.input_transform, TRANSFORMS, "input transform"),
            "branch": describe_module(name, module.branch, BRANCHES_SPEC, "branch")}


def float_weight(layer):
    """The weight of the plain linear a QuantLinear with both quantizers off computes.

    y = T(x) (W + D)^T with D = branch.dense() and T linear, T(x) = x A, A = T(I): so W' = (W + D) A^T.
    """
    with torch.no_grad():
        weight = layer.weight.detach()
        if layer.branch is not None:
            weight = weight + layer.branch.dense().to(weight.dtype)
        if layer.input_transform is not None:
            identity = torch.eye(layer.in_features, dtype=weight.dtype, device=weight.device)
            weight = weight @ layer.input_transform(identity).T
    return weight


def _scale(scale, dtype):
    """Scales in `dtype`; float32 for a layer whose scales leave fp16's normal range (tiny weights)."""
    nonzero = scale[scale != 0]
    if nonzero.numel() and (nonzero.min() < _FP16_NORMAL[0] or nonzero.max() > _FP16_NORMAL[1]):
        return scale.float()
    return scale.to(dtype)


def describe_module(name, module, kinds, what):
    if module is None:
        return None
    for kind, (cls, describe, _) in kinds.items():
        if type(module) is cls:
            return {"type": kind, **describe(module)}
    raise ValueError(f"{name}: cannot export {what} {type(module).__name__}; known: {', '.join(kinds)}")


def _bits(layers):
    return {name: {"w_bits": layer["w_bits"], "a_bits": layer["a_bits"]} for name, layer in sorted(layers.items())}


def _paths(path):
    """(weights, metadata) paths of an export folder; a path to either file stands for its folder."""
    folder = Path(path)
    if folder.name in (WEIGHTS_FILE, META_FILE):
        folder = folder.parent
    return folder / WEIGHTS_FILE, folder / META_FILE


def _write_pair(paths, tensors, meta):
    """Both files to temporary names, then renamed: the JSON (with the weights' checksum) goes last."""
    weights_path, meta_path = paths
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = [file.with_name(file.name + ".tmp") for file in paths]
    try:
        data = save_safetensors(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        meta["safetensors_bytes"], meta["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        temporary[0].write_bytes(data)
        temporary[1].write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.replace(temporary[0], weights_path)
        os.replace(temporary[1], meta_path)
    finally:
        for file in temporary:
            file.unlink(missing_ok=True)


def read_meta(meta_path, format_name, versions, required, kind):
    """An export's JSON after checking its format, version and required keys; one CheckpointError line else."""
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{meta_path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != format_name:
        raise CheckpointError(f"{meta_path} is not a TreeQ {kind} export (format {format_name!r})")
    if meta.get("format_version") not in versions:
        raise CheckpointError(f"{meta_path} has format version {meta.get('format_version')!r}; "
                              f"this TreeQ reads versions {', '.join(map(str, versions))}")
    missing = [key for key in required if key not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} lacks {', '.join(missing)}")
    return meta


def restore_origin_(model, meta):
    """Give a loaded model the sampling defaults and source its export recorded; returns it."""
    if meta.get("sampling") is not None:  # where the model came from decides how it samples
        set_sampling_defaults_(model, meta["sampling"])
    if meta.get("source") is not None:
        model.source = meta["source"]
    return model


def _read_meta(meta_path):
    meta = read_meta(meta_path, FORMAT, _READABLE_VERSIONS, ("model", "bits", "layers", "safetensors_bytes", "sha256"),
                     "packed")
    if not isinstance(meta["layers"], dict) or not all(isinstance(layer, dict) for layer in meta["layers"].values()):
        raise CheckpointError(f"{meta_path}: `layers` must map layer names to settings")
    if meta["bits"] != _bits(meta["layers"]):
        raise CheckpointError(f"{meta_path}: its bit configuration disagrees with its layer settings")
    return meta


def _read_tensors(weights_path, meta):
    """The safetensors dict, after checking the file is exactly the one the JSON was written with."""
    data = weights_path.read_bytes()
    if len(data) != meta["safetensors_bytes"]:
        raise CheckpointError(f"{weights_path} has {len(data)} bytes, its export recorded "
                              f"{meta['safetensors_bytes']}: truncated or from another export")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{weights_path} does not match the checksum its export recorded: corrupt")
    try:
        return load_safetensors(data)
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {error}") from None


def _install_layer(model, name, layer, state, source):
    """Swap an IntLinear for the linear at `name` and turn its stored tensors into its buffers."""
    try:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = getattr(parent, child)
        if (original.in_features, original.out_features) != (layer["in_features"], layer["out_features"]):
            raise ValueError(f"the model's linear is {original.in_features} -> {original.out_features}")
        module = IntLinear(layer["in_features"], layer["out_features"], w_bits=layer["w_bits"], a_bits=layer["a_bits"],
                           bias=layer["bias"], symmetric=layer["symmetric"], group_size=layer["group_size"],
                           activations=layer.get("activations", "static" if layer.get("static_act_scale") else "dynamic"),
                           input_transform=rebuild_module(layer["input_transform"], TRANSFORMS, layer),
                           branch=rebuild_module(layer["branch"], BRANCHES_SPEC, layer))
        numel = layer["in_features"] * layer["out_features"]
        codes = unpack(state.pop(name + ".weight_packed"), layer["w_bits"], numel)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: layer {name} cannot be rebuilt: {error}") from None
    state[name + ".weight_codes"] = codes.view(layer["out_features"], layer["in_features"])
    transform = module.input_transform
    if isinstance(transform, HadamardTransform) and transform.size != layer["input_transform"]["block_size"]:
        raise CheckpointError(f"{source}: layer {name} was rotated with Hadamard blocks of "
                              f"{layer['input_transform']['block_size']}, this TreeQ builds {transform.size}")
    setattr(parent, child, module)


def rebuild_module(spec, kinds, layer):
    if spec is None:
        return None
    if spec.get("type") not in kinds:
        raise ValueError(f"unknown kind {spec.get('type')!r}; known: {', '.join(kinds)}")
    return kinds[spec["type"]][2](spec, layer)
