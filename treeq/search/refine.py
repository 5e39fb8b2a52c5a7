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


def exchange(scorer, space, cost, target, result, rounds=1):
    """`result` improved by up to `rounds` budget exchanges: each measures every layer's candidates end
    to end with the rest of the network at the current configuration (sensitivities in context, so
    they carry its coupling), solves the sum-of-layers integer program on them within the budget
    (baselines.ilp), and keeps the program's configuration when it lowers the end-to-end metric.

    Why: coordinate descent moves one layer at a time, so with the budget spent it cannot trade bits
    between layers; the program trades them all at once, and measuring around the current
    configuration keeps its additive view close to where it is used. Method gets '+exchange'."""
    from .baselines import ilp

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    started = time.perf_counter()
    current = tuple(space.assignment(result.config))
    metric, evaluations = _finite(scorer.score(0, len(space), [current])[0]), 1
    for _ in range(rounds):
        proposal = ilp(_InContext(scorer, current, len(space)), space, cost, target)
        evaluations += proposal.evaluations
        if _finite(proposal.metric) >= metric:
            break
        current, metric = tuple(space.assignment(proposal.config)), _finite(proposal.metric)
    return replace(result, method=f"{result.method}+exchange", config=space.config(current),
                   average_bits=cost.average_bits(cost.assignment_cost(space.layers, current)), metric=metric,
                   evaluations=result.evaluations + evaluations, seconds=result.seconds + time.perf_counter() - started)


class _InContext:
    """A scorer of segments that scores each assignment end to end with the rest at `current`."""

    def __init__(self, scorer, current, num_layers):
        self.scorer, self.current, self.num_layers = scorer, current, num_layers

    def score(self, start, end, assignments):
        whole = [self.current[:start] + tuple(a) + self.current[end:] for a in assignments]
        return self.scorer.score(0, self.num_layers, whole)
