"""PTQ methods: the one registry that the recipe, the CLI, the benchmarks and export read.

A method is a step applied to every quantized layer. Steps are of three kinds and run in this
order: a transform (an online input transform whose inverse is folded into the weight: hadamard,
smooth), a branch (a full-precision side path; the quantized weight keeps the residual: lowrank,
monarch),
a rounding (how weight codes are chosen: rtn, gptq). Each step sees the layer as the steps before
left it, so `smooth,lowrank` is SVDQuant (SVD of the smoothed weight, quantize the residual) and
`hadamard,gptq` is QuaRot-style (GPTQ on the rotated weight with the Hessian of rotated inputs).
"""
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..bits import is_full_precision
from ..flags import number
from ..branches import LowRankBranch, MonarchBranch, monarch_shape
from .gptq import HessianAccumulator, gptq_quantize
from .rotation import HadamardTransform, rotate_linear_
from .smooth import InputAbsMax, SmoothTransform, smooth_linear_

KINDS = ("transform", "branch", "rounding")


@dataclass(frozen=True)
class Method:
    kind: str                      # one of KINDS: fixes where the step may stand in a method list
    apply: Callable                # apply(layer, statistic, w_bits, **options); w_bits: every w_bits to prepare
    rebuild: Callable              # rebuild(layer, **options): the empty structure a saved state dict loads into
    options: dict = field(default_factory=dict)  # defaults, overridden per method by a recipe
    statistic: Callable | None = None  # per-layer calibration statistic of the layer's input, taken just before the step
    help: str = ""
    bounds: dict = field(default_factory=dict)  # option -> flags.Number: its valid values (flags and recipes)


def _rtn(layer, statistic, w_bits):
    """Round to nearest: the quantized linear's own default."""


def _hadamard(layer, statistic, w_bits):
    rotate_linear_(layer)


def _rebuild_hadamard(layer):
    layer.input_transform = HadamardTransform(layer.in_features, device=layer.weight.device)


def _smooth(layer, statistic, w_bits, alpha):
    smooth_linear_(layer, statistic.value, alpha)


def _rebuild_smooth(layer, alpha):
    layer.input_transform = SmoothTransform(torch.ones(layer.in_features, device=layer.weight.device))


def _lowrank_rank(layer, rank, ratio):
    if ratio > 0:
        return LowRankBranch.rank_for_ratio(layer.out_features, layer.in_features, ratio)
    return min(rank, layer.out_features, layer.in_features)


def _lowrank(layer, statistic, w_bits, rank, ratio):
    layer.attach_branch(LowRankBranch.from_weight(layer.weight, _lowrank_rank(layer, rank, ratio)))


def _rebuild_lowrank(layer, rank, ratio):
    layer.branch = LowRankBranch(layer.in_features, layer.out_features, _lowrank_rank(layer, rank, ratio),
                                 device=layer.weight.device)


def _monarch(layer, statistic, w_bits, ratio):
    layer.attach_branch(MonarchBranch.from_ratio(layer.weight, ratio))


def _rebuild_monarch(layer, ratio):
    shape = monarch_shape(layer.out_features, layer.in_features, ratio)
    layer.branch = MonarchBranch(layer.in_features, layer.out_features, *shape, device=layer.weight.device)


def _gptq(layer, statistic, w_bits, damp, block_size):
    hessian = statistic.hessian().to(layer.weight.device)
    for bits in sorted(b for b in w_bits if not is_full_precision(b)):
        layer.set_rounded_weight(gptq_quantize(layer.weight, hessian, bits, damp=damp, block_size=block_size,
                                               **layer.weight_options()))
    layer.rounding = "gptq"


def _rebuild_gptq(layer, damp, block_size):
    layer.rounding = "gptq"


def _no_structure(layer, **options):
    """Nothing to rebuild: the step leaves no module behind."""


METHODS = {
    "rtn": Method("rounding", _rtn, _no_structure, help="round to nearest"),
    "gptq": Method("rounding", _gptq, _rebuild_gptq, {"damp": 0.01, "block_size": 128}, HessianAccumulator,
                   "Hessian-aware rounding, codes for every w_bits a run may switch to",
                   {"damp": number(float, 0, 1, low_open=True), "block_size": number(int, 1)}),
    "hadamard": Method("transform", _hadamard, _rebuild_hadamard, help="online block-Hadamard rotation of the input"),
    "smooth": Method("transform", _smooth, _rebuild_smooth, {"alpha": 0.5}, InputAbsMax,
                     "SmoothQuant: per-channel input scales moved into the weight", {"alpha": number(float, 0, 1)}),
    # ratio > 0 sizes the rank from a parameter share of each layer (for comparisons at equal parameters)
    "lowrank": Method("branch", _lowrank, _rebuild_lowrank, {"rank": 32, "ratio": 0.0},
                      help="SVDQuant-style low-rank full-precision branch",
                      bounds={"rank": number(int, 1), "ratio": number(float, 0, 1)}),
    "monarch": Method("branch", _monarch, _rebuild_monarch, {"ratio": 0.05},
                      help="General Monarch Branch: block-diagonal Monarch projection of the weight",
                      bounds={"ratio": number(float, 0, 1, low_open=True)}),
}


def parse_methods(methods):
    """A validated tuple of method names from "smooth,lowrank" or a sequence; one clear error otherwise."""
    names = tuple(part.strip() for part in methods.split(",")) if isinstance(methods, str) else tuple(methods)
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method {unknown[0] if unknown else '(none)'!r}; known: {', '.join(METHODS)}")
    seen = {}
    for name in names:
        kind = METHODS[name].kind
        if kind in seen:
            raise ValueError(f"methods {seen[kind]} and {name} are both a {kind}; a layer takes one {kind}")
        later = [other for other in seen if KINDS.index(other) > KINDS.index(kind)]
        if later:
            raise ValueError(f"{name} (a {kind}) cannot follow {seen[later[0]]} (a {later[0]}): "
                             f"methods run as transform, then branch, then rounding")
        seen[kind] = name
    return names


def method_options(names, overrides=None):
    """{method: options} for the named methods: registry defaults, then `overrides`; unknown options refused."""
    overrides = overrides or {}
    stray = sorted(set(overrides) - set(names))
    if stray:
        raise ValueError(f"options given for method {stray[0]}, which the recipe does not use")
    options = {}
    for name in names:
        given = overrides.get(name, {})
        unknown = sorted(set(given) - set(METHODS[name].options))
        if unknown:
            known = ", ".join(METHODS[name].options) or "none"
            raise ValueError(f"method {name} has no option {unknown[0]!r} (its options: {known})")
        for option, value in given.items():  # a recipe read back from config.json passes no flag
            METHODS[name].bounds[option].check(value, f"{name} option {option}")
        options[name] = {**METHODS[name].options, **given}
    return options
