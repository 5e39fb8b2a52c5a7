"""Online Hadamard rotation of a linear's input, its inverse folded into the weight (QuaRot-style).

Since H is orthonormal, x W^T = (x H)(W H)^T: rotating both spreads outlier channels over a block
of features, so per-token activation quantization loses less, while the float output is unchanged.
Widths that are not a power of two use a block-diagonal Hadamard (1152 = 9 blocks of 128). The online
rotation is a fast Walsh-Hadamard transform: H_n = H_a (x) H_b (x) ... (Sylvester matrices are Kronecker
powers of H_2), applied one small factor at a time, O(n log n) instead of the dense block's O(n^2).
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


# Largest factor the fast transform applies as one small dense matmul. Each stage is a (rows, f) @ (f, f)
# GEMM plus one transposing copy, so few balanced stages win: 128 = 16 x 8, 512 = 32 x 16 (48 MACs per
# feature instead of the dense block's 512).
_MAX_FACTOR = 32
# Blocks up to this size rotate as the dense block matmul: at 128 one GEMM of 128 MACs per feature beat
# two small GEMMs and two transposing copies on CPU (0.9 against 1.2 ms at 256 x 1152, torch 2.13);
# at 512 the fast transform wins by 1.5-3x (fc2 of DiT-XL/2, 4608 features).
DENSE_MAX = 128


def hadamard_factors(size):
    """Balanced powers of two, each at most _MAX_FACTOR, whose product is `size` (largest first)."""
    exponent = size.bit_length() - 1
    stages = -(-exponent // (_MAX_FACTOR.bit_length() - 1))
    return sorted((2 ** (exponent // stages + (index < exponent % stages)) for index in range(stages)),
                  reverse=True) if exponent else []


def hadamard_block_size(width):
    """Largest power of two dividing `width` (1 for odd widths: no rotation)."""
    return width & -width


class HadamardTransform(nn.Module):
    """x -> x @ blockdiag(H, ..., H) over the last dimension.

    `block` is the dense H (what folding into a weight uses). Blocks up to DENSE_MAX rotate with it; larger
    ones hold only the small factors and compute the same product as a fast Walsh-Hadamard transform over
    `hadamard_factors(block size)`, equal to float rounding.
    """

    def __init__(self, width, *, device=None, dtype=torch.float32):
        super().__init__()
        self.width, self.size = width, hadamard_block_size(width)
        self.factors = [] if self.size <= DENSE_MAX else hadamard_factors(self.size)
        # Not persistent: they are functions of the width, so state dicts stay free of them. Shared between
        # layers of one width (a model's buffers() counts them once).
        if not self.factors:
            self.register_buffer("matrix", _shared_hadamard(self.size, dtype, device), persistent=False)
        for index, factor in enumerate(self.factors):
            self.register_buffer(f"factor{index}", _shared_hadamard(factor, dtype, device), persistent=False)

    @property
    def block(self):
        """The dense (size, size) block matrix."""
        if not self.factors:
            return self.matrix
        return hadamard_matrix(self.size, dtype=self.factor0.dtype, device=self.factor0.device)

    def forward(self, x):
        size = self.size
        if size == 1:
            return x
        if not self.factors:
            return (x.unflatten(-1, (-1, size)) @ self.matrix.to(x.dtype)).flatten(-2)
        # The block of H_a (x) H_b (x) ... on a feature vector viewed as an (a, b, ...) array applies H_a
        # along axis a, H_b along b, ...: apply the last factor over the last axis, then move that axis to
        # the front of the block, once per factor, and the axes are back in order.
        rows = x.numel() // size
        out = x.reshape(rows, size)
        for index in reversed(range(len(self.factors))):
            factor = self.factors[index]
            out = out.reshape(-1, factor) @ getattr(self, f"factor{index}").to(x.dtype)
            if len(self.factors) > 1:
                out = out.reshape(rows, size // factor, factor).transpose(1, 2)
        return out.reshape(x.shape)

    def macs_per_token(self):
        """Multiply-accumulates of one token's rotation: the block size per feature when dense, else each
        factor f of the fast transform costs f per feature."""
        return 0 if self.size == 1 else self.width * (sum(self.factors) or self.size)

    def extra_repr(self):
        return f"width={self.width}, block={self.size}"


_MATRICES = {}


def _shared_hadamard(size, dtype, device):
    key = (size, dtype, str(torch.device(device or "cpu")))
    if key not in _MATRICES:
        _MATRICES[key] = hadamard_matrix(size, dtype=dtype, device=device)
    return _MATRICES[key]


def rotate_linear_(layer):
    """Rotate a QuantLinear's input online and fold the rotation into its weight."""
    transform = HadamardTransform(layer.in_features, device=layer.weight.device)
    layer.set_input_transform(transform, transform(layer.weight.detach()))
    return layer
