"""GPTQ weight rounding (Frantar et al., 2023): round column by column, pushing each column's error
onto the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs.

H = 2 X^T X / n from calibration inputs, dampened by 1% of its mean diagonal. Scales (and zero
points) are fixed from the weight before the loop, with the layer's clipping and grouping, so
codes from GPTQ and from round-to-nearest share one grid.
"""
import torch

from ..quant.quantizers import QuantizedWeight, code_range, is_full_precision, weight_quant_params


class HessianAccumulator:
    """Running 2 X^T X / n over every token of a linear's calibration inputs."""

    def __init__(self):
        self.sum = None
        self.count = 0

    def add(self, x):
        tokens = x.detach().flatten(0, -2).float()
        product = tokens.T @ tokens
        self.sum = product if self.sum is None else self.sum + product
        self.count += tokens.shape[0]

    def hessian(self):
        if self.sum is None:
            raise ValueError("no calibration inputs reached this layer")
        return 2 * self.sum / self.count


def gptq_quantize(weight, hessian, bits, *, symmetric=True, group_size=None, clip="minmax", damp=0.01,
                  block_size=128):
    """QuantizedWeight of `weight` (out, in) rounded by GPTQ against `hessian` (in, in)."""
    in_features = weight.shape[1]
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({in_features}, {in_features})")
    if damp <= 0 or block_size < 1:
        raise ValueError(f"damp must be > 0 and block_size >= 1, got damp={damp}, block_size={block_size}")
    scale, zero_point = weight_quant_params(weight, bits, symmetric=symmetric, group_size=group_size, clip=clip)
    column_scale, column_zero = _per_column(scale, in_features), _per_column(zero_point, in_features)
    column_shift = torch.zeros_like(column_scale) if column_zero is None else column_zero
    inverse_scale = column_scale.reciprocal()  # multiply as the round-to-nearest quantizer does: same codes
    qmin, qmax = code_range(bits, symmetric)
    work = weight.detach().float().clone()
    inverse = _inverse_hessian_factor(hessian.float().clone(), work, damp)
    codes = torch.empty_like(work)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = work[:, start:end]
        errors = torch.empty_like(block)
        for i in range(end - start):
            j = start + i
            codes[:, j] = (torch.round(block[:, i] * inverse_scale[:, j]) + column_shift[:, j]).clamp(qmin, qmax)
            restored = (codes[:, j] - column_shift[:, j]) * column_scale[:, j]
            errors[:, i] = (block[:, i] - restored) / inverse[j, j]
            block[:, i:] -= errors[:, i:i + 1] * inverse[j, j:end]
        work[:, end:] -= errors @ inverse[start:end, end:]
    return QuantizedWeight(codes.to(torch.int8), scale, zero_point, bits, group_size)


def gptq_linear_(layer, hessian, *, damp=0.01, block_size=128):
    """Round a QuantLinear's weight at its w_bits with GPTQ; forward and export then use those codes."""
    if is_full_precision(layer.w_bits):
        return layer
    quantized = gptq_quantize(layer.weight, hessian.to(layer.weight.device), layer.w_bits, damp=damp,
                              block_size=block_size, **layer.weight_options())
    layer.set_rounded_weight(quantized)
    return layer


def _inverse_hessian_factor(hessian, work, damp):
    """Upper Cholesky factor of the dampened inverse Hessian; inputs that never fired get their columns zeroed."""
    diagonal = hessian.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1
    work[:, dead] = 0
    diagonal += damp * diagonal.mean()
    lower = torch.linalg.cholesky(hessian)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _per_column(params, in_features):
    """(out, n_groups) -> (out, in_features): each column's scale or zero point."""
    if params is None:
        return None
    return params.repeat_interleave(in_features // params.shape[1], dim=1)

