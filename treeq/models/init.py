"""Random checkpoints at real shapes (`treeq init`), so every command runs without downloaded weights.

Formats: an official `.pt` (a plain state dict, as DiT-XL-2-256x256.pt), a diffusers DiT pipeline
folder laid out like facebook/DiT-XL-2-256 (transformer/, vae/, scheduler/, model_index.json),
TreeQ's safetensors + JSON pair, or a lone SD-VAE-shaped AutoencoderKL folder.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..io import atomic_write
from .checkpoint import save_model
from .diffusers_convert import diffusers_config, to_diffusers_state_dict
from .dit import DiT
from .registry import FAMILY, config_for

FORMATS = ("official", "diffusers", "treeq")


def random_dit(name, seed=0, diffusers_compatible=False, **overrides):
    """A DiT of size `name` with the official initialisation, then the zero-initialised adaLN and output
    weights drawn small (std 0.02) so that every block changes its input, as a trained one does.
    `diffusers_compatible` uses diffusers' timestep frequencies and norm eps (see diffusers_convert)."""
    config = config_for(name, **{k: v for k, v in overrides.items() if v is not None})
    if diffusers_compatible:
        config.freq_shift, config.norm_eps, config.mlp_norm_eps = 1.0, 1e-6, 1e-5
    torch.manual_seed(seed)
    model = DiT(config).eval()
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if "adaLN_modulation" in name_ or name_.startswith("final_layer.linear"):
                param.normal_(std=0.02)
    return model


def format_for(out):
    """The format an --out names: a .pt is official, a .safetensors TreeQ's, anything else a diffusers folder."""
    suffix = Path(out).suffix
    return "official" if suffix in (".pt", ".pth") else "treeq" if suffix == ".safetensors" else "diffusers"


def init_checkpoint(size, out, format=None, seed=0, vae_channels="128,256,512,512", **overrides):
    """Write a random checkpoint of `size` (a model name, or 'vae') to `out`; returns the path written.
    format: default the one `out` names (format_for). Everything is checked before anything is written,
    so a checkpoint that is written is one every loader reads."""
    out = Path(out)
    channels = _channels(vae_channels)
    if size == "vae":
        _save_vae(channels, out, seed)
        return out
    format = format or format_for(out)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "official":
        _check_official(size, out, overrides)
    model = random_dit(size, seed, diffusers_compatible=format == "diffusers", **overrides)
    if format == "official":
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(out, lambda p: torch.save(state, p))
    elif format == "treeq":
        save_model(model, out.with_suffix(""))
        out = out.with_suffix(".safetensors")
    else:
        _save_pipeline(model, out, channels, seed)
    return out


def _check_official(size, out, overrides):
    """An official .pt stores no config: loaders read its size off the tensor shapes, and the head count
    from the published (depth, width) pairs, so only those sizes make an official checkpoint."""
    if out.suffix not in (".pt", ".pth"):
        raise ValueError(f"an official checkpoint is a .pt file; got --out {out}")
    config = config_for(size, **{k: v for k, v in overrides.items() if v is not None})
    if (config.depth, config.hidden_size, config.num_heads) not in FAMILY.values():
        raise ValueError(f"depth {config.depth}, width {config.hidden_size}, {config.num_heads} heads is no published "
                         "DiT size, which an official .pt must be; write --out NAME.safetensors (TreeQ format) "
                         "or a folder (diffusers) instead")


def _channels(text):
    try:
        channels = tuple(int(c) for c in str(text).split(","))
    except ValueError:
        raise ValueError(f"--vae-channels needs comma-separated integers, got {text!r}") from None
    if not channels or min(channels) < 1:
        raise ValueError(f"--vae-channels needs positive widths, got {text!r}")
    return channels


def _save_vae(channels, folder, seed):
    from ..diffusion.vae import random_vae
    random_vae(channels, seed).save_pretrained(folder)


def _save_pipeline(model, folder, vae_channels, seed):
    """A DiTPipeline folder: what diffusers' DiTPipeline.from_pretrained and our loader both read."""
    from diffusers import DDIMScheduler

    folder.mkdir(parents=True, exist_ok=True)
    transformer = folder / "transformer"
    transformer.mkdir(exist_ok=True)
    config = json.dumps(diffusers_config(model.config), indent=2, sort_keys=True)
    atomic_write(transformer / "config.json", lambda p: p.write_text(config))
    state = to_diffusers_state_dict(model)
    atomic_write(transformer / "diffusion_pytorch_model.safetensors", lambda p: save_file(state, str(p)))
    _save_vae(vae_channels, folder / "vae", seed)
    # the scheduler diffusers' conversion script (scripts/convert_dit_to_diffusers.py) gives the Hub's DiT
    DDIMScheduler(beta_schedule="linear", clip_sample=False).save_config(folder / "scheduler")
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}
    atomic_write(folder / "model_index.json", lambda p: p.write_text(json.dumps(index, indent=2)))
