"""The model objective on a tiny DiT: a cached segment start gives the full forward's metric; ENG sets the rest."""
import torch

from treeq.bits import quantizable_layers, uniform_config
from treeq.ptq.apply import quantize, set_bits_
from treeq.search.cost import cost_model
from treeq.search.objective import ModelObjective
from treeq.search.space import SearchSpace
from treeq.search.tree import tree_search

import pytest


def calibration(rows=6):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(rows, 1, 32, 32, generator=generator), torch.randint(0, 1000, (rows,), generator=generator),
            torch.randint(0, 10, (rows,), generator=generator))


@pytest.fixture
def scored(tiny_dit):
    fp = tiny_dit
    quantized = quantize(fp, uniform_config(fp, 8, 8))
    return fp, quantized


def full_forward_mse(fp, quantized, data, config):
    with torch.no_grad():
        reference = fp(*data)
        set_bits_(quantized, config)
        return (quantized(*data) - reference).pow(2).mean().item()


@pytest.mark.parametrize("env_bits", [4, 32])
def test_cached_segment_start_equals_a_full_forward(scored, env_bits):
    fp, quantized = scored
    data = calibration()
    objective = ModelObjective(quantized, data, env_bits, batch_size=4)
    layers = quantizable_layers(fp)
    start, end = 6, 8  # blocks.1.attn.qkv, blocks.1.attn.proj: evaluation starts at block 1
    assignments = [((3, 4), (4, 3)), ((8, 8), (2, 2))]
    metrics = objective.score(start, end, assignments)
    assert (1, env_bits) in objective._entering_cache
    for assignment, metric in zip(assignments, metrics):
        config = {name: {"w_bits": env_bits, "a_bits": env_bits} for name in layers}
        config.update({layers[start + i]: {"w_bits": w, "a_bits": a} for i, (w, a) in enumerate(assignment)})
        assert metric == pytest.approx(full_forward_mse(fp, quantized, data, config), rel=1e-5)
    assert metrics[0] != metrics[1]
    # Scoring leaves the model in the environment, so repeated calls agree.
    assert objective.score(start, end, assignments) == metrics


def test_full_precision_environment_and_segment_give_zero(scored):
    _, quantized = scored
    objective = ModelObjective(quantized, calibration(), 32)
    assert objective.score(0, 3, [((32, 32),) * 3])[0] == pytest.approx(0, abs=1e-12)
    assert objective.score(0, 3, [((3, 3),) * 3])[0] > 0


def test_readout_a_block_past_the_segment_compares_hidden_tokens(scored):
    fp, quantized = scored
    data = calibration()
    objective = ModelObjective(quantized, data, 32, readout_blocks=0)
    metric = objective.score(0, 1, [((2, 2),)])[0]
    with torch.no_grad():
        set_bits_(quantized, {"blocks.0.adaLN_modulation.1": {"w_bits": 2, "a_bits": 2}})
        tokens, c = quantized.embed(*data)
        hidden = quantized.run_blocks(tokens, c, 0, 1)
        set_bits_(quantized, {})
        reference = quantized.run_blocks(tokens, c, 0, 1)
    assert metric == pytest.approx((hidden - reference).pow(2).mean().item(), rel=1e-5)


def test_unquantized_model_is_refused(tiny_dit):
    with pytest.raises(ValueError, match="not quantized"):
        ModelObjective(tiny_dit, calibration(), 4)


def test_tree_search_on_the_tiny_dit_respects_the_budget(scored):
    fp, quantized = scored
    objective = ModelObjective(quantized, calibration(4), 4, readout_blocks=1)
    space = SearchSpace.build(quantizable_layers(fp), [(4, 4), (3, 3), (8, 8)])
    cost = cost_model(fp)
    result = tree_search(objective, space, cost, 4.0, queue_size=3, progress=False)
    assert result.average_bits <= 4.0 + 1e-9
    assert result.metric == pytest.approx(full_forward_mse(fp, quantized, calibration(4), result.config), rel=1e-5)


