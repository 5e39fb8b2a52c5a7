"""The Python API: quantize_ works in place, load_run and search_bits (the README's example: test_readme.py)."""

import torch

import treeq
from treeq.models.families import init_pipeline_folder
from treeq.quant.linear import QuantLinear


def test_quantize_takes_a_preset_and_a_mapping_in_place(tiny_dit):
    model = treeq.quantize_(tiny_dit, "W8A8")
    assert model is tiny_dit and isinstance(tiny_dit.blocks[0].attn.qkv, QuantLinear)
    assert tiny_dit.blocks[0].attn.qkv.w_bits == 8
    torch.manual_seed(0)
    other = treeq.api.Recipe(bits={"blocks.0.mlp.fc1": {"w_bits": 4, "a_bits": 8}})
    from treeq.models.registry import create_model
    fresh = create_model("DiT-MNIST", depth=2, hidden_size=64, num_heads=4).eval()
    treeq.quantize_(fresh, other)
    assert isinstance(fresh.blocks[0].mlp.fc1, QuantLinear) and not isinstance(fresh.blocks[0].mlp.fc2, QuantLinear)


def test_load_run_returns_the_quantized_transformer_of_a_run_folder(tmp_path):
    from treeq.models.adapters import adapter_for
    from treeq.models.load import load
    from treeq.ptq.calibration import collect_calibration
    from treeq.ptq.run import save_run

    folder = init_pipeline_folder("pixart", tmp_path / "pixart")
    model = load(folder)
    calibration = collect_calibration(model, num_images=1, num_timesteps=1)
    recipe = treeq.Recipe(model=str(folder), bits="W4A4")
    quantized = treeq.quantize_(model, recipe, calibration)
    save_run(tmp_path / "run", recipe, quantized)
    reloaded = treeq.load_run(tmp_path / "run")
    inputs = next(adapter_for(model).batches(calibration, 4))
    with torch.no_grad():
        assert torch.equal(adapter_for(model).forward(reloaded, inputs), adapter_for(model).forward(quantized, inputs))
    assert isinstance(reloaded.transformer_blocks[0].attn1.to_q, QuantLinear)
