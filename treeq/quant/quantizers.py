"""Uniform integer quantizers: the rounding every TreeQ method builds on.

Weights are quantized per output channel or per group of input features, with min-max or
MSE-searched clipping; activations (the inputs of linears) per token, symmetric or asymmetric,
or per tensor from a calibrated scale. Pure functions; the fake-quantize ones pass gradients straight
through the rounding (STE) so the same code calibrates and fine-tunes.
"""
from dataclasses import dataclass

import torch

from ..bits import QUANTIZED_BITS, check_bits, is_full_precision

CLIP_METHODS = ("minmax", "mse")
# Clipping ratios tried by clip="mse", from no clipping (1.0, tried first so ties keep it) to half range.
MSE_CLIP_RATIOS = tuple(1.0 - 0.025 * step for step in range(21))


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes and the affine parameters that map them back: weight ~ (codes - zero_point) * scale.

    Codes are always int8. Symmetric codes lie in +-(2^(b-1) - 1); asymmetric codes use all 2^b
    levels, shifted from the unsigned range 0..2^b-1 down by 2^(b-1) so that 8-bit codes fit int8
    (zero_point is shifted the same way). A packer gets unsigned codes as `codes - qmin`.
    """

    codes: torch.Tensor              # (out_features, in_features) int8, integers in code_range(bits, symmetric)
    scale: torch.Tensor              # (out_features, n_groups) float32
    zero_point: torch.Tensor | None  # like scale, float32 holding integers; None when symmetric
    bits: int
    group_size: int | None           # None: one group spans all input features (per output channel)

    @property
    def symmetric(self):
        return self.zero_point is None


def code_range(bits, symmetric):
    """(qmin, qmax) of the int8 codes at `bits` (see QuantizedWeight for the two layouts).

    The symmetric range drops -2^(b-1) so that +absmax and -absmax are both reachable and zero is
    exact; it costs one level (three at 2 bits). Asymmetric quantization keeps every level.
    """
    if check_bits(bits) not in QUANTIZED_BITS:
        raise ValueError(f"{bits} bits is full precision: there is no integer code range")
    half = 2 ** (bits - 1)
    return (1 - half, half - 1) if symmetric else (-half, half - 1)


def check_weight_options(in_features, *, group_size=None, clip="minmax"):
    """Raise ValueError unless group_size (None or a divisor of in_features) and clip are valid."""
    if clip not in CLIP_METHODS:
        raise ValueError(f"clip must be one of {CLIP_METHODS}, got {clip!r}")
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not divisible by group_size {group_size}")


def quantize_weight(weight, bits, *, symmetric=True, group_size=None, clip="minmax"):
    """Round a (out_features, in_features) weight to integer codes at `bits` (2..8)."""
    scale, zero_point = weight_quant_params(weight, bits, symmetric=symmetric, group_size=group_size, clip=clip)
    grouped = _group(weight.detach().float(), group_size)
    codes = _codes(grouped, scale.unsqueeze(-1), _unsqueeze(zero_point), *code_range(bits, symmetric))
    return QuantizedWeight(codes.flatten(1).to(torch.int8), scale, zero_point, bits, group_size)


def dequantize_weight(quantized):
    """Float32 weight (out_features, in_features) that the codes stand for."""
    codes = quantized.codes.float().unflatten(1, (quantized.scale.shape[1], -1))
    if quantized.zero_point is not None:
        codes = codes - quantized.zero_point.unsqueeze(-1)
    return (codes * quantized.scale.unsqueeze(-1)).flatten(1)


def weight_quant_params(weight, bits, *, symmetric=True, group_size=None, clip="minmax"):
    """(scale, zero_point) of each output channel or group, each (out_features, n_groups) float32.

    clip="mse" searches MSE_CLIP_RATIOS of the min-max range per channel or group and keeps the
    ratio with the lowest reconstruction error; ratio 1.0 is among them, so it never loses to min-max.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    check_weight_options(weight.shape[1], group_size=group_size, clip=clip)
    grouped = _group(weight.detach().float(), group_size)
    low, high = grouped.amin(-1), grouped.amax(-1)
    if clip == "minmax":
        return _affine_params(low, high, bits, symmetric)
    return _mse_params(grouped, low, high, bits, symmetric)


def fake_quantize_weight(weight, bits, *, symmetric=True, group_size=None, clip="minmax"):
    """Quantize-dequantize a weight in its own dtype; gradients pass straight through inside the clip range."""
    if is_full_precision(check_bits(bits)):
        return weight
    with torch.no_grad():
        scale, zero_point = weight_quant_params(weight, bits, symmetric=symmetric, group_size=group_size, clip=clip)
    grouped = _group(weight.float(), group_size)
    out = _fake_quantize(grouped, scale.unsqueeze(-1), _unsqueeze(zero_point), *code_range(bits, symmetric))
    return out.flatten(1).to(weight.dtype)


