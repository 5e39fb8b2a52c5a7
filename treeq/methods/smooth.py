"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weight, per input channel.

With s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), the layer computes (x / s)(W diag(s))^T, equal
to x W^T in floating point but with flatter activations. Here the division is an online input
transform, since a DiT's pre-linear LayerNorm has no affine to absorb it.
"""
import torch
import torch.nn as nn

# Floor of both absmax statistics and of s, as the SmoothQuant reference code does, so a dead
# channel neither divides by zero nor blows up the weight.
MIN_STATISTIC = 1e-5


class InputAbsMax:
    """Running per-channel max |x| over all calibration tokens of a linear's input."""

    def __init__(self):
        self.value = None

    def add(self, x):
        absmax = x.detach().abs().flatten(0, -2).amax(0).float()
        self.value = absmax if self.value is None else torch.maximum(self.value, absmax)


def smoothing_scales(input_absmax, weight, alpha=0.5):
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) for each input channel j."""
    if input_absmax is None:
        raise ValueError("no calibration inputs reached this layer")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if input_absmax.shape != (weight.shape[1],):
        raise ValueError(f"input_absmax has shape {tuple(input_absmax.shape)}, expected ({weight.shape[1]},)")
    weight_absmax = weight.detach().abs().amax(0).float().clamp_min(MIN_STATISTIC)
    scales = input_absmax.float().clamp_min(MIN_STATISTIC).pow(alpha) / weight_absmax.pow(1 - alpha)
    return scales.clamp_min(MIN_STATISTIC)


class SmoothTransform(nn.Module):
    """x -> x / scale over the last dimension."""

    def __init__(self, scale):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, x):
        return x / self.scale.to(x.dtype)

    def macs_per_token(self):
        return self.scale.numel()


def smooth_linear_(layer, input_absmax, alpha=0.5):
    """Divide a QuantLinear's input by s online and multiply its weight columns by s."""
    scales = smoothing_scales(input_absmax, layer.weight, alpha).to(layer.weight.device)
    folded = layer.weight.detach() * scales.to(layer.weight.dtype)
    layer.set_input_transform(SmoothTransform(scales), folded)
    return layer
