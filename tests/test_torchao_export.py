"""torchao export: torchao tensors made of the run's own codes reproduce the fake-quant model, and load back.

Tolerances (relative Frobenius error of the tiny DiT's output against the fake-quant model): fed the run's
own input codes, the int8 GEMM computes the run's numbers up to float rounding, observed about 1e-7, more
where a rounding moves one activation code (bound RUN_TOLERANCE); W4A8 (`activation_bits=8`) is another
model, about 1e-3 from the run and closer to full precision.
"""
import copy
import json
import sys

import pytest
import torch
import torch.nn as nn

from treeq.bits import quantizable_layers, uniform_config
from treeq.cli import main
from treeq.deploy.integer import IntLinear
from treeq.models.checkpoint import CheckpointError, save_model
from treeq.ptq.apply import quantize, set_bits_
from treeq.ptq.recipe import Recipe
from treeq.ptq.run import load_run

torchao = pytest.importorskip("torchao")
from treeq.deploy import torchao_export  # noqa: E402
from treeq.deploy.torchao_export import TorchaoLinear, export_torchao, load_torchao, to_torchao_  # noqa: E402

RUN_TOLERANCE = 1e-3


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 32, 32, generator=generator), torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 3, 10])


def _error(reference_model, model):
    with torch.no_grad():
        reference, out = reference_model(*_inputs()), model(*_inputs())
    return ((out - reference).norm() / reference.norm()).item()


def _mixed_config(model):
    """W3A3, W4A4, W8A8, full precision (absent) and W4 with float inputs, cycling over the layers."""
    cycle = [(3, 3), (4, 4), (8, 8), None, (4, 32)]
    config = {}
    for index, name in enumerate(quantizable_layers(model)):
        if cycle[index % len(cycle)] is not None:
            config[name] = dict(zip(("w_bits", "a_bits"), cycle[index % len(cycle)]))
    return config


@pytest.mark.parametrize("methods, options", [
    ("hadamard,gptq", dict(activations="dynamic-asym")), ("rtn", {}),
    ("hadamard,lowrank", dict(method_options={"lowrank": {"rank": 4}})), ("hadamard,monarch", {}),
    ("smooth", dict(activations="dynamic-asym"))])
def test_export_reproduces_the_run_with_its_own_codes(tiny_dit, tmp_path, methods, options):
    calibration = (*_inputs()[:2], torch.tensor([1, 2, 10]))
    quantized = quantize(tiny_dit, _mixed_config(tiny_dit), Recipe(methods=methods, **options), calibration=calibration)
    export_torchao(quantized, tmp_path / "model")
    loaded = load_torchao(tmp_path / "model")
    for name, bits in _mixed_config(tiny_dit).items():
        layer, source = loaded.get_submodule(name), quantized.get_submodule(name)
        assert isinstance(layer, TorchaoLinear)
        weight = layer.linear.weight
        assert type(weight).__name__ == "Int8Tensor"
        # the run's codes and scales, not a re-quantization of the weight (then the anchors' zero columns)
        codes = source.quantized_weight().codes
        assert torch.equal(weight.qdata[:, :codes.shape[1]], codes) and not weight.qdata[:, codes.shape[1]:].any()
        assert torch.equal(weight.scale, source.quantized_weight().scale)
        assert layer.input_bits == (bits["a_bits"] if bits["a_bits"] <= 8 else None)
    switched_off = [name for name in quantizable_layers(tiny_dit) if name not in _mixed_config(tiny_dit)]
    assert switched_off and all(type(loaded.get_submodule(name)) is nn.Linear for name in switched_off)
    assert _error(quantized, loaded) < RUN_TOLERANCE


@pytest.mark.parametrize("activations", ["dynamic", "dynamic-asym"])
def test_symmetric_and_asymmetric_inputs_pass_torchaos_int8_unchanged(tiny_dit, activations):
    """The anchors make torchao's int8 rounding of the run's codes exact (without them a symmetric
    4-bit row spans 14 codes, not a divisor of int8's 255 steps: 0.5% error at the output)."""
    quantized = quantize(tiny_dit, uniform_config(tiny_dit, 4, 4), Recipe(methods=["hadamard"], activations=activations))
    assert _error(quantized, to_torchao_(copy.deepcopy(quantized))) < 1e-5


def test_w4a8_is_closer_to_full_precision_than_the_w4a4_run(tiny_dit, tmp_path):
    quantized = quantize(tiny_dit, uniform_config(tiny_dit, 4, 4), Recipe(methods=["hadamard"], activations="dynamic-asym"))
    run = export_torchao(quantized, tmp_path / "run")
    w4a8 = export_torchao(quantized, tmp_path / "w4a8", activation_bits=8)
    assert _error(quantized, run) < RUN_TOLERANCE < _error(quantized, w4a8)
    set_bits_(quantized, {})
    assert _error(quantized, w4a8) < _error(quantized, run)


