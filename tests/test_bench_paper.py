"""`treeq bench paper` on a tiny DiT: every (setting, regime, method) row with the promised columns."""
import pytest
import torch

import treeq.bench.paper as paper
from treeq.bits import preset_config
from treeq.quant.apply import quantize
from treeq.quant.finetune import FinetuneConfig
from treeq.quant.recipe import Recipe


@pytest.fixture
def tiny_bench(tiny_dit, tmp_path, monkeypatch):
    """The bench on the tiny model: 8 training digits, short trajectories, searches in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paper, "load", lambda name: tiny_dit)
    monkeypatch.setattr(paper, "mnist", lambda split: (torch.rand(8, 1, 32, 32) * 2 - 1, torch.arange(8) % 10))
    monkeypatch.setattr(paper, "generate", lambda model, n, seed, progress: _generate(model, n, seed))
    small = {name: (recipe.__class__(**{**recipe.to_dict(), "calibration_images": 4, "calibration_timesteps": 2}),
                    method) for name, (recipe, method) in paper.METHODS.items()}
    monkeypatch.setattr(paper, "METHODS", small)
    monkeypatch.setattr(paper, "SEARCH_RECIPE", small["treeq"][0])
    searches = []

    def searched(target, method, folder, recipe, name):  # a mixed configuration, as a search would return
        searches.append((name, recipe.methods))
        config = preset_config(tiny_dit, target)
        config["blocks.0.mlp.fc1"] = {"w_bits": 8, "a_bits": 8}
        return config, {"seconds": 1.5}
    monkeypatch.setattr(paper, "searched", searched)
    return tmp_path, searches


def _generate(model, num_samples, seed):
    from treeq.experiment import generate
    return generate(model, num_samples, seed, progress=False, steps=2)


def test_rows_cover_every_setting_regime_and_method(tiny_bench):
    folder, searches = tiny_bench
    rows = paper.bench_paper(targets=("W4A4",), methods=("rtn", "svdquant", "treeq+gmb"), num_samples=10,
                             finetune=FinetuneConfig(steps=2, batch_size=4, checkpoint_every=1),
                             folder=folder / "bench-paper")
    assert [(r["setting"], r["regime"], r["method"]) for r in rows] == [("FP32", "ptq", "fp")] + [
        ("W4A4", regime, method) for regime in ("ptq", "peft") for method in ("rtn", "svdquant", "treeq+gmb")]
    assert all(set(r) == {"setting", "regime", "method", *paper.COLUMNS, "size_mb", "seconds"} for r in rows)
    fp_size, rtn_size = rows[0]["size_mb"], rows[1]["size_mb"]
    assert rtn_size < fp_size  # 4-bit weights
    assert rows[4]["size_mb"] > rtn_size  # PEFT rtn carries a LoRA branch
    assert searches == [("W4A4-tss-gmb", ("hadamard", "monarch", "gptq"))] * 2  # searched with its branch
    assert rows[3]["seconds"] > 1.5 and (folder / "bench-paper" / "W4A4-treeq+gmb-peft").is_dir()


def test_size_counts_quantized_weights_at_their_bits(tiny_dit):
    fp = paper.model_size_mb(tiny_dit)
    w4 = paper.model_size_mb(quantize(tiny_dit, preset_config(tiny_dit, "W4A4"), Recipe()))
    w8 = paper.model_size_mb(quantize(tiny_dit, preset_config(tiny_dit, "W8A8"), Recipe()))
    weights = sum(tiny_dit.get_submodule(name).weight.numel() for name in preset_config(tiny_dit, "W4A4"))
    assert fp - w4 == pytest.approx(weights * 28 / 8 / 2 ** 20) and w8 - w4 == pytest.approx(weights * 4 / 8 / 2 ** 20)
