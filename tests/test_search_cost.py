"""A tree search's cost, said before it scores: the printed block-row runs are what the finished search ran
(where the count cannot depend on what the queues keep), --max-cost / max_cost refuse a search above them
before anything is quantized, and image equivalents follow each family's sampling settings."""
import json
import os
import subprocess
import sys

import pytest

import treeq
from treeq.bits import uniform_config
from treeq.cli import main
from treeq.models import shapes
from treeq.models.adapters import adapter_for
from treeq.models.adapters.dit import DiTAdapter
from treeq.models.checkpoint import save_model
from treeq.models.families import init_pipeline_folder
from treeq.models.load import load
from treeq.ptq.apply import quantize
from treeq.ptq.calibration import collect_calibration, load_or_record_states, spread_rows
from treeq.ptq.recipe import Recipe
from treeq.search.cost import cost_model
from treeq.search.estimate import estimate_tree_search, image_block_rows
from treeq.search.objective import ModelObjective
from treeq.search.space import SearchSpace
from treeq.search.tree import tree_search

FAST = ["--candidates", "4,4 3,3 8,8", "--calibration-rows", "4", "--calibration-images", "2",
        "--calibration-timesteps", "4"]
# The tiny DiT's search at queue 1 and 8 bits (nothing pruned; a merge scores its one candidate from its
# segment's first block): leaves 5 x 3 x 2 blocks (block 0) + 5 x 3 x 1 (block 1), merges 16 -> 61 block runs,
# on 4 guided states (8 rows); an image is 2 blocks x 20 steps x 2 rows (the testbed's sampling).
QUEUE_ONE = ["--target", "8", *FAST, "--queue-size", "1"]
BLOCK_RUNS, ROWS, IMAGE = 61, 8, 80


@pytest.fixture
def tiny_path(tiny_dit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the calibration cache goes to ./runs
    save_model(tiny_dit, tmp_path / "tiny")
    return str(tmp_path / "tiny.safetensors")


def _no_quantizing(monkeypatch):
    """quantize patched to fail; treeq.ptq.run imported first, so that its own binding of quantize is the real
    one after this test (a first import while patched kept the failing one for every later test)."""
    import treeq.ptq.apply as apply
    import treeq.ptq.run  # noqa: F401

    def fail(*args, **kwargs):
        raise AssertionError("quantized a search above its --max-cost")
    monkeypatch.setattr(apply, "quantize", fail)


def test_the_printed_cost_is_what_the_finished_search_ran(tiny_path, tmp_path, capsys):
    out = tmp_path / "bits.json"
    assert main(["search", "--model", tiny_path, *QUEUE_ONE, "--out", str(out)]) == 0
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("search cost:")]
    compute = json.loads((tmp_path / "bits.results.json").read_text())["compute"]
    assert compute["block_runs"] == BLOCK_RUNS and compute["rows"] == ROWS and compute["image_block_rows"] == IMAGE
    assert compute["planned_block_row_runs"] == compute["block_row_runs"] == BLOCK_RUNS * ROWS
    assert compute["image_equivalents"] == pytest.approx(BLOCK_RUNS * ROWS / IMAGE)
    assert len(printed) == 1 and (f"about {BLOCK_RUNS} block runs x {ROWS} rows = {BLOCK_RUNS * ROWS} block-row runs "
                                  f"= {BLOCK_RUNS * ROWS / IMAGE:.1f} image equivalents") in printed[0]
    assert "s per image equivalent here" in printed[0]


def test_the_estimate_counts_the_blocks_the_scorer_runs(tiny_dit, tmp_path, monkeypatch):
    """The scorer's real run_blocks calls: equal to the estimate where the queues cannot matter (queue 1, nothing
    pruned), at most it where pruning and shared prefixes save runs (queue 3 at W4A4)."""
    monkeypatch.chdir(tmp_path)
    recipe = Recipe(methods=("rtn",), activations="dynamic-asym", switch_bits=((3, 3), (4, 4), (8, 8)),
                    calibration_images=2, calibration_timesteps=4)
    states = spread_rows(load_or_record_states(tiny_dit, **recipe.calibration_options()), 4, tiny_dit)
    model = quantize(tiny_dit, uniform_config(tiny_dit, 8, 8), recipe)
    space = SearchSpace.build(list(uniform_config(tiny_dit, 8, 8)), ((4, 4), (3, 3), (8, 8)))
    calls = []
    original = DiTAdapter.run_blocks
    monkeypatch.setattr(DiTAdapter, "run_blocks",
                        lambda self, m, state, start, end: calls.append(end - start) or original(self, m, state, start, end))
    for queue, target, equal in ((1, 8.0, True), (3, 4.0, False)):
        objective = ModelObjective(model, states, 8, readout_blocks=1)
        estimate = estimate_tree_search(objective, space, queue)
        objective.entering(objective.depth - 1)  # the environment cache filled: what follows is scoring
        calls.clear()
        tree_search(objective, space, cost_model(model), target, queue_size=queue, progress=False)
        assert objective.block_runs == sum(calls)  # one batch of rows: a call is a block run
        assert (sum(calls) == estimate["block_runs"]) if equal else (0.75 * estimate["block_runs"] <= sum(calls)
                                                                      <= estimate["block_runs"])
        assert estimate["block_row_runs"] == estimate["block_runs"] * ROWS


