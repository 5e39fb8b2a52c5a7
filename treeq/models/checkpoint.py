"""Saving and loading DiT weights: our safetensors + JSON pair and official `.pt` checkpoints.

Every load is strict: a checkpoint that misses keys, carries unexpected ones or has
other shapes raises `CheckpointError` naming them, never a silent partial load.
Writes go to a temporary file first and are renamed into place, so a failure never
leaves half a checkpoint behind.
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..diffusion.defaults import OFFICIAL, set_sampling_defaults_
from ..io import atomic_write
from .dit import DiT, DiTConfig
from .registry import FAMILY, config_for


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model it claims to be."""


def save_model(model, prefix):
    """Write `prefix.safetensors` (weights) and `prefix.json` (the DiTConfig, and under "sampling"
    the sampling defaults the model carries, if any)."""
    prefix = Path(prefix)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(prefix.with_suffix(".safetensors"), lambda p: save_file(state, str(p)))
    meta = model.config.to_dict()
    if getattr(model, "sampling", None) is not None:
        meta["sampling"] = model.sampling
    config = json.dumps(meta, indent=2, sort_keys=True)
    atomic_write(prefix.with_suffix(".json"), lambda p: p.write_text(config))


def load_state_strict(model, state, source, assign=False):
    """Load `state` into `model` or raise naming every missing, unexpected and mis-shaped key.
    `assign`: the model takes `state`'s tensors instead of copying them (see build_loaded)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, assign=assign)
    return model


def build_loaded(config, state, source):
    """A DiT of `config` (eval mode) holding `state`'s tensors without a second copy: built on the meta
    device (no random init of 675M weights) and handed the tensors, cast to float32 where they are not.
    With a memory-mapped checkpoint, peak memory stays near one model's size."""
    with torch.device("meta"):
        model = DiT(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return load_state_strict(model, state, source, assign=True).eval()


def load_model(prefix):
    """Load a model written by `save_model` (give the path with or without a suffix)."""
    prefix = Path(prefix)
    if prefix.suffix in (".json", ".safetensors"):
        prefix = prefix.with_suffix("")
    config_path, weights_path = prefix.with_suffix(".json"), prefix.with_suffix(".safetensors")
    for path in (config_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"no such file: {path}")
    try:
        meta = json.loads(config_path.read_text())
        sampling = meta.pop("sampling", None)
        config = DiTConfig(**meta)
    except (json.JSONDecodeError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{config_path} is not a DiT config: {error}") from None
    try:
        state = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {error}") from None
    model = build_loaded(config, state, weights_path)
    if sampling is not None:  # else sampling_defaults infers them from the config
        try:
            set_sampling_defaults_(model, sampling)
        except ValueError as error:
            raise CheckpointError(f"{config_path}: bad sampling defaults: {error}") from None
    return model


def read_torch_checkpoint(path):
    """A state dict from a `.pt` file; DiT training checkpoints keep the EMA weights under 'ema'."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        # the official train.py also saves its argparse.Namespace under 'args'; allow just that class
        with torch.serialization.safe_globals([argparse.Namespace]):
            # mmap: tensors stay file-backed until used, so a 2.7 GB checkpoint is not held twice
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {error}") from None
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):
        state = state["ema"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return state


def load_official(path, name=None, **overrides):
    """An official facebookresearch/DiT checkpoint (e.g. DiT-XL-2-256x256.pt) as model `name`,
    or, without a name, as the published size its tensor shapes match; it samples with the
    official FID settings (treeq.diffusion.defaults.OFFICIAL).

    The image size is read from the position embedding, so DiT-XL/2 at 256 or 512 loads alike.
    """
    state = read_torch_checkpoint(path)
    if name is None:
        config = config_from_state(state, path)
    else:
        config = config_for(name, **overrides)
        if "pos_embed" in state and "input_size" not in overrides:
            tokens = state["pos_embed"].shape[1]
            config.input_size = int(round(tokens ** 0.5)) * config.patch_size
    model = build_loaded(config, state, path)
    return set_sampling_defaults_(model, OFFICIAL)


def config_from_state(state, source="checkpoint"):
    """DiTConfig of an official state dict, from its tensor shapes."""
    try:
        hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
        tokens = state["pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        table = state["y_embedder.embedding_table.weight"].shape[0]
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{source} is not a DiT state dict (cannot read {error})") from None
    heads = {(depth_, hidden_): heads_ for depth_, hidden_, heads_ in FAMILY.values()}
    if (depth, hidden) not in heads:
        # the head count changes the output but is not stored in the weights
        raise CheckpointError(f"{source}: depth {depth}, width {hidden} is no published DiT size; "
                              "save it with TreeQ (safetensors + JSON config) instead")
    num_heads = heads[(depth, hidden)]
    return DiTConfig(input_size=int(round(tokens ** 0.5)) * patch, patch_size=patch, in_channels=in_channels,
                     hidden_size=hidden, depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden,
                     num_classes=table - 1, class_dropout_prob=0.1, learn_sigma=out_channels == 2 * in_channels,
                     per_block_embedders=any(key.startswith("block_embedders.") for key in state))
