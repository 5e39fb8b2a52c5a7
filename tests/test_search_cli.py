"""`treeq search` in-process on a tiny model: writes bits.json, state, log, results and plots; bad input exits 2."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from treeq.bits import average_bits, load_config, validate_config
from treeq.cli import main
from treeq.models.checkpoint import save_model

FAST = ["--candidates", "4,4 3,3 8,8", "--calibration-rows", "4", "--queue-size", "2"]


@pytest.fixture
def tiny_path(tiny_dit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the calibration cache goes to ./runs
    save_model(tiny_dit, tmp_path / "tiny")
    return str(tmp_path / "tiny.safetensors")


def test_tree_search_writes_its_files(tiny_dit, tiny_path, tmp_path):
    out = tmp_path / "search" / "bits.json"
    assert main(["search", "--model", tiny_path, "--method", "tss", *FAST, "--out", str(out)]) == 0
    config = load_config(out)
    validate_config(config, tiny_dit)
    assert len(config) == 10 and average_bits(config, tiny_dit) <= 4.0 + 1e-9
    results = json.loads((tmp_path / "search" / "bits.results.json").read_text())
    assert results["method"] == "tss" and results["evaluations"] > 0 and results["settings"]["env_bits"] == 4
    lines = (tmp_path / "search" / "bits.log.jsonl").read_text().splitlines()
    assert len(lines) == results["evaluations"]
    assert (tmp_path / "search" / "bits.state.json").exists()
    assert (tmp_path / "search" / "bits-front.png").stat().st_size > 0
    assert (tmp_path / "search" / "bits-tss-level0.png").stat().st_size > 0
    # --resume on a finished search scores nothing more and gives the same bits.
    assert main(["search", "--model", tiny_path, "--method", "tss", *FAST, "--out", str(out), "--resume"]) == 0
    assert load_config(out) == config


@pytest.mark.parametrize("method", ["ilp", "greedy", "uniform", "random"])
def test_baselines_write_a_valid_config(tiny_dit, tiny_path, tmp_path, method):
    out = tmp_path / f"{method}.json"
    argv = ["search", "--model", tiny_path, "--method", method, *FAST, "--evaluations", "5", "--out", str(out)]
    assert main(argv) == 0
    assert average_bits(load_config(out), tiny_dit) <= 4.0 + 1e-9
    lines = (tmp_path / f"{method}.log.jsonl").read_text().splitlines()
    results = json.loads((tmp_path / f"{method}.results.json").read_text())
    assert len(lines) == results["evaluations"] and json.loads(lines[-1])["metric"] >= 0


def test_impossible_budget_is_one_line_and_exit_2(tiny_path, tmp_path, capsys):
    assert main(["search", "--model", tiny_path, "--target", "2.5", *FAST, "--out", str(tmp_path / "b.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("treeq: error:") and "lowest achievable 3.000" in error and "\n" not in error
    assert main(["search", "--model", tiny_path, "--candidates", "4,4 9,9", "--out", str(tmp_path / "b.json")]) == 2


def test_bench_search_reuses_a_finished_search(tiny_path, tmp_path, monkeypatch):
    import treeq.bench.search as bench
    from treeq.ptq.recipe import Recipe
    recipe = Recipe(model=tiny_path, calibration_images=8, calibration_timesteps=2)  # 16 states
    config, summary = bench.searched("W4A4", "uniform", tmp_path, recipe=recipe)
    assert summary["method"] == "uniform" and set(config) and summary["evaluations"] > 0
    monkeypatch.setattr(bench, "run_search", lambda *a, **k: pytest.fail("searched again"))
    assert bench.searched("W4A4", "uniform", tmp_path, recipe=recipe) == (config, summary)


def test_too_many_scored_rows_are_refused_before_quantizing(tiny_path, tmp_path, monkeypatch, capsys):
    import treeq.ptq.apply as apply

    def fail(*args, **kwargs):
        raise AssertionError("quantized before checking --calibration-rows")
    monkeypatch.setattr(apply, "quantize", fail)
    argv = ["search", "--model", tiny_path, *FAST[:2], "--calibration-images", "2", "--calibration-timesteps", "2",
            "--calibration-rows", "9", "--out", str(tmp_path / "b.json")]
    assert main(argv) == 2  # more than even a guided set could hold: before loading
    assert "9 calibration rows to score (and refine on) need more than the 4" in capsys.readouterr().err
    assert main(argv[:-4] + ["--calibration-rows", "5", "--out", str(tmp_path / "b.json")]) == 2  # 4 states
    assert "calibration_rows must be in 1..4, got 5" in capsys.readouterr().err


def test_search_reports_its_peak_memory(tiny_path, tmp_path, capsys):
    argv = ["search", "--model", tiny_path, "--method", "uniform", *FAST, "--device", "cpu",
            "--out", str(tmp_path / "u.json")]
    assert main(argv) == 0
    assert "peak memory: RSS" in capsys.readouterr().out


def test_random_configurations_for_the_rank_bench_meet_their_cost(tiny_dit):
    import random

    from treeq.bench.search import _random_config, env_settings
    candidates = ((3, 3), (4, 4), (8, 8))
    for bits in (3.5, 4.0, 6.0):
        config = _random_config(tiny_dit, candidates, bits, random.Random(0))
        validate_config(config, tiny_dit)
        assert bits - 1.5 < average_bits(config, tiny_dit) <= bits
        assert {(e["w_bits"], e["a_bits"]) for e in config.values()} <= set(candidates)
    assert env_settings("W3A3") == (2, 3, 8, 32) and env_settings("W4A4") == (3, 4, 8, 32)


def test_refine_sweeps_follow_the_search(tiny_dit, tiny_path, tmp_path):
    out = tmp_path / "refined.json"
    argv = ["search", "--model", tiny_path, "--method", "uniform", *FAST, "--refine-sweeps", "1", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "refined.results.json").read_text())
    assert results["method"] == "uniform+refine" and results["settings"]["refine_sweeps"] == 1
    assert results["evaluations"] > 3 and average_bits(load_config(out), tiny_dit) <= 4.0 + 1e-9


def test_seed_ilp_runs_the_integer_program_first_and_the_tree_ends_at_or_below_it(tiny_dit, tiny_path, tmp_path):
    # the seed: the integer program on sensitivities read at the model output
    assert main(["search", "--model", tiny_path, "--method", "ilp", "--readout-blocks", "-1", *FAST, "--out",
                 str(tmp_path / "ilp.json")]) == 0
    out = tmp_path / "seeded.json"
    assert main(["search", "--model", tiny_path, "--method", "tss", *FAST, "--seed-ilp", "--out", str(out)]) == 0
    seeded = json.loads((tmp_path / "seeded.results.json").read_text())
    ilp = json.loads((tmp_path / "ilp.results.json").read_text())
    ilp_lines = (tmp_path / "seeded.ilp.log.jsonl").read_text().splitlines()
    tree_lines = (tmp_path / "seeded.log.jsonl").read_text().splitlines()
    assert seeded["method"] == "tss+ilp" and seeded["settings"]["seed_ilp"] is True
    assert len(ilp_lines) == ilp["evaluations"] and seeded["evaluations"] == len(ilp_lines) + len(tree_lines)
    assert seeded["metric"] <= ilp["metric"] + 1e-12 and average_bits(load_config(out), tiny_dit) <= 4.0 + 1e-9
    assert main(["search", "--model", tiny_path, "--method", "ilp", *FAST, "--seed-ilp", "--out", str(out)]) == 2


def test_held_out_rows_are_apart_from_the_scored_and_the_refined_ones(tiny_dit):
    from treeq.ptq.calibration import split_rows
    rows = torch.arange(40).float()
    calibration = (rows[:, None], rows, rows.long())  # a DiT's (x_t, t, y): the row number in each part
    scored, refined, held_out = split_rows(calibration, (8, 6), tiny_dit)
    parts = [set(part[1].tolist()) for part in (scored, refined, held_out)]
    assert [len(part) for part in parts] == [8, 6, 26]
    assert set().union(*parts) == set(range(40)) and sum(map(len, parts)) == 40
    assert scored[1].tolist() == torch.linspace(0, 39, 8).round().tolist()  # the search's rows, as before
    with pytest.raises(ValueError, match=r"refine_rows must be in 1..32 \(the rows the search does not score\)"):
        split_rows(calibration, (8, 33), tiny_dit)


def test_a_search_reports_its_error_on_rows_it_did_not_score(tiny_path, tmp_path):
    from treeq.models.load import load
    from treeq.ptq.apply import quantize
    from treeq.ptq.calibration import load_or_collect, load_or_record_states, split_rows
    from treeq.search.objective import output_error
    from treeq.search.run import SEARCH_RECIPE
    out = tmp_path / "r.json"
    argv = ["search", "--model", tiny_path, "--method", "tss", *FAST, "--calibration-images", "2",
            "--calibration-timesteps", "4", "--refine-sweeps", "1", "--refine-rows", "2", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads(out.with_suffix(".results.json").read_text())
    assert results["settings"]["refine_rows"] == 2
    # The figure is the chosen bits' objective on the two trajectory states neither scored nor refined on.
    recipe = replace(SEARCH_RECIPE, model=tiny_path, calibration_images=2, calibration_timesteps=4)
    model = load(tiny_path)
    calibration = load_or_collect(model, **recipe.calibration_options())
    states = load_or_record_states(model, **recipe.calibration_options())
    *_, held_out = split_rows(states, (4, 2), model)
    assert results["held_out_rows"] == len(held_out) == len(states) - 6 > 0
    config = load_config(out)
    quantized = quantize(model, config, replace(recipe, switch_bits=((3, 3), (4, 4), (8, 8))), calibration=calibration)
    assert results["held_out_metric"] == pytest.approx(output_error(quantized, held_out, config), rel=1e-5)
    assert results["held_out_metric"] != pytest.approx(results["metric"], rel=1e-3)


def test_refine_rows_without_sweeps_are_refused(tiny_path, tmp_path, capsys):
    argv = ["search", "--model", tiny_path, *FAST, "--refine-rows", "2", "--out", str(tmp_path / "b.json")]
    assert main(argv) == 2
    assert "give refine_sweeps or exchange_rounds too" in capsys.readouterr().err


def test_equal_compute_rows_get_the_trees_block_runs_in_whole_model_evaluations(tiny_dit):
    """evo@compute / random@compute: whole-model evaluations whose block runs match the tree's, far fewer
    than the tree's evaluations (each of which runs only from its segment to one block past it)."""
    from treeq.bench.search import SEARCHES, tree_compute_evaluations
    from treeq.bits import quantizable_layers
    from treeq.search.estimate import stop_after, tree_block_runs
    from treeq.search.space import DEFAULT_CANDIDATES, SearchSpace
    from treeq.search.tree import expected_evaluations

    space = SearchSpace.build(quantizable_layers(tiny_dit), DEFAULT_CANDIDATES[3.0])
    blocks = [int(name.split(".")[1]) for name in space.layers]
    block_runs = tree_block_runs(space, 16, blocks, stop_after(blocks, 2, 1))
    evaluations = tree_compute_evaluations(tiny_dit, "W3A3")
    assert abs(evaluations * 2 - block_runs) <= 1 and evaluations < expected_evaluations(space, 16)
    assert SEARCHES["evo@compute"]["method"] == "evo" and SEARCHES["random@compute"]["method"] == "random"


