"""The fused W4A8 Triton kernel against QuantLinear's fake quantization, on CPU under Triton's interpreter.

Codes are integers and the int32 accumulation is exact, so the kernel and the fake-quant layer differ
only in float rounding order: |out - reference| <= TOLERANCE * max |reference| (observed about 2e-7).
A single input code rounded differently would move an output by s_x * s_w * |code_w|, over 5e-5 of the
largest output here, so the tolerance also checks that the kernel rounds activations exactly as the
quantizer does.

Triton reads TRITON_INTERPRET whenever `triton.jit` is applied: to its own helpers (tl.zeros, tl.max, ...)
once, when triton is first imported, and to the kernel on its first use in each mode (triton_w4a8 jits it
lazily; the fixture below sets the variable for each test). An interpreted kernel cannot call helpers
jitted for the compiler, so if this process imported triton before this file (torchao does, in a full
test run), the kernel tests run here in a fresh process instead (test_kernel_tests_in_a_fresh_process).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

_set_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # effective only if this is the process's first import of triton
try:
    triton = pytest.importorskip("triton")
finally:
    if _set_before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _set_before

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from treeq.branches.lowrank import LowRankBranch  # noqa: E402
from treeq.branches.monarch import init_monarch  # noqa: E402
from treeq.deploy.triton_w4a8 import TritonW4A8Linear, pack_w4, unpack_w4, w4a8_linear  # noqa: E402
from treeq.methods.rotation import rotate_linear_  # noqa: E402
from treeq.quant.linear import QuantLinear  # noqa: E402
from treeq.quant.quantizers import dequantize_weight, quantize_weight, token_quant_params  # noqa: E402

TOLERANCE = 1e-5
INTERPRETABLE = isinstance(triton.language.zeros, InterpretedFunction)
needs_interpreter = pytest.mark.skipif(not INTERPRETABLE, reason="triton was imported for the compiler first: "
                                       "test_kernel_tests_in_a_fresh_process runs these")
# Small tiles so the interpreter runs several programs per launch and masks ragged edges.
BLOCKS = {"block_m": 16, "block_n": 16, "block_k": 32}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _layer(activations, branch=None, in_features=64, out_features=48):
    """A W4A8 QuantLinear; its branch, if any, scaled up so that its share of the output is large."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(in_features, out_features), 4, 8, activations=activations)
    weight = layer.weight.detach()
    if branch == "lowrank":
        layer.attach_branch(LowRankBranch.from_weight(4 * weight, 8))
    elif branch == "monarch":
        layer.attach_branch(init_monarch(4 * weight, shape=(4, 4, 2)))
    return layer.eval()


def _tokens(*shape):
    """Inputs far from zero-mean: the asymmetric quantizer's zero points are then large."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 2 + 3


def _assert_close(out, reference):
    assert out.shape == reference.shape and out.dtype == reference.dtype
    error = (out - reference).abs().max().item()
    assert error <= TOLERANCE * reference.abs().max().item(), error


@needs_interpreter
@pytest.mark.parametrize("branch", [None, "lowrank", "monarch"])
@pytest.mark.parametrize("activations", ["dynamic", "dynamic-asym"])
def test_matches_fake_quant(activations, branch):
    """33 rows (not a multiple of BLOCK_M) in a (3, 11) batch; the branch's and, for asymmetric inputs,
    the zero point's shares of the output are far above the tolerance, so dropping either fails."""
    layer = _layer(activations, branch)
    x = _tokens(3, 11, 64)
    with torch.no_grad():
        reference = layer(x)
        out = TritonW4A8Linear.from_quant_linear(layer, **BLOCKS)(x)
        margin = 100 * TOLERANCE * reference.abs().max()
        if branch is not None:
            assert layer.branch(x).abs().max() > margin
        if activations == "dynamic-asym":
            scale, zero_point = token_quant_params(x, 8, symmetric=False)
            weight_sums = dequantize_weight(layer.quantized_weight()).sum(1)
            assert (zero_point * scale * weight_sums).abs().max() > margin  # what the correction subtracts
    _assert_close(out, reference)


@needs_interpreter
@pytest.mark.parametrize("activations", ["dynamic", "dynamic-asym"])
def test_ties_round_half_to_even(activations):
    """Rows whose scale is exactly 1 and whose entries are halves: every code is a tie (and so is the
    asymmetric zero point, -128 - round(-3.5)), where rounding half up or away from zero differs."""
    x = torch.randint(-3, 100, (9, 64), generator=torch.Generator().manual_seed(2)) + 0.5
    if activations == "dynamic":
        x[:, 0] = 127.0  # absmax 127: scale 1
    else:
        x[:, 0], x[:, 1] = -3.5, 251.5  # range 255: scale 1
    layer = _layer(activations)
    with torch.no_grad():
        _assert_close(TritonW4A8Linear.from_quant_linear(layer, **BLOCKS)(x), layer(x))


