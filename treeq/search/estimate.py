"""What a tree search will cost, said before it scores: block runs counted node by node, in block-row runs and
in image equivalents, times a block run timed on this device.

The scorer (objective.ModelObjective) runs a candidate from the block of the first layer where it differs
from the candidate before it up to its readout, every block on all scored rows (model rows: a guided state
is two). In product order the first candidate of each run sharing the left child's part starts at the
segment's first block, the others at the right child's first block; a leaf's candidates each start at its
block. The plan is the count of a search that prunes nothing and whose consecutive candidates share no longer
prefix than their run's left part (queue 1 at a budget every candidate fits), which the finished search
reports in its results file (`compute`: tested equal). Budget pruning and longer shared prefixes lower the real
count: 10-12% below the plan at queue 16 on DiT-XL/2 and a 12-block testbed, in a search with random metrics
(`simulate_search`). A chunk of candidates (tree_search's chunk_size) or a rank's share that begins inside a
run restarts at the segment, which the plan leaves out.

An image equivalent is the block-row runs of sampling one image at the model's sampling settings: blocks x
model calls (steps) x rows per call (two where classifier-free guidance doubles the batch).
"""
import statistics
import time
from dataclasses import replace
from typing import Callable, NamedTuple

import torch

from ..diffusion.defaults import resolve_sampling
from ..diffusion.pipelines import pipeline_settings
from ..flags import number
from ..models.adapters import adapter_for
from ..models.families import FAMILIES
from .objective import resume_block
from .schedule import as_schedule
from .tree import expected_evaluations, scored_nodes, tree_levels

# The ceiling a search may cost, in image equivalents (`--max-cost`, `max_cost=`).
MAX_COST = number(float, 0, low_open=True)


class ImageSampling(NamedTuple):
    """How a family samples one image: its settings (defaults, then a run's overrides) and whether its
    guidance runs each model call on two rows (conditional and unconditional) at a cfg_scale."""
    settings: Callable
    doubles: Callable


def family_settings(model, **overrides):
    """A text-to-image family's sampling settings: its folder's (`model.sampling`), else the published ones (as
    a folder without treeq.json is read: a transformer loaded by diffusers itself carries none), then overrides."""
    published = FAMILIES[adapter_for(model).family].folder_sampling(model.config)
    return {**published, **pipeline_settings(model, **overrides)}


# Our DiT's sampler guides at every cfg_scale but 1 (diffusion/sampling.py); FLUX embeds its guidance in one
# row (FluxPipeline's true CFG needs a negative prompt, which TreeQ never passes); the other diffusers
# pipelines double the batch above 1 (their do_classifier_free_guidance).
IMAGE_SAMPLING = {"dit": ImageSampling(resolve_sampling, lambda cfg: cfg != 1.0),
                  "flux": ImageSampling(family_settings, lambda cfg: False)}
PIPELINE_SAMPLING = ImageSampling(family_settings, lambda cfg: cfg > 1.0)


def image_block_rows(model, sampling=None):
    """Block-row runs of sampling one image at `model`'s sampling settings with the overrides `sampling` (a
    recipe's): blocks x steps x 2 where guidance doubles the batch. The unit of image equivalents."""
    adapter = adapter_for(model)
    settings = IMAGE_SAMPLING.get(adapter.family, PIPELINE_SAMPLING).settings(model, **(sampling or {}))
    return len(adapter.block_names(model)) * settings["steps"] * state_rows(model, sampling)


def state_rows(model, sampling=None):
    """Model rows of one trajectory state (and of one image's model call): 2 where guidance doubles the batch."""
    family = IMAGE_SAMPLING.get(adapter_for(model).family, PIPELINE_SAMPLING)
    return 2 if family.doubles(family.settings(model, **(sampling or {}))["cfg_scale"]) else 1


def tree_block_runs(space, queue, block_of, stop_block, rows=None):
    """Blocks the tree search's scorer runs, counted from the nodes' candidate bounds. block_of: the
    block of each layer of `space`; stop_block(start, end): where a candidate's scoring stops
    (ModelObjective's, or stop_after for a model not built). queue: a queue size or a schedule.Schedule.
    rows(level) -> rows a node of that level scores: the block-row runs instead (None: block runs)."""
    total = 0
    for node in scored_nodes(space, queue):
        stop, first, middle = stop_block(node.start, node.end), block_of[node.start], block_of[node.middle]
        runs = node.groups * (stop - first) + (node.candidates - node.groups) * (stop - middle)
        total += runs * (rows(node.level) if rows else 1)
    return total


