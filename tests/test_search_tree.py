"""Tree-Structured Search on synthetic objectives: tree shape, budget, known optimum, resume, errors."""
import itertools
import json
import math

import pytest

from treeq.search.baselines import evolutionary, greedy, ilp, random_search, uniform
from treeq.search.cost import BopsCost
from treeq.search.space import SearchSpace
from treeq.search.tree import expected_evaluations, tree_levels, tree_search

HIGH, LOW = (4, 4), (2, 2)


class CoupledScorer:
    """metric = sum of per-layer errors of low layers + a penalty for every pair of adjacent low layers.

    Layers 3 and 4 are individually the cheapest to lower, but lowering both couples: the
    sum-of-single-layers view (ILP) picks them, the end-to-end optimum does not.
    """

    settings = {"synthetic": "coupled"}

    def __init__(self, n=8, env=HIGH, penalty=5.0):
        self.errors = [1.5, 1.6, 1.7, 1.0, 1.1, 1.8, 1.9, 2.0][:n]
        self.n, self.env, self.penalty, self.calls = n, env, penalty, 0
        self.keys = []  # (start, end, bits) of every assignment scored

    def full(self, config):
        low = [pair == LOW for pair in config]
        return (sum(e for e, is_low in zip(self.errors, low) if is_low)
                + self.penalty * sum(a and b for a, b in zip(low, low[1:])))

    def score(self, start, end, assignments):
        self.calls += 1
        self.keys += [(start, end, tuple(bits)) for bits in assignments]
        return [self.full([self.env] * start + list(bits) + [self.env] * (self.n - end)) for bits in assignments]


def coupled_problem(n=8):
    space = SearchSpace.build([f"layer{i}" for i in range(n)], [HIGH, LOW])
    cost = BopsCost({name: 1 for name in space.layers})
    # Room for exactly two low layers: 6 * 16 + 2 * 4 = 104 of a full-high 128.
    return space, cost, math.sqrt(104 / n)


def brute_force(scorer, space, cost, target):
    budget = cost.budget_total(target)
    feasible = [c for c in itertools.product(*space.candidates)
                if cost.within(cost.assignment_cost(space.layers, c), budget)]
    return min(feasible, key=scorer.full)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 11])
def test_tree_shape_carries_the_last_node_of_an_odd_level(n):
    levels = tree_levels(n)
    assert len(levels) == 1 + math.ceil(math.log2(n))
    assert levels[-1] == [(0, n, levels[-1][0][2])]
    for below, level in zip(levels, levels[1:]):
        assert len(level) == math.ceil(len(below) / 2)
        covered = [(start, end) for start, end, _ in level]
        assert covered == sorted(covered) and covered[0][0] == 0 and covered[-1][1] == n
        if len(below) % 2:
            assert level[-1] == (below[-1][0], below[-1][1], (len(below) - 1,))
    assert tree_levels(5)[1] == [(0, 2, (0, 1)), (2, 4, (2, 3)), (4, 5, (4,))]


def test_finds_the_coupled_optimum_that_ilp_misses():
    space, cost, target = coupled_problem()
    scorer = CoupledScorer()
    optimum = brute_force(scorer, space, cost, target)
    # Queue 6 holds a segment's whole front (0..4 low layers of 4 leaves); at 4 the thinning drops the
    # two-low candidates of the left half, the very ones the optimum needs.
    result = tree_search(scorer, space, cost, target, queue_size=6, progress=False)
    assert [(v["w_bits"], v["a_bits"]) for v in result.config.values()] == list(optimum)
    assert result.metric == pytest.approx(scorer.full(optimum))
    hawq = ilp(scorer, space, cost, target)
    assert hawq.config["layer3"] == hawq.config["layer4"] == {"w_bits": 2, "a_bits": 2}
    assert hawq.metric > result.metric + 4  # the coupling penalty it could not see


def test_budget_is_respected_by_every_method():
    space, cost, target = coupled_problem()
    scorer = CoupledScorer()
    assert uniform(scorer, space, cost, 4.0).average_bits == 4.0
    results = [tree_search(scorer, space, cost, target, queue_size=2, progress=False),
               uniform(scorer, space, cost, target), greedy(scorer, space, cost, target),
               ilp(scorer, space, cost, target),
               evolutionary(scorer, space, cost, target, 30, population=6),
               random_search(scorer, space, cost, target, 30)]
    for result in results:
        assert result.average_bits <= target + 1e-9, result.method
        config = [(v["w_bits"], v["a_bits"]) for v in result.config.values()]
        assert result.average_bits == pytest.approx(math.sqrt(cost.assignment_cost(space.layers, config) / 8))
        assert result.metric == pytest.approx(scorer.full(config))


