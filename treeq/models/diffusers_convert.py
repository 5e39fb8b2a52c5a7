"""Diffusers-format DiT weights (`DiTTransformer2DModel`) loaded into our DiT by key conversion.

diffusers splits the fused qkv projection, keeps a copy of the timestep and class embedders
in every block and renames the final layer; mapping its keys onto the official layout lets
checkpoints from the Hub's DiT pipelines run through the same quantization code.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import CheckpointError, load_state_strict, read_torch_checkpoint
from .dit import DiT, DiTConfig, sincos_pos_embed_2d

_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")  # the Hub's DiT configs use the older name
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# DiTTransformer2DModel's defaults, for configs written before a setting existed (norm_eps is absent
# from the Hub's facebook/DiT-* configs, so their MLP norm runs at 1e-5).
_DEFAULTS = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None,
    "num_layers": 28, "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000, "norm_eps": 1e-5,
}

# Settings our DiT reproduces only at these values; an absent setting counts as this value.
_REQUIRED = {
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "dropout": 0.0,
    "cross_attention_dim": None,
    "num_vector_embeds": None,
}

_EMBEDDER = "transformer_blocks.0.norm1.emb."  # the copy diffusers' final layer reads, and ours


def config_from_diffusers(diffusers_config):
    """Our DiTConfig for a diffusers DiT config.json; CheckpointError for what our DiT cannot express."""
    settings = {**_DEFAULTS, **diffusers_config}
    class_name = settings.get("_class_name", _CLASS_NAMES[0])
    if class_name not in _CLASS_NAMES:
        raise CheckpointError(f"diffusers class {class_name!r} is not a DiT; "
                              f"expected one of {', '.join(_CLASS_NAMES)}")
    unsupported = [f"{key}={settings.get(key, value)!r} (need {value!r})"
                   for key, value in _REQUIRED.items() if settings.get(key, value) != value]
    if unsupported:
        raise CheckpointError(f"diffusers DiT settings our DiT cannot express: {', '.join(unsupported)}")
    in_channels = settings["in_channels"]
    out_channels = settings["out_channels"] or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"out_channels={out_channels} must be in_channels ({in_channels}) or twice it")
    return DiTConfig(
        input_size=settings["sample_size"],
        patch_size=settings["patch_size"],
        in_channels=in_channels,
        hidden_size=settings["num_attention_heads"] * settings["attention_head_dim"],
        depth=settings["num_layers"],
        num_heads=settings["num_attention_heads"],
        mlp_ratio=4.0,  # FeedForward's default mult; DiTTransformer2DModel passes no inner dim
        class_dropout_prob=0.1,  # fixed inside CombinedTimestepLabelEmbeddings: the table keeps a null class
        num_classes=settings["num_embeds_ada_norm"],
        learn_sigma=out_channels == 2 * in_channels,
        freq_shift=1.0,  # Timesteps(downscale_freq_shift=1, flip_sin_to_cos=True): [cos | sin] as ours
        norm_eps=1e-6,  # AdaLayerNormZero's norm and norm_out hard-code 1e-6
        mlp_norm_eps=settings["norm_eps"],  # only norm3 (before the MLP) reads the configured eps
    )


def _key_map(depth):
    """Our key -> the diffusers keys it is made of (three for the fused qkv, one elsewhere)."""
    pairs = {"y_embedder.embedding_table.weight": [_EMBEDDER + "class_embedder.embedding_table.weight"]}
    for suffix in ("weight", "bias"):
        pairs[f"x_embedder.proj.{suffix}"] = [f"pos_embed.proj.{suffix}"]
        pairs[f"t_embedder.mlp.0.{suffix}"] = [f"{_EMBEDDER}timestep_embedder.linear_1.{suffix}"]
        pairs[f"t_embedder.mlp.2.{suffix}"] = [f"{_EMBEDDER}timestep_embedder.linear_2.{suffix}"]
        pairs[f"final_layer.adaLN_modulation.1.{suffix}"] = [f"proj_out_1.{suffix}"]
        pairs[f"final_layer.linear.{suffix}"] = [f"proj_out_2.{suffix}"]
        for i in range(depth):
            ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
            pairs[f"{ours}attn.qkv.{suffix}"] = [f"{theirs}attn1.to_{p}.{suffix}" for p in "qkv"]
            pairs[f"{ours}attn.proj.{suffix}"] = [f"{theirs}attn1.to_out.0.{suffix}"]
            pairs[f"{ours}mlp.fc1.{suffix}"] = [f"{theirs}ff.net.0.proj.{suffix}"]
            pairs[f"{ours}mlp.fc2.{suffix}"] = [f"{theirs}ff.net.2.{suffix}"]
            pairs[f"{ours}adaLN_modulation.1.{suffix}"] = [f"{theirs}norm1.linear.{suffix}"]
    return pairs


def _embedder_copies(depth):
    """Each later block's embedder key -> block 0's: diffusers keeps one copy per block, we keep one."""
    names = [f"timestep_embedder.linear_{n}.{s}" for n in (1, 2) for s in ("weight", "bias")]
    names.append("class_embedder.embedding_table.weight")
    return {f"transformer_blocks.{i}.norm1.emb.{name}": _EMBEDDER + name for i in range(1, depth) for name in names}


def _check_keys(state, needed):
    missing = sorted(needed - set(state))
    unexpected = sorted(set(state) - needed)
    problems = [f"{label}: {', '.join(keys[:8])}" + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected)) if keys]
    if problems:
        raise CheckpointError("diffusers state dict does not fit a DiT: " + "; ".join(problems))


def _join(state, keys):
    """One tensor, or q, k and v stacked along the output dimension as our fused qkv expects."""
    tensors = [state[key] for key in keys]
    if len(tensors) == 1:
        return tensors[0]
    if len({t.shape for t in tensors}) > 1:
        shapes = ", ".join(f"{key} {tuple(t.shape)}" for key, t in zip(keys, tensors))
        raise CheckpointError(f"q, k and v projections differ in shape: {shapes}")
    return torch.cat(tensors)


def convert_diffusers_state_dict(state, config):
    """Our state dict from a diffusers DiT one; CheckpointError naming missing, unexpected or diverged keys.

    Our DiT shares one timestep/class embedder, so every block's copy must equal block 0's (as in
    the Hub conversions of the official weights). The position embedding is a non-persistent buffer
    in diffusers, absent from its files: ours is the same fixed sin-cos table, computed here.
    """
    key_map, copies = _key_map(config.depth), _embedder_copies(config.depth)
    _check_keys(state, {key for keys in key_map.values() for key in keys} | set(copies))
    diverged = sorted(copy for copy, first in copies.items() if not torch.equal(state[copy], state[first]))
    if diverged:
        raise CheckpointError(f"per-block embedders differ from block 0's, which our DiT cannot share: "
                              f"{', '.join(diverged[:8])}")
    converted = {ours: _join(state, theirs) for ours, theirs in key_map.items()}
    grid = config.input_size // config.patch_size
    converted["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, grid).unsqueeze(0)
    return converted


def _locate(path, config_path):
    """(weights file, config.json) for a transformer folder, a pipeline folder or a weights file."""
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        if (path / "transformer").is_dir():  # a saved DiTPipeline keeps the network in transformer/
            path = path / "transformer"
        found = [path / name for name in _WEIGHT_FILES if (path / name).exists()]
        if not found:
            raise FileNotFoundError(f"no diffusers weights in {path}: looked for {', '.join(_WEIGHT_FILES)}")
        path, default_config = found[0], path / "config.json"
    else:
        default_config = path.parent / "config.json"
    config_path = Path(config_path) if config_path is not None else default_config
    if not config_path.exists():
        raise FileNotFoundError(f"no such file: {config_path}")
    return path, config_path


def _read_config(path):
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not a JSON config: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config


def _read_weights(path):
    if path.suffix != ".safetensors":
        return read_torch_checkpoint(path)
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None


def load_diffusers(path, config_path=None):
    """Our DiT (eval mode) from diffusers DiT weights.

    `path` is a transformer folder (config.json + diffusion_pytorch_model.safetensors or .bin), a saved
    DiTPipeline folder, or a weights file whose config.json lies beside it unless `config_path` says
    where. Never downloads: fetch Hub repositories yourself and pass the local folder.
    """
    weights_path, config_path = _locate(Path(path), config_path)
    config = config_from_diffusers(_read_config(config_path))
    state = convert_diffusers_state_dict(_read_weights(weights_path), config)
    return load_state_strict(DiT(config), state, weights_path).eval()
