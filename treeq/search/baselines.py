"""Baselines of the search harness, on the same scorer, search space and cost model as tree search.

uniform, greedy (sensitivity per bit saved), ILP over single-layer sensitivities (HAWQ's integer
program, solved with scipy's MILP), evolutionary search (as Q-DiT) and random search; the last two
take an evaluation budget so they can be given as many evaluations as tree search used.
"""
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from functools import reduce

import numpy as np

from .result import SearchResult
from .space import budget_for


def single_layer_sensitivities(scorer, space):
    """metric[i][j]: layer i at its candidate j, every other layer at the scorer's environment bits."""
    return [[float(m) for m in scorer.score(i, i + 1, [(pair,) for pair in pairs])]
            for i, pairs in enumerate(space.candidates)]


def uniform(scorer, space, cost, target):
    """The lowest-metric configuration with every layer at the same candidate, within the budget."""
    started = time.perf_counter()
    budget = budget_for(space, cost, target)
    shared = [pair for pair in space.candidates[0] if all(pair in pairs for pairs in space.candidates)]
    fitting = [pair for pair in shared if cost.within(cost.assignment_cost(space.layers, [pair] * len(space)), budget)]
    if not fitting:
        raise ValueError(f"no candidate shared by every layer fits {cost.average_bits(budget):.3f} average bits "
                         f"(shared candidates: {shared})")
    metrics = scorer.score(0, len(space), [tuple([pair] * len(space)) for pair in fitting])
    best = min(range(len(fitting)), key=lambda j: (_finite(metrics[j]), j))
    return _result("uniform", space, cost, tuple([fitting[best]] * len(space)), metrics[best], len(fitting), started)


def greedy(scorer, space, cost, target):
    """Start every layer at its highest-cost candidate; repeatedly make the move (one layer to a cheaper
    candidate) with the smallest sensitivity increase per unit of cost saved, until within the budget.
    Ends with one end-to-end evaluation of the chosen configuration, so its metric is comparable."""
    started = time.perf_counter()
    budget = budget_for(space, cost, target)
    table = single_layer_sensitivities(scorer, space)
    costs = _leaf_costs(space, cost)
    current = [max(range(len(row)), key=lambda j: (row[j], -_finite(table[i][j]), -j)) for i, row in enumerate(costs)]
    total = sum(costs[i][j] for i, j in enumerate(current))
    while not cost.within(total, budget):
        moves = [((_finite(table[i][j]) - _finite(table[i][current[i]])) / (costs[i][current[i]] - costs[i][j]), i, j)
                 for i in range(len(space)) for j in range(len(costs[i])) if costs[i][j] < costs[i][current[i]]]
        _, i, j = min(moves)  # a move always exists: the cheapest configuration fits (budget_for checked it)
        total += costs[i][j] - costs[i][current[i]]
        current[i] = j
    assignment = tuple(space.candidates[i][j] for i, j in enumerate(current))
    metric = scorer.score(0, len(space), [assignment])[0]
    evaluations = sum(len(pairs) for pairs in space.candidates) + 1
    return _result("greedy", space, cost, assignment, metric, evaluations, started)