def stop_after(block_of, depth, readout_blocks):
    """stop_block of a scorer reading `readout_blocks` blocks past a segment (None: at the output)."""
    def stop_block(start, end):
        return depth if readout_blocks is None else min(depth, block_of[end - 1] + 1 + readout_blocks)
    return stop_block


def ilp_block_runs(space, block_of, depth):
    """Blocks the integer program's scorer runs (read at the output): every candidate of every layer alone,
    from its layer's block on, then the chosen configuration once."""
    return sum(len(pairs) * (depth - block) for pairs, block in zip(space.candidates, block_of)) + depth


def plan_tree_search(model, space, queue_size, rows, *, readout_blocks=1, sampling=None, seed_ilp=False, low_rows=None):
    """{evaluations, block_runs, rows, low_rows, block_row_runs, image_block_rows, image_equivalents}: what a tree
    search of `space` on `model` (FP or quantized) scoring `rows` model rows (`low_rows` at the schedule's low
    levels; None: `rows`) costs, from its structure alone, so it is known before quantizing. queue_size: an int
    or a schedule.Schedule. seed_ilp: the integer program first, whose configuration every queue keeps beyond
    its size (counted as one more place)."""
    adapter = adapter_for(model)
    blocks = adapter.block_of(model)
    block_of = [blocks[name] for name in space.layers]
    depth = len(adapter.block_names(model))
    schedule = as_schedule(queue_size)
    if seed_ilp:
        schedule = replace(schedule, queue_size=schedule.queue_size + 1,
                           low_queue=schedule.low_queue + 1 if schedule.low_queue else None)
    levels = len(tree_levels(len(space)))
    low_rows = rows if low_rows is None else low_rows

    def level_rows(level):
        return low_rows if schedule.is_low(level, levels) else rows
    evaluations = expected_evaluations(space, schedule)
    stop = stop_after(block_of, depth, readout_blocks)
    block_runs = tree_block_runs(space, schedule, block_of, stop)
    block_row_runs = tree_block_runs(space, schedule, block_of, stop, level_rows)
    if seed_ilp:
        ilp_runs = ilp_block_runs(space, block_of, depth)
        evaluations += sum(len(pairs) for pairs in space.candidates) + 1
        block_runs, block_row_runs = block_runs + ilp_runs, block_row_runs + ilp_runs * rows
    image = image_block_rows(model, sampling)
    return {"evaluations": evaluations, "block_runs": block_runs, "rows": rows, "low_rows": low_rows,
            "block_row_runs": block_row_runs, "image_block_rows": image, "image_equivalents": block_row_runs / image}


def check_cost(plan, max_cost):
    """Refuse, in one line, a search whose planned cost is above `max_cost` image equivalents (None: no ceiling)."""
    if max_cost is not None and plan["image_equivalents"] > max_cost:
        raise ValueError(f"the search would cost about {plan['image_equivalents']:,.1f} image equivalents "
                         f"({plan['block_row_runs']:,} block-row runs), above --max-cost {max_cost:g} (a smaller "
                         "queue or fewer calibration rows cost less)")


