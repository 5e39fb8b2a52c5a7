"""Resident memory of a quantized model: measured by component, and projected from shapes alone."""
import pytest
import torch

from treeq.bits import quantizable_layers, uniform_config
from treeq.memory import (
    dit_shapes,
    flux_shapes,
    model_shapes,
    project_resident_bytes,
    projected_peaks,
    quantized_linear_bytes,
    resident_bytes,
)
from treeq.models.registry import create_model
from treeq.ptq.apply import quantize
from treeq.quant.linear import cache_dequantized_
from treeq.ptq.recipe import Recipe


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("DiT-MNIST").eval()


def _forward(model):
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32), torch.tensor([3, 500]), torch.tensor([1, 10]))


@pytest.mark.parametrize("cache", [False, True], ids=["on-the-fly", "cached"])
def test_a_quantized_model_holds_what_the_formula_projects(model, cache):
    quantized = quantize(model, uniform_config(model, 4, 4), Recipe())
    cache_dequantized_(quantized, cache)
    shapes, other = model_shapes(model, quantizable_layers(model))
    before = resident_bytes(quantized)
    assert before == project_resident_bytes(shapes, other, code_widths=0)  # round-to-nearest: codes come later
    _forward(quantized)
    held = resident_bytes(quantized)
    assert held == project_resident_bytes(shapes, other, code_widths=1, cache_dequantized=cache)
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert held["total"] < (2.3 if cache else 1.3) * fp32  # 2.7x FP32 before the snapshot went and the cache


def test_gptq_widths_are_counted_per_width(model):
    recipe = Recipe(methods=("gptq",), switch_bits=((3, 4), (8, 8)))
    calibration = (torch.randn(4, 1, 32, 32), torch.tensor([1, 200, 500, 900]), torch.tensor([0, 1, 2, 10]))
    quantized = quantize(model, uniform_config(model, 4, 4), recipe, calibration=calibration)
    shapes, other = model_shapes(model, quantizable_layers(model))
    _forward(quantized)
    assert resident_bytes(quantized) == project_resident_bytes(shapes, other, code_widths=3)


def test_layer_formula_components():
    per_channel = quantized_linear_bytes(8, 16)
    assert per_channel == {"weights": 512, "codes": 128, "scales": 32, "caches": 4 * (24 + 16), "branches": 0,
                           "transforms": 0, "other": 32}
    grouped = quantized_linear_bytes(8, 16, group_size=4, symmetric=False, code_widths=2, cache_dequantized=True)
    assert grouped["codes"] == 256 and grouped["scales"] == 2 * 8 * 4 * 4 * 2 and grouped["caches"] == 160 + 512


def test_real_shapes_without_building_the_models():
    shapes, other = dit_shapes("DiT-XL/2")
    assert len(shapes) == 140 and (1152, 1152, True) in shapes and (1152, 4608, True) in shapes
    assert sum(out * inp + out for out, inp, _ in shapes) + other // 4 == 675_129_632  # DiT-XL/2's parameters
    peaks = projected_peaks(shapes, other, code_widths=4, gptq=True)
    assert peaks["quantize"]["hessians"] == 28 * 4 * (4 * 1152 ** 2 + 4608 ** 2)
    shapes, other = flux_shapes()
    assert len(shapes) == 19 * 14 + 38 * 6 and (3072, 15360, True) in shapes  # single blocks' proj_out
    assert sum(out * inp + out for out, inp, _ in shapes) + other // 4 == 11_891_178_560  # FLUX.1's parameters
