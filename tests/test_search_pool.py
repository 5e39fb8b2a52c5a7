"""Forked CPU workers score a search's candidates: the single process's result, the work split, errors raised."""
import copy
import json

import pytest
import torch

from treeq.bits import quantizable_layers, uniform_config
from treeq.ptq.apply import quantize
from treeq.search import pool as pool_module
from treeq.search.cost import cost_model
from treeq.search.objective import ModelObjective
from treeq.search.pool import ForkedPool, auto_workers
from treeq.search.space import SearchSpace
from treeq.search.tree import tree_search

from test_search_objective import calibration
from test_search_tree import CoupledScorer, coupled_problem


@pytest.fixture
def one_thread():
    """Both searches on one thread per process, so their float sums are the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(tiny_dit):
    quantized = quantize(tiny_dit, uniform_config(tiny_dit, 8, 8))
    space = SearchSpace.build(quantizable_layers(tiny_dit), [(4, 4), (3, 3), (8, 8)])
    return quantized, space, cost_model(tiny_dit)


def test_a_pooled_tree_search_equals_one_process(tiny_dit, one_thread):
    quantized, space, cost = _problem(tiny_dit)
    alone_objective = ModelObjective(quantized, calibration(4), 4, readout_blocks=1)
    alone = tree_search(alone_objective, space, cost, 4.0, queue_size=3, progress=False)
    objective = ModelObjective(quantized, calibration(4), 4, readout_blocks=1)
    with ForkedPool([objective], 2) as pool:
        pooled = tree_search(pool.scorer(0), space, cost, 4.0, queue_size=3, progress=False)
    assert pooled.config == alone.config and pooled.metric == alone.metric
    assert json.dumps(pooled.levels) == json.dumps(alone.levels)
    # split, not repeated: the worker scored a share, and its block runs are counted here
    assert sum(pool.scored) == alone.evaluations and 0 < pool.scored[1] < alone.evaluations
    assert objective.block_runs >= alone_objective.block_runs
    assert torch.get_num_threads() == 1  # the pool gives back the threads it found


class FailingScorer(CoupledScorer):
    """Fails on a marked assignment: in a worker when that assignment lies in the worker's share."""

    def score(self, start, end, assignments):
        if any(assignment == ("boom",) for assignment in assignments):
            raise ArithmeticError("the marked assignment")
        return super().score(start, end, assignments)


def test_a_workers_error_is_raised_here_and_the_pool_stays_in_step():
    space, _, _ = coupled_problem()
    good = [(pair,) for pair in space.candidates[0]]
    with ForkedPool([FailingScorer()], 2) as pool:
        with pytest.raises(RuntimeError, match="(?s)search worker 1 failed.*ArithmeticError: the marked assignment"):
            pool.score(0, 0, 1, [good[0], ("boom",)])
        # the failed call's replies were all read: the next call gets its own metrics
        assert pool.score(0, 0, 1, good) == CoupledScorer().score(0, 1, good)


def test_run_search_with_two_workers_equals_one(tiny_dit, tmp_path, monkeypatch, one_thread):
    from treeq.search import run

    monkeypatch.chdir(tmp_path)  # the calibration cache
    recipe = run.Recipe(methods=("rtn",), calibration_images=3, calibration_timesteps=2)
    results = {}
    for workers in (1, 2):
        model = copy.deepcopy(tiny_dit)
        model.sampling = {"sampler": "dpm++", "steps": 4, "cfg_scale": 3.0, "guidance_channels": None,
                          "clip_sample": False, "scheduler": None}
        out = tmp_path / str(workers) / "bits.json"
        results[workers] = run.run_search(recipe, "W4A4", "tss", out=out, model=model, calibration_rows=2,
                                          queue_size=2, low_rows=1, progress=False, workers=workers)
        written = json.loads(out.with_suffix(".results.json").read_text())
        assert written["settings"]["workers"] == workers and written["compute"]["block_runs"] > 0
    assert results[2].config == results[1].config and results[2].metric == results[1].metric


@pytest.mark.parametrize("workers, device, environment, message", [
    (2, "cuda", {}, "forks CPU processes"),
    (2, "cpu", {"WORLD_SIZE": "2"}, "under torchrun"),
    (0, "cpu", {}, "positive int"),
])
def test_workers_a_search_cannot_fork_are_refused_before_loading(workers, device, environment, message, monkeypatch):
    from treeq.search.run import _check_workers

    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        _check_workers(workers, device)
    _check_workers(1, device)  # one worker is this process: always allowed
    _check_workers("auto", device)


def test_auto_workers_follow_threads_memory_device_and_torchrun(monkeypatch):
    monkeypatch.setattr(pool_module.torch, "get_num_threads", lambda: 4)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    free = 64 * 2 ** 30
    monkeypatch.setattr(pool_module.os, "sysconf",
                        lambda name: {"SC_AVPHYS_PAGES": free // 4096, "SC_PAGE_SIZE": 4096}[name])
    assert auto_workers(2 ** 20, "cpu") == 4
    # half of 64 GiB holds two workers of 16 states of 1 GiB each
    assert auto_workers(2 ** 30, "cpu") == 2
    assert auto_workers(2 ** 40, "cpu") == 1
    assert auto_workers(2 ** 20, "cuda") == 1
    monkeypatch.setattr(pool_module.torch, "get_num_threads", lambda: 64)
    assert auto_workers(2 ** 20, "cpu") == pool_module.MAX_AUTO_WORKERS == 8
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert auto_workers(2 ** 20, "cpu") == 1


def test_the_cli_takes_auto_or_a_count(capsys):
    from treeq.cli import main

    assert main(["search", "--workers", "none"]) == 2
    assert "--workers" in capsys.readouterr().err


def test_ctrl_c_is_left_to_the_parent_so_the_workers_stay_in_step():
    import os
    import signal

    space, _, _ = coupled_problem()
    good = [(pair,) for pair in space.candidates[0]]
    expected = CoupledScorer().score(0, 1, good * 2)
    with ForkedPool([CoupledScorer()], 2) as pool:
        assert pool.score(0, 0, 1, good * 2) == expected  # the worker is in its loop
        os.kill(pool._processes[0].pid, signal.SIGINT)
        pool._processes[0].join(timeout=0.5)  # a worker that did not ignore it is gone by now
        assert pool._processes[0].is_alive()
        assert pool.score(0, 0, 1, good * 2) == expected


def test_a_worker_that_is_gone_is_named_not_skipped():
    space, _, _ = coupled_problem()
    good = [(pair,) for pair in space.candidates[0]]
    with ForkedPool([CoupledScorer()], 2) as pool:
        pool._processes[0].kill()
        pool._processes[0].join()
        with pytest.raises(RuntimeError, match="search worker 1 failed:\nthe worker exited without replying"):
            pool.score(0, 0, 1, good * 2)


def test_the_peak_memory_line_names_the_workers_peak():
    from treeq.memory import describe_peak_memory

    with ForkedPool([CoupledScorer()], 2):
        pass  # closing joins the worker: its peak RSS is now the children's
    assert "(a child process: " in describe_peak_memory()