def wall_seconds(run):
    """Wall seconds of one call of `run`; a call under a second is repeated three times more and the median
    kept (the first may pay for allocations and lazy codes)."""
    started = time.perf_counter()
    run()
    first = time.perf_counter() - started
    if first >= 1.0:
        return first
    times = []
    for _ in range(3):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def seconds_per_block(objective):
    """Wall time of one block run on the objective's rows with its layers at env bits (what scoring costs per
    block on this device, dequantization included)."""
    entering = objective.entering(0)

    def run():
        for state in entering:
            objective.adapter.run_blocks(objective.model, state, 0, 1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    with torch.no_grad():
        return wall_seconds(run)


def estimate_tree_search(objective, space, queue_size, *, sampling=None, seed_ilp=False, low_objective=None,
                         workers=1):
    """plan_tree_search for the objective's model, rows and readout (the low levels on `low_objective`'s rows),
    with seconds_per_block, seconds_per_image (an image equivalent here) and seconds (the whole search, its
    block runs shared by `workers` processes of this process's threads): the estimate `treeq search` prints
    first. A block run's time is taken as proportional to its rows."""
    plan = plan_tree_search(objective.model, space, queue_size, objective.model_rows,
                            readout_blocks=objective.readout_blocks, sampling=sampling, seed_ilp=seed_ilp,
                            low_rows=low_objective.model_rows if low_objective else None)
    seconds = seconds_per_block(objective)
    per_row = seconds / plan["rows"]
    return {**plan, "seconds_per_block": seconds, "seconds_per_image": per_row * plan["image_block_rows"],
            "workers": workers, "seconds": plan["block_row_runs"] * per_row / workers}


def describe(estimate):
    """One line: evaluations, block runs x rows = block-row runs = image equivalents, and their time here."""
    minutes = estimate["seconds"] / 60
    when = f"{minutes:,.0f} min" if minutes >= 1 else f"{estimate['seconds']:.2g} s"
    rows = f"{estimate['rows']} rows"
    if estimate.get("low_rows", estimate["rows"]) != estimate["rows"]:
        rows += f" ({estimate['low_rows']} at the low levels)"
    return (f"search cost: at most {estimate['evaluations']:,} evaluations; about {estimate['block_runs']:,} block "
            f"runs x {rows} = {estimate['block_row_runs']:,} block-row runs = "
            f"{estimate['image_equivalents']:,.1f} image equivalents (an image: {estimate['image_block_rows']:,} "
            f"block-row runs); {estimate['seconds_per_image']:.3g} s per image equivalent here (a block run timed: "
            f"{estimate['seconds_per_block']:.3g} s): about {when}"
            + (f" on {estimate['workers']} processes" if estimate.get("workers", 1) > 1 else ""))


class BlockRunCounter:
    """A scorer that counts the block runs objective.ModelObjective would make, without running a model.

    Per score() call each candidate runs from objective.resume_block to `stop` (one block past the segment's
    last with readout_blocks=1, at most the depth). `runs[b]` counts block b's runs; `heads` the readouts
    through the model's head (stop == depth). Setup (FP reference pass, cached environment states: about
    2 x depth block runs) is not counted. Metrics: those of `scorer` when given, else seeded random ones.
    """

    def __init__(self, block_of, depth, readout_blocks=1, scorer=None, seed=0):
        self.block_of, self.depth = list(block_of), depth
        self.stop_block = stop_after(self.block_of, depth, readout_blocks)
        self.scorer = scorer
        self.generator = torch.Generator().manual_seed(seed)
        self.runs = [0] * depth
        self.heads = self.evaluations = 0

    @property
    def block_runs(self):
        return sum(self.runs)

    def score(self, start, end, assignments):
        first, stop = self.block_of[start], self.stop_block(start, end)
        previous = None
        for assignment in assignments:
            for block in range(resume_block(self.block_of, start, first, stop, assignment, previous), stop):
                self.runs[block] += 1
            self.heads += stop == self.depth
            previous = tuple(assignment)
        self.evaluations += len(assignments)
        if self.scorer is not None:
            return self.scorer.score(start, end, assignments)
        return torch.rand(len(assignments), generator=self.generator).tolist()


def simulate_search(model, target="W4A4", queue_size=16, readout_blocks=1, seed=0):
    """(expected_evaluations, BlockRunCounter after a tree search with random metrics) on `model`'s layers
    with the target's default candidates (a meta-device model serves: only names, shapes and token counts
    are read). Defaults: run_search's queue and readout."""
    from .cost import cost_model, parse_target
    from .space import DEFAULT_CANDIDATES, SearchSpace
    from .tree import tree_search

    adapter = adapter_for(model)
    layers = adapter.layers(model)
    space = SearchSpace.build(layers, DEFAULT_CANDIDATES[parse_target(target)])
    block_of = adapter.block_of(model)
    counter = BlockRunCounter([block_of[name] for name in layers], len(adapter.block_names(model)),
                              readout_blocks, seed=seed)
    tree_search(counter, space, cost_model(model), target, queue_size=queue_size, progress=False)
    return expected_evaluations(space, queue_size), counter


def project_search(model, kind_of, seconds, queue_size=16, seed=0):
    """{expected_evaluations, simulated_evaluations, block_runs_per_evaluation, block_seconds (run-weighted
    over the kinds), evaluation_seconds, search_seconds}: search_seconds = expected_evaluations x
    block_runs_per_evaluation x block_seconds. kind_of(b, depth) -> kind index; seconds: {kind: s}."""
    expected, counter = simulate_search(model, queue_size=queue_size, seed=seed)
    depth = len(counter.runs)
    weighted = sum(runs * seconds[kind_of(b, depth)] for b, runs in enumerate(counter.runs)) / counter.block_runs
    per_evaluation = counter.block_runs / counter.evaluations
    return {"expected_evaluations": expected, "simulated_evaluations": counter.evaluations,
            "block_runs_per_evaluation": per_evaluation, "block_seconds": weighted,
            "evaluation_seconds": per_evaluation * weighted,
            "search_seconds": expected * per_evaluation * weighted}
