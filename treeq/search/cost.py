"""Additive per-layer cost models for the search budget: BOPs average bits (default) or weight-memory average bits.

The search sums per-layer costs over segments and compares the sum with a budget total, so both
models are additive in the layers; only the conversion to an average bit-width differs. A layer at
16 or 32 bits (floating point) costs FULL_PRECISION_COST_BITS, as in treeq.bits.average_bits.
"""
import math

from ..bits import FULL_PRECISION_COST_BITS, PRESETS, layer_macs, layer_weight_sizes
from ..bits import is_full_precision

# Relative slack of budget comparisons: a config exactly at the target must count as within it
# although float sums of non-integer targets round differently.
BUDGET_TOLERANCE = 1e-9


def parse_target(target):
    """'W4A4' -> 4.0, 'W3A3' -> 3.0 (a preset must have equal weight and activation bits), '3.5' or 3.5 -> 3.5."""
    if isinstance(target, str):
        key = target.strip().upper()
        if key in PRESETS:
            w_bits, a_bits = PRESETS[key]
            if w_bits != a_bits:
                raise ValueError(f"target {target!r} mixes bit-widths; give the average bits as a number")
            return float(w_bits)
        try:
            target = float(target)
        except ValueError:
            raise ValueError(f"target must be W4A4, W3A3 or a number of average bits, got {target!r}") from None
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 32 or math.isnan(target):
        raise ValueError(f"target average bits must be a number in (0, 32], got {target!r}")
    return float(target)


class _AdditiveCost:
    """Shared part: per-layer weights (MACs or weight entries) and budget comparisons."""

    def __init__(self, weights):
        if not weights:
            raise ValueError("a cost model needs at least one layer")
        self.weights = dict(weights)
        self.total_weight = sum(self.weights.values())

    def assignment_cost(self, layers, assignment):
        """Summed cost of `assignment` [(w, a), ...] over `layers`."""
        return sum(self.layer_cost(name, bits) for name, bits in zip(layers, assignment))

    def budget_total(self, target):
        """The summed cost of every layer at `target` average bits (a preset name or a number)."""
        return self.total_from_average(parse_target(target))

    def within(self, total, budget):
        return total <= budget * (1 + BUDGET_TOLERANCE)

    def segment_average(self, total, layers):
        """Average bits of a segment's summed cost over its own layers (the x axis of the per-node plots)."""
        return self._to_average(total, sum(self.weights[name] for name in layers))

    def average_bits(self, total):
        return self._to_average(total, self.total_weight)

    def total_from_average(self, bits):
        return self._from_average(bits, self.total_weight)

    def segment_total(self, bits, layers):
        """The summed cost of `layers` all at `bits` average bits: a segment's share of a budget."""
        return self._from_average(bits, sum(self.weights[name] for name in layers))

    def _from_average(self, bits, weight):
        raise NotImplementedError

    def _to_average(self, total, weight):
        raise NotImplementedError


class BopsCost(_AdditiveCost):
    """Cost of a layer = MACs * w_bits * a_bits; average bits = sqrt(total / sum MACs), so uniform W4A4 is 4.0."""

    name = "bops"

    def layer_cost(self, name, bits):
        w_bits, a_bits = (_cost_bits(b) for b in bits)
        return self.weights[name] * w_bits * a_bits

    def _from_average(self, bits, weight):
        return bits * bits * weight

    def _to_average(self, total, weight):
        return math.sqrt(total / weight)


class MemoryCost(_AdditiveCost):
    """Cost of a layer = weight entries * w_bits; average bits = total / sum of entries."""

    name = "memory"

    def layer_cost(self, name, bits):
        return self.weights[name] * _cost_bits(bits[0])

    def _from_average(self, bits, weight):
        return bits * weight

    def _to_average(self, total, weight):
        return total / weight


def cost_model(model, kind="bops"):
    """The cost model of `kind` ("bops" or "memory") over the quantizable layers of `model`."""
    if kind == "bops":
        return BopsCost(layer_macs(model))
    if kind == "memory":
        return MemoryCost(layer_weight_sizes(model))
    raise ValueError(f"cost must be 'bops' or 'memory', got {kind!r}")


def _cost_bits(bits):
    return FULL_PRECISION_COST_BITS if is_full_precision(bits) else bits
