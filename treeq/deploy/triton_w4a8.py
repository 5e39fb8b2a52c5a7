"""A fused Triton kernel for the W4A8 linear and its full-precision branch (CUDA; CPU tests run it
under Triton's interpreter).

    y = s_x s_w ((codes_x - z_x) @ codes_w^T) + bias + branch(x)

with 4-bit symmetric per-output-channel weight codes (`quantize_weight(w, 4)`) and 8-bit per-token
activation codes, symmetric ("dynamic") or asymmetric with a zero point z_x ("dynamic-asym"), rounded
exactly as `quantizers.token_quant_params` and `quantizers._codes` round them. One launch does, per
(BLOCK_M rows, BLOCK_N outputs) tile:

- prologue (fused): one pass over K of the tile's rows for their min and max, giving each row's
  scale (and zero point) as the quantizer computes them;
- main K loop (fused): x tiles are loaded in float, quantized to int8 on the fly, and multiplied with
  the 4-bit weight, unpacked from bytes in registers, by an int8 x int8 -> int32 `tl.dot`; a low-rank
  branch's x @ down^T is accumulated in float from the same x tiles (SVDQuant-style);
- epilogue (fused): the input zero point's correction z_x * sum_k codes_w (weight row sums precomputed
  at pack time), token scale x channel scale, bias, the low-rank branch's hidden @ up^T for the tile,
  or the tile of a precomputed branch output (Monarch or any other branch, computed by torch before
  the launch: not fused).

The input transform (Hadamard, smoothing) of a deployed layer runs in torch before the kernel.
Importing this module needs no Triton: a CPU-only install uses IntLinear; only running the kernel does.
Under TRITON_INTERPRET=1 the kernel runs on CPU tensors, slowly (tests); the variable must be set before
the process first imports triton, which jits its own helpers (tl.zeros, tl.max) then.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..branches.lowrank import LowRankBranch
from ..quant.quantizers import code_range

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the module imports, the kernel raises when asked for
    triton = tl = None

ACTIVATIONS = ("dynamic", "dynamic-asym")
# Triton's float32 dot precisions for the fused low-rank branch: "ieee" matches the float branch to
# summation order; "tf32" runs on tensor cores (about 1e-3 relative error on the branch's share).
LOWRANK_PRECISIONS = ("ieee", "tf32", "tf32x3")
# Compiler options of every launch: the kernel's rounding needs x * (1 / scale) rounded before it is
# added to, so no multiply-add may be fused into an FMA (Triton fuses them by default).
COMPILE_OPTIONS = {"enable_fp_fusion": False}


@dataclass(frozen=True)
class PackedW4:
    """A 4-bit weight as the kernel reads it.

    Layout of `data` (out_features, ceil(in_features / 2)) uint8: byte j of row n holds the code of
    input feature j in its low nibble and that of feature j + ceil(in_features / 2) in its high
    nibble, both as 4-bit two's complement (an odd in_features pads the last high nibble with 0).
    Splitting K in halves rather than pairing neighbours lets one byte tile give two contiguous
    (BLOCK_K, BLOCK_N) code tiles with one shift and mask each, whatever BLOCK_K is.
    """

    data: torch.Tensor      # (out_features, ceil(in_features / 2)) uint8
    scale: torch.Tensor     # (out_features,) float32 per-channel scale
    row_sums: torch.Tensor  # (out_features,) int32 sum of each row's codes: the input zero point's share
    in_features: int

    @property
    def out_features(self):
        return self.data.shape[0]


def pack_w4(codes, scale):
    """int8 codes (out, in) in [-8, 7] and per-channel scales (out, 1) or (out,) -> PackedW4."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D int8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    if codes.numel() and not -8 <= int(codes.min()) <= int(codes.max()) <= 7:
        raise ValueError("4-bit codes must lie in [-8, 7]")
    out_features, in_features = codes.shape
    if scale.numel() != out_features:
        raise ValueError(f"one scale per output channel expected ({out_features}), got shape {tuple(scale.shape)}")
    half = (in_features + 1) // 2
    fields = F.pad(codes, (0, 2 * half - in_features)).to(torch.int16) & 0xF
    data = (fields[:, :half] | (fields[:, half:] << 4)).to(torch.uint8)
    return PackedW4(data, scale.reshape(out_features).float().contiguous(),
                    codes.sum(1, dtype=torch.int32), in_features)


