"""IntLinear runs the same integer math as QuantLinear's fake quantization, so outputs agree to float
rounding: relative error (Frobenius norm) below TOLERANCE, observed around 2e-7."""
import pytest
import torch
import torch.nn as nn

from treeq.bench.kernels import bench_kernels
from treeq.branches.lowrank import LowRankBranch
from treeq.deploy.gemm import int_matmul
from treeq.deploy.integer import IntLinear
from treeq.quant.linear import QuantLinear
from treeq.quant.quantizers import quantize_activation_per_token
from treeq.methods.rotation import DENSE_MAX, HadamardTransform, hadamard_factors, rotate_linear_
from treeq.methods.smooth import smooth_linear_

TOLERANCE = 1e-5


def _quant_linear(w_bits, a_bits, in_features=64, out_features=40, **options):
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(in_features, out_features), w_bits, a_bits, **options)


def _relative_error(layer, x):
    with torch.no_grad():
        reference = layer(x)
        out = IntLinear.from_quant_linear(layer)(x)
    assert out.shape == reference.shape and out.dtype == reference.dtype
    return ((out - reference).norm() / reference.norm()).item()


def _tokens(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (4, 4), (3, 3), (2, 2), (4, 8)])
def test_matches_fake_quant_on_token_batches(w_bits, a_bits):
    assert _relative_error(_quant_linear(w_bits, a_bits), _tokens(3, 7, 64)) < TOLERANCE


@pytest.mark.parametrize("tokens", [1, 20])
def test_shapes_the_gemm_pads(tokens):
    """One token (adaLN's one row per image) and widths that are not multiples of 8."""
    layer = _quant_linear(4, 4, in_features=20, out_features=10, symmetric=False, group_size=10)
    assert _relative_error(layer, _tokens(tokens, 20)) < TOLERANCE


@pytest.mark.parametrize("symmetric, group_size", [(False, None), (True, 16), (False, 16)])
def test_zero_points_and_groups(symmetric, group_size):
    layer = _quant_linear(4, 4, symmetric=symmetric, group_size=group_size)
    assert _relative_error(layer, _tokens(2, 5, 64)) < TOLERANCE


def test_hadamard_transform_and_lowrank_branch():
    layer = rotate_linear_(_quant_linear(4, 4))
    layer.attach_branch(LowRankBranch.from_weight(layer.weight, 4))
    assert _relative_error(layer, _tokens(2, 9, 64)) < TOLERANCE


def test_smoothing_transform():
    layer = smooth_linear_(_quant_linear(8, 8), _tokens(64).abs() + 0.5)
    assert _relative_error(layer, _tokens(4, 64)) < TOLERANCE


def test_static_activation_scale_clips_like_fake_quant():
    layer = _quant_linear(32, 32, activations="static")
    layer.act_scales[4] = torch.tensor(0.1)  # inputs of std 1 saturate the 4-bit range at +-0.7
    layer.set_bits(4, 4)
    assert _relative_error(layer, _tokens(6, 64)) < TOLERANCE


@pytest.mark.parametrize("w_bits, a_bits, symmetric", [(4, 4, True), (8, 8, False), (3, 3, False)])
def test_asymmetric_activations_match_fake_quant(w_bits, a_bits, symmetric):
    layer = _quant_linear(w_bits, a_bits, activations="dynamic-asym", symmetric=symmetric, group_size=16)
    x = torch.nn.functional.gelu(_tokens(7, 64) * 3) + 0.3  # all tokens shifted off zero
    assert _relative_error(layer, x) < TOLERANCE


def test_float_activations_use_the_dequantized_weight():
    layer = _quant_linear(4, 16)
    assert _relative_error(layer, _tokens(3, 64)) < TOLERANCE


def test_input_codes_are_the_quantizer_codes():
    x = _tokens(5, 64) * 3
    x[0] = 0.0  # an all-zero token gets the smallest scale and zero codes
    x[1, 0] = 1e4  # one outlier flattens the rest of its token to zero codes
    layer = IntLinear(64, 8, w_bits=4, a_bits=4)
    codes, scale, zero_point = layer.quantize_input(x)
    expected_codes, expected_scale, _ = quantize_activation_per_token(x, 4)
    assert codes.dtype == torch.int8 and zero_point is None
    assert torch.equal(codes, expected_codes) and torch.equal(scale, expected_scale)


@pytest.mark.parametrize("m, k, n", [(3, 13, 5), (17, 8, 8), (20, 24, 9)])
def test_int_matmul_pads_any_shape_exactly(m, k, n):
    generator = torch.Generator().manual_seed(m)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=generator)
    out = int_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.long(), a.long() @ b.long())


def test_state_dict_holds_int8_codes():
    layer = IntLinear.from_quant_linear(_quant_linear(3, 3, group_size=16))
    state = layer.state_dict()
    assert state["weight_codes"].dtype == torch.int8 and state["weight_codes"].abs().max() <= 3
    assert state["weight_scale"].shape == (40, 4)
    assert "weight" not in state


def test_full_precision_weight_is_refused():
    with pytest.raises(ValueError, match="full precision"):
        IntLinear.from_quant_linear(_quant_linear(32, 8))
    with pytest.raises(ValueError, match="w_bits must be in"):
        IntLinear(8, 8, w_bits=16, a_bits=8)


def test_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        IntLinear(64, 8, w_bits=4, a_bits=4, group_size=24)


def test_bench_kernels_rows(capsys):
    rows = bench_kernels(shapes=(("tiny", 17, 32, 8),), settings=(("W8A8", "rtn"), ("W4A4", "hadamard")), repeats=2)
    assert {"shape", "bits", "backend", "speedup_vs_fp32", "bf16_speedup_vs_fp32", "dynamic_int8_speedup_vs_fp32",
            "resident_bytes_ratio_vs_fp32"} <= set(rows[0])
    assert "cpu" in capsys.readouterr().err  # the machine header
    w4 = [row for row in rows if row["bits"] == "W4A4"]
    chosen = [row for row in w4 if row["chosen"]]
    assert [row["backend"].endswith("+packed") for row in chosen] == [False, True]
    assert chosen[1]["resident_bytes_ratio_vs_fp32"] < chosen[0]["resident_bytes_ratio_vs_fp32"]
    assert all(row["transform_macs_ratio"] > 0 for row in w4)  # the rotation is part of a W4A4 layer
    assert all(row["speedup_vs_fp32"] > 0 and row["threads"] == torch.get_num_threads() for row in rows)


@pytest.mark.parametrize("width", [96, 1536, 2048 * 3])
def test_fast_hadamard_equals_the_dense_block(width):
    """Blocks of 32 (one factor), 512 (32 x 16) and 2048 (16 x 16 x 8): the fast path, with the dense
    block matrix that folding uses as the reference."""
    transform = HadamardTransform(width)
    x = _tokens(2, 3, width)
    size = transform.block.shape[0]
    dense = (x.unflatten(-1, (-1, size)) @ transform.block).flatten(-2)
    assert torch.allclose(transform(x), dense, atol=1e-5)
    assert transform.macs_per_token() < width * size or size <= DENSE_MAX


def test_hadamard_factors_multiply_to_the_block():
    for exponent in range(13):
        factors = hadamard_factors(2 ** exponent)
        assert torch.tensor(factors, dtype=torch.long).prod().item() == 2 ** exponent
        assert all(factor <= 32 for factor in factors)
