"""Diffusers-format DiT weights (`DiTTransformer2DModel`) converted to and from our DiT's keys.

diffusers splits the fused qkv projection, keeps a copy of the timestep and class embedders
in every block and renames the final layer; mapping its keys onto the official layout lets
checkpoints from the Hub's DiT pipelines run through the same quantization code. Folders and
files are read in treeq.models.diffusers_load.
"""
import torch

from .checkpoint import CheckpointError
from .dit import DiTConfig, sincos_pos_embed_2d

_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")  # the Hub's DiT configs use the older name

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


_EMBEDDER_NAMES = {  # ConditionEmbedder key -> CombinedTimestepLabelEmbeddings key
    **{f"t_embedder.mlp.{2 * (n - 1)}.{s}": f"timestep_embedder.linear_{n}.{s}" for n in (1, 2) for s in ("weight", "bias")},
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
}


def _embedder_copies(depth):
    """Each later block's embedder key -> block 0's: diffusers keeps one copy per block."""
    return {f"transformer_blocks.{i}.norm1.emb.{name}": _EMBEDDER + name
            for i in range(1, depth) for name in _EMBEDDER_NAMES.values()}


def _block_embedder_map(depth):
    """Our per-block embedder key -> its diffusers key (blocks 1..depth-1; block 0's is the shared pair)."""
    return {f"block_embedders.{i}.{ours}": f"transformer_blocks.{i}.norm1.emb.{theirs}"
            for i in range(1, depth) for ours, theirs in _EMBEDDER_NAMES.items()}


def embedders_differ(state, depth):
    """Whether any block's timestep/class embedder differs from block 0's (a DiT trained in diffusers)."""
    return any(key in state and first in state and not torch.equal(state[key], state[first])
               for key, first in _embedder_copies(depth).items())


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

    With `config.per_block_embedders` off our DiT shares one timestep/class embedder, so every block's
    copy must equal block 0's (as in the Hub conversions of the official weights); with it on, blocks
    1.. keep theirs. The position embedding is a non-persistent buffer in diffusers, absent from its
    files: ours is the same fixed sin-cos table, computed here.
    """
    key_map, copies = _key_map(config.depth), _embedder_copies(config.depth)
    _check_keys(state, {key for keys in key_map.values() for key in keys} | set(copies))
    if config.per_block_embedders:
        key_map.update({ours: [theirs] for ours, theirs in _block_embedder_map(config.depth).items()})
    else:
        diverged = sorted(copy for copy, first in copies.items() if not torch.equal(state[copy], state[first]))
        if diverged:
            raise CheckpointError(f"per-block embedders differ from block 0's (load with per_block_embedders=True): "
                                  f"{', '.join(diverged[:8])}")
    converted = {ours: _join(state, theirs) for ours, theirs in key_map.items()}
    grid = config.input_size // config.patch_size
    converted["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, grid).unsqueeze(0)
    return converted


def to_diffusers_state_dict(model):
    """A diffusers DiTTransformer2DModel state dict of our `model`: the inverse of the conversion
    above (qkv split, one embedder copy per block unless the model has its own per block)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    depth = model.config.depth
    out = {}
    for ours, theirs in _key_map(depth).items():
        parts = state[ours].chunk(len(theirs)) if len(theirs) > 1 else [state[ours]]
        out.update({key: part.contiguous() for key, part in zip(theirs, parts)})
    if model.config.per_block_embedders:
        out.update({theirs: state[ours].contiguous() for ours, theirs in _block_embedder_map(depth).items()})
    else:
        out.update({copy: out[first].clone() for copy, first in _embedder_copies(depth).items()})
    return out


def diffusers_config(config):
    """The DiTTransformer2DModel config.json (a dict) of our DiTConfig; CheckpointError if diffusers'
    DiT would compute something else (it fixes the timestep frequency shift and the norm eps)."""
    if config.freq_shift != 1.0 or config.norm_eps != 1e-6 or not config.class_dropout_prob > 0:
        raise CheckpointError("diffusers' DiT needs freq_shift=1.0, norm_eps=1e-6 and a null class; "
                              "build the model from config_from_diffusers(...) to export it")
    return {
        "_class_name": _CLASS_NAMES[0], "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads, "in_channels": config.in_channels,
        "out_channels": config.in_channels * (2 if config.learn_sigma else 1), "num_layers": config.depth,
        "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": config.input_size,
        "patch_size": config.patch_size, "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": config.num_classes, "upcast_attention": False, "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": config.norm_eps if config.mlp_norm_eps is None else config.mlp_norm_eps,
    }