def test_env_bits_and_budget_window_reach_the_search(tiny_path, tmp_path, monkeypatch):
    """--env-bits and --budget-window are passed to the search and recorded with its results."""
    out = tmp_path / "bits.json"
    argv = ["search", "--model", tiny_path, *FAST, "--env-bits", "6", "--budget-window", "0.5", "--out", str(out)]
    assert main(argv) == 0
    settings = json.loads((tmp_path / "bits.results.json").read_text())["settings"]
    assert settings["env_bits"] == 6 and settings["budget_window"] == 0.5
    from treeq.search import run

    seen = {}
    monkeypatch.setattr(run, "run_search", lambda *args, **kwargs: seen.update(kwargs) or (_ for _ in ()).throw(
        ValueError("stop")))
    assert main(argv[:-2] + ["--budget-window", "-1", "--out", str(tmp_path / "other.json")]) == 2
    assert seen["budget_window"] is None and seen["env_bits"] == 6


def test_eng_reads_the_default_tree_at_the_target_and_pairs_every_row_with_it(monkeypatch):
    import treeq.bench.search as bench
    read = []

    def searched(target, method, folder, recipe=None, env_bits=None, name=None):
        read.append((target, Path(folder), env_bits, name))
        return {"layer": {"w_bits": 4, "a_bits": 4}}, {"evaluations": 1, "metric": 0.0}
    images = iter(torch.full((4, 1, 2, 2), float(value)) for value in (0.0, 0.1, 0.2, 0.3, 0.4))
    monkeypatch.setattr(bench, "searched", searched)
    monkeypatch.setattr(bench, "load", lambda name: None)
    monkeypatch.setattr(bench, "load_or_collect", lambda model, **options: None)
    monkeypatch.setattr(bench, "quantize", lambda model, config, recipe, calibration: None)
    monkeypatch.setattr(bench, "generate", lambda model, n, seed, progress: (next(images), None, None))
    monkeypatch.setattr(bench, "average_bits", lambda config, model: 4.0)
    monkeypatch.setattr(bench, "measure", lambda *args: {"fid": 0, "sfid": 0, "class_accuracy": 1, "psnr_vs_fp": 0})
    rows = bench.bench_eng(targets=("W4A4",), num_samples=4)
    assert [(env, folder) for _, folder, env, _ in read] == [
        (3, bench.ENG_FOLDER), (None, bench.FOLDER), (8, bench.ENG_FOLDER), (32, bench.ENG_FOLDER)]
    differences = {row["env_bits"]: row["psnr_minus_target"] for row in rows}
    assert differences[4] is None and differences[3].startswith("+")  # e = 3 drew closer to FP's zeros
    assert differences[8].startswith("-") and differences[32].startswith("-")


