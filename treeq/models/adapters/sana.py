"""Sana (`SanaTransformer2DModel`): a chain of blocks under `transformer_blocks`, each linear (ReLU-kernel)
self-attention, softmax cross-attention to Gemma2 text features, and a GLUMBConv feed-forward.

Modulation is adaLN-single: one table per block plus the model's time embedder, outside the blocks. A
block returns the image stream alone; text features, mask, time embedding and the latent height and width
(the feed-forward reshapes tokens into a map) pass unchanged. Cross-attention keys and values run on the
text tokens (300 by default).

The feed-forward (GLUMBConv) is a 1x1, a depthwise 3x3 and a 1x1 convolution: the quantized layer is an
nn.Linear swap, so those convolutions stay in full precision; the quantizable layers of a block are its
eight attention linears (attn1/attn2 to_q, to_k, to_v, to_out.0).
"""
from .base import ChainAdapter, register


@register("SanaTransformer2DModel")
class SanaAdapter(ChainAdapter):
    family = "sana"
    text = ("attn2.to_k", "attn2.to_v")
    pipeline = "SanaPipeline"
    default_text_tokens = 300
