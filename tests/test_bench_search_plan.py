"""`treeq bench search-plan`: each lever planned beside the default search on a published transformer's shapes
(meta device, no weights), its cut the default's cost over its own."""
import pytest

from treeq.bench.search_plan import bench_search_plan
from treeq.bits import uniform_config
from treeq.models.shapes import meta_transformer
from treeq.search.estimate import plan_tree_search
from treeq.search.space import DEFAULT_CANDIDATES, SearchSpace


def test_levers_are_planned_beside_the_default():
    rows = {row["search"]: row for row in bench_search_plan(["sana"], levers=("tss", "tss-end", "tss-lowq", "tss-fast"))}
    model = meta_transformer("sana")
    space = SearchSpace.build(list(uniform_config(model, 8, 8)), DEFAULT_CANDIDATES[4.0])
    default = plan_tree_search(model, space, 16, 32, sampling={"steps": rows["tss"]["steps"]})  # 16 guided states
    assert rows["tss"]["rows"] == 32
    assert rows["tss"]["image_equivalents"] == default["image_equivalents"] and rows["tss"]["cut"] == 1
    assert rows["tss-end"]["evaluations"] == default["evaluations"] > rows["tss-lowq"]["evaluations"]
    assert rows["tss-end"]["block_runs"] < default["block_runs"]
    assert all(rows[name]["cut"] == pytest.approx(default["image_equivalents"] / rows[name]["image_equivalents"])
               for name in rows)
    assert 1 < rows["tss-lowq"]["cut"] < rows["tss-fast"]["cut"]


def test_flux_dev_fast_search_is_planned_at_a_tenth():
    rows = {(row["steps"], row["search"]): row for row in bench_search_plan(["flux"], levers=("tss", "tss-fast"))}
    assert rows[28, "tss"]["rows"] == 16  # FLUX.1 embeds its guidance: one row a state
    assert rows[28, "tss"]["image_equivalents"] == pytest.approx(2129.8, abs=0.1)
    assert rows[28, "tss-fast"]["image_equivalents"] <= 200 and rows[28, "tss-fast"]["cut"] >= 10


def test_an_unknown_lever_is_refused():
    with pytest.raises(ValueError, match="unknown lever 'tss-nope'"):
        bench_search_plan(["sana"], levers=("tss-nope",))
