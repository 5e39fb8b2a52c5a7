"""Wan 2.x video (`WanTransformer3DModel`): a chain of 30 (1.3B) or 40 (14B) blocks under `blocks`, each
self-attention over frames x patches (rotary embeddings), cross-attention to UMT5 text, a feed-forward.

Modulation comes from one table per block plus the model's condition embedder, outside the blocks: no
linear in a block computes shifts, scales or gates. A block returns the image stream alone; the text
features, the time projection and the rotary embeddings pass unchanged from block to block.
Cross-attention keys and values run on the text tokens (512 by default); image-to-video models add
`attn2.add_k_proj` / `add_v_proj` over CLIP image tokens (257).
"""
from .base import ChainAdapter, register

IMAGE_CONTEXT_TOKENS = 257  # Wan I2V's CLIP image features, ahead of the text in encoder_hidden_states


@register("WanTransformer3DModel")
class WanAdapter(ChainAdapter):
    family = "wan"
    block_lists = ("blocks",)
    text = ("attn2.to_k", "attn2.to_v")
    pipeline = "WanPipeline"
    default_text_tokens = 512

    def layer_rows(self, model):
        rows = super().layer_rows(model)
        for name in rows:
            if name.endswith(("attn2.add_k_proj", "attn2.add_v_proj")):
                rows[name] = IMAGE_CONTEXT_TOKENS
        return rows

    def image_tokens(self, model):
        """81 frames of 480x832 by default: 21 latent frames of 60x104, patches (1, 2, 2)."""
        source = getattr(model, "source", {})
        if source.get("image_tokens"):
            return source["image_tokens"]
        t, h, w = model.config.patch_size
        return (21 // t) * (60 // h) * (104 // w)
