"""Early exit of a merge: products best-predicted first, in product order within a chunk; a chunk that changes
nothing in the queue stops the node; a resumed search ends where an uninterrupted one does."""
import json

import pytest

from treeq.search.early_exit import predicted_order, settled
from treeq.search.tree import Candidate, tree_search

from test_search_tree import CoupledScorer, FailingScorer, Interrupt, brute_force, coupled_problem


def _products(left, right):
    return [Candidate(a.bits + b.bits, a.cost + b.cost, None) for a in left for b in right]


def test_products_come_best_predicted_first_and_each_chunk_in_product_order():
    left = [Candidate((("l", i),), cost, metric) for i, (cost, metric) in enumerate([(1, 5.0), (2, 2.0), (3, 1.0)])]
    right = [Candidate((("r", i),), cost, metric) for i, (cost, metric) in enumerate([(1, 9.0), (2, 4.0), (3, 3.0)])]
    feasible = _products(left, right)
    order = predicted_order(feasible, left, right, chunk_size=3)
    assert sorted(order, key=feasible.index) == feasible  # a permutation
    # predicted: right metric + 3 x (left metric - 1) (3: the ratio of the best metrics), cost i + j + 2;
    # the predicted front is (l2,r2) 3, (l2,r1) 4, (l1,r1) 7, (l1,r0) 12, (l0,r0) 21; (l0,r2) is dominated twice
    bits = [tuple(pair[1] for pair in c.bits) for c in order]
    assert bits[:3] == [(1, 1), (2, 1), (2, 2)]  # the best three, scored in product order (left child major)
    assert bits[3:] == [(0, 0), (1, 0), (1, 2), (0, 1), (0, 2), (2, 0)]  # then the rest of the front, layer 1, 2
    # a protected (seed) product leads whatever its prediction
    protected = {(("l", 0), ("r", 0))}
    assert predicted_order(feasible, left, right, 3, protected)[0].bits == (("l", 0), ("r", 0))


def test_a_node_settles_when_a_whole_chunk_puts_nothing_into_its_queue():
    good = [(cost, 1.0 / cost) for cost in (1, 2, 3, 4)]
    worse = [(cost, 2.0 / cost) for cost in (1, 2, 3, 4)]  # each dominated by a good point
    assert not settled(good, 4, 4, None)  # one chunk: never settled
    assert settled(good + worse, 4, 4, None)
    better = [(cost, 0.5 / cost) for cost in (1, 2, 3, 4)]
    assert not settled(good + better, 4, 4, None)
    assert not settled(good + worse[:3], 4, 4, None)  # not a whole chunk


def test_early_exit_scores_fewer_candidates_and_finds_an_additive_optimum():
    space, cost, target = coupled_problem()
    options = dict(queue_size=3, progress=False, chunk_size=2)
    additive = CoupledScorer(penalty=0.0)
    plain = tree_search(CoupledScorer(penalty=0.0), space, cost, target, **options)
    early = tree_search(additive, space, cost, target, early_exit=True, **options)
    assert early.evaluations < plain.evaluations
    assert early.metric == additive.full(list(brute_force(additive, space, cost, target))) == plain.metric
    assert early.average_bits <= target + 1e-9


def test_an_interrupted_early_exit_search_resumes_to_the_same_result(tmp_path):
    space, cost, target = coupled_problem()
    options = dict(queue_size=3, progress=False, chunk_size=2, early_exit=True)
    clean = tree_search(CoupledScorer(), space, cost, target, state_path=tmp_path / "a.json",
                        log_path=tmp_path / "a.jsonl", **options)
    with pytest.raises(Interrupt):
        tree_search(FailingScorer(fail_at=12), space, cost, target, state_path=tmp_path / "b.json",
                    log_path=tmp_path / "b.jsonl", **options)
    resumed = tree_search(CoupledScorer(), space, cost, target, state_path=tmp_path / "b.json",
                          log_path=tmp_path / "b.jsonl", resume=True, **options)
    for field in ("config", "metric", "evaluations", "levels"):
        assert getattr(resumed, field) == getattr(clean, field), field
    skipped = [node.get("skipped", 0) for node in json.loads((tmp_path / "a.json").read_text())["nodes"].values()]
    assert sum(skipped) > 0
    # a state written without early exit is not resumed with it
    tree_search(CoupledScorer(), space, cost, target, state_path=tmp_path / "c.json", queue_size=3, progress=False,
                chunk_size=2)
    with pytest.raises(ValueError):
        tree_search(CoupledScorer(), space, cost, target, state_path=tmp_path / "c.json", resume=True, **options)


@pytest.mark.parametrize("early_exit", [False, True])
def test_a_searchs_log_replayed_counts_the_block_runs_its_scorer_ran(tiny_dit, tmp_path, early_exit):
    """bench search-compute's replay: the same search again from its log, counted without a model."""
    from treeq.bench.search_analysis import _LogReplay
    from treeq.bits import quantizable_layers, uniform_config
    from treeq.models.adapters import adapter_for
    from treeq.ptq.apply import quantize
    from treeq.search.cost import cost_model
    from treeq.search.estimate import BlockRunCounter
    from treeq.search.objective import ModelObjective
    from treeq.search.space import SearchSpace

    from test_search_objective import calibration

    quantized = quantize(tiny_dit, uniform_config(tiny_dit, 8, 8))
    layers = quantizable_layers(tiny_dit)
    space = SearchSpace.build(layers, [(4, 4), (3, 3), (8, 8), (4, 8)])
    options = dict(queue_size=5, progress=False, chunk_size=4, early_exit=early_exit)
    objective = ModelObjective(quantized, calibration(4), 4, readout_blocks=1)
    ran = tree_search(objective, space, cost_model(tiny_dit), 4.0, log_path=tmp_path / "log.jsonl", **options)
    adapter = adapter_for(tiny_dit)
    block_of = adapter.block_of(tiny_dit)
    counter = BlockRunCounter([block_of[name] for name in layers], len(adapter.block_names(tiny_dit)), 1,
                              scorer=_LogReplay(tmp_path / "log.jsonl"))
    replayed = tree_search(counter, space, cost_model(tiny_dit), 4.0, **options)
    assert replayed.config == ran.config and counter.evaluations == ran.evaluations
    assert counter.block_runs == objective.block_runs > 0
