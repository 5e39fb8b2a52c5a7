"""Uniform quantizers: agreement with torch's fake-quantize ops, grid properties, STE, clipping."""
import pytest
import torch

from treeq.quant.quantizers import (
    code_range,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_activation_per_token,
    quantize_weight,
)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def sqnr_db(reference, approximation):
    return (10 * torch.log10(reference.square().sum() / (reference - approximation).square().sum())).item()


@pytest.fixture
def weight():
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(0))


def test_code_range_layouts():
    assert code_range(4, symmetric=True) == (-7, 7)
    assert code_range(4, symmetric=False) == (-8, 7)
    assert code_range(8, symmetric=False) == (-128, 127)  # 256 levels still fit int8
    with pytest.raises(ValueError, match="full precision"):
        code_range(16, symmetric=True)
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits"):
            code_range(bits, symmetric=True)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_matches_torch_per_channel_affine(weight, bits, symmetric):
    quantized = quantize_weight(weight, bits, symmetric=symmetric)
    qmin, qmax = code_range(bits, symmetric)
    zero_point = torch.zeros(16) if symmetric else quantized.zero_point[:, 0]
    expected = torch.fake_quantize_per_channel_affine(
        weight, quantized.scale[:, 0], zero_point.to(torch.int32), 0, qmin, qmax)
    assert torch.equal(dequantize_weight(quantized), expected)
    assert torch.equal(fake_quantize_weight(weight, bits, symmetric=symmetric), expected)


@pytest.mark.parametrize("bits", [3, 8])
def test_static_activation_matches_torch_per_tensor_affine(bits):
    x = torch.randn(2, 5, 32)
    qmin, qmax = code_range(bits, symmetric=True)
    expected = torch.fake_quantize_per_tensor_affine(x, 0.05, 0, qmin, qmax)
    assert torch.equal(fake_quantize_activation(x, bits, scale=torch.tensor(0.05)), expected)


def test_dynamic_activation_is_per_token_affine():
    x = torch.randn(2, 5, 32) * torch.linspace(0.1, 10, 5)[:, None]
    qmin, qmax = code_range(4, symmetric=True)
    tokens = x.reshape(10, 32)
    scale = tokens.abs().amax(1) / qmax
    expected = torch.fake_quantize_per_channel_affine(tokens, scale, torch.zeros(10, dtype=torch.int32), 0, qmin, qmax)
    assert torch.equal(fake_quantize_activation(x, 4), expected.reshape(x.shape))


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_are_int8_in_range_and_use_at_most_2_to_the_bits_levels(weight, bits, symmetric, group_size):
    quantized = quantize_weight(weight, bits, symmetric=symmetric, group_size=group_size, clip="mse")
    qmin, qmax = code_range(bits, symmetric)
    assert quantized.codes.dtype == torch.int8 and quantized.codes.shape == weight.shape
    assert qmin <= quantized.codes.min() and quantized.codes.max() <= qmax
    assert quantized.scale.shape == (16, 1 if group_size is None else 4)
    restored = dequantize_weight(quantized)
    for row in restored.unflatten(1, (quantized.scale.shape[1], -1)).flatten(0, 1):
        assert row.unique().numel() <= 2 ** bits


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantizing_a_dequantized_weight_gives_it_back(weight, symmetric, group_size):
    options = {"symmetric": symmetric, "group_size": group_size}
    once = fake_quantize_weight(weight, 4, **options)
    assert torch.allclose(fake_quantize_weight(once, 4, **options), once, atol=1e-6)


def test_symmetric_idempotence_is_exact(weight):
    once = quantize_weight(weight, 3)
    assert torch.equal(quantize_weight(dequantize_weight(once), 3).codes, once.codes)


@pytest.mark.parametrize("symmetric", [True, False])
def test_sqnr_grows_with_bits(weight, symmetric):
    sqnrs = [sqnr_db(weight, fake_quantize_weight(weight, bits, symmetric=symmetric)) for bits in range(2, 9)]
    assert all(low < high for low, high in zip(sqnrs, sqnrs[1:]))
    assert sqnrs[-1] > 40


def test_activation_sqnr_grows_with_bits():
    x = torch.randn(4, 8, 32)
    sqnrs = [sqnr_db(x, fake_quantize_activation(x, bits)) for bits in range(2, 9)]
    assert all(low < high for low, high in zip(sqnrs, sqnrs[1:]))


def test_full_precision_bits_are_the_identity(weight):
    assert fake_quantize_weight(weight, 16) is weight
    assert fake_quantize_activation(weight, 32) is weight


def test_mse_clipping_never_worse_than_minmax_per_channel():
    heavy_tailed = torch.distributions.StudentT(2.0).sample((32, 64))
    for symmetric in (True, False):
        for group_size in (None, 16):
            options = {"symmetric": symmetric, "group_size": group_size}
            minmax = (fake_quantize_weight(heavy_tailed, 3, **options) - heavy_tailed).square().sum(1)
            mse = (fake_quantize_weight(heavy_tailed, 3, clip="mse", **options) - heavy_tailed).square().sum(1)
            assert (mse <= minmax + 1e-6).all()
            assert mse.sum() < 0.97 * minmax.sum()


def test_weight_ste_gradient_is_identity_inside_the_clip_range():
    weight = torch.distributions.StudentT(2.0).sample((8, 32)).requires_grad_()
    upstream = torch.randn(8, 32)
    (fake_quantize_weight(weight, 3, clip="mse") * upstream).sum().backward()
    quantized = quantize_weight(weight.detach(), 3, clip="mse")
    limit = quantized.scale * code_range(3, True)[1]
    inside = weight.detach().abs() <= limit
    assert 0 < (~inside).sum() < inside.sum()  # the clipping actually cut something
    assert torch.equal(weight.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_activation_ste_gradient_with_static_and_dynamic_scale():
    x = torch.randn(4, 32, requires_grad=True)
    fake_quantize_activation(x, 4).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # per-token absmax: nothing is clipped
    x.grad = None
    fake_quantize_activation(x, 4, scale=0.1).sum().backward()
    assert torch.equal(x.grad, (x.detach().abs() <= 0.7).float())


def test_per_token_integer_activation_codes():
    x = torch.randn(2, 6, 32)
    codes, scale, zero_point = quantize_activation_per_token(x, 8)
    assert codes.dtype == torch.int8 and scale.shape == (2, 6, 1) and zero_point is None
    assert codes.abs().max() == 127
    assert torch.allclose(codes * scale, fake_quantize_activation(x, 8))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_asymmetric_per_token_codes_use_every_level_over_min_to_max(bits):
    x = torch.rand(5, 64) * 9 - 0.17  # like post-GELU inputs: -0.17 .. 8.8
    codes, scale, zero_point = quantize_activation_per_token(x, bits, symmetric=False)
    assert codes.min() == -2 ** (bits - 1) and codes.max() == 2 ** (bits - 1) - 1
    restored = (codes - zero_point) * scale
    assert torch.allclose(restored, fake_quantize_activation(x, bits, symmetric=False))
    assert (restored - x).abs().max() <= scale.max() / 2 + 1e-6
    symmetric_error = (fake_quantize_activation(x, bits) - x).square().mean()
    assert (restored - x).square().mean() < 0.5 * symmetric_error


def test_bad_options_raise_value_error(weight):
    with pytest.raises(ValueError, match="divisible"):
        quantize_weight(weight, 4, group_size=5)
    with pytest.raises(ValueError, match="clip"):
        quantize_weight(weight, 4, clip="percentile")
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(weight[0], 4)
