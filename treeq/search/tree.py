"""Tree-Structured Search (TSS, TreeQ paper): mixed precision by merging adjacent segments bottom-up.

Leaves are the quantizable layers in execution order. Each node keeps a queue of candidate bit
assignments of its segment; a merge scores the Cartesian product of its children's queues end to
end and Pareto-drops back to the queue size, so coupled neighbours are judged jointly, in O(n) merges.
"""
import itertools
import math
import time
from typing import NamedTuple

from tqdm import tqdm

from .cost import parse_target
from .early_exit import predicted_order, settled
from .pareto import BUDGET_WINDOW, non_dominated_layers, pareto_drop
from .result import SearchResult
from .schedule import as_schedule
from .space import budget_for
from .state import SearchState


class Candidate(NamedTuple):
    bits: tuple      # ((w_bits, a_bits), ...) for the leaves of the segment, in order
    cost: float      # summed cost of the segment under the cost model
    metric: float    # the scorer's metric (None before scoring)


def tree_levels(num_leaves):
    """The merge tree: per level, a list of (start, end, children) with children indices into the level below.

    Level 0 holds the leaves (children ()). Each next level pairs nodes (0, 1), (2, 3), ...; with an odd
    count the last node is carried up unchanged (one child), so it merges one level later.
    """
    if num_leaves < 1:
        raise ValueError("a search tree needs at least one leaf")
    levels = [[(i, i + 1, ()) for i in range(num_leaves)]]
    while len(levels[-1]) > 1:
        below = levels[-1]
        level = [(below[j][0], below[j + 1][1], (j, j + 1)) for j in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            level.append((below[-1][0], below[-1][1], (len(below) - 1,)))
        levels.append(level)
    return levels


class Node(NamedTuple):
    """A scored node of the tree as a search's cost sees it: its segment, where its children meet
    (a leaf: its start), and the candidates it scores at most, in `groups` runs that share the left
    child's part (product order, left child major; a leaf: every candidate its own run), at `level`."""
    start: int
    middle: int
    end: int
    candidates: int
    groups: int
    level: int = 0


def expected_evaluations(space, queue):
    """Upper bound of the evaluations of a search (budget pruning only lowers it): the progress bar's total.
    queue: a queue size or a schedule.Schedule."""
    return sum(node.candidates for node in scored_nodes(space, queue))


def scored_nodes(space, queue):
    """Every scored node (leaves first) with the bound of its candidates: expected_evaluations node by
    node, from which the search's time is estimated before it scores (search/estimate.py)."""
    schedule = as_schedule(queue)
    levels = tree_levels(len(space))
    kept = schedule.queue(0, len(levels))
    sizes = [min(kept, len(pairs)) for pairs in space.candidates]
    nodes = [Node(i, i, i + 1, len(pairs), len(pairs)) for i, pairs in enumerate(space.candidates)]
    for index, (below, level) in enumerate(zip(levels, levels[1:]), start=1):
        kept, next_sizes = schedule.queue(index, len(levels)), []
        for start, end, children in level:
            if len(children) == 2:
                left, right = sizes[children[0]], sizes[children[1]]
                nodes.append(Node(start, below[children[0]][1], end, left * right, left, index))
                next_sizes.append(min(kept, left * right))
            else:
                next_sizes.append(sizes[children[0]])
        sizes = next_sizes
    return nodes


def tree_search(scorer, space, cost, target, *, queue_size=16, state_path=None, log_path=None, resume=False,
                progress=True, chunk_size=64, writer=None, seeds=(), budget_window=BUDGET_WINDOW, low_scorer=None,
                early_exit=False):
    """Search `space` for the lowest-metric configuration within `target` average bits.

    scorer.score(start, end, assignments) -> metrics: one per assignment, an assignment being the
    (w, a) pairs of leaves start..end-1; the scorer sets every other layer to its environment bits.
    A node's candidates are pruned when they can no longer meet the budget (segment cost plus the
    cheapest cost of every other leaf above the budget) before they are scored, scored in calls
    of up to `chunk_size`, then Pareto-dropped to `queue_size` (pareto.pareto_drop). The root
    returns its lowest-metric candidate (ties: lower cost) before any drop.
    state_path / log_path: state rewritten after every node and every chunk, JSON lines of every scored
    candidate; resume=True continues from the state file at the first candidate not yet scored. writer: whether this process writes files
    (default: rank 0 when torch.distributed is initialised, else True).
    seeds: whole assignments within the budget (e.g. the integer program's) whose part in each node
    stays in its queue beyond `queue_size`: the root scores them and their mixes with the tree's
    own candidates, so it never ends above a seed's metric.
    queue_size: an int, or a schedule.Schedule whose low levels keep their own queue and are scored by
    `low_scorer` (the same objective on fewer rows; None: `scorer`).
    early_exit: a merge scores its products best-predicted first and stops once a whole chunk puts nothing into
    its queue (search/early_exit.py); the leaves are scored whole.
    """
    budget = budget_for(space, cost, target)
    seeds = [tuple(tuple(pair) for pair in seed) for seed in seeds]
    if any(len(seed) != len(space) or not cost.within(cost.assignment_cost(space.layers, seed), budget)
           for seed in seeds):
        raise ValueError("a seed must assign every layer and keep the budget")
    schedule = as_schedule(queue_size)
    if budget_window is not None and (isinstance(budget_window, bool) or not isinstance(budget_window, (int, float))
                                      or not budget_window >= 0):
        raise ValueError(f"budget_window must be None or a number of bits >= 0, got {budget_window!r}")
    writer = _is_rank_zero() if writer is None else writer
    leaf_costs = [[cost.layer_cost(name, pair) for pair in pairs]
                  for name, pairs in zip(space.layers, space.candidates)]
    cheapest = list(itertools.accumulate((min(costs) for costs in leaf_costs), initial=0))
    levels = tree_levels(len(space))
    settings = {"layers": space.layers, "candidates": space.candidates, "cost": cost.name, "budget": budget,
                "queue_size": schedule.queue_size, "budget_window": budget_window, "scorer": getattr(scorer, "settings", None),
                **({"schedule": schedule.to_dict(), "low_scorer": getattr(low_scorer, "settings", None)}
                   if not schedule.is_plain() else {}),
                **({"seeds": [[list(pair) for pair in seed] for seed in seeds]} if seeds else {}),
                **({"early_exit": True} if early_exit else {})}
    state = SearchState(settings, state_path, log_path, resume=resume, writer=writer)
    evaluations, started = state.evaluations, time.perf_counter()
    bar = tqdm(total=expected_evaluations(space, schedule), initial=evaluations, unit="eval",
               disable=not (progress and writer), desc="tree search")
    below = []
    for level_index, level in enumerate(levels):
        queues, kept_size = [], schedule.queue(level_index, len(levels))
        low = schedule.is_low(level_index, len(levels)) and low_scorer is not None
        node_scorer = low_scorer if low else scorer
        for index, (start, end, children) in enumerate(level):
            saved = state.node(level_index, index)
            if saved is not None:
                queues.append(_candidates_from_json(saved["queue"]))
                continue
            lines = []
            if len(children) == 1:
                queue = below[children[0]]
                record = {"segment": [start, end], "kind": "carry"}
            else:
                if children:
                    left, right = below[children[0]], below[children[1]]
                    pool = [Candidate(a.bits + b.bits, a.cost + b.cost, None) for a in left for b in right]
                else:
                    pool = [Candidate((pair,), leaf_cost, None)
                            for pair, leaf_cost in zip(space.candidates[start], leaf_costs[start])]
                rest = cheapest[-1] - (cheapest[end] - cheapest[start])
                feasible = [c for c in pool if cost.within(c.cost + rest, budget)]
                protected = {seed[start:end] for seed in seeds}
                window = _window(cost, space.layers[start:end], target, budget_window)
                exits = early_exit and bool(children) and bool(feasible)
                if exits:
                    feasible = predicted_order(feasible, left, right, chunk_size, protected)
                metrics = state.scored_so_far(level_index, index)[:len(feasible)]  # kept by an interrupted run
                bar.update(len(metrics))
                for first in range(len(metrics), len(feasible), chunk_size):
                    if exits and settled([(c.cost, m) for c, m in zip(feasible, metrics)], chunk_size, kept_size,
                                         window):
                        bar.update(len(feasible) - first)  # decided without scoring
                        break
                    chunk = feasible[first:first + chunk_size]
                    metrics += _score(node_scorer, start, end, [c.bits for c in chunk])
                    bar.update(len(chunk))
                    if first + chunk_size < len(feasible):
                        state.save_progress(level_index, index, metrics)
                evaluations += len(metrics)
                scored = [c._replace(metric=m) for c, m in zip(feasible, metrics)]
                kept, dropped = pareto_drop([(c.cost, c.metric) for c in scored], kept_size, window)
                kept = sorted(kept + [i for i in dropped if scored[i].bits in protected],
                              key=lambda i: (scored[i].cost, scored[i].metric, i))
                dropped = [i for i in dropped if scored[i].bits not in protected]
                queue = [scored[i] for i in kept]
                segment = space.layers[start:end]
                point = lambda c: [cost.segment_average(c.cost, segment), c.metric]  # noqa: E731
                record = {"segment": [start, end], "kind": "merge" if children else "leaf",
                          "pruned": len(pool) - len(feasible),
                          **({"skipped": len(feasible) - len(scored)} if exits else {}),
                          "kept": [point(scored[i]) for i in kept], "dropped": [point(scored[i]) for i in dropped]}
                if level_index == len(levels) - 1:  # the root: choose before dropping
                    best = min(range(len(scored)), key=lambda i: (scored[i].metric, scored[i].cost, i))
                    record["best"] = _candidate_to_json(scored[best])
                    record["front"] = [_candidate_to_json(scored[i]) for i in non_dominated_layers(
                        [(c.cost, c.metric) for c in scored])[0]]
                kept_set = set(kept)
                lines = [{"node": [level_index, index], "segment": [start, end], "config": space.config(c.bits, start),
                          "cost": point(c)[0], "metric": c.metric, "kept": i in kept_set} for i, c in enumerate(scored)]
            record["queue"] = [_candidate_to_json(c) for c in queue]
            state.finish(level_index, index, record, lines, evaluations,
                         state.seconds + time.perf_counter() - started)
            started = time.perf_counter()
            queues.append(queue)
        below = queues
    bar.close()
    root = state.node(len(levels) - 1, 0)
    best = _candidate_from_json(root["best"])
    front = [_candidate_from_json(entry) for entry in root["front"]]
    records = [[_plot_record(state.node(level_index, index)) for index in range(len(level))]
               for level_index, level in enumerate(levels)]
    return SearchResult(
        method="tss", config=space.config(best.bits), average_bits=cost.average_bits(best.cost), metric=best.metric,
        evaluations=state.evaluations, seconds=state.seconds,
        front=[{"average_bits": cost.average_bits(c.cost), "metric": c.metric, "config": space.config(c.bits)}
               for c in front],
        levels=records)


def _window(cost, segment, target, width):
    """The cost interval of `segment` at target -+ width average bits, or None without a width."""
    if width is None:
        return None
    bits = parse_target(target)
    return cost.segment_total(max(0.0, bits - width), segment), cost.segment_total(bits + width, segment)


def _score(scorer, start, end, assignments):
    """The scorer's metrics as floats, NaN mapped to +inf (a broken candidate loses every comparison)."""
    if not assignments:
        return []
    metrics = [float(m) for m in scorer.score(start, end, assignments)]
    if len(metrics) != len(assignments):
        raise ValueError(f"scorer returned {len(metrics)} metrics for {len(assignments)} assignments")
    return [math.inf if math.isnan(m) else m for m in metrics]


def _plot_record(record):
    return {key: record[key] for key in ("segment", "kind", "kept", "dropped", "pruned") if key in record}


def _candidate_to_json(candidate):
    return [[list(pair) for pair in candidate.bits], candidate.cost, candidate.metric]


def _candidate_from_json(entry):
    bits, cost, metric = entry
    return Candidate(tuple(tuple(pair) for pair in bits), cost, metric)


def _candidates_from_json(entries):
    return [_candidate_from_json(entry) for entry in entries]


def _is_rank_zero():
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
