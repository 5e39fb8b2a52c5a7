"""PTQ methods (rotation, smoothing, GPTQ, low-rank branch) and quantize() on the tiny DiT."""
import copy

import pytest
import torch
import torch.nn as nn

from treeq.bits import quantizable_layers, uniform_config
from treeq.branches.lowrank import LowRankBranch
from treeq.ptq.apply import quantization_map, quantize, set_bits_
from treeq.methods.gptq import HessianAccumulator, gptq_quantize
from treeq.quant.linear import QuantLinear
from treeq.ptq.recipe import Recipe
from treeq.quant.quantizers import dequantize_weight, quantize_weight
from treeq.methods.rotation import HadamardTransform, hadamard_matrix, rotate_linear_
from treeq.methods.smooth import InputAbsMax, smooth_linear_


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture
def calibration():
    return torch.randn(4, 1, 32, 32), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))


def relative_error(reference, approximation):
    return ((reference - approximation).norm() / reference.norm()).item()


def outlier_layer(tokens=256, features=64):
    """Inputs with one channel 20x larger, and a linear whose weights make every channel matter equally."""
    linear, x = nn.Linear(features, 32), torch.randn(tokens, features)
    x[:, 3] *= 20
    with torch.no_grad():
        linear.weight[:, 3] /= 20
    return linear, x


def quantized_output(linear, x, w_bits, a_bits, prepare=None):
    layer = QuantLinear.from_linear(copy.deepcopy(linear), w_bits, a_bits)
    if prepare is not None:
        prepare(layer)
    with torch.no_grad():
        return layer(x)


def test_hadamard_is_orthonormal_and_block_diagonal():
    h = hadamard_matrix(64)
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(96)
    rotation = HadamardTransform(96)  # 96 = 3 blocks of 32
    dense = rotation(torch.eye(96))
    assert torch.allclose(dense @ dense.T, torch.eye(96), atol=1e-6)
    assert torch.equal(dense[:32, 32:], torch.zeros(32, 64))
    assert HadamardTransform(1152).block.shape == (128, 128)
    assert "block" not in rotation.state_dict()


def test_rotation_keeps_the_float_output_and_lowers_w4a4_error():
    linear, x = outlier_layer()
    reference = linear(x).detach()
    assert torch.allclose(quantized_output(linear, x, 32, 32, rotate_linear_), reference, atol=1e-4)
    plain = relative_error(reference, quantized_output(linear, x, 4, 4))
    rotated = relative_error(reference, quantized_output(linear, x, 4, 4, rotate_linear_))
    assert rotated < 0.7 * plain


def test_smoothing_keeps_the_float_output_and_lowers_error_with_outliers():
    linear, x = outlier_layer()
    reference = linear(x).detach()
    statistic = InputAbsMax()
    statistic.add(x[:128])
    statistic.add(x[128:])
    assert torch.equal(statistic.value, x.abs().amax(0))
    smooth = lambda layer: smooth_linear_(layer, statistic.value, alpha=0.5)  # noqa: E731
    assert torch.allclose(quantized_output(linear, x, 32, 32, smooth), reference, atol=1e-4)
    for w_bits, a_bits in ((8, 8), (4, 8)):
        plain = relative_error(reference, quantized_output(linear, x, w_bits, a_bits))
        smoothed = relative_error(reference, quantized_output(linear, x, w_bits, a_bits, smooth))
        assert smoothed < 0.7 * plain
    with pytest.raises(ValueError, match="alpha"):
        smooth_linear_(QuantLinear.from_linear(linear, 8, 8), statistic.value, alpha=1.5)


def correlated_inputs(tokens=512, features=64):
    return torch.randn(tokens, 6) @ torch.randn(6, features) + 0.05 * torch.randn(tokens, features)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    weight, x = torch.randn(32, 64), correlated_inputs()
    accumulator = HessianAccumulator()
    accumulator.add(x.unsqueeze(0))
    assert torch.allclose(accumulator.hessian(), 2 * x.T @ x / 512, rtol=1e-4)
    reference = x @ weight.T
    for bits, options in ((3, {}), (4, {"group_size": 16, "symmetric": False})):
        rtn = dequantize_weight(quantize_weight(weight, bits, **options))
        gptq = dequantize_weight(gptq_quantize(weight, accumulator.hessian(), bits, block_size=16, **options))
        assert relative_error(reference, x @ gptq.T) < 0.6 * relative_error(reference, x @ rtn.T)


@pytest.mark.parametrize("options", [{}, {"group_size": 16, "symmetric": False, "clip": "mse"}])
def test_gptq_equals_round_to_nearest_when_inputs_are_uncorrelated(options):
    weight = torch.randn(32, 64)
    hessian = torch.diag(torch.rand(64) + 0.5)  # no correlation: no error is worth pushing to other columns
    gptq = gptq_quantize(weight, hessian, 4, block_size=16, **options)
    assert torch.equal(gptq.codes, quantize_weight(weight, 4, **options).codes)


def test_gptq_survives_an_input_channel_that_never_fires():
    x = correlated_inputs()
    x[:, 5] = 0
    quantized = gptq_quantize(torch.randn(16, 64), 2 * x.T @ x, 4)
    assert torch.isfinite(quantized.scale).all()
    assert (quantized.codes[:, 5] == 0).all()
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(torch.randn(16, 64), torch.eye(32), 4)


