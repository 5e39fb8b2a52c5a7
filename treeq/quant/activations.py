"""Static activation scales: one per-tensor input scale per layer and per a_bits, from calibration.

Two passes over the calibration set: the first finds max |T(x)| of each layer's transformed input,
the second histograms |T(x)| over [0, max] (2048 bins). The clip value c, and so the scale c / qmax,
comes from the histogram: "max" keeps every input representable, "percentile" lets the rarest
outliers saturate, "mse" picks the c that minimises the squared error of quantizing the calibration
inputs at that bit-width, so its scale differs per a_bits. Scales are stored per a_bits and follow
`set_bits_`; a bit-width not calibrated raises rather than borrowing another's scale.
"""
import torch

from ..bits import is_full_precision
from .quantizers import code_range
from .statistics import collect_statistics, quantized_layers

CLIPS = ("max", "percentile", "mse")
BINS = 2048


class AbsMax:
    """Largest |x| over every calibration token."""

    def __init__(self):
        self.value = torch.zeros(())

    def add(self, x):
        self.value = torch.maximum(self.value, x.detach().abs().max().float().cpu())


class AbsHistogram:
    """Counts of |x| in BINS equal bins over [0, limit]."""

    def __init__(self, limit):
        self.limit = float(limit)
        self.counts = torch.zeros(BINS, dtype=torch.float64)

    def add(self, x):
        values = x.detach().abs().flatten().float()
        self.counts += torch.histc(values, bins=BINS, min=0, max=self.limit).cpu().double()


def clip_value(histogram, bits, clip="max", percentile=99.99):
    """The clip value c of one layer at `bits` (see the module docstring)."""
    if clip == "max":
        return histogram.limit
    edges = torch.linspace(0, histogram.limit, BINS + 1, dtype=torch.float64)
    if clip == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        cumulative = histogram.counts.cumsum(0) / histogram.counts.sum()
        index = int(torch.searchsorted(cumulative, torch.tensor(percentile / 100, dtype=torch.float64)))
        return float(edges[min(index + 1, BINS)])
    if clip == "mse":
        return _mse_clip(histogram, edges, bits)
    raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")


def _mse_clip(histogram, edges, bits):
    """The bin edge c minimising sum_bins count * (center - Q_c(center))^2, with Q_c the symmetric grid of c."""
    qmax = code_range(bits, symmetric=True)[1]
    centers = (edges[:-1] + edges[1:]) / 2
    candidates = edges[1:]
    best, best_error = float(candidates[-1]), None
    for chunk in candidates.split(256):
        scale = (chunk / qmax)[:, None]
        restored = torch.round(centers[None, :] / scale).clamp(max=qmax) * scale
        errors = (histogram.counts[None, :] * (centers[None, :] - restored).square()).sum(1)
        index = int(errors.argmin())
        if best_error is None or errors[index] < best_error:
            best, best_error = float(chunk[index]), errors[index]
    return best


def calibrate_activations_(model, calibration, a_bits, *, clip="max", percentile=99.99, batch_size=16):
    """Give every static-activation QuantLinear a scale for each bit-width in `a_bits`.

    a_bits: a mapping layer name -> iterable of a_bits, or one iterable for every layer.
    """
    layers = {name: layer for name, layer in quantized_layers(model).items() if layer.activations == "static"}
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")
    if not layers:
        return model
    maxima = collect_statistics(model, {name: AbsMax() for name in layers}, calibration, batch_size)
    histograms = {name: AbsHistogram(maxima[name].value.clamp_min(1e-8)) for name in layers}
    if clip != "max":
        collect_statistics(model, histograms, calibration, batch_size)
    for name, layer in layers.items():
        wanted = a_bits.get(name, ()) if isinstance(a_bits, dict) else a_bits
        for bits in sorted(set(wanted)):
            if is_full_precision(bits):
                continue
            value = clip_value(histograms[name], bits, clip, percentile)
            scale = torch.tensor(value / code_range(bits, symmetric=True)[1], dtype=torch.float32)
            layer.act_scales[bits] = scale.clamp_min(1e-12).to(layer.weight.device)
    return model