def fake_quantize_activation(x, bits, *, symmetric=True, scale=None):
    """Quantize-dequantize of linear inputs over the last (feature) dimension.

    Dynamic per token when `scale` is None: symmetric from each token's absmax, or asymmetric from
    its min and max (all 2^b levels over [min, max]: post-GELU inputs span about -0.17..9, where a
    symmetric grid wastes half its levels). Static with a calibrated per-tensor symmetric `scale`
    otherwise. Gradients pass straight through inside the clip range.
    """
    if is_full_precision(check_bits(bits)):
        return x
    if scale is not None:
        qmin, qmax = code_range(bits, symmetric=True)
        scale = torch.as_tensor(scale, device=x.device)
        return _fake_quantize(x.float(), scale.float(), None, qmin, qmax).to(x.dtype)
    scale, zero_point = token_quant_params(x, bits, symmetric=symmetric)
    return _fake_quantize(x.float(), scale, zero_point, *code_range(bits, symmetric)).to(x.dtype)


def token_quant_params(x, bits, *, symmetric=True):
    """(scale, zero_point) of each token (row over the last dimension), each (..., 1) float32."""
    x = x.detach()
    if symmetric:
        return _token_scale(x, code_range(bits, symmetric=True)[1]), None
    return _affine_params(x.amin(-1, keepdim=True).float(), x.amax(-1, keepdim=True).float(), bits, False)


def quantize_activation_per_token(x, bits, *, symmetric=True):
    """(int8 codes like x, float32 scale (..., 1), zero point like scale or None) with
    x ~ (codes - zero_point) * scale: the integer path's input."""
    scale, zero_point = token_quant_params(x, bits, symmetric=symmetric)
    codes = _codes(x.detach().float(), scale, zero_point, *code_range(bits, symmetric))
    return codes.to(torch.int8), scale, zero_point


def _group(weight, group_size):
    """(out, in) -> (out, n_groups, group_size); one group of all inputs when group_size is None."""
    return weight.unsqueeze(1) if group_size is None else weight.unflatten(1, (-1, group_size))


def _affine_params(low, high, bits, symmetric):
    """Scale (and zero point) that map [low, high] onto the code range; the range always holds 0."""
    qmin, qmax = code_range(bits, symmetric)
    tiny = torch.finfo(torch.float32).tiny  # an all-zero channel gets a tiny scale and all-zero codes
    if symmetric:
        return (torch.maximum(-low, high) / qmax).clamp_min(tiny), None
    low, high = low.clamp_max(0), high.clamp_min(0)
    scale = ((high - low) / (qmax - qmin)).clamp_min(tiny)
    return scale, (qmin - torch.round(low / scale)).clamp(qmin, qmax)


def _mse_params(grouped, low, high, bits, symmetric):
    """Per channel/group best clipping ratio: one pass over the ratios, vectorised over channels."""
    qmin, qmax = code_range(bits, symmetric)
    best = None
    for ratio in MSE_CLIP_RATIOS:
        scale, zero_point = _affine_params(low * ratio, high * ratio, bits, symmetric)
        restored = _fake_quantize(grouped, scale.unsqueeze(-1), _unsqueeze(zero_point), qmin, qmax)
        error = (restored - grouped).square().sum(-1)
        if best is None:
            best = [error, scale, zero_point]
            continue
        better = error < best[0]
        best[0] = torch.where(better, error, best[0])
        best[1] = torch.where(better, scale, best[1])
        if zero_point is not None:
            best[2] = torch.where(better, zero_point, best[2])
    return best[1], best[2]


def _token_scale(x, qmax):
    return (x.abs().amax(-1, keepdim=True).float() / qmax).clamp_min(torch.finfo(torch.float32).tiny)


def _codes(x, scale, zero_point, qmin, qmax):
    """Integer-valued float codes; multiplies by 1/scale as torch.fake_quantize_* does, so results match it."""
    codes = torch.round(x * scale.reciprocal())
    if zero_point is not None:
        codes = codes + zero_point
    return codes.clamp(qmin, qmax)


def _fake_quantize(x, scale, zero_point, qmin, qmax):
    codes = _codes(x.detach(), scale, zero_point, qmin, qmax)
    if zero_point is not None:
        codes = codes - zero_point
    restored = codes * scale
    if not (torch.is_grad_enabled() and x.requires_grad):
        return restored
    # Straight-through estimator: identity gradient inside the representable range, zero where clipped.
    shift = 0 if zero_point is None else zero_point
    inside = x.clamp((qmin - shift) * scale, (qmax - shift) * scale)
    return inside + (restored - inside).detach()


def _unsqueeze(zero_point):
    return None if zero_point is None else zero_point.unsqueeze(-1)
