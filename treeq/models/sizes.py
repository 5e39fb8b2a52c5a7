"""Sampling sizes a family's pipeline can make, checked from the folder's JSON before any weight loads.

A side must be a multiple of the VAE's downsampling times the transformer's patch (FLUX packs 2x2 latent
patches into one token), and a video's frame count one more than a multiple of the VAE's temporal
downsampling; otherwise the pipeline fails (or silently resizes) minutes later, after the model loaded.
"""
import json
from pathlib import Path

SIZE_KEYS = ("height", "width", "num_frames", "max_sequence_length")
_PACKED = {"FluxTransformer2DModel": 2}      # latent patches packed into one token by the pipeline
_TEMPORAL = {"AutoencoderKLWan": 4}          # frames = 1 + temporal factor x latent frames


def check_sizes(path, settings):
    """Raise ValueError (one line naming what fits) for a size in `settings` the folder `path` cannot take."""
    given = {key: settings[key] for key in SIZE_KEYS if settings.get(key) is not None}
    if not given:
        return
    folder = Path(path)
    if not (folder / "model_index.json").exists():
        flags = ", ".join("--" + _flag(key) for key in given)
        raise ValueError(f"{flags} set the sampling size of a text-to-image family's pipeline folder; {path} is "
                         "not one (a DiT samples at its input size)")
    transformer, vae = _config(folder / "transformer"), _config(folder / "vae")
    side = vae_scale(vae) * _patch(transformer)
    for key in ("height", "width"):
        if key in given and given[key] % side:
            raise ValueError(f"--{key} {given[key]}: {transformer['_class_name']} samples sides divisible by {side} "
                             f"(VAE {vae_scale(vae)}x, patch {_patch(transformer)}); e.g. "
                             f"{max(side, given[key] // side * side)}")
    if "num_frames" in given:
        factor = _TEMPORAL.get(vae.get("_class_name"))
        if factor is None:
            raise ValueError(f"--frames applies to video families; {transformer['_class_name']} makes images")
        if (given["num_frames"] - 1) % factor:
            raise ValueError(f"--frames {given['num_frames']}: this VAE takes 1 + {factor}k frames, e.g. "
                             f"{1 + (given['num_frames'] - 1) // factor * factor}")


def _flag(key):
    return {"num_frames": "frames"}.get(key, key).replace("_", "-")


def _config(folder):
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / 'config.json'}: unreadable ({error})") from None


def vae_scale(config):
    """Spatial downsampling of a VAE config: what it says (Wan: scale_factor_spatial), else 2 per stage after
    the first (an AutoencoderKL; Sana's DC-AE by encoder_block_out_channels: 32x for the published f32c32)."""
    if "scale_factor_spatial" in config:
        return config["scale_factor_spatial"]
    if "temperal_downsample" in config:  # AutoencoderKLWan: every stage after the first halves space
        return 2 ** len(config["temperal_downsample"])
    stages = config.get("encoder_block_out_channels") or config.get("block_out_channels") or (0,) * 4
    return 2 ** (len(stages) - 1)


def _patch(config):
    patch = config.get("patch_size") or 1
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    return max(patch, _PACKED.get(config.get("_class_name"), 1))
