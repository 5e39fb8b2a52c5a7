"""Online Hadamard rotation of a linear's input, its inverse folded into the weight (QuaRot-style).

Since H is orthonormal, x W^T = (x H)(W H)^T: rotating both spreads outlier channels over a block
of features, so per-token activation quantization loses less, while the float output is unchanged.
Widths that are not a power of two use a block-diagonal Hadamard (1152 = 9 blocks of 128).
"""
import math

import torch
import torch.nn as nn


def hadamard_matrix(size, *, dtype=torch.float32, device=None):
    """Orthonormal Sylvester Hadamard matrix of a power-of-two size: H @ H.T = I."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size & (size - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {size!r}")
    matrix = torch.ones(1, 1, dtype=dtype, device=device)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / math.sqrt(size)


def hadamard_block_size(width):
    """Largest power of two dividing `width` (1 for odd widths: no rotation)."""
    return width & -width


class HadamardTransform(nn.Module):
    """x -> x @ blockdiag(H, ..., H) over the last dimension."""

    def __init__(self, width, *, device=None, dtype=torch.float32):
        super().__init__()
        self.width = width
        # Not persistent: it is a function of the width, so state dicts stay free of it.
        self.register_buffer("block", hadamard_matrix(hadamard_block_size(width), dtype=dtype, device=device),
                             persistent=False)

    def forward(self, x):
        size = self.block.shape[0]
        return (x.unflatten(-1, (-1, size)) @ self.block.to(x.dtype)).flatten(-2)

    def extra_repr(self):
        return f"width={self.width}, block={self.block.shape[0]}"


def rotate_linear_(layer):
    """Rotate a QuantLinear's input online and fold the rotation into its weight."""
    transform = HadamardTransform(layer.in_features, device=layer.weight.device)
    layer.set_input_transform(transform, transform(layer.weight.detach()))
    return layer