def unpack_w4(packed):
    """The int8 codes (out, in) of a PackedW4: the inverse of pack_w4."""
    fields = torch.cat([packed.data & 0xF, packed.data >> 4], dim=1).to(torch.int8)
    return ((fields ^ 8) - 8)[:, :packed.in_features]


def triton_available():
    """Whether Triton imported (the kernel can run on CUDA, or anywhere under TRITON_INTERPRET=1)."""
    return triton is not None


def w4a8_linear(x, packed, *, bias=None, lowrank=None, branch_out=None, activations="dynamic",
                lowrank_precision="ieee", block_m=64, block_n=128, block_k=64, num_warps=4):
    """y = Q_a(x) @ Q_w(W)^T + bias + branch for x (M, in_features) float, in one kernel launch.

    lowrank: (down (rank, in), up (out, rank)) of a low-rank branch, fused into the K loop and the
    epilogue. branch_out: a precomputed (M, out) branch output (any other branch), added in the
    epilogue. Tiles: block_m rows by block_n outputs, block_k bytes (2 * block_k input features) per
    K step. Returns (M, out_features) in x's dtype. Needs CUDA tensors, or TRITON_INTERPRET=1.
    """
    _check_launch(x, packed, activations, lowrank_precision, lowrank, branch_out, block_m, block_n, block_k)
    rows, out_features = x.shape[0], packed.out_features
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    down, up = (None, None) if lowrank is None else (lowrank[0].float(), lowrank[1].float())
    rank = 0 if down is None else down.shape[0]
    symmetric = activations == "dynamic"
    qmin, qmax = code_range(8, symmetric)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _kernel()[grid](
        x, packed.data, packed.scale, packed.row_sums, _or(bias, out), _or(down, out), _or(up, out),
        _or(branch_out, out), out,
        rows, out_features, packed.in_features, packed.data.shape[1], rank,
        *x.stride(), *packed.data.stride(), *_strides(down), *_strides(up), *_strides(branch_out), *out.stride(),
        QMIN=qmin, QMAX=qmax, ASYMMETRIC=not symmetric, HAS_BIAS=bias is not None, HAS_LOWRANK=down is not None,
        HAS_BRANCH_OUT=branch_out is not None, LOWRANK_PRECISION=lowrank_precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=max(16, triton.next_power_of_2(rank)), num_warps=num_warps, **COMPILE_OPTIONS)
    return out


class TritonW4A8Linear(nn.Module):
    """A deployed W4A8 linear running `w4a8_linear` (inference only: no autograd through the kernel):
    input transform in torch, then one fused launch.

    A LowRankBranch is fused into the kernel; any other branch (MonarchBranch) runs in torch and its
    output is added in the kernel's epilogue. Buffers: `weight_packed` (PackedW4 layout),
    `weight_scale`, `weight_row_sums`, `bias`.
    """

    def __init__(self, packed, *, bias=None, activations="dynamic", input_transform=None, branch=None,
                 **launch):
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.activations, self.launch = activations, launch
        self.register_buffer("weight_packed", packed.data)
        self.register_buffer("weight_scale", packed.scale)
        self.register_buffer("weight_row_sums", packed.row_sums)
        self.register_buffer("bias", bias)
        self.register_module("input_transform", input_transform)
        self.register_module("branch", branch)

    @classmethod
    def from_quant_linear(cls, layer, **launch):
        """The kernel twin of a QuantLinear at w_bits=4, a_bits=8 with per-channel symmetric weights and
        dynamic activations (transform and branch copied). `launch`: w4a8_linear's tile options."""
        if (layer.w_bits, layer.a_bits) != (4, 8):
            raise ValueError(f"the W4A8 kernel needs w_bits=4, a_bits=8, got {layer.w_bits}, {layer.a_bits}")
        if layer.step_gain is not None:
            raise ValueError("the layer's step sizes are training: fold them first (fold_step_sizes_)")
        quantized = layer.quantized_weight()
        if not quantized.symmetric or quantized.group_size is not None:
            raise ValueError("the W4A8 kernel needs symmetric per-output-channel weight codes")
        bias = None if layer.bias is None else layer.bias.detach().float().clone()
        return cls(pack_w4(quantized.codes, quantized.scale), bias=bias, activations=layer.activations,
                   input_transform=copy.deepcopy(layer.input_transform), branch=copy.deepcopy(layer.branch),
                   **launch)

    @property
    def packed(self):
        return PackedW4(self.weight_packed, self.weight_scale, self.weight_row_sums, self.in_features)

    def forward(self, x):
        if self.input_transform is not None:
            x = self.input_transform(x)
        flat = x.reshape(-1, self.in_features)
        lowrank = isinstance(self.branch, LowRankBranch)
        out = w4a8_linear(flat, self.packed, bias=self.bias, activations=self.activations,
                          lowrank=(self.branch.down.weight, self.branch.up.weight) if lowrank else None,
                          branch_out=None if self.branch is None or lowrank else self.branch(flat), **self.launch)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={self.activations}"


