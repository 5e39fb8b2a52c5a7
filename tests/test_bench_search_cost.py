"""`treeq bench search-cost` on a small DiT: the memory formulas equal what the objects hold, and the
28-block counts come from the tree of the full model."""
import pytest

from treeq.bench.search_cost import bench_search_cost


@pytest.mark.parametrize("blocks", [1, 3])
def test_search_cost_formulas_match_the_measured_memory(blocks):
    rows = {row["quantity"]: row for row in bench_search_cost(blocks=blocks, rows=2, name="DiT-S/8", queue_size=4)}
    caches = rows["scorer caches"]
    assert caches["measured"] == pytest.approx(caches["formula_at_blocks"], rel=1e-9)
    resident = rows["quantized model resident"]
    assert resident["measured"] == pytest.approx(resident["formula_at_blocks"], rel=1e-3)
    assert rows["tree search evaluations (bound)"]["unit"].startswith("60 leaves")  # DiT-S: 12 blocks x 5 linears
    assert rows["tree search block runs"]["at_full_depth"] > rows["tree search evaluations (bound)"]["at_full_depth"]
    assert rows["seconds per block run"]["measured"] > 0
