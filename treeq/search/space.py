"""The search space of mixed-precision search: layers in execution order, each with its (w_bits, a_bits) candidates.

Every method of the harness (tree search and the baselines) takes the same space, so they search
exactly the same configurations. A configuration of the whole space is a tuple of (w, a) pairs.
"""
from dataclasses import dataclass

from ..bits import SUPPORTED_BITS

# Eight pairs around each target: below it, at it, above it. The design notes' {2,3,4,6}^2 (16 pairs) costs
# 1.6x the evaluations (measured: a W4A4 tree search with 16 pairs and queue 16 runs ~16,000 evaluations,
# with these 8 ~9,800), beyond 10 minutes on 2 CPU cores for the testbed at 32 calibration rows.
DEFAULT_CANDIDATES = {
    4.0: ((3, 3), (3, 4), (4, 3), (4, 4), (4, 6), (6, 4), (6, 6), (8, 8)),
    3.0: ((2, 2), (2, 3), (3, 2), (3, 3), (3, 4), (4, 3), (4, 4), (6, 6)),
}


@dataclass(frozen=True)
class SearchSpace:
    """`layers`: names in execution order; `candidates`: per layer, a tuple of distinct (w_bits, a_bits)."""

    layers: tuple
    candidates: tuple

    @classmethod
    def build(cls, layers, candidates):
        """One candidate list for every layer, a dict layer -> list, or a list of lists (one per layer)."""
        layers = tuple(layers)
        if not layers:
            raise ValueError("the search space needs at least one layer")
        if len(set(layers)) != len(layers):
            raise ValueError("layer names in the search space must be distinct")
        if isinstance(candidates, dict):
            missing = [name for name in layers if name not in candidates]
            extra = sorted(set(candidates) - set(layers))
            if missing or extra:
                raise ValueError(f"candidates must name exactly the searched layers; missing {missing[:3]}, "
                                 f"unknown {extra[:3]}")
            per_layer = [candidates[name] for name in layers]
        elif not _is_list_of_lists(candidates):
            per_layer = [candidates] * len(layers)
        else:
            per_layer = list(candidates)
            if len(per_layer) != len(layers):
                raise ValueError(f"got {len(per_layer)} candidate lists for {len(layers)} layers")
        return cls(layers, tuple(_check_candidates(name, pairs) for name, pairs in zip(layers, per_layer)))

    def __len__(self):
        return len(self.layers)

    def config(self, assignment, start=0):
        """The bit configuration {name: {w_bits, a_bits}} of `assignment` for layers start, start+1, ..."""
        return {self.layers[start + i]: {"w_bits": w, "a_bits": a} for i, (w, a) in enumerate(assignment)}

    def assignment(self, config):
        """The inverse of config(): the (w_bits, a_bits) pairs of `config` for every layer, in order."""
        return tuple((config[name]["w_bits"], config[name]["a_bits"]) for name in self.layers)


# A layer is cheap when it runs under this share of the average layer's MACs (adaLN modulation: once per
# image, not per token; 0.8% of DiT-XL/2's MACs over 28 blocks).
CHEAP_SHARE = 0.1


def floored(space, macs, floor):
    """`space` with the candidates of cheap layers (CHEAP_SHARE) limited to those at or above the (w_bits,
    a_bits) `floor`: bits where they cost almost nothing, if the objective does not find that itself."""
    mean = sum(macs.values()) / len(macs)
    keep = [tuple(pair for pair in pairs if pair[0] >= floor[0] and pair[1] >= floor[1])
            if macs[name] < CHEAP_SHARE * mean else pairs for name, pairs in zip(space.layers, space.candidates)]
    empty = [name for name, pairs in zip(space.layers, keep) if not pairs]
    if empty:
        raise ValueError(f"floor W{floor[0]}A{floor[1]} leaves {empty[0]} no candidate")
    return SearchSpace(space.layers, tuple(keep))


def parse_candidates(text):
    """'4,4 3,4 8,8' (or W4A4 W3A4) -> ((4, 4), (3, 4), (8, 8))."""
    pairs = []
    for token in text.replace(";", " ").split():
        token = token.upper()
        try:
            if token.startswith("W") and "A" in token:
                w, a = token[1:].split("A")
            else:
                w, a = token.split(",")
            pairs.append((int(w), int(a)))
        except ValueError:
            raise ValueError(f"cannot read candidate {token!r}; write pairs as 4,4 or W4A4, "
                             "separated by spaces") from None
    return _check_candidates("--candidates", pairs)


def _is_list_of_lists(value):
    """Per-layer lists hold pairs; a shared list holds ints in its items (or is empty, refused later)."""
    items = list(value)
    return bool(items) and all(isinstance(item, (tuple, list)) and item
                               and all(isinstance(pair, (tuple, list)) for pair in item) for item in items)


def _check_candidates(name, pairs):
    pairs = tuple(tuple(pair) if isinstance(pair, (tuple, list)) else pair for pair in pairs)
    if not pairs:
        raise ValueError(f"{name}: empty candidate list")
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b in SUPPORTED_BITS for b in pair)):
            raise ValueError(f"{name}: candidate {pair!r} is not a (w_bits, a_bits) pair of ints in {SUPPORTED_BITS}")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"{name}: duplicate candidates in {list(pairs)}")
    return pairs


def budget_for(space, cost, target):
    """The budget total of `target` under `cost`, refused when even the cheapest configuration exceeds it."""
    budget = cost.budget_total(target)
    cheapest = sum(min(cost.layer_cost(name, pair) for pair in pairs)
                   for name, pairs in zip(space.layers, space.candidates))
    if not cost.within(cheapest, budget):
        raise ValueError(f"budget of {cost.average_bits(budget):.3f} average bits ({cost.name}) is below the lowest "
                         f"achievable {cost.average_bits(cheapest):.3f} (every layer at its cheapest candidate)")
    return budget
