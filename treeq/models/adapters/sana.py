"""Sana (`SanaTransformer2DModel`): linear self-attention and cross-attention blocks.

Its feed-forward (GLUMBConv) is 1x1 and depthwise 3x3 convolutions: the quantized layer is an nn.Linear
swap, so those stay in full precision; only the attention linears are quantizable here.
"""
from .base import ChainAdapter, register


@register("SanaTransformer2DModel")
class SanaAdapter(ChainAdapter):
    family = "sana"
    text = ("attn2.to_k", "attn2.to_v")
    pipeline = "SanaPipeline"
    default_text_tokens = 300
