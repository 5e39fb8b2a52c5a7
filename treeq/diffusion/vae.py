"""The latent side of DiT: a diffusers `AutoencoderKL` (e.g. stabilityai/sd-vae-ft-ema) decodes
sampled latents, divided by the VAE's `scaling_factor`, into images in [-1, 1].

Weights are read by our own file finder (whole, sharded or a variant such as fp16); the
attention keys of VAEs saved before diffusers renamed them load too. Never downloads.
"""
from pathlib import Path

import torch

# stabilityai/sd-vae-ft-ema's architecture (its config.json), the VAE every DiT-XL/2 result uses:
# 8x down-sampling to 4 latent channels; latents are scaled by 0.18215 during training.
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", sample_size=256, scaling_factor=0.18215)

# Keys of attention blocks saved before diffusers 0.14 -> today's (as diffusers' own loader renames them).
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _renamed(key):
    parts = key.split(".")
    if len(parts) >= 3 and "attentions" in parts and parts[-2] in _OLD_ATTENTION:
        return ".".join(parts[:-2] + [_OLD_ATTENTION[parts[-2]], parts[-1]])
    return key


def load_vae(path, variant=None):
    """An AutoencoderKL (eval mode, float32) from a diffusers folder: config.json + weights."""
    from diffusers import AutoencoderKL

    from ..models.checkpoint import CheckpointError
    from ..models.diffusers_load import find_weights, read_json, read_weights

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no VAE folder at {folder} (need a diffusers AutoencoderKL folder)")
    config = read_json(folder / "config.json")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{folder} holds a {config['_class_name']}, not an AutoencoderKL")
    files, _ = find_weights(folder, variant)
    state = {_renamed(key): value for key, value in read_weights(files).items()}
    vae = AutoencoderKL.from_config(config)
    result = vae.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{folder} does not fit its AutoencoderKL config: missing {result.missing_keys[:4]}, "
                              f"unexpected {result.unexpected_keys[:4]}")
    return vae.float().eval()


@torch.no_grad()
def decode(vae, latents, batch_size=8):
    """Images in [-1, 1] (float32, on the latents' device) from sampled latents, in batches."""
    param = next(vae.parameters())
    scale = 1 / vae.config.scaling_factor  # multiplied, as DiTPipeline does, for identical rounding
    images = [vae.decode((scale * chunk.to(param.device, param.dtype))).sample.float()
              for chunk in latents.split(batch_size)]
    return torch.cat(images).to(latents.device)


def random_vae(block_out_channels=SD_VAE["block_out_channels"], seed=0):
    """An AutoencoderKL with SD-VAE's layout (or narrower blocks, for tests) and random weights."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    config = {**SD_VAE, "block_out_channels": tuple(block_out_channels),
              "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
              "norm_num_groups": min(32, min(block_out_channels))}
    torch.manual_seed(seed)
    return AutoencoderKL(**config).eval()
