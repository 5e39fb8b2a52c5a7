"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): MMDiT joint blocks with image and text streams;
SD3.5's dual attention (`attn2`, image only); the last block's text stream is `context_pre_only`
(no text outputs: it returns None for them)."""
from .base import ChainAdapter, register


@register("SD3Transformer2DModel")
class SD3Adapter(ChainAdapter):
    family = "sd3"
    carried = ("encoder_hidden_states", "hidden_states")
    modulation = ("norm1.linear", "norm1_context.linear")
    text = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context")
    pipeline = "StableDiffusion3Pipeline"
    default_text_tokens = 333  # 77 CLIP + 256 T5 tokens
