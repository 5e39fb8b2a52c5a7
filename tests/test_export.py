"""Packed export: the loaded integer model reproduces the fake-quantized one, and bad files fail clearly.

Tolerances (relative error of the whole tiny DiT's output, Frobenius norm): with float32 scales the
integer path is the fake-quant math up to float rounding, typically 1e-7, up to 1e-4 where rounding
order moves one activation code across a rounding boundary (bound 1e-3); fp16 scales add a relative
rounding of <= 2^-11 per scale, observed up to 3e-3 at the output at W3A3 (bound 1e-2).
"""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from treeq.bits import preset_config, quantizable_layers, uniform_config
from treeq.models.checkpoint import CheckpointError
from treeq.ptq.apply import quantization_map, quantize, set_bits_
from treeq.deploy.export import export, load_exported
from treeq.deploy.integer import IntLinear
from treeq.ptq.recipe import Recipe

FP32_SCALE_TOLERANCE = 1e-3
FP16_SCALE_TOLERANCE = 1e-2


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 32, 32, generator=generator), torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 3, 10])


def _relative_error(reference_model, model):
    with torch.no_grad():
        reference, out = reference_model(*_inputs()), model(*_inputs())
    return ((out - reference).norm() / reference.norm()).item()


def _mixed_config(model):
    """Layers cycling through W3A3, W4A4, W8A8 and full precision (absent)."""
    cycle = [(3, 3), (4, 4), (8, 8), None]
    config = {}
    for index, name in enumerate(quantizable_layers(model)):
        bits = cycle[index % len(cycle)]
        if bits is not None:
            config[name] = {"w_bits": bits[0], "a_bits": bits[1]}
    return config


@pytest.mark.parametrize("preset, method", [("W4A4", "rtn"), ("W8A8", "hadamard"), ("mixed", "lowrank")])
def test_round_trip_runs_integer_layers(tiny_dit, tmp_path, preset, method):
    config = _mixed_config(tiny_dit) if preset == "mixed" else preset_config(tiny_dit, preset)
    quantized = quantize(tiny_dit, config, Recipe(methods=[method]))
    export(quantized, tmp_path / "model")
    loaded = load_exported(tmp_path / "model")
    assert all(isinstance(loaded.get_submodule(name), IntLinear) for name in config)
    assert type(loaded.final_layer.linear) is nn.Linear
    assert json.loads((tmp_path / "model" / "packed.json").read_text())["bits"] == quantization_map(quantized) == config
    assert _relative_error(quantized, loaded) < FP16_SCALE_TOLERANCE


def test_float32_scales_reproduce_fake_quant(tiny_dit, tmp_path):
    quantized = quantize(tiny_dit, _mixed_config(tiny_dit), Recipe(methods=["hadamard"]))
    export(quantized, tmp_path / "model", scale_dtype=torch.float32)
    assert _relative_error(quantized, load_exported(tmp_path / "model" / "packed.safetensors")) < FP32_SCALE_TOLERANCE


@pytest.mark.parametrize("methods, options", [
    ("smooth", dict(weight_symmetric=False, group_size=16)), ("gptq", {}), ("hadamard,gptq", {}),
    ("smooth,lowrank", dict(activations="dynamic-asym")), ("hadamard", dict(activations="static")),
    ("hadamard,monarch", {}),
    ("rtn", dict(activations="dynamic-asym", weight_symmetric=False))])
def test_calibrated_methods(tiny_dit, tmp_path, methods, options):
    """Transforms with asymmetric group-wise weights, GPTQ's rounding, compositions, each activation quantizer."""
    calibration = (*_inputs()[:2], torch.tensor([1, 2, 10]))
    recipe = Recipe(methods=methods, method_options={"lowrank": {"rank": 4}} if "lowrank" in methods else {},
                    **options)
    quantized = quantize(tiny_dit, uniform_config(tiny_dit, 4, 8), recipe, calibration=calibration)
    export(quantized, tmp_path / "model", scale_dtype=torch.float32)
    assert _relative_error(quantized, load_exported(tmp_path / "model")) < FP32_SCALE_TOLERANCE


