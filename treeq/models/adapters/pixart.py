"""PixArt-alpha / PixArt-Sigma (`PixArtTransformer2DModel`): DiT blocks with cross-attention to T5
text; adaLN-single (one modulation for the whole model, outside the blocks, a table per block)."""
from .base import ChainAdapter, register


@register("PixArtTransformer2DModel")
class PixArtAdapter(ChainAdapter):
    family = "pixart"
    text = ("attn2.to_k", "attn2.to_v")  # cross-attention keys and values come from the text tokens
    pipeline = "PixArtSigmaPipeline"
    default_text_tokens = 300