def test_merges_score_the_product_and_prune_what_cannot_fit():
    space, cost, _ = coupled_problem(n=4)
    scorer = CoupledScorer(n=4)
    # Room for one high layer among four (16 + 3 * 4 = 28 of 64).
    result = tree_search(scorer, space, cost, math.sqrt(28 / 4), queue_size=4, progress=False)
    leaves, merges, root = result.levels
    assert all(len(node["kept"]) == 2 and node["pruned"] == 0 for node in leaves)
    # A pair holds at most one high layer: (high, high) is pruned unscored, the other three kept.
    assert all(node["pruned"] == 1 and len(node["kept"]) == 3 and not node["dropped"] for node in merges)
    assert root[0]["pruned"] == 9 - 5  # of the 3 x 3 products, 5 have at most one high layer
    assert result.evaluations == 4 * 2 + 2 * 3 + 5 < expected_evaluations(space, 4)
    assert result.config["layer2"] == {"w_bits": 4, "a_bits": 4} and result.metric == pytest.approx(9.1)


def test_root_prefers_lowest_metric_over_cheapest():
    space, cost, target = coupled_problem()
    result = tree_search(CoupledScorer(), space, cost, 4.0, queue_size=4, progress=False)
    assert result.metric == 0 and all(v == {"w_bits": 4, "a_bits": 4} for v in result.config.values())
    costs = [entry["average_bits"] for entry in result.front]
    assert costs == sorted(costs) and result.front[-1]["metric"] == 0 and result.front[0]["average_bits"] < 4.0


def test_impossible_budget_is_refused_with_the_lowest_achievable_bits():
    space, cost, _ = coupled_problem()
    with pytest.raises(ValueError, match=r"below the lowest achievable 2\.000"):
        tree_search(CoupledScorer(), space, cost, 1.5, progress=False)
    for method in (uniform, greedy, ilp):
        with pytest.raises(ValueError, match="lowest achievable"):
            method(CoupledScorer(), space, cost, 1.5)


@pytest.mark.parametrize("candidates, message", [
    ([], "empty candidate list"), ([(4, 4), (4, 4)], "duplicate"), ([(4, 9)], "not a"), ([(4,)], "not a"),
    ({"layer0": [(4, 4)]}, "exactly the searched layers")])