@needs_interpreter
@pytest.mark.parametrize("in_features", [100, 99])
def test_ragged_and_odd_widths(in_features):
    """K = 100: two K steps, the second partly masked; K = 99: the last high nibble is padding."""
    layer = _layer("dynamic-asym", "lowrank", in_features=in_features, out_features=40)
    x = _tokens(5, in_features)
    with torch.no_grad():
        _assert_close(TritonW4A8Linear.from_quant_linear(layer, **BLOCKS)(x), layer(x))


@needs_interpreter
def test_input_transform_runs_before_the_kernel():
    torch.manual_seed(0)
    layer = rotate_linear_(QuantLinear.from_linear(nn.Linear(64, 48), 4, 8, activations="dynamic"))
    layer.attach_branch(LowRankBranch.from_weight(layer.weight.detach(), 4))
    x = _tokens(7, 64)
    with torch.no_grad():
        _assert_close(TritonW4A8Linear.from_quant_linear(layer, **BLOCKS)(x), layer(x))


def test_packing_round_trips_in_the_documented_layout():
    codes = torch.randint(-8, 8, (6, 9), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = pack_w4(codes, torch.rand(6, 1))
    assert packed.data.shape == (6, 5) and packed.data.dtype == torch.uint8
    assert torch.equal(unpack_w4(packed), codes)
    # byte j: feature j in the low nibble, feature j + 5 in the high one (the last high nibble: padding 0)
    assert int(packed.data[2, 1]) == (int(codes[2, 1]) & 0xF) | (int(codes[2, 6]) & 0xF) << 4
    assert int(packed.data[2, 4]) >> 4 == 0
    assert torch.equal(packed.row_sums, codes.sum(1, dtype=torch.int32))
    assert packed.scale.shape == (6,) and packed.scale.dtype == torch.float32


def test_refuses_what_the_kernel_cannot_run():
    with pytest.raises(ValueError, match="-8, 7"):
        pack_w4(torch.full((2, 4), 8, dtype=torch.int8), torch.ones(2))
    quantized = quantize_weight(torch.randn(8, 64), 4)
    packed = pack_w4(quantized.codes, quantized.scale)
    with pytest.raises(ValueError, match="block_k"):
        w4a8_linear(torch.randn(4, 64), packed, block_k=16)  # an int8 tl.dot needs K >= 32
    with pytest.raises(ValueError, match="w_bits=4, a_bits=8"):
        TritonW4A8Linear.from_quant_linear(QuantLinear.from_linear(nn.Linear(64, 8), 8, 8))
    with pytest.raises(ValueError, match="per-output-channel"):
        TritonW4A8Linear.from_quant_linear(QuantLinear.from_linear(nn.Linear(64, 8), 4, 8, group_size=16))


# Compiles the kernel for sm_90 with every feature on and writes its PTX to argv[1]. Run in a process of
# its own without TRITON_INTERPRET: triton's compiler refuses to load where triton was imported for the
# interpreter.
_COMPILE_SCRIPT = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from treeq.deploy import triton_w4a8

kernel = triton_w4a8._kernel()
constants = {"QMIN": -128, "QMAX": 127, "ASYMMETRIC": True, "HAS_BIAS": True, "HAS_LOWRANK": True,
             "HAS_BRANCH_OUT": True, "LOWRANK_PRECISION": "tf32", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32,
             "BLOCK_R": 16}
pointers = {"weight_ptr": "*u8", "row_sums_ptr": "*i32", "out_ptr": "*bf16"}
signature = {name: "constexpr" if name in constants else pointers.get(name, "*fp32" if name.endswith("_ptr") else "i32")
             for name in kernel.arg_names}
compiled = compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, **triton_w4a8.COMPILE_OPTIONS})
open(sys.argv[1], "w").write(compiled.asm["ptx"])
"""


def test_compiles_for_hopper_without_fusing_the_rounding(tmp_path):
    """The compiler path (no GPU needed): type rules the interpreter skips, int8 and TF32 tensor-core
    dots, IEEE divisions for the scales (plain `/` would be div.full, approximate), and the
    round-half-to-even add of 1.5 * 2^23 kept apart from the product before it (no FMA)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(tmp_path / "kernel.ptx")], env=env, check=True)
    ptx = (tmp_path / "kernel.ptx").read_text()
    assert ".s32.s8.s8" in ptx and ".f32.tf32.tf32" in ptx
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx
    assert "fma.rn.f32" not in ptx and "0f4B400000" in ptx and "0fCB400000" in ptx


def test_imports_and_packs_without_triton():
    script = ("import sys; sys.modules['triton'] = None\n"
              "import torch\n"
              "from treeq.deploy.triton_w4a8 import pack_w4, w4a8_linear\n"
              "packed = pack_w4(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))\n"
              "try:\n"
              "    w4a8_linear(torch.zeros(2, 8), packed)\n"
              "except ImportError as error:\n"
              "    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "needs Triton" in result.stdout


@pytest.mark.skipif(INTERPRETABLE, reason="the kernel tests run in this process")
def test_kernel_tests_in_a_fresh_process():
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], cwd=root,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
