"""Three questions about the search that need no sampling: how its cost grows with depth, how additive
its metric is, and how local the coupling between layers is on a testbed (TreeQ paper, Fig. 2b).

`treeq bench depth`: evaluations a tree search actually scores on random DiTs of 4..28 blocks (a
random scorer suffices for counting; budget pruning is real), against the exhaustive |C|^n.
`treeq bench additivity`: the model-output error of two quantized layers against the sum of each alone,
and of random configurations against the integer program's sum of single-layer sensitivities.
`treeq bench search-compute`: the block runs finished `treeq bench search` tree searches ran, replayed from
their logs.
`treeq bench locality`: relative L2 error of every block's output when only blocks.0.attn.qkv is
quantized (W4A4, the search's recipe), on calibration inputs of the testbed.
"""
import json
import math
from dataclasses import replace

import torch

from ..bits import uniform_config
from ..models.adapters import adapter_for
from ..models.load import load
from ..models.registry import create_model
from ..ptq.apply import quantize, set_bits_
from ..ptq.calibration import load_or_collect, load_or_record_states, split_rows, spread_rows
from ..search.cost import cost_model, parse_target
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


def bench_additivity(model="default", low=(3, 3), distances=(1, 2, 5, 10, 20), pairs=8, configs=20, rows=16,
                     seed=0):
    """Is the search metric additive over layers, as the integer program assumes? Rows:
    {kind, distance, count, joint_over_sum_mean, joint_over_sum_min, joint_over_sum_max, spearman}.

    pair rows: two layers `distance` apart at `low`, the rest in full precision: the model-output error of
    both together over the sum of each alone (1 = additive; > 1 the pair couples). config row: random
    configurations of the W3A3 candidates, the end-to-end error against the sum of single-layer
    sensitivities (the integer program's objective): their Spearman rank correlation and the ratio."""
    import random

    from scipy.stats import spearmanr

    from ..search.objective import ModelObjective

    fp = load(model)
    calibration = load_or_collect(fp, **SEARCH_RECIPE.calibration_options())
    candidates = DEFAULT_CANDIDATES[3.0]
    recipe = replace(SEARCH_RECIPE, switch_bits=sorted(set(candidates) | {low}))
    quantized = quantize(fp, uniform_config(fp, *low), recipe, calibration=calibration)
    objective = ModelObjective(quantized, spread_rows(calibration, rows, fp), 32, readout_blocks=None)
    n, full = len(objective.layers), (32, 32)

    def error(assignment):
        return objective.score(0, n, [tuple(assignment)])[0]

    single = {(i, pair): error([full] * i + [pair] + [full] * (n - i - 1)) for i in range(n) for pair in candidates}
    rng = random.Random(seed)
    table = []
    for distance in distances:
        ratios = []
        for i in rng.sample(range(n - distance), min(pairs, n - distance)):
            both = [full] * n
            both[i] = both[i + distance] = low
            ratios.append(error(both) / (single[i, low] + single[i + distance, low]))
        table.append({"kind": "pair", "distance": distance, "count": len(ratios), **_spread(ratios), "spearman": None})
    drawn = [[rng.choice(candidates) for _ in range(n)] for _ in range(configs)]
    true = [error(assignment) for assignment in drawn]
    predicted = [sum(single[i, pair] for i, pair in enumerate(assignment)) for assignment in drawn]
    table.append({"kind": "config", "distance": None, "count": configs,
                  **_spread([t / p for t, p in zip(true, predicted)]), "spearman": spearmanr(true, predicted).statistic})
    return table


def _spread(ratios):
    return {"joint_over_sum_mean": sum(ratios) / len(ratios), "joint_over_sum_min": min(ratios),
            "joint_over_sum_max": max(ratios)}


class _LogReplay:
    """The metrics a finished search logged, served again by (segment, assignment): the same search runs again
    without a model, so a scorer wrapped around this one counts what it ran."""

    def __init__(self, log_path):
        self.metrics = {}
        with open(log_path) as log:
            for line in log:
                entry = json.loads(line)
                bits = tuple((bits["w_bits"], bits["a_bits"]) for bits in entry["config"].values())
                self.metrics[(*entry["segment"], bits)] = entry["metric"]

    def score(self, start, end, assignments):
        return [self.metrics[(start, end, tuple(tuple(pair) for pair in assignment))] for assignment in assignments]


def bench_search_compute(model="default", targets=("W4A4", "W3A3"), methods=("tss", "tss-exit")):
    """Rows {target, method, evaluations, block_runs, block_row_runs, image_equivalents, cut}: the compute of
    finished `treeq bench search` tree searches (a lever row's own settings), counted by replaying each one's
    log through estimate.BlockRunCounter: exact for runs that predate the results' `compute`. `cut`: the
    first method's block-row runs over the row's."""
    from ..search.estimate import BlockRunCounter, image_block_rows
    from ..search.objective import model_rows
    from ..search.schedule import model_schedule
    from .search import FOLDER, SEARCHES, bench_folder

    net = load(model)
    states = load_or_record_states(net, **SEARCH_RECIPE.calibration_options())
    adapter = adapter_for(net)
    layers = list(uniform_config(net, 8, 8))
    block_of = [adapter.block_of(net)[name] for name in layers]
    depth = len(adapter.block_names(net))
    scored_rows = model_rows(split_rows(states, (16,), net)[0], net)  # run_search's 16 calibration rows
    image_rows = image_block_rows(net, SEARCH_RECIPE.sampling)
    folder, rows = bench_folder(FOLDER, model), []
    for target in targets:
        space = SearchSpace.build(layers, DEFAULT_CANDIDATES[parse_target(target)])
        first = None
        for method in methods:
            options = SEARCHES[method]
            schedule = model_schedule(net, layers, options.get("queue_size", 16), options.get("low_levels"),
                                      options.get("low_queue"), options.get("low_rows"))
            counter = BlockRunCounter(block_of, depth, options.get("readout_blocks", 1),
                                      scorer=_LogReplay(folder / f"{target}-{method}.log.jsonl"))
            tree_search(counter, space, cost_model(net), target, queue_size=schedule, progress=False,
                        early_exit=options.get("early_exit", False))
            block_row_runs = counter.block_runs * scored_rows
            first = first or block_row_runs
            rows.append({"target": target, "method": method, "evaluations": counter.evaluations,
                         "block_runs": counter.block_runs, "block_row_runs": block_row_runs,
                         "image_equivalents": block_row_runs / image_rows,
                         "cut": first / block_row_runs})
    return rows