def test_the_search_keeps_freed_memory_for_its_scoring(tiny_path, tmp_path, monkeypatch):
    import treeq.memory as memory
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(True))
    assert main(["search", "--model", tiny_path, "--method", "uniform", *FAST, "--out", str(tmp_path / "u.json")]) == 0
    assert calls == [True]


def test_a_bench_row_is_kept_with_its_errors_and_made_again_only_for_another_key(tmp_path):
    from treeq.bench.search import kept_row
    made = []

    def make():
        made.append(True)
        errors = torch.tensor([0.1, 0.2], dtype=torch.float64)
        return {"psnr_vs_fp": 20.0}, errors, errors[:1] * 10
    key = {"num_samples": 2, "seed": 0, "config": {"layer": {"w_bits": 4, "a_bits": 4}}}
    first = kept_row(tmp_path / "rows" / "W4A4-tss.json", key, make)
    again = kept_row(tmp_path / "rows" / "W4A4-tss.json", key, make)
    assert len(made) == 1 and again[0] == first[0]
    assert all(torch.equal(a, b) and b.dtype == torch.float64 for a, b in zip(first[1:], again[1:]))
    kept_row(tmp_path / "rows" / "W4A4-tss.json", {**key, "config": {"layer": {"w_bits": 3, "a_bits": 3}}}, make)
    assert len(made) == 2  # another configuration under the same name is sampled again