def test_low_rank_branch_is_its_dense_matrix_and_the_best_rank_r_approximation():
    weight = torch.randn(24, 40)
    branch = LowRankBranch.from_weight(weight, 5)
    x = torch.randn(3, 40)
    assert torch.allclose(branch(x), x @ branch.dense().T, atol=1e-5)
    singular_values = torch.linalg.svdvals(weight)
    assert (weight - branch.dense()).norm().item() == pytest.approx(singular_values[5:].norm().item(), rel=1e-4)
    with pytest.raises(ValueError, match="rank"):
        LowRankBranch(40, 24, 25)


def test_low_rank_branch_lowers_w4a4_error_on_a_low_rank_dominated_weight():
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 4) @ torch.randn(4, 64) + 0.05 * torch.randn(48, 64))
    x = torch.randn(128, 64)
    reference = linear(x).detach()
    attach = lambda layer: layer.attach_branch(LowRankBranch.from_weight(layer.weight, 8))  # noqa: E731
    assert torch.allclose(quantized_output(linear, x, 32, 32, attach), reference, atol=1e-4)
    plain = relative_error(reference, quantized_output(linear, x, 4, 4))
    assert relative_error(reference, quantized_output(linear, x, 4, 4, attach)) < 0.3 * plain


def dit_output(model, calibration):
    with torch.no_grad():
        return model(*calibration)


def test_w8a8_is_close_to_full_precision_and_w4a4_is_not(tiny_dit, calibration):
    reference = dit_output(tiny_dit, calibration)
    w8a8 = relative_error(reference, dit_output(quantize(tiny_dit, uniform_config(tiny_dit, 8, 8)), calibration))
    w4a4 = relative_error(reference, dit_output(quantize(tiny_dit, uniform_config(tiny_dit, 4, 4)), calibration))
    assert w8a8 < 0.02
    assert w4a4 > 3 * w8a8


def test_quantize_copies_unless_inplace(tiny_dit):
    before = copy.deepcopy(tiny_dit.state_dict())
    recipe = Recipe(methods=["lowrank"], method_options={"lowrank": {"rank": 4}})
    quantized = quantize(tiny_dit, uniform_config(tiny_dit, 4, 4), recipe)
    assert quantized is not tiny_dit
    assert not any(isinstance(module, QuantLinear) for module in tiny_dit.modules())
    assert all(torch.equal(value, tiny_dit.state_dict()[key]) for key, value in before.items())
    assert quantizable_layers(quantized) == quantizable_layers(tiny_dit)  # branch linears are not layers
    same = quantize(tiny_dit, {"blocks.0.attn.qkv": {"w_bits": 4, "a_bits": 4}}, inplace=True)
    assert same is tiny_dit and isinstance(tiny_dit.blocks[0].attn.qkv, QuantLinear)


def test_quantization_map_round_trips_and_set_bits_switches_in_place(tiny_dit, calibration):
    config = uniform_config(tiny_dit, 4, 8)
    del config["blocks.1.mlp.fc1"]
    config["blocks.0.attn.proj"] = {"w_bits": 3, "a_bits": 16}
    quantized = quantize(tiny_dit, config)
    assert quantization_map(quantized) == config
    w4a4 = uniform_config(tiny_dit, 4, 4)
    del w4a4["blocks.1.mlp.fc1"]
    set_bits_(quantized, w4a4)
    assert quantization_map(quantized) == w4a4
    assert torch.equal(dit_output(quantized, calibration), dit_output(quantize(tiny_dit, w4a4), calibration))
    set_bits_(quantized, {})
    assert quantization_map(quantized) == {}
    with pytest.raises(ValueError, match="not quantized"):
        set_bits_(quantized, uniform_config(tiny_dit, 4, 4))


@pytest.mark.parametrize("method", ["rtn", "hadamard", "smooth", "gptq", "lowrank"])
def test_every_method_keeps_the_float_model_and_quantizes(tiny_dit, calibration, method):
    reference = dit_output(tiny_dit, calibration)
    options = {"lowrank": {"rank": 8}} if method == "lowrank" else {}
    recipe = Recipe(methods=[method], method_options=options)
    quantized = quantize(tiny_dit, uniform_config(tiny_dit, 4, 8), recipe, calibration=calibration)
    error = relative_error(reference, dit_output(quantized, calibration))
    assert 0 < error < 0.5
    set_bits_(quantized, {})
    assert torch.allclose(dit_output(quantized, calibration), reference, atol=1e-4)


def test_gptq_through_quantize_beats_round_to_nearest_at_w3(tiny_dit, calibration):
    config = uniform_config(tiny_dit, 3, 32)
    reference = dit_output(tiny_dit, calibration)
    rtn = relative_error(reference, dit_output(quantize(tiny_dit, config), calibration))
    gptq_model = quantize(tiny_dit, config, Recipe(methods=["gptq"]), calibration=calibration)
    assert relative_error(reference, dit_output(gptq_model, calibration)) < rtn
    layer = gptq_model.blocks[0].attn.qkv
    assert layer.quantized_weight() is layer.rounded_weights[3]


def test_quantize_input_errors(tiny_dit, calibration):
    config = uniform_config(tiny_dit, 4, 4)
    with pytest.raises(ValueError, match="needs calibration"):
        quantize(tiny_dit, config, Recipe(methods=["smooth"]))
    with pytest.raises(ValueError, match="needs calibration"):
        quantize(tiny_dit, config, Recipe(activations="static"))
    with pytest.raises(ValueError, match="three tensors"):
        quantize(tiny_dit, config, Recipe(methods=["gptq"]), calibration=calibration[:2])
    with pytest.raises(ValueError, match="another model"):
        quantize(tiny_dit, {"blocks.9.attn.qkv": {"w_bits": 4, "a_bits": 4}})
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantize(tiny_dit, config), config)
