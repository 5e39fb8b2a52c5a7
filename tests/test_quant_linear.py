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
    """Bit-widths at which the layer rounded its weight: RTN codes (cached path) or the STE path."""
    calls = []

    def counting_codes(*args, **kwargs):
        calls.append(args[1])
        return quantize_weight(*args, **kwargs)

    def counting_ste(*args, **kwargs):
        calls.append(args[1])
        return fake_quantize_weight(*args, **kwargs)

    monkeypatch.setattr(linear_module, "quantize_weight", counting_codes)
    monkeypatch.setattr(linear_module, "fake_quantize_weight", counting_ste)
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
        cached = layer.quantized_weight()
        layer(x)
        assert count_weight_quantizations == [4]
        layer.set_bits(8, 8)
        layer(x)
        layer.set_bits(4, 4)
        assert torch.equal(layer(x), first)
        assert layer.quantized_weight() is cached
    assert count_weight_quantizations == [4, 8]


def _adamw_fused_step(layer):
    layer.weight.grad = torch.ones_like(layer.weight)
    torch.optim.AdamW([layer.weight], lr=0.1, fused=True).step()


@pytest.mark.parametrize("change", [
    lambda layer: layer.weight.data.copy_(3 * layer.weight.data),
    lambda layer: layer.weight.data.mul_(2),
    lambda layer: layer.weight.data.__setitem__((0, 0), 5.0),
    _adamw_fused_step,
    lambda layer: torch.optim.SGD([layer.weight], lr=0.1).step(),
    lambda layer: layer.load_state_dict({"weight": torch.randn(24, 32), "bias": layer.bias.detach()}),
], ids=["data.copy_", "data.mul_", "data[0,0]=", "AdamW(fused)", "SGD", "load_state_dict"])
def test_codes_never_outlive_the_weight_they_came_from(linear, change):
    layer = QuantLinear.from_linear(linear, 4, 32)
    layer.weight.grad = torch.randn_like(layer.weight)
    x = torch.randn(5, 32)
    with torch.no_grad():
        layer(x)  # fills the cache
    change(layer)
    with torch.no_grad():
        expected = nn.functional.linear(x, fake_quantize_weight(layer.weight, 4), layer.bias)
        assert torch.equal(layer(x), expected)


def test_cache_follows_weight_option_changes(linear, count_weight_quantizations):
    layer = QuantLinear.from_linear(linear, 4, 32)
    with torch.no_grad():
        layer.fake_quantized_weight()
        layer.group_size = 8
        layer.fake_quantized_weight()
        layer.fake_quantized_weight()
    assert count_weight_quantizations == [4, 4]
    assert layer.quantized_weight().group_size == 8


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


def test_static_activation_scales_are_kept_per_a_bits(linear):
    layer = QuantLinear.from_linear(linear, 32, 32, activations="static")
    layer.act_scales.update({8: torch.tensor(0.02), 4: torch.tensor(0.3)})
    x = torch.randn(3, 32)
    with torch.no_grad():
        for bits, scale in ((8, 0.02), (4, 0.3), (8, 0.02)):
            layer.set_bits(32, bits)
            assert torch.allclose(layer(x), linear(fake_quantize_activation(x, bits, scale=scale)))
    with pytest.raises(ValueError, match="no static activation scale for a_bits 6"):
        layer.set_bits(32, 6)
    assert layer.a_bits == 8  # a refused switch changes nothing
    assert set(layer.state_dict()) >= {"act_scales.8", "act_scales.4"}


def test_asymmetric_per_token_activations(linear):
    layer = QuantLinear.from_linear(linear, 32, 4, activations="dynamic-asym")
    x = torch.nn.functional.gelu(torch.randn(6, 32) * 3)  # post-GELU: mostly positive
    with torch.no_grad():
        asymmetric = (layer(x) - linear(x)).norm()
        symmetric = (linear(fake_quantize_activation(x, 4)) - linear(x)).norm()
        assert torch.allclose(layer(x), linear(fake_quantize_activation(x, 4, symmetric=False)))
    assert asymmetric < 0.75 * symmetric


def test_gptq_codes_per_w_bits_and_no_silent_fallback(linear):
    layer = QuantLinear.from_linear(linear, 4, 32)
    rounded = {bits: quantize_weight(torch.randn(24, 32), bits) for bits in (3, 4)}
    for quantized in rounded.values():
        layer.set_rounded_weight(quantized)
    x = torch.randn(2, 32)
    with torch.no_grad():
        for bits in (3, 4):
            layer.set_bits(bits, 32)
            assert torch.allclose(layer(x), nn.functional.linear(x, dequantize_weight(rounded[bits]), linear.bias))
            assert layer.quantized_weight() is rounded[bits]
    with pytest.raises(ValueError, match="no GPTQ codes for w_bits 8"):
        layer.set_bits(8, 32)
    layer.set_bits(32, 32)  # full precision needs no codes
    layer.set_bits(4, 32)
    with torch.no_grad():
        layer.weight.data.mul_(3)  # GPTQ codes belong to the old weight: dropped, and the forward refuses
        with pytest.raises(ValueError, match="weight changed"):
            layer(x)


def test_per_bit_state_survives_state_dict_and_moves_with_the_module(linear):
    layer = QuantLinear.from_linear(linear, 4, 32, activations="static", symmetric=False)
    layer.act_scales[8] = torch.tensor(0.05)
    layer.set_rounded_weight(quantize_weight(linear.weight, 4, symmetric=False))
    layer.set_bits(4, 8)
    state = layer.state_dict()
    assert {"rounded_weights.4.codes", "rounded_weights.4.scale", "rounded_weights.4.zero_point"} <= set(state)
    twin = QuantLinear(32, 24, activations="static", symmetric=False)
    twin.load_state_dict(state)
    twin.set_bits(4, 8)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(twin(x), layer(x))
        twin.double()
        assert twin.quantized_weight().scale.dtype == torch.float64
        assert twin.act_scale.dtype == torch.float64
        assert twin(x.double()).dtype == torch.float64


def test_second_branch_or_late_transform_is_refused(linear):
    from treeq.branches.lowrank import LowRankBranch
    from treeq.methods.rotation import rotate_linear_
    layer = QuantLinear.from_linear(nn.Linear(32, 24), 32, 32)
    layer.load_state_dict(linear.state_dict())
    layer.attach_branch(LowRankBranch.from_weight(layer.weight.detach(), 2))
    x = torch.randn(3, 32)
    before = layer(x)
    with pytest.raises(ValueError, match="already has a branch"):
        layer.attach_branch(LowRankBranch.from_weight(layer.weight.detach(), 2))
    with pytest.raises(ValueError, match="before the branch"):
        rotate_linear_(layer)
    assert torch.allclose(layer(x), before) and torch.allclose(before, linear(x), atol=1e-5)


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