def test_max_cost_below_the_cost_refuses_before_quantizing(tiny_path, tmp_path, monkeypatch, capsys):
    _no_quantizing(monkeypatch)
    out = tmp_path / "search" / "bits.json"
    assert main(["search", "--model", tiny_path, *QUEUE_ONE, "--max-cost", "6", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == ("treeq: error: the search would cost about 6.1 image equivalents (488 block-row runs), above "
                     "--max-cost 6 (a smaller queue or fewer calibration rows cost less)")
    assert not out.parent.exists()


def test_max_cost_above_the_cost_searches(tiny_path, tmp_path):
    out = tmp_path / "bits.json"
    assert main(["search", "--model", tiny_path, *QUEUE_ONE, "--max-cost", "6.2", "--out", str(out)]) == 0
    assert out.exists()


def test_quantize_target_takes_the_ceiling(tiny_path, tmp_path, monkeypatch, capsys):
    _no_quantizing(monkeypatch)
    argv = ["quantize", "--model", tiny_path, "--target", "W4A4", "--queue-size", "1", "--calibration-images", "4",
            "--calibration-timesteps", "4", "--max-cost", "1", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "above --max-cost 1 " in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_ceiling_is_positive_and_bounds_the_tree_search_only(tiny_path, tmp_path, capsys):
    out = str(tmp_path / "bits.json")
    assert main(["search", "--model", tiny_path, *FAST, "--max-cost", "0", "--out", out]) == 2
    assert "--max-cost: expected finite number > 0, got 0" in capsys.readouterr().err
    assert main(["search", "--model", tiny_path, *FAST, "--method", "greedy", "--max-cost", "5", "--out", out]) == 2
    assert "--max-cost bounds a tree search" in capsys.readouterr().err


def test_search_bits_refuses_above_max_cost_and_reports_what_a_family_ran(tmp_path, monkeypatch):
    """A text-to-image family: its scored rows are trajectory states of two model rows (both halves of the guided
    batch), an image is blocks x steps x 2 rows at the folder's guidance; the printed plan equals the run at
    queue 1 and 8 bits."""
    monkeypatch.chdir(tmp_path)
    model = load(init_pipeline_folder("pixart", tmp_path / "pixart"))
    calibration = collect_calibration(model, num_images=1, num_timesteps=2)
    options = dict(recipe=Recipe(methods=("rtn",), activations="dynamic-asym"), candidates="4,4 8,8", queue_size=1,
                   calibration_rows=2)
    with pytest.raises(ValueError, match="above --max-cost 0.01 "):
        treeq.search_bits(model, calibration, "8", out=tmp_path / "refused.json", max_cost=0.01, **options)
    assert not (tmp_path / "refused.json").exists()
    treeq.search_bits(model, calibration, "8", out=tmp_path / "bits.json", max_cost=1e6, **options)
    compute = json.loads((tmp_path / "bits.results.json").read_text())["compute"]
    assert compute["planned_block_row_runs"] == compute["block_row_runs"] > 0 and compute["rows"] == 2 * 2
    blocks = len(adapter_for(model).block_names(model))
    assert compute["image_block_rows"] == blocks * 4 * 2  # 4 steps, guidance 4.5 doubling the batch


@pytest.mark.parametrize("name, doubled", [("pixart", 2), ("sd3", 2), ("flux", 1), ("sana", 2), ("wan", 2)])
def test_an_image_is_blocks_times_steps_times_the_guided_rows(name, doubled):
    """FLUX embeds its guidance (one row a call); the others double the batch above cfg 1, none at 1."""
    model = shapes.meta_transformer(name, "full")
    blocks = len(adapter_for(model).block_names(model))
    steps = model.sampling["steps"]
    assert image_block_rows(model) == blocks * steps * doubled
    assert image_block_rows(model, {"cfg_scale": 1.0, "steps": 2}) == blocks * 2
    del model.sampling  # a transformer diffusers loaded itself: the family's published settings
    assert image_block_rows(model) == blocks * steps * doubled


def test_treeq_search_imports_no_benchmark(tiny_path, tmp_path):
    """The estimate's helpers live in models/ and search/, not in treeq.bench."""
    code = ("import sys; from treeq.cli import main; "
            f"assert main(['search', '--model', {tiny_path!r}, *{QUEUE_ONE!r}, '--out', 'bits.json']) == 0; "
            "assert not [name for name in sys.modules if name.startswith('treeq.bench')], 'bench imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "bits.json").exists()


def test_our_dit_guides_at_every_cfg_scale_but_one(tiny_dit):
    assert image_block_rows(tiny_dit) == 2 * 20 * 2  # the testbed's DPM-Solver++, 20 steps, cfg 4
    assert image_block_rows(tiny_dit, {"cfg_scale": 0.0}) == 2 * 20 * 2  # unconditional still runs both rows
    assert image_block_rows(tiny_dit, {"cfg_scale": 1.0, "steps": 5}) == 2 * 5
    assert image_block_rows(tiny_dit, {"sampler": "ddpm", "steps": 250}) == 2 * 250 * 2


def _search_on_rank(rank, folder, port, argv):
    """One torchrun-like rank of `treeq search` (gloo on the CPU)."""
    import torch.distributed as dist

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.chdir(folder)
    try:
        assert main(argv) == 0
    finally:
        dist.destroy_process_group()


def test_two_ranks_report_the_block_runs_of_both(tiny_path, tmp_path):
    """Each rank scores its share of every node; the results count them together: at queue 1 each leaf candidate
    starts at its block wherever it is scored, so the two ranks ran what one process runs."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["search", "--model", tiny_path, *QUEUE_ONE, "--device", "cpu", "--out", "bits.json"]
    mp.spawn(_search_on_rank, args=(tmp_path, port, argv), nprocs=2, join=True)
    compute = json.loads((tmp_path / "bits.results.json").read_text())["compute"]
    assert compute["block_runs"] == BLOCK_RUNS and compute["planned_block_row_runs"] == BLOCK_RUNS * ROWS
