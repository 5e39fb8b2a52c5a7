"""Refinement after a search: coordinate descent on the end-to-end metric, never over the budget."""
import pytest

from treeq.search.refine import refine
from treeq.search.result import SearchResult
from treeq.search.space import SearchSpace


class AdditiveCost:
    """Cost = sum of w_bits; average bits = total / layers."""

    def __init__(self, layers):
        self.layers = layers

    def layer_cost(self, name, pair):
        return pair[0]

    def assignment_cost(self, layers, assignment):
        return sum(pair[0] for pair in assignment)

    def budget_total(self, target):
        return target * len(self.layers)

    def within(self, total, budget):
        return total <= budget + 1e-9

    def average_bits(self, total):
        return total / len(self.layers)


class CoupledScorer:
    """Metric of a full configuration: each layer's error 2^-w, doubled when its left neighbour sits at 3 bits
    (a coupling that per-layer scores miss). Counts the configurations it scores."""

    def __init__(self):
        self.scored = 0

    def score(self, start, end, assignments):
        self.scored += len(assignments)
        return [sum(2.0 ** -w * (2 if i and assignment[i - 1][0] == 3 else 1) for i, (w, _) in enumerate(assignment))
                for assignment in assignments]


@pytest.fixture
def problem():
    layers = [f"l{i}" for i in range(6)]
    space = SearchSpace.build(layers, ((3, 3), (4, 4), (6, 6)))
    return space, AdditiveCost(layers), CoupledScorer()


def _result(space, pairs, scorer):
    assignment = tuple(pairs)
    return SearchResult("tss", space.config(assignment), sum(p[0] for p in pairs) / len(pairs),
                        scorer.score(0, len(pairs), [assignment])[0], evaluations=10, seconds=1.0)


def test_refinement_lowers_the_metric_and_spends_unused_budget(problem):
    space, cost, scorer = problem
    start = _result(space, [(3, 3)] * 6, scorer)  # 3.0 bits against a 4.0 budget
    refined = refine(scorer, space, cost, 4.0, start, sweeps=3)
    assert refined.metric < start.metric and refined.average_bits > start.average_bits
    assert refined.average_bits <= 4.0 and refined.method == "tss+refine"
    assert refined.evaluations == start.evaluations + scorer.scored - 1
    assert refined.metric == pytest.approx(scorer.score(0, 6, [tuple(
        (e["w_bits"], e["a_bits"]) for e in refined.config.values())])[0])


def test_a_configuration_no_move_improves_is_kept(problem):
    space, cost, scorer = problem
    best = _result(space, [(4, 4)] * 6, scorer)  # exactly the budget; any move costs more or scores worse
    refined = refine(scorer, space, cost, 4.0, best, sweeps=2)
    assert refined.config == best.config and refined.metric == best.metric


def test_sweeps_must_be_positive(problem):
    space, cost, scorer = problem
    with pytest.raises(ValueError, match="sweeps must be a positive int"):
        refine(scorer, space, cost, 4.0, _result(space, [(4, 4)] * 6, scorer), sweeps=0)


def test_an_exchange_trades_bits_between_layers_that_coordinate_descent_cannot(problem):
    from treeq.search.refine import exchange
    space, cost, scorer = problem
    # The budget spent, badly: layer 0 at 6 bits, layer 1 at 3 (doubling layer 2's error). Every single
    # move within the budget lowers one layer only by raising none, so coordinate descent is stuck.
    start = _result(space, [(6, 6), (3, 3), (4, 4), (4, 4), (3, 3), (4, 4)], scorer)
    stuck = refine(scorer, space, cost, 4.0, start, sweeps=2)
    traded = exchange(scorer, space, cost, 4.0, start, rounds=2)
    assert traded.metric < stuck.metric <= start.metric
    assert traded.average_bits <= 4.0 and traded.method == "tss+exchange"
    assert traded.metric == pytest.approx(scorer.score(0, 6, [tuple(
        (e["w_bits"], e["a_bits"]) for e in traded.config.values())])[0])


def test_an_exchange_that_does_not_help_keeps_the_configuration(problem):
    from treeq.search.refine import exchange
    space, cost, scorer = problem
    best = _result(space, [(4, 4)] * 6, scorer)
    kept = exchange(scorer, space, cost, 4.0, best, rounds=3)
    assert kept.config == best.config and kept.metric == pytest.approx(best.metric)
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        exchange(scorer, space, cost, 4.0, best, rounds=0)
