"""Candidates split across 2 CPU ranks (gloo) give the single-process result; only rank 0 writes files."""
import json

import torch.distributed as dist
import torch.multiprocessing as mp

from treeq.search.distributed import DistributedScorer
from treeq.search.tree import tree_search

from test_search_tree import CoupledScorer, coupled_problem


class CountingScorer(CoupledScorer):
    def __init__(self):
        super().__init__()
        self.scored = 0

    def score(self, start, end, assignments):
        self.scored += len(assignments)
        return super().score(start, end, assignments)


def _search(rank, world_size, folder):
    store = dist.FileStore(str(folder / "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        space, cost, target = coupled_problem()
        local = CountingScorer()
        result = tree_search(DistributedScorer(local), space, cost, target, queue_size=3, progress=False, chunk_size=5,
                             state_path=folder / f"state{rank}.json", log_path=folder / f"log{rank}.jsonl")
        summary = {"config": result.config, "metric": result.metric, "evaluations": result.evaluations,
                   "levels": result.levels, "scored_here": local.scored}
        (folder / f"result{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    space, cost, target = coupled_problem()
    alone = tree_search(CoupledScorer(), space, cost, target, queue_size=3, progress=False)
    mp.spawn(_search, args=(2, tmp_path), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["config"] == alone.config and result["metric"] == alone.metric
        assert result["evaluations"] == alone.evaluations
        assert result["levels"] == json.loads(json.dumps(alone.levels))
    # The work was split, not repeated.
    assert sum(r["scored_here"] for r in results) == alone.evaluations
    assert 0 < results[1]["scored_here"] < alone.evaluations
    assert (tmp_path / "state0.json").exists() and (tmp_path / "log0.jsonl").exists()
    assert not (tmp_path / "state1.json").exists() and not (tmp_path / "log1.jsonl").exists()


def _family_search(rank, world_size, folder, pipeline):
    import dataclasses

    from treeq.models.load import load
    from treeq.ptq.calibration import collect_calibration
    from treeq.search.run import SEARCH_RECIPE, run_search

    import os
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank))  # what torchrun sets: run_search reads it
    store = dist.FileStore(str(folder / "family-store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        model = load(pipeline)
        recipe = dataclasses.replace(SEARCH_RECIPE, model=str(pipeline))
        result = run_search(recipe, "W4A4", "tss", out=folder / "ranks" / "bits.json", queue_size=2,
                            calibration_rows=4, low_rows=2, model=model, progress=False,
                            calibration=collect_calibration(model, num_images=2, num_timesteps=2))
        (folder / f"family{rank}.json").write_text(json.dumps({"config": result.config, "metric": result.metric}))
    finally:
        dist.destroy_process_group()


def test_a_familys_search_on_two_ranks_equals_one_process(tmp_path):
    """A tiny PixArt's tree search, candidates split over 2 gloo ranks (its low levels' scorer too, on 2 of the
    4 states): the single process's configuration."""
    import dataclasses

    from treeq.models.families import init_pipeline_folder
    from treeq.models.load import load
    from treeq.ptq.calibration import collect_calibration
    from treeq.search.run import SEARCH_RECIPE, run_search

    pipeline = init_pipeline_folder("pixart", tmp_path / "pixart")
    model = load(pipeline)
    alone = run_search(dataclasses.replace(SEARCH_RECIPE, model=str(pipeline)), "W4A4", "tss",
                       out=tmp_path / "alone" / "bits.json", queue_size=2, calibration_rows=4, low_rows=2, model=model,
                       progress=False, calibration=collect_calibration(model, num_images=2, num_timesteps=2))
    mp.spawn(_family_search, args=(2, tmp_path, pipeline), nprocs=2, join=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"family{rank}.json").read_text())
        assert result["config"] == alone.config and abs(result["metric"] - alone.metric) <= 1e-6 * abs(alone.metric)
    assert json.loads((tmp_path / "ranks" / "bits.results.json").read_text())["compute"]["block_runs"] > 0
