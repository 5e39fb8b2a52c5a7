"""Wan 2.x video (`WanTransformer3DModel`): self-attention over frames x patches, cross-attention to
UMT5 text, a feed-forward; modulation from a per-block table (no linear inside the blocks)."""
from .base import ChainAdapter, register


@register("WanTransformer3DModel")
class WanAdapter(ChainAdapter):
    family = "wan"
    text = ("attn2.to_k", "attn2.to_v", "attn2.add_k_proj", "attn2.add_v_proj")
    pipeline = "WanPipeline"
    default_text_tokens = 512

    def image_tokens(self, model):
        """81 frames of 480x832 by default: 21 latent frames of 60x104, patches (1, 2, 2)."""
        source = getattr(model, "source", {})
        if source.get("image_tokens"):
            return source["image_tokens"]
        t, h, w = model.config.patch_size
        return (21 // t) * (60 // h) * (104 // w)
