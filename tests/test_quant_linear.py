"""QuantLinear: exact at full precision, cached bit switching, STE training, export view."""
import pytest
import torch
import torch.nn as nn

import treeq.quant.linear as linear_module
from treeq.memory import quantized_linear_bytes, resident_bytes
from treeq.quant.linear import QuantLinear, cache_dequantized_, weight_fingerprint
from treeq.quant.quantizers import (
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_weight,
)


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
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_codes_never_outlive_the_weight_they_came_from(linear, change, frozen):
    layer = QuantLinear.from_linear(linear, 4, 32)
    layer.weight.requires_grad_(not frozen)
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


def _pre_change_forward(layer, x, quantized):
    """The forward as it was computed before the memory work (commit 266db8b), written out."""
    weight = dequantize_weight(quantized).to(layer.weight.dtype)
    if layer.step_gain is not None:
        weight = weight * layer.step_gain.repeat_interleave(layer.in_features // layer.step_gain.shape[1], dim=1)
    x_quantized = fake_quantize_activation(x, layer.a_bits, symmetric=layer.activations != "dynamic-asym",
                                           scale=layer.act_scale)
    return nn.functional.linear(x_quantized, weight, layer.bias)


@pytest.mark.parametrize("cache", [False, True], ids=["on-the-fly", "cached"])
@pytest.mark.parametrize("options", [{}, {"symmetric": False, "group_size": 8}, {"clip": "mse"},
                                     {"activations": "dynamic-asym", "group_size": 16}],
                         ids=["sym", "asym-g8", "mse", "asym-act"])
def test_forward_is_bit_identical_to_the_pre_change_formula(linear, options, cache):
    layer = QuantLinear.from_linear(linear, 4, 4, **options)
    layer.cache_dequantized = cache
    layer.weight.requires_grad_(False)
    x = torch.randn(7, 32)
    with torch.no_grad():
        for bits in (2, 3, 4, 6, 8, 4):
            layer.set_bits(bits, bits)
            expected = _pre_change_forward(layer, x, quantize_weight(layer.weight, bits, **layer.weight_options()))
            assert torch.equal(layer(x), expected)
            assert torch.equal(layer(x), expected)  # a second forward at the same bits: the cache (or not)
    # GPTQ codes per w_bits, and trained step gains, through the same formula
    rounded = {bits: quantize_weight(torch.randn(24, 32), bits, **layer.weight_options()) for bits in (3, 4)}
    for quantized in rounded.values():
        layer.set_rounded_weight(quantized)
    for bits in (3, 4, 3):
        layer.set_bits(bits, 8)
        with torch.no_grad():
            assert torch.equal(layer(x), _pre_change_forward(layer, x, rounded[bits]))
    gain = layer.train_step_sizes_()
    with torch.no_grad():
        gain.mul_(torch.rand_like(gain) + 0.5)
    out = layer(x)
    assert torch.equal(out, _pre_change_forward(layer, x, rounded[3]))
    out.sum().backward()
    assert gain.grad is not None


def _frozen_w4a4(linear, **options):
    layer = QuantLinear.from_linear(linear, 4, 4, **options)
    layer.weight.requires_grad_(False)
    with torch.no_grad():
        layer(torch.randn(3, 32))
    return layer


@pytest.mark.parametrize("options", [{}, {"symmetric": False, "group_size": 8}], ids=["per-channel", "asym-g8"])
def test_a_frozen_layer_holds_its_weight_and_codes_only(linear, options):
    """Resident bytes of a frozen W4A4 layer: 4N (float weight) + N (int8 codes) + scales + a 4 (3 out + in)
    fingerprint + bias; no float snapshot and no dequantized copy (each would add 4N)."""
    layer = _frozen_w4a4(linear, **options)
    held = resident_bytes(layer)
    formula = quantized_linear_bytes(24, 32, code_widths=1, **options)
    assert {key: held[key] for key in formula} == formula
    entries = 24 * 32
    assert held["caches"] == 4 * (3 * 24 + 32) < entries
    groups = 32 // options.get("group_size", 32)
    # 1.25x the float32 weight, plus scales and zero points (8 bytes per group), fingerprint and bias
    assert held["total"] <= 5 * entries + 8 * 24 * groups + 4 * (3 * 24 + 32) + 4 * 24
    for bits in (3, 8):  # round-to-nearest codes accumulate per visited w_bits: N bytes each
        layer.set_bits(bits, bits)
        with torch.no_grad():
            layer(torch.randn(3, 32))
    assert resident_bytes(layer)["codes"] == 3 * entries


def test_the_dequantized_cache_is_one_float_copy_and_can_be_dropped(linear, count_weight_quantizations):
    layer = _frozen_w4a4(linear)
    assert layer._dequantized is None and not linear_module.CACHE_DEQUANTIZED  # off by default
    cache_dequantized_(layer, True)
    x = torch.randn(3, 32)
    with torch.no_grad():
        out = layer(x)
        cached = layer._dequantized[1]
        assert torch.equal(layer(x), out) and layer._dequantized[1] is cached
    assert resident_bytes(layer)["caches"] == 4 * 24 * 32 + 4 * (3 * 24 + 32)
    cache_dequantized_(layer, False)
    assert layer._dequantized is None
    with torch.no_grad():
        assert torch.equal(layer(x), out) and layer._dequantized is None
    assert count_weight_quantizations == [4]  # the codes are kept either way


def _fingerprints_equal(first, second):
    return linear_module._same_fingerprint(weight_fingerprint(first), weight_fingerprint(second))


def test_weight_fingerprint_is_exact_and_sees_permutations_scaling_and_sign():
    weight = torch.randn(48, 40)
    rows, columns, maxima, minima = weight_fingerprint(weight)
    assert rows.shape == maxima.shape == minima.shape == (48,) and columns.shape == (40,)
    bits = weight.view(torch.int32).to(torch.int64)
    wrapped = lambda sums: ((sums + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)  # noqa: E731
    assert torch.equal(rows, wrapped(bits.sum(1))) and torch.equal(columns, wrapped(bits.sum(0)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert linear_module._same_fingerprint(weight_fingerprint(weight), (rows, columns, maxima, minima))
    finally:
        torch.set_num_threads(threads)
    assert _fingerprints_equal(weight, weight.T.contiguous().T.clone())  # same values, another tensor
    point = weight.clone()
    point[5, 7] = torch.nextafter(point[5, 7], torch.tensor(float("inf")))  # one ulp of one entry
    changed = {"row swap": weight[[1, 0, *range(2, 48)]], "column swap": weight[:, [1, 0, *range(2, 40)]],
               "one ulp": point, "negated": -weight, "x2": 2 * weight}
    for name, other in changed.items():
        assert not _fingerprints_equal(weight, other), name
    # x2 and a sign flip are invisible to the wrapped sums at these shapes (512 x 2^23 = 2^32; an even
    # count of 2^31): the extremes see them
    big = torch.randn(512, 512)
    for other in (2 * big, -big):
        assert all(torch.equal(a, b) for a, b in zip(weight_fingerprint(other)[:2], weight_fingerprint(big)[:2]))
        assert not _fingerprints_equal(big, other)
    nan = weight.clone()
    nan[0, 0] = float("nan")
    assert _fingerprints_equal(nan, nan.clone())  # NaN matches itself: no false "changed"
    for dtype in (torch.float64, torch.bfloat16):
        assert _fingerprints_equal(weight.to(dtype), weight.to(dtype).clone())
        assert not _fingerprints_equal(weight.to(dtype), -weight.to(dtype))


def test_gptq_codes_survive_moves_and_a_frozen_weight_write_drops_them(linear):
    layer = QuantLinear.from_linear(linear, 4, 32)
    layer.weight.requires_grad_(False)
    layer.set_rounded_weight(quantize_weight(linear.weight, 4))
    layer.double().float()
    assert 4 in layer.rounded_weights
    with torch.no_grad():
        layer(torch.randn(2, 32))
    layer.weight.data[3, 3] += 1e-3
    with pytest.raises(ValueError, match="weight changed"):
        with torch.no_grad():
            layer(torch.randn(2, 32))
