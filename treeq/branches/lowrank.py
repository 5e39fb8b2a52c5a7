"""Low-rank branch (SVDQuant-style): a rank-r full-precision path beside a quantized linear.

Initialised from the top-r singular triplets of the weight, so the quantized path only has to
hold the residual W - up @ down, whose outliers the branch has absorbed. The baseline the
Monarch branch is compared with at equal parameter count.
"""
import torch
import torch.nn as nn


class LowRankBranch(nn.Module):
    """x -> up(down(x)), down: in_features -> rank, up: rank -> out_features, no biases."""

    def __init__(self, in_features, out_features, rank, *, device=None, dtype=None):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be an int in 1..{min(in_features, out_features)}, got {rank!r}")
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)

    @classmethod
    def from_weight(cls, weight, rank):
        """Best rank-r approximation of `weight` (out, in), sqrt of singular values on each side."""
        out_features, in_features = weight.shape
        branch = cls(in_features, out_features, rank, device=weight.device, dtype=weight.dtype)
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        root = s[:rank].sqrt()
        with torch.no_grad():
            branch.up.weight.copy_(u[:, :rank] * root)
            branch.down.weight.copy_(root[:, None] * vh[:rank])
        return branch

    @staticmethod
    def rank_for_ratio(out_features, in_features, ratio):
        """The largest rank whose r * (in + out) parameters stay within `ratio` of the layer's, at least 1."""
        return max(1, min(int(ratio * out_features * in_features / (out_features + in_features)),
                          out_features, in_features))

    def parameter_count(self):
        return self.down.weight.numel() + self.up.weight.numel()

    def macs_per_token(self):
        return self.parameter_count()

    def describe(self):
        """Constructor options beyond the shape (what an export records)."""
        return {"rank": self.down.out_features}

    def dense(self):
        """The (out_features, in_features) matrix the branch applies."""
        return self.up.weight @ self.down.weight

    def forward(self, x):
        return self.up(self.down(x))
