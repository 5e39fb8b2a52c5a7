"""Bit configurations: layer discovery in execution order, costs, presets, validation, JSON files."""
import json

import pytest
import torch
import torch.nn as nn

from treeq.bits import (
    PRESETS,
    average_bits,
    layer_macs,
    load_config,
    preset_config,
    quantizable_layers,
    save_config,
    uniform_config,
    validate_config,
)

BLOCK_ORDER = ["adaLN_modulation.1", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def test_quantizable_layers_are_block_linears_in_execution_order(tiny_dit):
    names = quantizable_layers(tiny_dit)
    assert names == [f"blocks.{i}.{layer}" for i in range(2) for layer in BLOCK_ORDER]
    executed = []
    hooks = [tiny_dit.get_submodule(name).register_forward_hook(lambda *_, name=name: executed.append(name))
             for name in names]
    with torch.no_grad():
        tiny_dit(torch.randn(1, 1, 32, 32), torch.tensor([5]), torch.tensor([3]))
    for hook in hooks:
        hook.remove()
    assert executed == names


def test_layer_macs_count_tokens_except_for_adaln(tiny_dit):
    macs = layer_macs(tiny_dit)
    tokens = (32 // 4) ** 2
    assert macs["blocks.0.attn.qkv"] == tokens * 64 * 192
    assert macs["blocks.1.mlp.fc2"] == tokens * 256 * 64
    assert macs["blocks.0.adaLN_modulation.1"] == 64 * 384
    assert list(macs) == quantizable_layers(tiny_dit)


def test_presets_and_uniform_configs(tiny_dit):
    config = preset_config(tiny_dit, "W4A8")
    assert set(config) == set(quantizable_layers(tiny_dit))
    assert all(entry == {"w_bits": 4, "a_bits": 8} for entry in config.values())
    assert set(PRESETS) == {"W8A8", "W6A6", "W4A8", "W4A4", "W3A3"}
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config(tiny_dit, "W5A5")
    with pytest.raises(ValueError, match="w_bits"):
        uniform_config(tiny_dit, 1, 4)


def test_average_bits_under_bops_and_memory(tiny_dit):
    assert average_bits(uniform_config(tiny_dit, 4, 4), tiny_dit) == pytest.approx(4.0)
    assert average_bits(uniform_config(tiny_dit, 4, 8), tiny_dit) == pytest.approx(32 ** 0.5)
    assert average_bits({}, tiny_dit) == pytest.approx(16.0)
    assert average_bits(uniform_config(tiny_dit, 32, 32), tiny_dit) == pytest.approx(16.0)
    assert average_bits(uniform_config(tiny_dit, 4, 8), tiny_dit, cost="memory") == pytest.approx(4.0)
    # Moving the cheap per-image adaLN layers to 8 bits barely moves BOPs but moves weight memory a lot.
    config = uniform_config(tiny_dit, 4, 4)
    for name in config:
        if "adaLN" in name:
            config[name] = {"w_bits": 8, "a_bits": 8}
    assert 4.0 < average_bits(config, tiny_dit) < 4.1
    assert average_bits(config, tiny_dit, cost="memory") > 5.0
    with pytest.raises(ValueError, match="cost"):
        average_bits(config, tiny_dit, cost="latency")


@pytest.mark.parametrize("entry, message", [
    ({"w_bits": 9, "a_bits": 4}, "w_bits"),
    ({"w_bits": 4, "a_bits": True}, "a_bits"),
    ({"w_bits": "4", "a_bits": 4}, "w_bits"),
    ({"w_bits": 4.0, "a_bits": 4}, "w_bits"),
    ({"w_bits": 4}, "exactly the keys"),
    ({"w_bits": 4, "a_bits": 4, "group_size": 64}, "exactly the keys"),
    (4, "exactly the keys"),
])
def test_validate_config_rejects_bad_entries(tiny_dit, entry, message):
    with pytest.raises(ValueError, match=message):
        validate_config({"blocks.0.attn.qkv": entry}, tiny_dit)


def test_validate_config_names_unknown_layers(tiny_dit):
    config = uniform_config(tiny_dit, 4, 4)
    config["blocks.7.attn.qkv"] = {"w_bits": 4, "a_bits": 4}
    config["final_layer.linear"] = {"w_bits": 4, "a_bits": 4}
    with pytest.raises(ValueError, match=r"blocks\.7\.attn\.qkv.*final_layer\.linear.*another model"):
        validate_config(config, tiny_dit)
    with pytest.raises(ValueError, match="dict"):
        validate_config([("blocks.0.attn.qkv", 4)], tiny_dit)
    validate_config({}, tiny_dit)


def test_quantizable_layers_of_an_unknown_class_name_the_supported_ones():
    with pytest.raises(ValueError, match="Linear is not a supported transformer; supported: .*FluxTransformer2DModel"):
        quantizable_layers(nn.Linear(4, 4))


def test_save_and_load_round_trip(tiny_dit, tmp_path):
    config = uniform_config(tiny_dit, 4, 8)
    config["blocks.1.mlp.fc2"] = {"w_bits": 3, "a_bits": 16}
    path = tmp_path / "run" / "bits.json"
    save_config(config, path)
    assert load_config(path) == config
    text = path.read_text()
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert list(json.loads(text)) == sorted(config)
    assert [p.name for p in path.parent.iterdir()] == ["bits.json"]  # no temporary file left behind


def test_load_config_checks_the_form(tmp_path):
    path = tmp_path / "bits.json"
    path.write_text(json.dumps({"blocks.0.attn.qkv": {"w_bits": 4}}))
    with pytest.raises(ValueError, match="exactly the keys"):
        load_config(path)
    with pytest.raises(ValueError, match="a_bits"):
        save_config({"blocks.0.attn.qkv": {"w_bits": 4, "a_bits": 0}}, tmp_path / "other.json")


def test_overhead_macs_count_transforms_and_branches(tiny_dit):
    from treeq.bits import layer_overhead_macs
    from treeq.ptq.apply import quantize
    from treeq.ptq.recipe import Recipe
    assert set(layer_overhead_macs(tiny_dit).values()) == {0}
    model = quantize(tiny_dit, uniform_config(tiny_dit, 4, 4),
                     Recipe(methods=["smooth", "lowrank"], method_options={"lowrank": {"rank": 2}}),
                     calibration=(torch.randn(2, 1, 32, 32), torch.tensor([3, 900]), torch.tensor([1, 2])))
    overhead, tokens = layer_overhead_macs(model), 64
    assert overhead["blocks.0.attn.qkv"] == tokens * (64 + 2 * (64 + 192))  # smoothing + rank-2 branch per token
    assert overhead["blocks.0.adaLN_modulation.1"] == 64 + 2 * (64 + 384)  # once per image
