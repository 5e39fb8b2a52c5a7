"""FLUX.1 (`FluxTransformer2DModel`): 19 double-stream blocks (image and text streams with their own
weights, joint attention), then 38 single-stream blocks over the concatenated tokens."""
from .base import ChainAdapter, register


@register("FluxTransformer2DModel")
class FluxAdapter(ChainAdapter):
    family = "flux"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    carried = ("encoder_hidden_states", "hidden_states")  # both block kinds return (text, image)
    shared_keys = ("img_ids", "txt_ids")                  # position ids: (tokens, 3), no batch dimension
    modulation = ("norm1.linear", "norm1_context.linear", "norm.linear")
    text = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context")
    joint = ("single_transformer_blocks",)
    pipeline = "FluxPipeline"
    default_text_tokens = 512

    def image_tokens(self, model):
        """1024px by default: 128x128 latents packed 2x2 into 4,096 tokens (the config has no size)."""
        return getattr(model, "source", {}).get("image_tokens") or 4096
