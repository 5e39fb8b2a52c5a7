"""Random diffusers pipeline folders of every transformer family, at test size or at the real model's shapes.

`treeq init --family F --size tiny|full` writes one: transformer, scheduler, VAE, text encoders and
tokenizers, all built in code from configs (nothing downloaded), plus `treeq.json` with the sampling
settings TreeQ uses for it. "full" gives the transformer its published shapes (text encoders and VAE
stay small: they are never quantized and only feed the transformer).
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import atomic_write
from .text_encoders import byte_tokenizer, clip_encoder, clip_tokenizer, t5_encoder

SETTINGS_FILE = "treeq.json"


@dataclass
class Family:
    pipeline: str                  # diffusers pipeline class
    transformer: str               # diffusers transformer class
    tiny: dict                     # transformer config at test size
    full: dict                     # the published model's transformer config
    vae: dict                      # AutoencoderKL config
    scheduler: str
    sampling: dict = field(default_factory=dict)  # height, width, steps, cfg_scale, max_sequence_length
    full_sampling: dict = field(default_factory=dict)


# Tiny transformers are 64 wide: the smallest Monarch branch of a 32 x 32 weight is over 5% of it.
_TINY_VAE = dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, sample_size=32)

FAMILIES = {
    "pixart": Family(
        "PixArtSigmaPipeline", "PixArtTransformer2DModel",
        tiny=dict(sample_size=8, num_layers=3, patch_size=2, attention_head_dim=16, num_attention_heads=4,
                  caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=64, attention_bias=True,
                  activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                  norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1),
        full=dict(sample_size=128, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
                  caption_channels=4096, in_channels=4, out_channels=8, cross_attention_dim=1152,
                  attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                  norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2,
                  use_additional_conditions=False),
        vae=dict(_TINY_VAE, latent_channels=4), scheduler="DPMSolverMultistepScheduler",
        sampling=dict(height=16, width=16, steps=4, cfg_scale=4.5, max_sequence_length=32),
        full_sampling=dict(height=1024, width=1024, steps=20, cfg_scale=4.5, max_sequence_length=300)),
    "sd3": Family(
        "StableDiffusion3Pipeline", "SD3Transformer2DModel",
        tiny=dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64,
                  pooled_projection_dim=64, pos_embed_max_size=16, dual_attention_layers=(0,)),
        full=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
        vae=dict(_TINY_VAE, latent_channels=4, shift_factor=0.06, scaling_factor=1.5, use_quant_conv=False,
                 use_post_quant_conv=False),
        scheduler="FlowMatchEulerDiscreteScheduler",
        sampling=dict(height=16, width=16, steps=4, cfg_scale=7.0, max_sequence_length=32),
        full_sampling=dict(height=1024, width=1024, steps=28, cfg_scale=7.0, max_sequence_length=256)),
    "flux": Family(
        "FluxPipeline", "FluxTransformer2DModel",
        tiny=dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                  guidance_embeds=False, axes_dims_rope=(8, 12, 12)),
        full=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                  guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
        vae=dict(_TINY_VAE, latent_channels=4, shift_factor=0.06, scaling_factor=1.5, use_quant_conv=False,
                 use_post_quant_conv=False),
        scheduler="FlowMatchEulerDiscreteScheduler",
        # FLUX.1-schnell: guidance-distilled to 4 steps, no classifier-free guidance
        sampling=dict(height=16, width=16, steps=4, cfg_scale=0.0, max_sequence_length=32),
        full_sampling=dict(height=1024, width=1024, steps=4, cfg_scale=0.0, max_sequence_length=256)),
}


def family_names():
    return list(FAMILIES)


def build_pipeline(name, size="tiny", seed=0):
    """A random diffusers pipeline of family `name` (see the module docstring)."""
    import diffusers

    family = _family(name)
    if size not in ("tiny", "full"):
        raise ValueError(f"--size of a family is tiny or full, got {size!r}")
    torch.manual_seed(seed)
    transformer = getattr(diffusers, family.transformer)(**(family.tiny if size == "tiny" else family.full))
    _randomize_zero_init(transformer)
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKL(**family.vae)
    scheduler = getattr(diffusers, family.scheduler)()
    components = _TEXT_COMPONENTS[name](transformer.config, _settings(family, size)["max_sequence_length"], seed)
    return getattr(diffusers, family.pipeline)(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler,
                                               **components)


def init_pipeline_folder(name, out, size="tiny", seed=0):
    """Write the random pipeline of `build_pipeline` to `out` (a folder), with its TreeQ sampling settings."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new folder for the pipeline")
    pipeline = build_pipeline(name, size, seed)
    pipeline.save_pretrained(out)
    settings = {"family": name, "size": size, **_settings(_family(name), size)}
    atomic_write(out / SETTINGS_FILE, lambda p: p.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n"))
    return out


def read_settings(folder):
    """The folder's treeq.json, or {} for a pipeline written elsewhere."""
    path = Path(folder) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _family(name):
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _settings(family, size):
    return family.sampling if size == "tiny" else family.full_sampling


def _randomize_zero_init(model):
    """Zero-initialised gates and output projections make a random model the identity; give them weights."""
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().max() == 0:
                param.normal_(std=0.02)


def _pixart_text(config, max_length, seed):
    return {"tokenizer": byte_tokenizer(max_length), "text_encoder": t5_encoder(config.caption_channels, seed=seed)}


def _sd3_text(config, max_length, seed):
    clip_dim = config.pooled_projection_dim // 2  # the two CLIP encoders' pooled outputs are concatenated
    return {"tokenizer": clip_tokenizer(), "text_encoder": clip_encoder(clip_dim, projection_dim=clip_dim, seed=seed),
            "tokenizer_2": clip_tokenizer(),
            "text_encoder_2": clip_encoder(clip_dim, projection_dim=clip_dim, seed=seed + 1),
            "tokenizer_3": byte_tokenizer(max_length),
            "text_encoder_3": t5_encoder(config.joint_attention_dim, seed=seed + 2)}


def _flux_text(config, max_length, seed):
    return {"tokenizer": clip_tokenizer(), "text_encoder": clip_encoder(config.pooled_projection_dim, seed=seed),
            "tokenizer_2": byte_tokenizer(max_length),
            "text_encoder_2": t5_encoder(config.joint_attention_dim, seed=seed + 1)}


_TEXT_COMPONENTS = {"pixart": _pixart_text, "sd3": _sd3_text, "flux": _flux_text}
