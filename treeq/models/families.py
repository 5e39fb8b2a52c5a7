"""Random diffusers pipeline folders of every transformer family, at test size or at the real model's shapes.

`treeq init --family F --size tiny|full` writes one: transformer, scheduler, VAE, text encoders and
tokenizers, all built in code from configs (nothing downloaded), plus `treeq.json` with the sampling
settings TreeQ uses for it. "full" gives the transformer its published shapes (text encoders and VAE
stay small: they are never quantized and only feed the transformer; every full VAE keeps the published
compression and latent channels - 8x for PixArt, SD3 and FLUX, 32x for Sana, 4x8x8 for Wan - so the token
counts at the published resolution are the real ones).

Sana (`SanaPipeline`) encodes prompts with Gemma2 (a byte tokenizer laid out as Gemma's: <bos> first) and
decodes with a DC-AE (`AutoencoderDC`); Wan (`WanPipeline`, text-to-video) with UMT5 and `AutoencoderKLWan`.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import atomic_write
from .text_encoders import (
    byte_tokenizer,
    clip_encoder,
    clip_tokenizer,
    gemma2_encoder,
    gemma_tokenizer,
    t5_encoder,
)

SETTINGS_FILE = "treeq.json"


@dataclass
class Family:
    pipeline: str                  # diffusers pipeline class
    transformer: str               # diffusers transformer class
    tiny: dict                     # transformer config at test size
    full: dict                     # the published model's transformer config
    vae: dict                      # the VAE's config (`vae_class`)
    scheduler: str
    sampling: dict = field(default_factory=dict)  # height, width, steps, cfg_scale, max_sequence_length
    full_sampling: dict = field(default_factory=dict)  # (and num_frames for video)
    vae_class: str = "AutoencoderKL"
    full_vae: dict = None          # the VAE of "full" when it differs from the tiny one
    scheduler_config: dict = field(default_factory=dict)
    # (transformer config key, value, sampling settings): a published variant's own defaults, read from the
    # folder when it carries no treeq.json
    variants: tuple = ()

    def folder_sampling(self, config):
        """The published sampling settings of the variant whose transformer `config` a folder holds."""
        settings = dict(self.full_sampling)
        for key, value, overrides in self.variants:
            if config.get(key) == value:
                settings.update(overrides)
        return settings


# Tiny transformers are 64 wide: the smallest Monarch branch of a 32 x 32 weight is over 5% of it.
_TINY_VAE = dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, sample_size=32)

# A DC-AE of three ResBlock stages (4x: Sana wants sides divisible by 32, so 32px gives 8x8 latents); the
# full Sana's has six (32x, as the published f32c32).
_TINY_DC_AE = dict(in_channels=3, attention_head_dim=8, encoder_block_types=("ResBlock",) * 3,
                   decoder_block_types=("ResBlock",) * 3, encoder_block_out_channels=(8,) * 3,
                   decoder_block_out_channels=(8,) * 3, encoder_layers_per_block=(1,) * 3,
                   decoder_layers_per_block=(1,) * 3, encoder_qkv_multiscales=((),) * 3,
                   decoder_qkv_multiscales=((),) * 3, downsample_block_type="conv",
                   upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                   scaling_factor=0.41407)

# The full-size KL VAE of PixArt, SD3 and FLUX: tiny channels, but the published four stages (8x) and latent
# channels, so a 1024px sample has the real token count (64 x 64 latents: 4,096 tokens after patch 2, or
# after FLUX's 2x2 packing). Scaling and shift factors are the published VAEs'.
_FULL_KL_VAE = dict(_TINY_VAE, block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4)

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
        full_vae=dict(_FULL_KL_VAE, latent_channels=4, scaling_factor=0.13025),  # SDXL's VAE (PixArt-Sigma)
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
        full_vae=dict(_FULL_KL_VAE, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305,
                      use_quant_conv=False, use_post_quant_conv=False),
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
        full_vae=dict(_FULL_KL_VAE, latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611,
                      use_quant_conv=False, use_post_quant_conv=False),  # 16 channels: 64 after 2x2 packing
        scheduler="FlowMatchEulerDiscreteScheduler",
        # FLUX.1-schnell: guidance-distilled to 4 steps, no classifier-free guidance
        sampling=dict(height=16, width=16, steps=4, cfg_scale=0.0, max_sequence_length=32),
        full_sampling=dict(height=1024, width=1024, steps=4, cfg_scale=0.0, max_sequence_length=256),
        # FLUX.1-dev embeds its guidance: FluxPipeline's defaults for it (28 steps, guidance 3.5, 512 tokens)
        variants=(("guidance_embeds", True, dict(steps=28, cfg_scale=3.5, max_sequence_length=512)),)),
    # Sana 1600M 1024px (Efficient-Large-Model/Sana_1600M_1024px_diffusers): 20 blocks 2240 wide, linear
    # self-attention, cross-attention to Gemma2-2B's 2304-wide features, GLUMBConv feed-forward; DC-AE f32c32.
    "sana": Family(
        "SanaPipeline", "SanaTransformer2DModel",
        tiny=dict(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=16, num_layers=3,
                  num_cross_attention_heads=4, cross_attention_head_dim=16, cross_attention_dim=64,
                  caption_channels=32, mlp_ratio=2.5, attention_bias=False, sample_size=8, patch_size=1,
                  norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None),
        full=dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                  num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                  caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1,
                  norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None),
        vae_class="AutoencoderDC",
        vae=dict(_TINY_DC_AE, latent_channels=8),
        full_vae=dict(_TINY_DC_AE, latent_channels=32, encoder_block_types=("ResBlock",) * 6,
                      decoder_block_types=("ResBlock",) * 6, encoder_block_out_channels=(8,) * 6,
                      decoder_block_out_channels=(8,) * 6, encoder_layers_per_block=(1,) * 6,
                      decoder_layers_per_block=(1,) * 6, encoder_qkv_multiscales=((),) * 6,
                      decoder_qkv_multiscales=((),) * 6),  # 6 stages: 32x, as DC-AE f32c32
        scheduler="DPMSolverMultistepScheduler",
        scheduler_config=dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        sampling=dict(height=32, width=32, steps=4, cfg_scale=4.5, max_sequence_length=32),
        full_sampling=dict(height=1024, width=1024, steps=20, cfg_scale=4.5, max_sequence_length=300)),
    # Wan2.1-T2V-1.3B (Wan-AI/Wan2.1-T2V-1.3B-Diffusers): 30 blocks 1536 wide (12 heads of 128), FFN 8960,
    # cross-attention to UMT5-XXL's 4096-wide features; its VAE compresses 4x in time and 8x in space.
    "wan": Family(
        "WanPipeline", "WanTransformer3DModel",
        tiny=dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16,
                  out_channels=16, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=3, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32),
        full=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        vae_class="AutoencoderKLWan",
        vae=dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,  # lists: the VAE adds to them
                 temperal_downsample=[False, True, True]),
        scheduler="UniPCMultistepScheduler",
        scheduler_config=dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        sampling=dict(height=32, width=32, num_frames=9, steps=4, cfg_scale=5.0, max_sequence_length=32),
        full_sampling=dict(height=480, width=832, num_frames=81, steps=50, cfg_scale=5.0, max_sequence_length=512)),
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
    vae = getattr(diffusers, family.vae_class)(**(family.full_vae or family.vae if size == "full" else family.vae))
    scheduler = getattr(diffusers, family.scheduler)(**family.scheduler_config)
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
    if not path.exists():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON ({error}): fix it, or delete it to sample with the family's "
                         "published settings") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a JSON object of sampling settings (height, width, steps, ...)")
    return settings


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


def _sana_text(config, max_length, seed):
    return {"tokenizer": gemma_tokenizer(max_length),
            "text_encoder": gemma2_encoder(config.caption_channels, seed=seed)}


def _wan_text(config, max_length, seed):
    return {"tokenizer": byte_tokenizer(max_length), "text_encoder": t5_encoder(config.text_dim, seed=seed, umt5=True)}


_TEXT_COMPONENTS = {"pixart": _pixart_text, "sd3": _sd3_text, "flux": _flux_text, "sana": _sana_text,
                    "wan": _wan_text}
