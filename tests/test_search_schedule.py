"""The cost levers of a tree search (issue 31): its low levels keep a shorter queue and score fewer rows,
the levels above and the root every row; the printed plan counts what the finished search ran."""
import json

import pytest

from treeq.cli import main
from treeq.models.adapters import adapter_for
from treeq.search.cost import BopsCost
from treeq.search.schedule import Schedule, block_levels
from treeq.search.space import SearchSpace
from treeq.search.tree import expected_evaluations, scored_nodes, tree_levels, tree_search

from test_search_cost import FAST, QUEUE_ONE, tiny_path  # noqa: F401 (fixture)

PAIRS = [(8, 8), (4, 4), (3, 3), (2, 2)]


class SpyScorer:
    """Metric: the summed bits of the segment (deterministic); records which segments it scored."""

    def __init__(self):
        self.segments = []

    def score(self, start, end, assignments):
        self.segments.append((start, end))
        return [float(sum(w + a for w, a in bits)) for bits in assignments]


def _problem(n=16):
    space = SearchSpace.build([f"layer{i}" for i in range(n)], PAIRS)
    return space, BopsCost({name: 1 for name in space.layers})


def test_low_levels_use_their_scorer_and_queue_and_the_root_never_does():
    space, cost = _problem()
    high, low = SpyScorer(), SpyScorer()
    schedule = Schedule(queue_size=6, low_levels=2, low_queue=2)
    result = tree_search(high, space, cost, 8.0, queue_size=schedule, low_scorer=low, progress=False)
    assert {end - start for start, end in low.segments} == {1, 2}  # levels 0 and 1
    assert {end - start for start, end in high.segments} == {4, 8, 16}
    sizes = [len(record["kept"]) for level in result.levels[:2] for record in level]
    assert max(sizes) == 2 and max(len(record["kept"]) for record in result.levels[2]) > 2
    # levels 1 and 2 score products of two queues of 2, level 3 of two of 4 (kept 6), the root of two of 6
    assert result.evaluations == expected_evaluations(space, schedule) == 16 * 4 + 8 * 4 + 4 * 4 + 2 * 16 + 36
    top = Schedule(queue_size=6, low_levels=99, low_queue=2)  # every level but the root
    assert tree_levels(16)[-1] and not top.is_low(len(tree_levels(16)) - 1, len(tree_levels(16)))
    assert [node.level for node in scored_nodes(space, top)][-1] == 4


def test_a_plain_queue_is_the_schedule_without_low_levels():
    space, _ = _problem(11)
    assert expected_evaluations(space, 5) == expected_evaluations(space, Schedule(queue_size=5))
    assert expected_evaluations(space, Schedule(queue_size=5, low_levels=2, low_queue=2)) < expected_evaluations(space, 5)


def test_bad_schedules_are_refused():
    for bad in ({"queue_size": 0}, {"low_queue": True}, {"low_rows": 0}, {"low_levels": -1}):
        with pytest.raises(ValueError, match="must be"):
            Schedule(**bad)


def test_the_default_low_levels_fit_the_smallest_block(tiny_dit):
    adapter = adapter_for(tiny_dit)
    blocks = adapter.block_of(tiny_dit)
    block_of = [blocks[name] for name in adapter.layers(tiny_dit)]
    per_block = min(block_of.count(b) for b in set(block_of))
    levels = block_levels(block_of)
    assert 2 ** (levels - 1) <= per_block < 2 ** levels
    assert block_levels([0] * 8 + [1] * 14) == 4 and block_levels([0, 1, 2]) == 1


def test_fewer_low_rows_cost_what_the_plan_printed(tiny_path, tmp_path, capsys):  # noqa: F811
    """At queue 1 the count cannot depend on the queues: the block-row runs the search reports equal its plan, with
    the low levels on 2 of the 4 states (4 model rows) and the rest on all 8."""
    out = tmp_path / "bits.json"
    assert main(["search", "--model", tiny_path, *QUEUE_ONE, "--low-rows", "2", "--out", str(out)]) == 0
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("search cost:")][0]
    results = json.loads((tmp_path / "bits.results.json").read_text())
    compute = results["compute"]
    assert compute["planned_block_row_runs"] == compute["block_row_runs"]
    assert 4 * compute["block_runs"] < compute["block_row_runs"] < 8 * compute["block_runs"]
    assert "x 8 rows (4 at the low levels) =" in printed
    assert results["settings"]["schedule"]["low_rows"] == 2


def test_the_levers_schedule_the_tree_only(tiny_path, tmp_path, capsys):  # noqa: F811
    out = str(tmp_path / "bits.json")
    assert main(["search", "--model", tiny_path, *FAST, "--method", "greedy", "--low-rows", "2", "--out", out]) == 2
    assert "schedule a tree search" in capsys.readouterr().err
    assert main(["search", "--model", tiny_path, *FAST, "--low-queue", "0", "--out", out]) == 2
    assert not (tmp_path / "bits.json").exists()


def test_low_levels_that_change_nothing_resume_a_plain_search(tmp_path):
    """The default search's schedule has low levels (the model's blocks) and nothing scheduled on them: its state
    is a plain search's, so a search started with a plain queue (or before schedules existed) resumes."""
    space, cost = _problem()
    state = tmp_path / "s.state.json"
    plain = tree_search(SpyScorer(), space, cost, 8.0, queue_size=6, state_path=state, progress=False)
    default = Schedule(queue_size=6, low_levels=2)
    assert default.is_plain() and not Schedule(queue_size=6, low_levels=2, low_rows=4).is_plain()
    spy = SpyScorer()
    resumed = tree_search(spy, space, cost, 8.0, queue_size=default, state_path=state, resume=True, progress=False)
    assert resumed.config == plain.config and not spy.segments  # nothing scored again
    assert "schedule" not in json.loads(state.read_text())["settings"]