def _check_launch(x, packed, activations, lowrank_precision, lowrank, branch_out, block_m, block_n, block_k):
    """Raise before launching what the kernel cannot run (Triton would fail later, less clearly)."""
    if triton is None:
        raise ImportError("the W4A8 Triton kernel needs Triton (pip install triton); on CPU use IntLinear")
    if not x.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError("the W4A8 Triton kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if lowrank_precision not in LOWRANK_PRECISIONS:
        raise ValueError(f"lowrank_precision must be one of {LOWRANK_PRECISIONS}, got {lowrank_precision!r}")
    if x.dim() != 2 or x.shape[1] != packed.in_features or not x.is_floating_point():
        raise ValueError(f"x must be float (M, {packed.in_features}), got {x.dtype} of shape {tuple(x.shape)}")
    # tl.arange needs powers of two; tl.dot needs 16 rows and columns, and K >= 32 for int8 operands.
    for name, value, least in (("block_m", block_m, 16), ("block_n", block_n, 16), ("block_k", block_k, 32)):
        if value < least or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= {least}, got {value}")
    if lowrank is not None:
        down, up = lowrank
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != packed.in_features or \
                up.shape != (packed.out_features, down.shape[0]):
            raise ValueError(f"lowrank must be down (rank, {packed.in_features}) and up ({packed.out_features}, rank)")
    if branch_out is not None and branch_out.shape != (x.shape[0], packed.out_features):
        raise ValueError(f"branch_out must be ({x.shape[0]}, {packed.out_features}), got {tuple(branch_out.shape)}")


def _or(tensor, stand_in):
    """An absent operand still needs a pointer argument; the kernel never reads it (its flag is off)."""
    return stand_in if tensor is None else tensor


def _strides(tensor):
    return (0, 0) if tensor is None else tensor.stride()


def _kernel():
    """The kernel jitted for the current mode. `triton.jit` picks interpreter or compiler when it is
    applied (TRITON_INTERPRET), so it is applied on first use, once per mode, rather than at import."""
    return _jitted(triton.knobs.runtime.interpret)


@functools.cache
def _jitted(interpret):  # `interpret` is the cache key: triton.jit reads the same setting itself
    return triton.jit(_w4a8_kernel)


def _w4a8_kernel(x_ptr, weight_ptr, weight_scale_ptr, row_sums_ptr, bias_ptr, down_ptr, up_ptr, branch_ptr,
                 out_ptr, M, N, K, HALF_K, RANK,
                 stride_xm, stride_xk, stride_wn, stride_wb, stride_dr, stride_dk, stride_un, stride_ur,
                 stride_bm, stride_bn, stride_om, stride_on,
                 QMIN: tl.constexpr, QMAX: tl.constexpr, ASYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_LOWRANK: tl.constexpr, HAS_BRANCH_OUT: tl.constexpr, LOWRANK_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) output tile; each step of the K loop reads BLOCK_K bytes of weight per
    output, i.e. input features [j, j + BLOCK_K) and the same range shifted by HALF_K (PackedW4)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    steps = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xm

    # Prologue: each row's extremes. Starting from 0 is the quantizer's range always holding 0, and
    # makes masked-out (zero) entries harmless.
    low = tl.zeros((BLOCK_M,), tl.float32)
    high = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + steps
        tile = tl.load(x_rows + k[None, :] * stride_xk, mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
        tile = tile.to(tl.float32)
        low = tl.minimum(low, tl.min(tile, axis=1))
        high = tl.maximum(high, tl.max(tile, axis=1))
    # Scales as quantizers._affine_params / _token_scale: IEEE divisions, clamped to float32's tiny.
    # Rounding half to even (torch.round): adding 1.5 * 2^23 lands in [2^23, 2^24), where float32's
    # spacing is 1, so the add rounds to an integer; exact for |v| < 2^22 (codes and zero points are
    # within +-256). The launch disables FMA contraction so the product is rounded before the add.
    if ASYMMETRIC:
        scale = tl.maximum(tl.math.div_rn(high - low, (QMAX - QMIN) * 1.0), 1.1754943508222875e-38)
        zero = QMIN - ((tl.math.div_rn(low, scale) + 12582912.0) - 12582912.0)
        zero = tl.minimum(tl.maximum(zero, QMIN * 1.0), QMAX * 1.0)
    else:
        scale = tl.maximum(tl.math.div_rn(tl.maximum(high, -low), QMAX * 1.0), 1.1754943508222875e-38)
    inverse = tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), scale)

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    if HAS_LOWRANK:
        ranks = tl.arange(0, BLOCK_R)
        hidden = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for start in range(0, HALF_K, BLOCK_K):
        byte = start + steps
        byte_ok = byte < HALF_K
        packed = tl.load(weight_ptr + byte[:, None] * stride_wb + cols[None, :] * stride_wn,
                         mask=byte_ok[:, None] & col_ok[None, :], other=0).to(tl.int32)
        for half in tl.static_range(2):  # low nibbles: features [j, j + BLOCK_K); high: the same + HALF_K
            k = byte + half * HALF_K
            k_ok = byte_ok & (k < K)
            # Sign-extend the 4-bit field; masked bytes are 0, so out-of-range features add nothing.
            weight = ((((packed >> (4 * half)) & 0xF) ^ 8) - 8).to(tl.int8)
            x = tl.load(x_rows + k[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            x = x.to(tl.float32)
            codes = (x * inverse[:, None] + 12582912.0) - 12582912.0
            if ASYMMETRIC:
                codes = codes + zero[:, None]
            codes = tl.minimum(tl.maximum(codes, QMIN * 1.0), QMAX * 1.0).to(tl.int8)
            acc = tl.dot(codes, weight, acc)
            if HAS_LOWRANK:  # SVDQuant-style: the branch's down projection from the same x tile
                down = tl.load(down_ptr + ranks[None, :] * stride_dr + k[:, None] * stride_dk,
                               mask=k_ok[:, None] & (ranks < RANK)[None, :], other=0.0)
                hidden = tl.dot(x, down, hidden, input_precision=LOWRANK_PRECISION)

    if ASYMMETRIC:  # sum_k (codes_x - z_x) codes_w = acc - z_x * row sum of codes_w, exact in int32
        row_sums = tl.load(row_sums_ptr + cols, mask=col_ok, other=0)
        acc = acc - zero.to(tl.int32)[:, None] * row_sums[None, :]
    weight_scale = tl.load(weight_scale_ptr + cols, mask=col_ok, other=0.0)
    out = acc.to(tl.float32) * scale[:, None] * weight_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LOWRANK:
        up = tl.load(up_ptr + ranks[:, None] * stride_ur + cols[None, :] * stride_un,
                     mask=(ranks < RANK)[:, None] & col_ok[None, :], other=0.0)
        out = tl.dot(hidden, up, out, input_precision=LOWRANK_PRECISION)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BRANCH_OUT:
        out += tl.load(branch_ptr + rows[:, None] * stride_bm + cols[None, :] * stride_bn, mask=tile_ok,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, out.to(out_ptr.dtype.element_ty),
             mask=tile_ok)