@contextmanager
def solver_output_to_stderr():
    """Send what is written to file descriptor 1 inside the block to descriptor 2.

    Why: HiGHS (scipy's milp) prints some diagnostics from C++ straight to descriptor 1, whatever its
    `disp` option says, and they would corrupt what `--json` commands print on standard output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def ilp(scorer, space, cost, target):
    """HAWQ-style integer program: minimise the sum of single-layer sensitivities within the budget.

    `scorer` should measure each layer with everything else in full precision (env_bits=32), as HAWQ
    does. One binary per (layer, candidate), one-hot rows, one budget row in integer units (costs
    divided by their gcd, so the solver's tolerance cannot let a configuration over the budget through).
    Ends with one end-to-end evaluation of the chosen configuration.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    started = time.perf_counter()
    budget = budget_for(space, cost, target)
    table = single_layer_sensitivities(scorer, space)
    costs = _leaf_costs(space, cost)
    flat_costs = [c for row in costs for c in row]
    if not all(float(c).is_integer() for c in flat_costs):
        raise ValueError("ilp needs integer layer costs (MACs or weight entries times bits)")
    unit = reduce(math.gcd, (int(c) for c in flat_costs)) or 1
    # Shift each layer's sensitivities to start at 0 and scale the whole objective to [0, 1]: the same
    # argmin, numbers the solver handles well.
    shifted = [[_finite(m) - min(map(_finite, row)) for m in row] for row in table]
    scale = max(max(row) for row in shifted) or 1.0
    objective = np.array([m / scale for row in shifted for m in row])
    one_hot = np.zeros((len(space), len(objective)))
    column = 0
    for i, row in enumerate(costs):
        one_hot[i, column:column + len(row)] = 1
        column += len(row)
    budget_row = np.array([[int(c) // unit for c in flat_costs]], dtype=float)
    limit = math.floor(budget * (1 + 1e-9) / unit)
    with solver_output_to_stderr():
        solution = milp(objective, integrality=np.ones(len(objective)), bounds=Bounds(0, 1),
                        constraints=[LinearConstraint(one_hot, 1, 1), LinearConstraint(budget_row, -np.inf, limit)],
                        options={"mip_rel_gap": 0.0})
    if not solution.success:
        raise ValueError(f"the integer program found no solution: {solution.message}")
    chosen, column = [], 0
    for row in costs:
        chosen.append(int(np.argmax(solution.x[column:column + len(row)])))
        column += len(row)
    assignment = tuple(space.candidates[i][j] for i, j in enumerate(chosen))
    metric = scorer.score(0, len(space), [assignment])[0]
    evaluations = sum(len(pairs) for pairs in space.candidates) + 1
    return _result("ilp", space, cost, assignment, metric, evaluations, started)


def evolutionary(scorer, space, cost, target, evaluations, *, population=20, mutation=0.1, tournament=3, seed=0):
    """Evolutionary search over full configurations, as Q-DiT: tournament selection of parents, uniform
    crossover, per-layer mutation with probability `mutation`, repair to the budget, and (mu + lambda)
    truncation survival. Scores at most `evaluations` distinct configurations, one generation per call."""
    started, budget, rng, costs, seen = _sampling_start(space, cost, target, evaluations, seed)
    first = _fresh(rng, space, costs, cost, budget, seen, min(population, evaluations))
    parents = _score_new(scorer, space, seen, first)
    while len(seen) < evaluations:
        children = []
        for _ in range(100 * population):  # bounded tries: a small space can run out of unseen configurations
            if len(children) == min(population, evaluations - len(seen)):
                break
            mother, father = (min(rng.sample(parents, min(tournament, len(parents))), key=lambda p: (p[1], p[0]))
                              for _ in range(2))
            child = [rng.choice((a, b)) for a, b in zip(mother[0], father[0])]
            child = [rng.randrange(len(costs[i])) if rng.random() < mutation else j for i, j in enumerate(child)]
            child = tuple(_repair(rng, child, costs, cost, budget))
            if child not in seen and child not in children:
                children.append(child)
        if not children:
            break
        parents = sorted(parents + _score_new(scorer, space, seen, children), key=lambda p: (p[1], p[0]))[:population]
    return _best("evolutionary", space, cost, seen, started)


def _sampling_start(space, cost, target, evaluations, seed):
    """What evolutionary and random search start from: clock, budget, seeded rng, leaf costs, scored configs."""
    started = time.perf_counter()
    budget = budget_for(space, cost, target)
    _check_evaluations(evaluations)
    return started, budget, random.Random(seed), _leaf_costs(space, cost), {}


def random_search(scorer, space, cost, target, evaluations, *, seed=0, batch_size=64):
    """Uniformly random configurations repaired to the budget; the best of `evaluations` distinct ones."""
    started, budget, rng, costs, seen = _sampling_start(space, cost, target, evaluations, seed)
    while len(seen) < evaluations:
        batch = _fresh(rng, space, costs, cost, budget, seen, min(batch_size, evaluations - len(seen)))
        if not batch:
            break
        _score_new(scorer, space, seen, batch)
    return _best("random", space, cost, seen, started)


def _fresh(rng, space, costs, cost, budget, seen, count):
    """Up to `count` unseen random configurations (candidate indices), repaired to the budget."""
    found = []
    for _ in range(100 * max(count, 1)):
        if len(found) == count:
            break
        config = tuple(_repair(rng, [rng.randrange(len(row)) for row in costs], costs, cost, budget))
        if config not in seen and config not in found:
            found.append(config)
    return found


def _repair(rng, config, costs, cost, budget):
    """Lower random layers one step (to their next cheaper candidate) until the configuration fits."""
    total = sum(costs[i][j] for i, j in enumerate(config))
    while not cost.within(total, budget):
        i = rng.choice([i for i, j in enumerate(config) if costs[i][j] > min(costs[i])])
        lower = [k for k in range(len(costs[i])) if costs[i][k] < costs[i][config[i]]]
        j = max(lower, key=lambda k: (costs[i][k], -k))
        total += costs[i][j] - costs[i][config[i]]
        config[i] = j
    return config


def _score_new(scorer, space, seen, configs):
    """Score configurations (candidate indices) end to end; remember them in `seen`; return (config, metric)."""
    if not configs:
        return []
    assignments = [tuple(space.candidates[i][j] for i, j in enumerate(config)) for config in configs]
    metrics = [_finite(m) for m in scorer.score(0, len(space), assignments)]
    seen.update(zip(configs, metrics))
    return list(zip(configs, metrics))


def _best(method, space, cost, seen, started):
    config, metric = min(seen.items(), key=lambda item: (item[1], item[0]))
    assignment = tuple(space.candidates[i][j] for i, j in enumerate(config))
    return _result(method, space, cost, assignment, metric, len(seen), started)


def _result(method, space, cost, assignment, metric, evaluations, started):
    return SearchResult(method=method, config=space.config(assignment),
                        average_bits=cost.average_bits(cost.assignment_cost(space.layers, assignment)),
                        metric=float(metric), evaluations=evaluations, seconds=time.perf_counter() - started)


def _leaf_costs(space, cost):
    return [[cost.layer_cost(name, pair) for pair in pairs] for name, pairs in zip(space.layers, space.candidates)]


def _check_evaluations(evaluations):
    if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < 1:
        raise ValueError(f"evaluations must be a positive int, got {evaluations!r}")


def _finite(metric):
    """NaN -> +inf, so a broken configuration loses every comparison."""
    metric = float(metric)
    return math.inf if math.isnan(metric) else metric
