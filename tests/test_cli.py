"""The command line in-process: each command on a tiny model, and bad input as one clear line."""
import json

import numpy as np
import pytest

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
    assert json.loads((tmp_path / "static" / "config.json").read_text())["activations"] == "static"
    assert main(["export", "--quant", run, "--out", str(tmp_path / "packed")]) == 0
    layers = json.loads((tmp_path / "packed" / "packed.json").read_text())["layers"]
    assert all(layer["static_act_scale"] for layer in layers.values())


def test_fp_eval_has_null_psnr(tiny_path, capsys):
    assert main(["eval", "--model", tiny_path, *FAST, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["psnr_vs_fp"] is None


@pytest.mark.parametrize("argv,message", [
    (["info", "--model", "missing.safetensors"], "no such file"),
    (["info", "--model", "nowhere"], "no model at"),
    (["quantize", "--model", "TINY", "--config", "W5A5", "--out", "OUT"], "W5A5"),
    (["quantize", "--model", "TINY", "--config", "BITS", "--out", "OUT"], "unknown layer"),
    (["sample", "--quant", "EMPTY", "--out", "OUT"], "holds no quantization run"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tiny_path, tmp_path, capsys):
    (tmp_path / "bits.json").write_text(json.dumps({"blocks.7.attn.qkv": {"w_bits": 4, "a_bits": 4}}))
    (tmp_path / "empty").mkdir()
    replace = {"TINY": tiny_path, "BITS": str(tmp_path / "bits.json"), "OUT": str(tmp_path / "out"),
               "EMPTY": str(tmp_path / "empty")}
    assert main([replace.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("treeq: error:") and message in err and "\n" not in err
