"""The exact int8 GEMM every integer back-end can fall back on: torch._int_mm, padded to the shapes
it accepts, and an in-place int32 -> float32 conversion of its accumulator."""
import torch
import torch.nn.functional as F

# torch._int_mm on CUDA (cuBLAS) wants more than 16 rows and K, N multiples of 8; the CPU kernel
# takes any shape (checked on torch 2.13). Padding to the CUDA limits everywhere keeps one code path:
# on DiT shapes it only pads the adaLN rows (one per image), and zero padding adds nothing to a sum.
_MIN_ROWS = 17
_MULTIPLE = 8


def int_matmul(a, b):
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32 via torch._int_mm, zero-padded to shapes it accepts."""
    (m, k), n = a.shape, b.shape[1]
    pad_m, pad_k, pad_n = max(0, _MIN_ROWS - m), -k % _MULTIPLE, -n % _MULTIPLE
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = F.pad(b, (0, pad_n, 0, pad_k))
    out = torch._int_mm(a, b)
    return out[:m, :n] if pad_m or pad_n else out


def to_float_in_place(accumulator):
    """int32 -> float32 in the same memory (4 bytes each; an elementwise copy reads each element before
    writing it): no second M x N buffer to allocate, which costs a fifth of a small-K layer on CPU."""
    return accumulator.view(torch.float32).copy_(accumulator)
