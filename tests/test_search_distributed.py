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
