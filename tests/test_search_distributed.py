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


def _record(rank, world_size, folder, model_path):
    import torch

    from treeq.models.load import load
    from treeq.ptq.calibration import load_or_collect, load_or_record_states

    store = dist.FileStore(str(folder / "record-store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        model = load(model_path)
        rows = _count_rows(model)
        options = {"num_images": 3, "num_timesteps": 2}  # 3 images over 2 ranks: shares of 2 and 1
        calibration = load_or_collect(model, folder / "cache", **options)
        states = load_or_record_states(model, folder / "cache", **options)
        torch.save({"calibration": calibration.to_dict() if hasattr(calibration, "to_dict") else list(calibration),
                    "states": states.to_dict(), "files": sorted(p.name for p in (folder / "cache").iterdir()),
                    "rows": rows[0]}, folder / f"recorded{rank}.pt")
    finally:
        dist.destroy_process_group()


def _count_rows(model):
    """A counter of the rows every forward of `model` runs (its first input's batch)."""
    rows = [0]

    def count(module, args, kwargs):
        rows[0] += len(args[0] if args else kwargs["hidden_states"])
    model.register_forward_pre_hook(count, with_kwargs=True)
    return rows


def _tensors(value):
    import torch
    if torch.is_tensor(value):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [tensor for item in items for tensor in _tensors(item)]


def _close_sensitivity(a, b):
    """J (the states' last tensor) is a central difference of 1e-2 of latents that reach hundreds on a random
    model: float32 rounding of the step moves it by about 1e-3 of its scale when the batch differs."""
    import torch
    return torch.allclose(a.float(), b.float(), atol=1e-2 * a.abs().max().item())


def test_calibration_recording_splits_over_ranks_and_joins_as_one_process(tmp_path, tiny_dit):
    """Each of 2 gloo ranks records its share of the calibration images (the DiT's sampler, a tiny PixArt's
    pipeline), the shares are joined step by step, and the set and its trajectory states are one process's;
    rank 0 alone writes the cache."""
    import torch

    from treeq.models.checkpoint import save_model
    from treeq.models.families import init_pipeline_folder
    from treeq.models.load import load
    from treeq.ptq.calibration import load_or_collect, load_or_record_states

    save_model(tiny_dit, tmp_path / "dit")
    for name, path in (("dit", str(tmp_path / "dit.safetensors")),
                       ("pixart", str(init_pipeline_folder("pixart", tmp_path / "pixart")))):
        folder = tmp_path / f"{name}-recorded"
        folder.mkdir()
        model = load(path)
        rows = _count_rows(model)
        alone = {"calibration": load_or_collect(model, folder / "alone", num_images=3, num_timesteps=2),
                 "states": load_or_record_states(model, folder / "alone", num_images=3, num_timesteps=2)}
        mp.spawn(_record, args=(2, folder, path), nprocs=2, join=True)
        shares = [torch.load(folder / f"recorded{rank}.pt", weights_only=False)["rows"] for rank in range(2)]
        assert sum(shares) == rows[0] and shares[0] == 2 * shares[1]  # split 2 + 1 images, not repeated
        expected = [_tensors(v.to_dict() if hasattr(v, "to_dict") else list(v)) for v in alone.values()]
        for rank in range(2):
            recorded = torch.load(folder / f"recorded{rank}.pt", weights_only=False)
            got = [_tensors(recorded[key]) for key in ("calibration", "states")]
            for want, have in zip(expected, got):
                assert len(want) == len(have) > 0
                for a, b in zip(want, have):  # batches of 3 against 2 + 1 images: float rounding at most
                    assert a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5) or (
                        a is want[-1] and _close_sensitivity(a, b)), (a.float() - b.float()).abs().max()
            assert len(recorded["files"]) == 2