def test_layers_without_a_torchao_form_keep_the_integer_layer(tiny_dit, tmp_path):
    """Asymmetric group-wise weights and static input scales: Int8Tensor has neither, so IntLinear stays."""
    calibration = (*_inputs()[:2], torch.tensor([1, 2, 10]))
    for name, options in (("groups", dict(weight_symmetric=False, group_size=16)), ("static", dict(activations="static"))):
        quantized = quantize(tiny_dit, uniform_config(tiny_dit, 4, 8), Recipe(methods=["rtn"], **options),
                             calibration=calibration)
        export_torchao(quantized, tmp_path / name)
        layers = json.loads((tmp_path / name / "torchao.json").read_text())["layers"]
        assert {layer["kind"] for layer in layers.values()} == {"treeq"}
        loaded = load_torchao(tmp_path / name)
        assert all(isinstance(loaded.get_submodule(layer), IntLinear) for layer in layers)
        assert _error(quantized, loaded) < RUN_TOLERANCE


@pytest.fixture
def exported(tiny_dit, tmp_path):
    export_torchao(quantize(tiny_dit, uniform_config(tiny_dit, 4, 4)), tmp_path / "model")
    return tmp_path / "model"


def test_damaged_exports_fail_in_one_line(exported):
    meta = json.loads((exported / "torchao.json").read_text())
    (exported / "torchao.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_torchao(exported)
    (exported / "torchao.json").write_text(json.dumps(meta))
    data = (exported / "torchao.pt").read_bytes()
    (exported / "torchao.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_torchao(exported)
    (exported / "torchao.pt").unlink()
    with pytest.raises(FileNotFoundError, match="torchao.pt"):
        load_torchao(exported)


def test_cli_export_then_sample_and_eval(tiny_dit, tmp_path, capsys):
    save_model(tiny_dit, tmp_path / "tiny")
    model, run, out = str(tmp_path / "tiny.safetensors"), str(tmp_path / "run"), str(tmp_path / "ao")
    assert main(["quantize", "--model", model, "--config", "W4A4", "--method", "hadamard", "--out", run]) == 0
    assert main(["export", "--quant", run, "--format", "torchao", "--out", out]) == 0
    assert isinstance(load_run(out)[1].blocks[1].mlp.fc2, TorchaoLinear)
    fast = ["--num-samples", "10", "--steps", "2"]
    assert main(["sample", "--quant", out, *fast, "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", model, "--quant", out, *fast, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["psnr_vs_fp"] > 0
    assert main(["finetune", "--quant", out, "--steps", "1", "--out", str(tmp_path / "f")]) == 2
    assert "is an export (packed or torchao), not a run" in capsys.readouterr().err


def test_activation_bits_belong_to_the_torchao_export(tmp_path, capsys):
    assert main(["export", "--quant", str(tmp_path / "run"), "--activation-bits", "8", "--out", str(tmp_path / "e")]) == 2
    assert "torchao export" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_without_torchao_the_export_refuses_in_one_line(tiny_dit, tmp_path, capsys, monkeypatch):
    save_model(tiny_dit, tmp_path / "tiny")
    run = str(tmp_path / "run")
    assert main(["quantize", "--model", str(tmp_path / "tiny.safetensors"), "--config", "W4A4", "--out", run]) == 0
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # what a missing package raises
    monkeypatch.setattr(torchao_export, "_CONFIG", None)
    assert main(["export", "--quant", run, "--format", "torchao", "--out", str(tmp_path / "ao")]) == 2
    assert capsys.readouterr().err.strip().endswith("pip install torchao (make install does)")
    assert not (tmp_path / "ao").exists()


def test_a_folder_holds_one_export(tiny_dit, tmp_path, capsys):
    save_model(tiny_dit, tmp_path / "tiny")
    run, out = str(tmp_path / "run"), tmp_path / "out"
    assert main(["quantize", "--model", str(tmp_path / "tiny.safetensors"), "--config", "W4A4", "--out", run]) == 0
    assert main(["export", "--quant", run, "--out", str(out)]) == 0
    assert main(["export", "--quant", run, "--format", "torchao", "--out", str(out)]) == 2
    assert "holds a packed export" in capsys.readouterr().err and not (out / "torchao.json").exists()
    assert main(["export", "--quant", run, "--format", "torchao", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "packed.json").exists() and isinstance(load_run(out)[1].blocks[0].attn.qkv, TorchaoLinear)