def test_shared_prefixes_are_not_recomputed_and_change_no_metric(scored):
    fp, quantized = scored
    data = calibration()
    objective = ModelObjective(quantized, data, 4)
    # Segment: all of block 0 and the first layer of block 1; candidates differ only in that last layer.
    prefix = ((3, 3),) * 5
    assignments = [prefix + ((2, 2),), prefix + ((8, 8),), prefix + ((2, 2),)]
    calls = []
    hook = quantized.blocks[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        metrics = objective.score(0, 6, assignments)
    finally:
        hook.remove()
    assert len(calls) == 1  # block 0 ran once for three candidates
    alone = [objective.score(0, 6, [a])[0] for a in assignments]
    assert metrics == alone and metrics[0] == metrics[2] != metrics[1]


def test_the_environment_bits_change_a_segments_score(scored):
    """ENG: the same candidate of the same segment scores worse in a W3A3 environment than in full precision,
    and switching the environment of one objective changes its scores the same way."""
    _, quantized = scored
    candidate = [((4, 4), (4, 4))]
    in_fp = ModelObjective(quantized, calibration(), 32).score(6, 8, candidate)[0]
    low = ModelObjective(quantized, calibration(), 3)
    in_w3a3 = low.score(6, 8, candidate)[0]
    assert in_w3a3 > 10 * in_fp > 0
    low.set_env_bits(32)
    assert low.score(6, 8, candidate)[0] == pytest.approx(in_fp, rel=1e-6)


def test_environment_at_full_precision_and_at_the_target_give_different_trees(scored):
    fp, quantized = scored
    space = SearchSpace.build(quantizable_layers(fp), [(4, 4), (3, 3), (2, 2), (8, 8)])
    cost = cost_model(fp)
    trees = {}
    for env_bits in (32, 4):
        result = tree_search(ModelObjective(quantized, calibration(), env_bits), space, cost, 4.0, queue_size=4,
                             progress=False)
        trees[env_bits] = [(v["w_bits"], v["a_bits"]) for v in result.config.values()]
        assert result.average_bits <= 4.0 + 1e-9
    assert trees[32] != trees[4]


def test_the_time_estimate_counts_the_block_runs_a_tree_search_makes(monkeypatch):
    """The estimate's block runs against the scorer's real ones on a tiny DiT: within 25%, and
    wrong by far when the product order's reuse is left out of the count."""
    from treeq.bits import uniform_config
    from treeq.models.adapters.dit import DiTAdapter
    from treeq.ptq.apply import quantize
    from treeq.ptq.recipe import Recipe
    from treeq.search.cost import cost_model
    from treeq.search.estimate import estimate_tree_search, tree_block_runs
    from treeq.search.objective import ModelObjective
    from treeq.search.space import SearchSpace
    from treeq.search.tree import tree_search

    from treeq.models.registry import create_model

    torch.manual_seed(0)
    fp = create_model("DiT-MNIST", depth=6, hidden_size=32, num_heads=2).eval()
    candidates = ((3, 3), (4, 4), (8, 8))
    space = SearchSpace.build(list(uniform_config(fp, 8, 8)), candidates)
    model = quantize(fp, uniform_config(fp, 8, 8), Recipe(switch_bits=candidates))
    objective = ModelObjective(model, calibration(4), 4, readout_blocks=1, batch_size=4)
    runs = []
    original = DiTAdapter.run_blocks
    monkeypatch.setattr(DiTAdapter, "run_blocks",
                        lambda self, m, state, start, end: runs.append(end - start) or original(self, m, state, start, end))
    estimate = estimate_tree_search(objective, space, queue_size=4)
    runs.clear()
    objective._entering_cache.clear()
    tree_search(objective, space, cost_model(model), 8.0, queue_size=4, progress=False)  # 8 bits: nothing pruned
    actual = sum(runs)
    assert 0.75 * actual <= estimate["block_runs"] <= 1.25 * actual
    assert estimate["seconds"] == pytest.approx(estimate["block_runs"] * estimate["seconds_per_block"])
    without_reuse = sum(node_count * (objective.stop_block(s, e) - objective.block_of[s])
                        for s, e, node_count in _nodes(space))
    assert without_reuse > 1.25 * actual and tree_block_runs(space, 4, objective.block_of, objective.stop_block) == estimate["block_runs"]


def _nodes(space):
    from treeq.search.tree import scored_nodes
    return [(node.start, node.end, node.candidates) for node in scored_nodes(space, 4)]
