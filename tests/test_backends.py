"""Integer GEMM backends: every backend TreeQ may pick returns the exact integer sums (splitting weights it
cannot sum exactly), and a deployed IntLinear reproduces the fake-quantized layer on each of them."""
import pytest
import torch
import torch.nn as nn

from treeq.deploy import backends
from treeq.deploy.backends import BACKENDS, WeightKernel, available_backends, choose_backend, exact_limit
from treeq.deploy.integer import IntLinear
from treeq.quant.linear import QuantLinear
from treeq.deploy.pack import planes_size

TOLERANCE = 1e-5
AVAILABLE = available_backends()


def _codes(rows, columns, limit, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-limit, limit + 1, (rows, columns), dtype=torch.int8, generator=generator)
    codes[0] = limit
    codes[-1, ::2] = -limit
    return codes


def test_int_mm_is_always_there_and_exact():
    assert "int_mm" in AVAILABLE and exact_limit("int_mm") == 127


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 20])
def test_kernels_return_exact_sums(backend, bits, rows):
    """Full-range 8-bit weights included: where a backend saturates, the split must make it exact."""
    weight = _codes(24, 40, 2 ** (bits - 1) - 1, bits)
    codes = _codes(rows, 40, 127, rows)
    codes[:, 1] = -128  # asymmetric 8-bit activation codes reach -128
    for resident in ("prepacked", "packed"):
        out = WeightKernel(weight, bits, backend, resident)(codes)
        assert out.dtype == torch.float32 and torch.equal(out.double(), (codes.long() @ weight.long().t()).double())


@pytest.mark.parametrize("backend", [name for name in AVAILABLE if exact_limit(name) < 127])
def test_backends_that_saturate_split_wide_weights(backend):
    weight = _codes(8, 16, 127, 0)
    assert WeightKernel(weight, 8, backend).split == exact_limit(backend)
    assert WeightKernel(weight.clamp(-exact_limit(backend), exact_limit(backend)), 8, backend).split is None


def _layer(w_bits, a_bits, **options):
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(64, 40), w_bits, a_bits, **options)


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("resident", ["prepacked", "packed"])
@pytest.mark.parametrize("w_bits, a_bits, options", [
    (8, 8, {}), (4, 4, {}), (3, 3, {"group_size": 16}),
    (4, 8, {"activations": "dynamic-asym", "symmetric": False, "group_size": 16})])
def test_deployed_layer_matches_fake_quant(backend, resident, w_bits, a_bits, options):
    layer = _layer(w_bits, a_bits, **options)
    x = torch.nn.functional.gelu(torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)) * 3)
    with torch.no_grad():
        reference = layer(x)
        deployed = IntLinear.from_quant_linear(layer).deploy_(backend, resident)
        out = deployed(x)
    assert deployed.backend == backend and deployed.weight_codes is None
    assert ((out - reference).norm() / reference.norm()).item() < TOLERANCE


def test_packed_residency_holds_b_bit_planes():
    layer = IntLinear.from_quant_linear(_layer(4, 4))
    int8_bytes = layer.resident_bytes()
    layer.deploy_("int_mm", "packed")
    assert layer.weight_planes.numel() == planes_size(64 * 40, 4) == 64 * 40 // 2
    # half of the int8 codes' bytes gone, one float32 row sum per output added (the zero-point correction's)
    assert int8_bytes - layer.resident_bytes() == 64 * 40 // 2 - 4 * 40


def test_deployed_state_dict_still_holds_int8_codes():
    layer = IntLinear.from_quant_linear(_layer(3, 3))
    codes = layer.weight_codes.clone()
    layer.deploy_("int_mm", "packed")
    state = layer.state_dict()
    assert torch.equal(state["weight_codes"], codes) and "weight_planes" not in state
    fresh = IntLinear.from_quant_linear(_layer(3, 3)).deploy_("int_mm", "packed")
    fresh.load_state_dict(state)  # loading into a deployed layer deploys the loaded codes
    assert torch.equal(fresh.codes(), codes) and fresh.kernels is not None


def test_choice_is_an_exact_backend_and_can_be_forced(monkeypatch):
    assert choose_backend(64, 40, 4) in AVAILABLE
    monkeypatch.setenv(backends.BACKEND_VARIABLE, "int_mm")
    assert IntLinear.from_quant_linear(_layer(4, 4)).deploy_().backend == "int_mm"
    monkeypatch.setenv(backends.BACKEND_VARIABLE, "nonsense")
    with pytest.raises(ValueError, match="not an exact backend"):
        choose_backend(64, 40, 4)


def test_bad_backend_and_residency():
    with pytest.raises(ValueError, match="unknown backend"):
        WeightKernel(torch.zeros(2, 2, dtype=torch.int8), 4, "cuda")
    with pytest.raises(ValueError, match="resident"):
        IntLinear.from_quant_linear(_layer(4, 4)).deploy_("int_mm", "disk")
    assert set(BACKENDS) >= {"int_mm", "onednn", "fbgemm"}