def test_bad_candidate_sets_are_refused(candidates, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace.build(["layer0", "layer1"], candidates)


def test_a_resumed_search_scores_exactly_what_the_interrupted_one_had_not(tmp_path):
    """Every (segment, candidate) is scored once over the interrupted and the resumed run together: none
    twice (not even those of the node in progress), none left out; a full run scores the same set."""
    space, cost, target = coupled_problem()
    options = dict(queue_size=3, progress=False, chunk_size=2, state_path=tmp_path / "s.json")
    full = CoupledScorer()
    tree_search(full, space, cost, target, **{**options, "state_path": tmp_path / "full.json"})
    for fail_at in (3, 12, 20):  # early (leaves), in the middle, late in the search
        (tmp_path / "s.json").unlink(missing_ok=True)
        interrupted = FailingScorer(fail_at=fail_at)
        with pytest.raises(Interrupt):
            tree_search(interrupted, space, cost, target, **options)
        resumed = CoupledScorer()
        tree_search(resumed, space, cost, target, resume=True, **options)
        assert not set(interrupted.keys) & set(resumed.keys), fail_at
        assert sorted(interrupted.keys + resumed.keys) == sorted(full.keys), fail_at
        assert interrupted.keys and resumed.keys


def test_resume_without_a_state_file_is_refused(tmp_path):
    space, cost, target = coupled_problem()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        tree_search(CoupledScorer(), space, cost, target, state_path=tmp_path / "none.json", resume=True,
                    progress=False)


class Interrupt(Exception):
    pass


class FailingScorer(CoupledScorer):
    """Raises on its `fail_at`-th call, as a crash in the middle of a search would."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at = fail_at

    def score(self, start, end, assignments):
        if self.calls + 1 == self.fail_at:
            raise Interrupt
        return super().score(start, end, assignments)


def test_resume_after_a_crash_gives_the_identical_result(tmp_path):
    space, cost, target = coupled_problem()
    options = dict(queue_size=3, progress=False, chunk_size=2)
    clean = tree_search(CoupledScorer(), space, cost, target, state_path=tmp_path / "a.json",
                        log_path=tmp_path / "a.jsonl", **options)
    with pytest.raises(Interrupt):
        tree_search(FailingScorer(fail_at=12), space, cost, target, state_path=tmp_path / "b.json",
                    log_path=tmp_path / "b.jsonl", **options)
    partial = json.loads((tmp_path / "b.json").read_text())
    assert 0 < len(partial["nodes"]) < 15
    resumed_scorer = CoupledScorer()
    resumed = tree_search(resumed_scorer, space, cost, target, state_path=tmp_path / "b.json",
                          log_path=tmp_path / "b.jsonl", resume=True, **options)
    assert resumed_scorer.calls < clean.evaluations  # finished nodes were not scored again
    for field in ("config", "average_bits", "metric", "evaluations", "front", "levels"):
        assert getattr(resumed, field) == getattr(clean, field), field
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == clean.evaluations


def test_resume_refuses_a_state_written_with_other_settings(tmp_path):
    space, cost, target = coupled_problem()
    tree_search(CoupledScorer(), space, cost, target, queue_size=3, state_path=tmp_path / "s.json", progress=False)
    with pytest.raises(ValueError, match="queue_size"):
        tree_search(CoupledScorer(), space, cost, target, queue_size=4, state_path=tmp_path / "s.json",
                    resume=True, progress=False)


def test_tree_search_evaluations_grow_linearly_with_depth():
    from treeq.bench.search_analysis import bench_depth
    rows = bench_depth(depths=(2, 4, 8), queue_size=4)
    counts = [row["tss_evaluations"] for row in rows]
    per_layer = [count / row["layers"] for count, row in zip(counts, rows)]
    assert counts[0] < counts[1] < counts[2] and max(per_layer) < 1.2 * min(per_layer)
    assert rows[-1]["exhaustive_log10"] == 40 * math.log10(8)


def test_a_seed_stays_in_every_queue_so_the_root_never_ends_above_it():
    space, cost, target = coupled_problem()
    scorer = CoupledScorer()
    optimum = brute_force(scorer, space, cost, target)
    plain = tree_search(scorer, space, cost, target, queue_size=4, progress=False, budget_window=None)
    assert plain.metric > scorer.full(optimum) + 0.1  # the thinning dropped what the optimum needs
    seeded = tree_search(scorer, space, cost, target, queue_size=4, progress=False, seeds=[optimum],
                         budget_window=None)
    assert seeded.metric == pytest.approx(scorer.full(optimum))
    assert [(v["w_bits"], v["a_bits"]) for v in seeded.config.values()] == list(optimum)
    assert all(len(node["kept"]) <= 5 for level in seeded.levels for node in level)  # the queue plus the seed
    with pytest.raises(ValueError, match="keep the budget"):
        tree_search(scorer, space, cost, target, queue_size=4, progress=False, seeds=[(HIGH,) * 8])


def test_the_budget_window_keeps_what_the_optimum_needs_where_the_plain_drop_loses_it():
    space, cost, target = coupled_problem()
    scorer = CoupledScorer()
    optimum = scorer.full(brute_force(scorer, space, cost, target))
    plain = tree_search(scorer, space, cost, target, queue_size=4, progress=False, budget_window=None)
    windowed = tree_search(scorer, space, cost, target, queue_size=4, progress=False)
    assert plain.metric > optimum + 0.1 and windowed.metric == pytest.approx(optimum)
    assert windowed.evaluations <= plain.evaluations * 1.1


@pytest.mark.parametrize("width", [-1, "1", True])
def test_a_bad_budget_window_is_refused(width):
    space, cost, target = coupled_problem()
    with pytest.raises(ValueError, match="budget_window"):
        tree_search(CoupledScorer(), space, cost, target, queue_size=4, progress=False, budget_window=width)
