"""Two questions about the search that need no sampling: how its cost grows with depth, and how local
the coupling between layers is on the testbed (TreeQ paper, Fig. 2b).

`treeq bench depth`: evaluations a tree search actually scores on random DiTs of 4..28 blocks (a
random scorer suffices for counting; budget pruning is real), against the exhaustive |C|^n.
`treeq bench locality`: relative L2 error of every block's output when only blocks.0.attn.qkv is
quantized (W4A4, the search's recipe), on calibration inputs of the testbed.
"""
import math

import torch

from ..bits import uniform_config
from ..models.load import load
from ..models.registry import create_model
from ..ptq.apply import quantize, set_bits_
from ..ptq.calibration import load_or_collect, spread_rows
from ..search.cost import cost_model
from ..search.run import SEARCH_RECIPE
from ..search.space import DEFAULT_CANDIDATES, SearchSpace
from ..search.tree import tree_search

DEPTHS = (4, 8, 12, 24, 28)


class _RandomScorer:
    """Seeded random metrics: counts evaluations without running a model."""

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, start, end, assignments):
        return torch.rand(len(assignments), generator=self.generator).tolist()


def bench_depth(depths=DEPTHS, target="W4A4", queue_size=16):
    """Rows {blocks, layers, candidates, tss_evaluations, exhaustive_log10}."""
    rows = []
    candidates = DEFAULT_CANDIDATES[4.0 if target == "W4A4" else 3.0]
    for depth in depths:
        model = create_model("DiT-MNIST", depth=depth, hidden_size=32, num_heads=2)
        space = SearchSpace.build(list(uniform_config(model, 8, 8)), candidates)
        result = tree_search(_RandomScorer(), space, cost_model(model), target, queue_size=queue_size, progress=False)
        rows.append({"blocks": depth, "layers": len(space), "candidates": len(candidates),
                     "tss_evaluations": result.evaluations,
                     "exhaustive_log10": len(space) * math.log10(len(candidates))})
    return rows


def bench_locality(layer="blocks.0.attn.qkv", bits=(4, 4), rows=64, model="default"):
    """Rows {block, relative_l2_error}: each block's output with only `layer` quantized, against FP, on the
    testbed `model` (default, or deep)."""
    model = load(model)
    calibration = load_or_collect(model, **SEARCH_RECIPE.calibration_options())
    quantized = quantize(model, {layer: {"w_bits": bits[0], "a_bits": bits[1]}}, SEARCH_RECIPE, calibration=calibration)
    x_t, t, y = spread_rows(calibration, rows)
    with torch.no_grad():
        outputs = {}
        for label, config in (("fp", {}), ("quantized", {layer: {"w_bits": bits[0], "a_bits": bits[1]}})):
            set_bits_(quantized, config)
            hidden, c = quantized.embed(x_t, t, y)
            outputs[label] = []
            for block in range(len(quantized.blocks)):
                hidden = quantized.run_blocks(hidden, c, block, block + 1)
                outputs[label].append(hidden)
    return [{"block": block, "relative_l2_error": ((q - f).norm() / f.norm()).item()}
            for block, (f, q) in enumerate(zip(outputs["fp"], outputs["quantized"]))]