def test_layers_switched_off_are_stored_as_the_float_linear_they_compute(tiny_dit, tmp_path):
    """A search may switch a rotated, branched layer to full precision: export folds T and the branch back in."""
    recipe = Recipe(methods=["hadamard", "lowrank"], method_options={"lowrank": {"rank": 4}})
    quantized = quantize(tiny_dit, uniform_config(tiny_dit, 4, 4), recipe)
    layer = quantized.blocks[0].attn.qkv
    config = uniform_config(tiny_dit, 4, 4)
    del config["blocks.0.attn.qkv"]
    set_bits_(quantized, config)
    export(quantized, tmp_path / "model")
    loaded = load_exported(tmp_path / "model")
    assert type(loaded.blocks[0].attn.qkv) is nn.Linear
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.blocks[0].attn.qkv(x), layer(x), atol=1e-5)
    assert _relative_error(quantized, loaded) < FP16_SCALE_TOLERANCE


def test_reexport_of_a_loaded_model_is_identical(tiny_dit, tmp_path):
    export(quantize(tiny_dit, _mixed_config(tiny_dit), Recipe(methods=["lowrank"])), tmp_path / "first")
    export(load_exported(tmp_path / "first"), tmp_path / "second")
    first, second = load_file(tmp_path / "first" / "packed.safetensors"), load_file(tmp_path / "second" / "packed.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def test_packed_linears_are_a_fraction_of_fp32(tiny_dit, tmp_path):
    config = uniform_config(tiny_dit, 4, 4)
    export(quantize(tiny_dit, config), tmp_path / "model")
    stored = load_file(tmp_path / "model" / "packed.safetensors")
    packed = sum(value.numel() * value.element_size() for key, value in stored.items()
                 if key.rpartition(".")[0] in config)
    fp32 = sum(parameter.numel() * 4 for name in config for parameter in tiny_dit.get_submodule(name).parameters())
    assert stored["blocks.0.attn.qkv.weight_packed"].dtype == torch.uint8
    assert packed / fp32 < 0.16  # 4/32 of the weights, plus fp16 scales and the fp32 biases


def test_missing_files(tiny_dit, tmp_path):
    with pytest.raises(FileNotFoundError, match="packed.json"):
        load_exported(tmp_path / "model")
    export(quantize(tiny_dit, uniform_config(tiny_dit, 8, 8)), tmp_path / "model")
    (tmp_path / "model" / "packed.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="packed.safetensors"):
        load_exported(tmp_path / "model")


@pytest.fixture
def exported(tiny_dit, tmp_path):
    export(quantize(tiny_dit, uniform_config(tiny_dit, 4, 4)), tmp_path / "model")
    return tmp_path / "model"


def test_truncated_weights(exported):
    weights = exported / "packed.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_exported(exported)


def test_corrupt_weights(exported):
    weights = exported / "packed.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_exported(exported)


@pytest.mark.parametrize("change, message", [
    (lambda meta: meta.update(format_version=3), "format version 3"),
    (lambda meta: meta.update(format="other"), "not a TreeQ packed export"),
    (lambda meta: meta["bits"].popitem(), "disagrees"),
    (lambda meta: meta.update(layers=[]), "must map layer names"),
    (lambda meta: meta["model"].update(hidden_size=32), "cannot be rebuilt"),
    (lambda meta: [meta[key]["blocks.0.attn.qkv"].update(w_bits=3) for key in ("bits", "layers")], "cannot be rebuilt"),
])
def test_bad_metadata(exported, change, message):
    path = exported / "packed.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_exported(exported)


def test_truncated_metadata(exported):
    path = exported / "packed.json"
    path.write_text(path.read_text()[:50])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_exported(exported)


def test_failed_write_leaves_the_previous_pair(exported, tiny_dit, monkeypatch):
    before = {name: (exported / name).read_bytes() for name in ("packed.json", "packed.safetensors")}
    monkeypatch.setattr("treeq.deploy.export.save_safetensors", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export(quantize(tiny_dit, uniform_config(tiny_dit, 8, 8)), exported)
    assert {name: (exported / name).read_bytes() for name in before} == before
    assert sorted(path.name for path in exported.iterdir()) == sorted(before)


def test_weight_only_full_precision_with_quantized_inputs_is_refused(tiny_dit, tmp_path):
    quantized = quantize(tiny_dit, {"blocks.0.mlp.fc1": {"w_bits": 16, "a_bits": 8}})
    with pytest.raises(ValueError, match="no integer form"):
        export(quantized, tmp_path / "model")


def test_export_needs_a_dit(tmp_path):
    with pytest.raises(ValueError, match="holds our DiT only, not a Linear"):
        export(nn.Linear(4, 4), tmp_path / "model")


def test_version_1_exports_still_load(exported):
    """Version 1 recorded only whether a static scale exists; it had no asymmetric activations."""
    path = exported / "packed.json"
    meta = json.loads(path.read_text())
    meta["format_version"] = 1
    for layer in meta["layers"].values():
        layer["static_act_scale"] = layer.pop("activations") == "static"
    path.write_text(json.dumps(meta))
    assert all(module.activations == "dynamic" for module in load_exported(exported).modules()
               if isinstance(module, IntLinear))


def test_exported_models_answer_the_bit_config_helpers(tiny_dit, tmp_path):
    from treeq.bits import average_bits
    config = _mixed_config(tiny_dit)
    export(quantize(tiny_dit, config, Recipe(methods=["lowrank"], method_options={"lowrank": {"rank": 4}})),
           tmp_path / "model")
    loaded = load_exported(tmp_path / "model")
    assert quantizable_layers(loaded) == quantizable_layers(tiny_dit)  # not the branches' linears
    assert quantization_map(loaded) == config
    assert average_bits(quantization_map(loaded), loaded) == average_bits(config, tiny_dit)
    set_bits_(loaded, config)  # the bits it holds: accepted
    with pytest.raises(ValueError, match="holds codes at one bit-width"):
        set_bits_(loaded, uniform_config(tiny_dit, 8, 8))


def test_smoothing_folds_into_adaLN_and_qkv_at_load(tiny_dit, tmp_path):
    """qkv and fc1 smoothing divide adaLN's shift and 1 + scale rows, proj's the v rows of qkv; fc2's stays."""
    from treeq.deploy.fold import transform_macs
    from treeq.methods.smooth import SmoothTransform
    calibration = (*_inputs()[:2], torch.tensor([1, 2, 10]))
    quantized = quantize(tiny_dit, uniform_config(tiny_dit, 8, 8), Recipe(methods=["smooth"]), calibration=calibration)
    export(quantized, tmp_path / "model", scale_dtype=torch.float32)
    unfolded, folded = load_exported(tmp_path / "model", fold=False), load_exported(tmp_path / "model")
    block = folded.blocks[0]
    assert block.attn.qkv.input_transform is None and block.mlp.fc1.input_transform is None
    assert block.attn.proj.input_transform is None
    assert isinstance(block.mlp.fc2.input_transform, SmoothTransform)
    assert transform_macs(block.mlp.fc2) == 256 and transform_macs(block.attn.qkv) == 0
    assert transform_macs(unfolded.blocks[0].attn.qkv) == 64
    assert _relative_error(quantized, folded) < FP32_SCALE_TOLERANCE
    assert _relative_error(unfolded, folded) < FP32_SCALE_TOLERANCE


def test_loaded_layers_are_deployed(tiny_dit, tmp_path):
    export(quantize(tiny_dit, uniform_config(tiny_dit, 4, 4)), tmp_path / "model")
    packed = load_exported(tmp_path / "model", backend="int_mm", resident="packed")
    plain = load_exported(tmp_path / "model", backend=None)
    assert packed.blocks[0].mlp.fc1.kernels is not None and plain.blocks[0].mlp.fc1.kernels is None
    assert packed.blocks[0].mlp.fc1.resident_bytes() < plain.blocks[0].mlp.fc1.resident_bytes()
    assert _relative_error(plain, packed) < 1e-6


def test_sampling_defaults_and_source_travel_with_the_export(tiny_dit, tmp_path):
    from treeq.diffusion.defaults import sampling_defaults, set_sampling_defaults_
    settings = {**sampling_defaults(tiny_dit), "steps": 7, "cfg_scale": 2.5}
    set_sampling_defaults_(tiny_dit, settings)
    tiny_dit.source = {"path": "somewhere", "vae": None, "id2label": {"0": "zero"}}
    export(quantize(tiny_dit, uniform_config(tiny_dit, 8, 8)), tmp_path / "model")
    loaded = load_exported(tmp_path / "model")
    assert sampling_defaults(loaded) == settings and loaded.source == tiny_dit.source
