"""QuantLinear: exact at full precision, cached bit switching, STE training, export view."""
import pytest
import torch
import torch.nn as nn

import treeq.quant.linear as linear_module
from treeq.quant.linear import QuantLinear
from treeq.quant.quantizers import dequantize_weight, fake_quantize_activation, fake_quantize_weight, quantize_weight


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture
def linear():
    return nn.Linear(32, 24)


@pytest.fixture
def count_weight_quantizations(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return fake_quantize_weight(*args, **kwargs)

    monkeypatch.setattr(linear_module, "fake_quantize_weight", counting)
    return calls


@pytest.mark.parametrize("bits", [16, 32])
def test_full_precision_equals_nn_linear_exactly(linear, bits):
    layer = QuantLinear.from_linear(linear, bits, bits)
    x = torch.randn(2, 5, 32)
    assert torch.equal(layer(x), linear(x))
    with torch.no_grad():
        assert torch.equal(layer(x), linear(x))


def test_from_linear_shares_parameters_and_is_an_nn_linear(linear):
    layer = QuantLinear.from_linear(linear, 8, 8)
    assert isinstance(layer, nn.Linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(4, 32)
    with torch.no_grad():
        error = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert 0 < error < 0.02


def test_forward_is_quantized_input_times_quantized_weight(linear):
    layer = QuantLinear.from_linear(linear, 4, 6, group_size=8, symmetric=False)
    x = torch.randn(3, 32)
    expected = nn.functional.linear(fake_quantize_activation(x, 6),
                                    fake_quantize_weight(linear.weight, 4, group_size=8, symmetric=False), linear.bias)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_cache_hit_does_not_requantize(linear, count_weight_quantizations):
    layer = QuantLinear.from_linear(linear, 4, 4)
    x = torch.randn(3, 32)
    with torch.no_grad():
        first = layer(x)
        cached = layer.fake_quantized_weight()
        layer(x)
        assert count_weight_quantizations == [4]
        layer.set_bits(8, 8)
        layer(x)
        layer.set_bits(4, 4)
        assert torch.equal(layer(x), first)
        assert layer.fake_quantized_weight() is cached
    assert count_weight_quantizations == [4, 8]


def test_cache_follows_weight_and_option_changes(linear, count_weight_quantizations):
    layer = QuantLinear.from_linear(linear, 4, 32)
    with torch.no_grad():
        before = layer.fake_quantized_weight()
        layer.weight.mul_(2)
        assert torch.allclose(layer.fake_quantized_weight(), 2 * before)
        layer.group_size = 8
        layer.fake_quantized_weight()
        layer.clear_cache()
        layer.fake_quantized_weight()
    assert count_weight_quantizations == [4, 4, 4, 4]


def test_ste_path_when_the_weight_needs_gradients(linear, count_weight_quantizations):
    layer = QuantLinear.from_linear(linear, 4, 4).train()
    x = torch.randn(6, 32)
    layer(x).square().sum().backward()
    layer(x)
    assert count_weight_quantizations == [4, 4]  # never cached while training the weight
    reference = nn.Linear(32, 24)
    with torch.no_grad():
        reference.weight.copy_(fake_quantize_weight(linear.weight, 4))
        reference.bias.copy_(linear.bias)
    reference(fake_quantize_activation(x, 4)).square().sum().backward()
    # min-max clipping clips nothing, so the straight-through gradient is the quantized layer's own.
    assert torch.allclose(layer.weight.grad, reference.weight.grad, atol=1e-5)
    assert torch.allclose(layer.bias.grad, reference.bias.grad, atol=1e-5)


def test_frozen_weight_uses_the_cache_while_gradients_reach_the_input(linear, count_weight_quantizations):
    layer = QuantLinear.from_linear(linear, 4, 32)
    layer.weight.requires_grad_(False)
    x = torch.randn(6, 32, requires_grad=True)
    layer(x).sum().backward()
    layer(x)
    assert count_weight_quantizations == [4]
    assert torch.allclose(x.grad, layer.fake_quantized_weight().sum(0).expand(6, 32))


def test_quantized_weight_matches_the_forward_weight(linear):
    layer = QuantLinear.from_linear(linear, 3, 8, clip="mse", group_size=16)
    quantized = layer.quantized_weight()
    assert quantized.bits == 3 and quantized.group_size == 16
    with torch.no_grad():
        assert torch.equal(dequantize_weight(quantized), layer.fake_quantized_weight())
    layer.set_bits(16, 8)
    with pytest.raises(ValueError, match="full precision"):
        layer.quantized_weight()


def test_static_activation_scale(linear):
    layer = QuantLinear.from_linear(linear, 32, 8, act_scale=0.02)
    x = torch.randn(3, 32)
    expected = linear(fake_quantize_activation(x, 8, scale=0.02))
    with torch.no_grad():
        assert torch.allclose(layer(x), expected)
    assert "act_scale" in layer.state_dict()


def test_rounded_weight_replaces_round_to_nearest_at_its_bits(linear):
    layer = QuantLinear.from_linear(linear, 4, 32)
    rounded = quantize_weight(torch.randn(24, 32), 4)
    layer.set_rounded_weight(rounded)
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert torch.allclose(layer(x), nn.functional.linear(x, dequantize_weight(rounded), linear.bias))
        assert layer.quantized_weight() is rounded
        layer.set_bits(8, 32)
        assert torch.equal(layer.fake_quantized_weight(), fake_quantize_weight(linear.weight, 8))
    layer.double()  # rounded weights move with the module
    layer.set_bits(4, 32)
    assert layer.quantized_weight().scale.dtype == torch.float64
    with torch.no_grad():
        assert layer(x.double()).dtype == torch.float64


def test_invalid_options_raise_value_error(linear):
    with pytest.raises(ValueError, match="bits"):
        QuantLinear.from_linear(linear, 9, 8)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear.from_linear(linear, 4, 8, group_size=5)
    with pytest.raises(ValueError, match="clip"):
        QuantLinear.from_linear(linear, 4, 8, clip="max")
    layer = QuantLinear.from_linear(linear, 4, 8)
    with pytest.raises(ValueError, match="bits"):
        layer.set_bits(4, 1)


def test_repr_shows_bits(linear):
    assert "w_bits=4, a_bits=8" in repr(QuantLinear.from_linear(linear, 4, 8))
