"""`treeq bench paper` and `treeq bench ablation` on a tiny DiT: every row with the promised columns,
rows kept on disk and shared between the two benches."""
import pytest
import torch

import treeq.bench.paper as paper
from treeq.bits import preset_config
from treeq.ptq.apply import quantize
from treeq.finetune.distill import FinetuneConfig
from treeq.ptq.recipe import Recipe

TINY_FINETUNE = FinetuneConfig(steps=2, batch_size=4, checkpoint_every=1)


@pytest.fixture
def tiny_bench(tiny_dit, tmp_path, monkeypatch):
    """The bench on the tiny model: 8 training digits, short trajectories, searches faked."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paper, "load", lambda name: tiny_dit)
    monkeypatch.setattr(paper, "mnist", lambda split: (torch.rand(8, 1, 32, 32) * 2 - 1, torch.arange(8) % 10))
    monkeypatch.setattr(paper, "generate", lambda model, n, seed, progress: _generate(model, n, seed))
    small = {name: (_small(recipe), search) for name, (recipe, search) in paper.ROWS.items()}
    monkeypatch.setattr(paper, "ROWS", small)
    monkeypatch.setattr(paper, "SEARCH_RECIPE", small["treeq"][0])
    searches = []

    def searched(target, method, folder, recipe, name, **options):  # a mixed configuration, as a search gives
        searches.append((name, recipe.methods, options))
        config = preset_config(tiny_dit, target)
        config["blocks.0.mlp.fc1"] = {"w_bits": 8, "a_bits": 8}
        return config, {"seconds": 1.5}
    monkeypatch.setattr(paper, "searched", searched)
    return tmp_path / "bench-paper", searches


def _small(recipe):
    return recipe.__class__(**{**recipe.to_dict(), "calibration_images": 4, "calibration_timesteps": 2})


def _generate(model, num_samples, seed):
    from treeq.testbed.experiment import generate
    return generate(model, num_samples, seed, progress=False, steps=2)


def test_rows_cover_every_setting_regime_and_method(tiny_bench):
    folder, searches = tiny_bench
    rows = paper.bench_paper(targets=("W4A4",), methods=("rtn", "svdquant", "treeq+gmb"), num_samples=10,
                             finetune=TINY_FINETUNE, folder=folder)
    assert [(r["setting"], r["regime"], r["method"]) for r in rows] == [("FP32", "ptq", "fp")] + [
        ("W4A4", regime, method) for regime in ("ptq", "peft") for method in ("rtn", "svdquant", "treeq+gmb")]
    assert all({"setting", "regime", "method", *paper.COLUMNS, "size_mb", "seconds"} <= set(r) for r in rows)
    fp_size, rtn_size = rows[0]["size_mb"], rows[1]["size_mb"]
    assert rtn_size < fp_size  # 4-bit weights
    assert rows[4]["size_mb"] > rtn_size and rows[4]["branch_params"] > 0 == rows[1]["branch_params"]  # LoRA
    assert [s[:2] for s in searches] == [("W4A4-tss-gmb", ("hadamard", "monarch", "gptq"))] * 2  # with its branch
    assert rows[3]["seconds"] > 1.5 and (folder / "W4A4-treeq+gmb-peft").is_dir()


def test_finished_rows_are_read_back_not_remade(tiny_bench, monkeypatch):
    folder, _ = tiny_bench
    first = paper.bench_paper(targets=("W3A3",), regimes=("ptq",), methods=("rtn",), num_samples=10, folder=folder)
    def made_again(*args, **kwargs):
        raise RuntimeError("a kept row was made again")
    monkeypatch.setattr(paper, "quantize", made_again)
    assert paper.bench_paper(targets=("W3A3",), regimes=("ptq",), methods=("rtn",), num_samples=10,
                             folder=folder) == first
    with pytest.raises(RuntimeError, match="made again"):  # other samples: the row is made anew
        paper.bench_paper(targets=("W3A3",), regimes=("ptq",), methods=("rtn",), num_samples=12, folder=folder)


def test_ablation_rows_share_the_paper_rows_and_compare_branches_at_equal_parameters(tiny_bench):
    folder, searches = tiny_bench
    rows = paper.bench_ablation(targets=("W3A3",), num_samples=10, finetune=TINY_FINETUNE, folder=folder)
    assert [(r["ablation"], r["variant"], r["regime"]) for r in rows] == [
        ("branch", "none", "ptq"), ("branch", "lowrank", "ptq"), ("branch", "lowrank", "peft"),
        ("branch", "monarch", "ptq"), ("branch", "monarch", "peft"),
        ("queue_size", "4", "ptq"), ("queue_size", "8", "ptq"), ("queue_size", "16", "ptq")] + [
        ("env_bits", e, regime) for e in ("2", "3", "8", "32") for regime in ("ptq", "peft")]
    branch = {(r["variant"], r["regime"]): r for r in rows if r["ablation"] == "branch"}
    assert branch["none", "ptq"]["branch_params"] == 0
    lowrank, monarch = branch["lowrank", "ptq"]["branch_params"], branch["monarch", "ptq"]["branch_params"]
    assert lowrank > 0 and monarch > 0 and 0.5 < monarch / lowrank < 2  # the same parameter share
    assert (folder / "rows" / "W3A3-peft-treeq.json").exists()  # low-rank PEFT is the paper's TreeQ PEFT row
    options = [s[2] for s in searches]
    assert {"queue_size": 4} in options and {"queue_size": 8} in options
    assert {"env_bits": 2} in options and {"env_bits": 32} in options and {"env_bits": 3} not in options
    chosen = paper.bench_ablation(targets=("W3A3",), ablations=("env_bits",), regimes=("peft",), num_samples=10,
                                  finetune=TINY_FINETUNE, folder=folder)
    assert chosen == [row for row in rows if row["ablation"] == "env_bits" and row["regime"] == "peft"]


def test_size_counts_quantized_weights_at_their_bits(tiny_dit):
    fp = paper.model_size_mb(tiny_dit)
    w4 = paper.model_size_mb(quantize(tiny_dit, preset_config(tiny_dit, "W4A4"), Recipe()))
    w8 = paper.model_size_mb(quantize(tiny_dit, preset_config(tiny_dit, "W8A8"), Recipe()))
    weights = sum(tiny_dit.get_submodule(name).weight.numel() for name in preset_config(tiny_dit, "W4A4"))
    assert fp - w4 == pytest.approx(weights * 28 / 8 / 2 ** 20) and w8 - w4 == pytest.approx(weights * 4 / 8 / 2 ** 20)


def test_settings_flag_splits_the_paper_bench_and_leaves_other_defaults():
    from treeq.cli import _BENCHES, build_parser

    def arguments(*argv):
        args = build_parser().parse_args(["bench", *argv])
        return _BENCHES[args.which][2](args)
    assert arguments("paper", "--settings", "W3A3")["targets"] == ("W3A3",)
    assert arguments("ablation", "--settings", "W4A4,W3A3")["targets"] == ("W4A4", "W3A3")
    assert "targets" not in arguments("paper") and "settings" not in arguments("ptq")
    assert arguments("ptq", "--settings", "W8A8")["settings"] == ("W8A8",)
