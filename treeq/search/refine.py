"""Refinement after a search: coordinate descent on the end-to-end metric, within the budget.

The tree search chooses at the root among children fronts that were thinned over the whole cost
range and scored with the environment at the target, so its configuration can leave budget
unused and keep choices that only looked good in that environment. One sweep visits every layer
in execution order and scores each of its other candidates that keep the whole configuration
within the budget, end to end (the root's metric: the model output against FP), keeping the best
when it lowers the metric. Candidates of one layer share every layer before it, so the scorer
re-runs only the blocks from that layer on. Refining on the rows the search scored overfits them
(measured at W4A4, docs/RESULTS.md); run_search can give the refinement rows of its own.
"""
import time
from dataclasses import replace

from .baselines import _finite, _leaf_costs
from .space import budget_for


def refine(scorer, space, cost, target, result, sweeps=1):
    """`result` (a SearchResult of any method) improved by up to `sweeps` sweeps; its evaluations and
    seconds include the refinement's, its method gets '+refine'."""
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 1:
        raise ValueError(f"sweeps must be a positive int, got {sweeps!r}")
    started = time.perf_counter()
    budget = budget_for(space, cost, target)
    costs = _leaf_costs(space, cost)
    current = [pairs.index(pair) for pairs, pair in zip(space.candidates, space.assignment(result.config))]
    total = sum(row[j] for row, j in zip(costs, current))
    # Scored again: the scorer may hold other rows than the search's (run_search's refine_rows), and
    # a baseline's metric need not be the end-to-end one.
    metric, evaluations = _finite(scorer.score(0, len(space), [_assignment(space, current)])[0]), 1
    for _ in range(sweeps):
        improved = False
        for i, row in enumerate(costs):
            options = [j for j in range(len(row)) if j != current[i] and cost.within(total - row[current[i]] + row[j], budget)]
            if not options:
                continue
            metrics = scorer.score(0, len(space), [_assignment(space, current, i, j) for j in options])
            evaluations += len(options)
            best = min(range(len(options)), key=lambda k: (_finite(metrics[k]), k))
            if _finite(metrics[best]) < metric:
                total += row[options[best]] - row[current[i]]
                current[i], metric, improved = options[best], _finite(metrics[best]), True
        if not improved:
            break
    assignment = _assignment(space, current)
    return replace(result, method=f"{result.method}+refine", config=space.config(assignment),
                   average_bits=cost.average_bits(cost.assignment_cost(space.layers, assignment)), metric=metric,
                   evaluations=result.evaluations + evaluations, seconds=result.seconds + time.perf_counter() - started)


def _assignment(space, current, layer=None, candidate=None):
    """The (w, a) pairs of `current` (candidate indices), with `layer` moved to `candidate` when given."""
    return tuple(pairs[candidate if i == layer else j] for i, (pairs, j) in enumerate(zip(space.candidates, current)))
