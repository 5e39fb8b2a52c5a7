"""General Monarch Branch (GMB): a structured full-precision path beside a quantized linear.

M = P2 L P1 R (Monarch, Dao et al. 2022) generalised to rank r per block pair and to any shape
(padded, then cropped), initialised by the exact Frobenius-optimal projection of a weight.
The low-rank branch (lowrank.py) is the baseline at equal parameter count.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MonarchBranch(nn.Module):
    """x -> M x with M (out_features, in_features) = P2 L P1 R, never formed in forward.

    The input (padded to k_in * block_in) is cut into k_in blocks; `right` (R) maps input
    block j to k_out * rank values, one group of `rank` per output block i; the fixed
    permutation P1 regroups them by output block; `left` (L) maps output block i's k_in * rank
    values to its block_out outputs; P2 is the reshape back to (out_features,), then cropped.
    Block pair (i, j) of M is therefore left[i][:, j-th rank columns] @ right[j][i-th rank rows],
    a rank-`rank` matrix, and

        parameters = multiply-accumulates per token = rank * (k_out * n_pad + k_in * m_pad)

    with n_pad = k_in * ceil(in_features / k_in), m_pad = k_out * ceil(out_features / k_out).
    k_in = k_out = 1 is the low-rank branch; rank = min(block_out, block_in) is a dense matrix.
    """

    def __init__(self, in_features, out_features, k_in, k_out, rank, *, device=None, dtype=None):
        super().__init__()
        for name, value, limit in (("k_in", k_in, in_features), ("k_out", k_out, out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise ValueError(f"{name} must be an int in 1..{limit}, got {value!r}")
            # k blocks of ceil(size / k) leave a block of pure padding when (k - 1) blocks already
            # cover the size (e.g. 5 columns in 4 blocks of 2): parameters that can never matter.
            if (value - 1) * math.ceil(limit / value) >= limit:
                raise ValueError(f"{name}={value} leaves a block of {limit} features with no real feature; "
                                 f"use {math.ceil(limit / math.ceil(limit / value))}")
        self.in_features, self.out_features = in_features, out_features
        self.k_in, self.k_out = k_in, k_out
        self.block_in = math.ceil(in_features / k_in)
        self.block_out = math.ceil(out_features / k_out)
        max_rank = min(self.block_in, self.block_out)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
            raise ValueError(f"rank must be an int in 1..{max_rank} (the smaller side of a "
                             f"{self.block_out} x {self.block_in} block), got {rank!r}")
        self.rank = rank
        # LoRA-style start when built bare: R random, L zero, so the branch adds nothing yet
        # gradients reach L; from_weight overwrites both.
        self.right = nn.Parameter(torch.empty(k_in, k_out * rank, self.block_in, device=device, dtype=dtype))
        self.left = nn.Parameter(torch.zeros(k_out, self.block_out, k_in * rank, device=device, dtype=dtype))
        nn.init.normal_(self.right, std=self.block_in ** -0.5)

    @classmethod
    def from_weight(cls, weight, k_in, k_out, rank):
        """Frobenius-nearest Monarch matrix to `weight` (out, in): top-`rank` SVD of each block pair."""
        out_features, in_features = weight.shape
        branch = cls(in_features, out_features, k_in, k_out, rank, device=weight.device, dtype=weight.dtype)
        m_pad, n_pad = k_out * branch.block_out, k_in * branch.block_in
        # Zero padding is harmless: a slice with zero rows/columns has the same nonzero
        # singular triplets, with zeros at the padding, so the cropped result stays optimal.
        work = weight.detach().double() if weight.dtype == torch.float64 else weight.detach().float()
        work = F.pad(work, (0, n_pad - in_features, 0, m_pad - out_features))
        slices = work.reshape(k_out, branch.block_out, k_in, branch.block_in).transpose(1, 2)
        u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # batched over (k_out, k_in)
        root = s[..., :rank].sqrt()
        left = u[..., :rank] * root[..., None, :]                # (k_out, k_in, block_out, rank)
        right = root[..., :, None] * vh[..., :rank, :]           # (k_out, k_in, rank, block_in)
        with torch.no_grad():
            branch.left.copy_(left.permute(0, 2, 1, 3).reshape_as(branch.left))
            branch.right.copy_(right.transpose(0, 1).reshape_as(branch.right))
        return branch

    @classmethod
    def from_ratio(cls, weight, ratio):
        """from_weight with the structure monarch_shape picks for `ratio` parameters per weight."""
        return cls.from_weight(weight, *monarch_shape(*weight.shape, ratio))

    def dense(self):
        """The (out_features, in_features) matrix the branch applies."""
        left = self.left.view(self.k_out, self.block_out, self.k_in, self.rank)
        right = self.right.view(self.k_in, self.k_out, self.rank, self.block_in)
        blocks = torch.einsum("iajs,jisc->iajc", left, right)
        full = blocks.reshape(self.k_out * self.block_out, self.k_in * self.block_in)
        return full[: self.out_features, : self.in_features]

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        tokens = x.shape[0]
        if self.k_in * self.block_in != self.in_features:
            x = F.pad(x, (0, self.k_in * self.block_in - self.in_features))
        # Tokens ride along as the matmul's wide side (feature-major): 2x faster on CPU than
        # token-major, whose second matmul has only block_out columns.
        # R: one (block_in -> k_out * rank) matmul per input block
        hidden = torch.bmm(self.right, x.view(tokens, self.k_in, self.block_in).permute(1, 2, 0))
        # P1: (input block j, output block i, rank) -> (i, j, rank)
        hidden = hidden.view(self.k_in, self.k_out, self.rank, tokens).transpose(0, 1)
        hidden = hidden.reshape(self.k_out, self.k_in * self.rank, tokens)
        # L: one (k_in * rank -> block_out) matmul per output block; P2 is the reshape, then crop
        y = torch.bmm(self.left, hidden).view(self.k_out * self.block_out, tokens)
        y = y[: self.out_features].T
        return y.reshape(*lead, self.out_features)

    def describe(self):
        """Constructor options beyond the shape (what an export records)."""
        return {"k_in": self.k_in, "k_out": self.k_out, "rank": self.rank}

    def parameter_count(self):
        """rank * (k_out * n_pad + k_in * m_pad)."""
        return self.rank * (self.k_out * self.k_in * self.block_in + self.k_in * self.k_out * self.block_out)

    def macs_per_token(self):
        """Multiply-accumulates per token of forward: each parameter is used once per token."""
        return self.parameter_count()

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, k_in={self.k_in}, "
                f"k_out={self.k_out}, rank={self.rank}, parameters={self.parameter_count()}")


def _block_counts(size):
    """Block counts with the least padding for each block size: ceil(size / b), b = 1..size."""
    return sorted({math.ceil(size / b) for b in range(1, size + 1)})


def monarch_shape(out_features, in_features, ratio, *, tolerance=0.05):
    """(k_in, k_out, rank) for a branch of about `ratio` * out_features * in_features parameters.

    Rule: among structures with no all-padding block and rank at most the block's smaller side,
    keep those at or under the target and within `tolerance` (relative) of the largest such
    count, then take the one nearest the canonical Monarch geometry k_out ~ sqrt(out_features),
    k_in ~ sqrt(in_features) (distance |log(k_out/sqrt m)| + |log(k_in/sqrt n)|), larger count
    on ties. Rank is therefore the coarse knob (how many rank-1 layers the sqrt geometry
    affords, at least 1) and the block counts the fine one; small or low-ratio layers get fewer,
    larger blocks. The smallest branch is k_in = k_out = rank = 1 (out + in parameters); a
    ratio below that, zero included, raises ValueError: attach no branch instead.
    """
    m, n = out_features, in_features
    target = ratio * m * n
    if not target >= m + n:  # also refuses NaN
        raise ValueError(f"ratio {ratio!r} gives {target:.0f} parameters, under the smallest Monarch branch "
                         f"of a {m} x {n} weight ({m + n}, ratio {(m + n) / (m * n):.4g}); attach no branch")
    candidates = []  # (k_in, k_out, rank, parameter count)
    for k_out in _block_counts(m):
        for k_in in _block_counts(n):
            block_out, block_in = math.ceil(m / k_out), math.ceil(n / k_in)
            per_rank = k_out * k_in * (block_in + block_out)
            rank = min(int(target // per_rank), block_out, block_in)
            if rank >= 1:
                candidates.append((k_in, k_out, rank, rank * per_rank))
    largest = max(count for *_, count in candidates)

    def preference(candidate):
        k_in, k_out, _, count = candidate
        return abs(math.log(k_out / math.sqrt(m))) + abs(math.log(k_in / math.sqrt(n))), -count

    k_in, k_out, rank, _ = min((c for c in candidates if c[3] >= (1 - tolerance) * largest), key=preference)
    return k_in, k_out, rank


def init_monarch(weight, ratio=None, *, shape=None, residual=None):
    """Monarch branch for `weight` (out, in), its structure from `ratio` or `shape` = (k_in, k_out, rank).

    Default: project W itself, so the quantized path holds W - M (SVDQuant's split). Pass
    `residual` (same shape, e.g. W - Q(W)) to project the quantization error instead.
    """
    if (ratio is None) == (shape is None):
        raise ValueError("give exactly one of ratio and shape")
    if residual is not None and residual.shape != weight.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != weight shape {tuple(weight.shape)}")
    shape = monarch_shape(*weight.shape, ratio) if shape is None else shape
    return MonarchBranch.from_weight(weight if residual is None else residual, *shape)
