"""The command line in-process: each command on a tiny model, and bad input as one clear line."""
import json

import numpy as np
import pytest
import torch

from treeq.cli import main
from treeq.models.checkpoint import save_model

FAST = ["--num-samples", "10", "--steps", "2"]


@pytest.fixture
def tiny_path(tiny_dit, tmp_path):
    save_model(tiny_dit, tmp_path / "tiny")
    return str(tmp_path / "tiny.safetensors")


def test_info_lists_the_quantizable_layers(tiny_path, capsys):
    assert main(["info", "--model", tiny_path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantizable_layers"] == 10  # 2 blocks x (adaLN, qkv, proj, fc1, fc2)
    assert info["layers"][0]["name"] == "blocks.0.adaLN_modulation.1"


def test_sample_writes_adm_npz_and_grid(tiny_path, tmp_path):
    assert main(["sample", "--model", tiny_path, *FAST, "--out", str(tmp_path / "s")]) == 0
    images = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert (tmp_path / "s" / "grid.png").stat().st_size > 0


def test_quantize_eval_export_round_trip(tiny_path, tmp_path, capsys):
    run = str(tmp_path / "w4a4")
    assert main(["quantize", "--model", tiny_path, "--config", "W4A4", "--method", "hadamard", "--out", run]) == 0
    bits = json.loads((tmp_path / "w4a4" / "bits.json").read_text())
    assert bits["blocks.1.mlp.fc2"] == {"a_bits": 4, "w_bits": 4}
    capsys.readouterr()
    assert main(["eval", "--model", tiny_path, "--quant", run, *FAST, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"fid", "sfid", "inception_score", "precision", "recall", "class_accuracy", "psnr_vs_fp"}
    assert metrics["psnr_vs_fp"] is not None and metrics["psnr_vs_fp"] > 0
    packed = str(tmp_path / "packed")
    assert main(["export", "--quant", run, "--out", packed]) == 0
    assert main(["sample", "--quant", packed, *FAST, "--out", str(tmp_path / "s")]) == 0


def test_static_activation_recipe_rebuilds_and_exports(tiny_path, tmp_path):
    run = str(tmp_path / "static")
    assert main(["quantize", "--model", tiny_path, "--config", "W8A8", "--activations", "static",
                 "--calibration-images", "2", "--calibration-timesteps", "2", "--out", run]) == 0
    assert json.loads((tmp_path / "static" / "config.json").read_text())["recipe"]["activations"] == "static"
    assert main(["export", "--quant", run, "--out", str(tmp_path / "packed")]) == 0
    layers = json.loads((tmp_path / "packed" / "packed.json").read_text())["layers"]
    assert all(layer["activations"] == "static" for layer in layers.values())


def test_run_folder_reloads_without_recalibrating(tiny_path, tmp_path, capsys, monkeypatch):
    """smooth,lowrank,gptq with static scales: reload gives the same model with no calibration or GPTQ."""
    import treeq.methods.registry as methods
    import treeq.ptq.run as run_module
    run = str(tmp_path / "svdquant")
    assert main(["quantize", "--model", tiny_path, "--config", "W4A4", "--method", "smooth,lowrank,gptq",
                 "--lowrank-rank", "4", "--smooth-alpha", "0.6", "--activations", "static", "--clip", "mse",
                 "--calibration-images", "2", "--calibration-timesteps", "2", "--steps", "4", "--out", run]) == 0
    recipe = json.loads((tmp_path / "svdquant" / "config.json").read_text())["recipe"]
    assert recipe["method_options"] == {"smooth": {"alpha": 0.6}, "lowrank": {"rank": 4, "ratio": 0.0},
                                        "gptq": {"damp": 0.01, "block_size": 128}}
    assert recipe["sampling"] == {"steps": 4}
    built = run_module.build(run_module.Recipe.from_dict(recipe))
    monkeypatch.setattr(run_module, "load_or_collect", lambda *a, **k: pytest.fail("recalibrated"))
    monkeypatch.setattr(methods, "gptq_quantize", lambda *a, **k: pytest.fail("re-ran GPTQ"))
    loaded = run_module.load_quantized(run)
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), built(x, t, y))
    capsys.readouterr()
    assert main(["eval", "--quant", run, *FAST, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["psnr_vs_fp"] > 0


def test_branch_flag_composes_with_any_method_list(tiny_path, tmp_path):
    run = tmp_path / "gmb"
    assert main(["quantize", "--model", tiny_path, "--config", "W4A4", "--method", "hadamard,gptq",
                 "--branch", "monarch", "--branch-ratio", "0.1", "--calibration-images", "2",
                 "--calibration-timesteps", "2", "--steps", "2", "--out", str(run)]) == 0
    recipe = json.loads((run / "config.json").read_text())["recipe"]
    assert recipe["methods"] == ["hadamard", "monarch", "gptq"]
    assert recipe["method_options"]["monarch"] == {"ratio": 0.1}
    assert main(["export", "--quant", str(run), "--out", str(tmp_path / "packed")]) == 0
    layers = json.loads((tmp_path / "packed" / "packed.json").read_text())["layers"]
    assert layers["blocks.0.mlp.fc1"]["branch"]["type"] == "monarch"


def test_finetune_command_writes_a_run_that_eval_accepts(tiny_path, tmp_path, capsys, monkeypatch):
    import treeq.testbed.data
    monkeypatch.setattr(treeq.testbed.data, "mnist", lambda split: (torch.randn(16, 1, 32, 32).clamp(-1, 1),
                                                            torch.arange(16) % 10))
    run, tuned = tmp_path / "lr", tmp_path / "tuned"
    assert main(["quantize", "--model", tiny_path, "--config", "W3A3", "--branch", "lowrank", "--branch-ratio", "0.1",
                 "--out", str(run)]) == 0
    assert main(["finetune", "--quant", str(run), "--out", str(tuned), "--steps", "2", "--batch-size", "4"]) == 0
    record = json.loads((tuned / "config.json").read_text())
    assert record["finetune"]["steps"] == 2 and record["finetuned_from"] == str(run)
    capsys.readouterr()
    assert main(["eval", "--quant", str(tuned), *FAST, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["psnr_vs_fp"] > 0


def test_fp_eval_has_null_psnr(tiny_path, capsys):
    assert main(["eval", "--model", tiny_path, *FAST, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["psnr_vs_fp"] is None


@pytest.mark.parametrize("argv,message", [
    (["info", "--model", "missing.safetensors"], "no such file"),
    (["info", "--model", "nowhere"], "no model at"),
    (["quantize", "--model", "TINY", "--config", "W5A5", "--out", "OUT"], "W5A5"),
    (["quantize", "--model", "TINY", "--config", "BITS", "--out", "OUT"], "unknown layer"),
    (["sample", "--quant", "EMPTY", "--out", "OUT"], "holds no quantization run"),
    (["sample", "--model", "TINY", "--num-samples", "-3", "--out", "OUT"], "expected integer >= 1, got -3"),
    (["quantize", "--model", "TINY", "--config", "BROKEN", "--out", "OUT"], "broken.json: not a bit configuration"),
    (["quantize", "--model", "TINY", "--method", "lowrank,smooth", "--out", "OUT"], "cannot follow lowrank"),
    (["quantize", "--model", "TINY", "--method", "smooth", "--out", "OUT", "--clip", "p99"], "invalid choice"),
    (["eval", "--quant", "NOTRUN", "--num-samples", "10"], "not a TreeQ run"),
    (["quantize", "--model", "TINY", "--method", "lowrank", "--branch", "monarch", "--out", "OUT"], "both a branch"),
    # flags that would do nothing, checked against the loaded model before any work
    (["sample", "--model", "TINY", "--guidance-channels", "99", "--out", "OUT"], "guidance_channels must be in 1..1"),
    (["sample", "--model", "TINY", "--prompts", "PROMPTS", "--out", "OUT"], "class-conditional"),
    (["quantize", "--model", "TINY", "--prompts", "PROMPTS", "--method", "gptq", "--out", "OUT"], "class-conditional"),
    (["search", "--model", "TINY", "--prompts", "PROMPTS", "--out", "OUT.json"], "class-conditional"),
    (["sample", "--quant", "EMPTY", "--model", "TINY", "--out", "OUT"], "--model does not apply"),
    # devices this machine lacks, before loading
    (["sample", "--model", "TINY", "--device", "tpu", "--out", "OUT"], "--device tpu is not a device; available here: cpu"),
    (["search", "--model", "TINY", "--device", "cuda:7", "--out", "OUT.json"], "--device cuda:7 is not available"),
    (["sample", "--model", "TINY", "--device", "nonsense", "--out", "OUT"], "is not a device"),
    # files and counts that failed late, before loading
    (["eval", "--model", "TINY", "--num-samples", "2"], "at least 10"),  # before sampling
    (["bench", "fp", "--num-samples", "9"], "at least 10"),
    (["sample", "--model", "TINY", "--prompts", "MISSING", "--out", "OUT"], "no such file"),
    (["sample", "--model", "TINY", "--prompts", "BINARY", "--out", "OUT"], "not UTF-8"),
    (["sample", "--model", "TINY", "--prompts", "BLANK", "--out", "OUT"], "holds no prompts"),
    (["search", "--model", "TINY", "--calibration-images", "1", "--calibration-timesteps", "1", "--out", "OUT.json"],
     "16 calibration rows to score (and refine on) need more than the 1"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tiny_path, tmp_path, capsys):
    (tmp_path / "bits.json").write_text(json.dumps({"blocks.7.attn.qkv": {"w_bits": 4, "a_bits": 4}}))
    (tmp_path / "broken.json").write_text('{"blocks.0.attn.qkv": {"w_bits": 4,')
    (tmp_path / "empty").mkdir()
    (tmp_path / "notrun").mkdir()
    (tmp_path / "notrun" / "config.json").write_text('{"method": "rtn"}')
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)))
    (tmp_path / "blank.txt").write_text("\n  \n")
    replace = {"TINY": tiny_path, "BITS": str(tmp_path / "bits.json"), "OUT": str(tmp_path / "out"),
               "EMPTY": str(tmp_path / "empty"), "BROKEN": str(tmp_path / "broken.json"),
               "NOTRUN": str(tmp_path / "notrun"), "OUT.json": str(tmp_path / "out.json"),
               "PROMPTS": str(tmp_path / "prompts.txt"), "MISSING": str(tmp_path / "missing.txt"),
               "BINARY": str(tmp_path / "binary.txt"), "BLANK": str(tmp_path / "blank.txt")}
    assert main([replace.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("treeq: error:") and message in err and "\n" not in err


def test_treeq_in_one_command_searches_with_the_branch_then_quantizes(tiny_path, tmp_path, monkeypatch, capsys):
    from treeq.bits import average_bits, load_config
    from treeq.branches import MonarchBranch
    from treeq.ptq.run import load_run
    monkeypatch.chdir(tmp_path)  # the calibration cache goes to ./runs
    run = tmp_path / "treeq"
    argv = ["quantize", "--model", tiny_path, "--target", "W4A4", "--search", "tss", "--queue-size", "2",
            "--method", "hadamard", "--branch", "monarch", "--branch-ratio", "0.1", "--calibration-images", "4",
            "--calibration-timesteps", "4", "--out", str(run)]
    assert main(argv) == 0
    searched = load_config(run / "search" / "bits.json")
    results = json.loads((run / "search" / "bits.results.json").read_text())
    assert results["method"] == "tss" and results["settings"]["recipe"]["methods"] == ["hadamard", "monarch"]
    recipe, model = load_run(run)
    assert load_config(run / "bits.json") == searched and average_bits(searched, model) <= 4.0 + 1e-9
    assert isinstance(model.get_submodule("blocks.0.attn.qkv").branch, MonarchBranch)
    assert main(["quantize", "--model", tiny_path, "--target", "W4A4", "--config", "W3A3", "--out", str(run)]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_line_sleeps_waiting_openmp_threads_unless_told_otherwise(given, expected):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, treeq.cli, sys; assert 'torch' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tiny_path, tmp_path, capsys):
    for argv in (["quantize", "--model", tiny_path, "--out", str(tmp_path / "q")],
                 ["sample", "--model", tiny_path, *FAST, "--out", str(tmp_path / "s")]):
        assert main([*argv, "--device", "cuda"]) == 2
        assert "--device cuda is not available here; available: cpu" in capsys.readouterr().err


def test_quantize_passes_the_ilp_seed_to_its_search(tiny_path, tmp_path, monkeypatch):
    import treeq.search.run as run_module
    calls = []

    def run_search(*args, **kwargs):
        calls.append(kwargs)
        raise ValueError("stop after the search call")
    monkeypatch.setattr(run_module, "run_search", run_search)
    argv = ["quantize", "--model", tiny_path, "--target", "W3A3", "--seed-ilp", "--out", str(tmp_path / "q")]
    assert main(argv) == 2 and calls[0]["seed_ilp"] is True
    assert main(argv[:5] + argv[6:]) == 2 and calls[1]["seed_ilp"] is False
    assert calls[0]["workers"] == "auto" and main([*argv, "--workers", "3"]) == 2 and calls[2]["workers"] == 3


def test_a_run_whose_recipe_names_unknown_bits_is_refused(tiny_path, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["quantize", "--model", tiny_path, "--method", "rtn", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    config["recipe"]["bits"] = "W5A5"
    (run / "config.json").write_text(json.dumps(config))
    assert main(["sample", "--quant", str(run), *FAST, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a TreeQ run: bits must be a preset" in err and "W5A5" in err and "\n" not in err


def test_a_sample_count_the_disk_cannot_hold_is_refused_before_sampling(tiny_path, tmp_path, capsys):
    """A billion 32x32 samples: refused in one line, nothing written, no memory grown (the parts list is never
    built)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["sample", "--model", tiny_path, "--num-samples", "1000000000", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--num-samples 1000000000 needs about" in err and "GB free" in err and "\n" not in err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB


def test_the_calibration_cache_is_announced_and_goes_where_asked(tiny_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TREEQ_CACHE_DIR", str(tmp_path / "unused"))  # restored after the test
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    argv = ["quantize", "--model", tiny_path, "--method", "gptq", "--calibration-images", "2",
            "--calibration-timesteps", "2", "--cache-dir", str(cache)]
    assert main([*argv, "--out", str(tmp_path / "q1")]) == 0
    assert f"calibration cached in {cache}" in capsys.readouterr().err
    assert len(list(cache.glob("*.pt"))) == 1 and not (tmp_path / "runs").exists()
    assert main([*argv, "--out", str(tmp_path / "q2")]) == 0  # reused: nothing new to announce
    assert "calibration cached" not in capsys.readouterr().err
