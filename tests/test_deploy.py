"""`treeq bench deploy` on a tiny DiT: every runtime gets a row, ours reproduces fake quant and holds less."""
import pytest

from treeq.bench.deploy import _bench_model, _converted, resident_bytes
from treeq.bits import preset_config
from treeq.cli import build_parser
from treeq.ptq.apply import quantize
from treeq.deploy.integer import IntLinear
from treeq.quant.linear import QuantLinear
from treeq.ptq.recipe import Recipe


def test_rows_runtimes_and_quality(tiny_dit):
    rows = _bench_model("tiny", tiny_dit, 4, 0, 1, dict(steps=2), exported=True)
    keyed = {(row["setting"], row["runtime"]): row for row in rows}
    assert {("FP32", "fp32"), ("BF16", "bf16"), ("W8A8", "dynamic_onednn"), ("W4A4", "ours"),
            ("W4A4", "ours+packed"), ("W4A4", "fake_quant")} <= set(keyed)
    assert all({"model", "setting", "runtime", "images_per_second", "resident_mb"} <= set(row) for row in rows)
    for setting in ("W8A8", "W4A4"):
        assert keyed[(setting, "ours")]["rel_error_vs_fake_quant"] < 1e-3
    assert keyed[("W4A4", "ours+packed")]["resident_mb"] < keyed[("W4A4", "ours")]["resident_mb"]
    assert keyed[("W4A4", "ours")]["resident_mb"] < keyed[("FP32", "fp32")]["resident_mb"]
    assert keyed[("BF16", "bf16")]["psnr_vs_fp32"] > 20


def test_torchao_rows_reproduce_the_run_and_hold_its_codes(tiny_dit):
    pytest.importorskip("torchao")
    rows = _bench_model("tiny", tiny_dit, 4, 0, 1, dict(steps=2), exported=True)
    keyed = {(row["setting"], row["runtime"]): row for row in rows}
    for runtime in ("torchao", "torchao+compile"):
        assert keyed[("W4A4", runtime)]["rel_error_vs_fake_quant"] < 1e-3
    # W4A8 is another, more accurate model: further from the W4A4 run, nearer full precision
    assert keyed[("W4A4", "torchao_w4a8")]["rel_error_vs_fake_quant"] > 1e-3
    assert keyed[("W4A4", "torchao_w4a8")]["psnr_vs_fp32"] > keyed[("W4A4", "torchao")]["psnr_vs_fp32"]
    # int8 codes and scales, counted as such: less than the FP32 model it stands for
    assert keyed[("W4A4", "torchao")]["resident_mb"] < 0.7 * keyed[("FP32", "fp32")]["resident_mb"]


def test_resident_bytes_of_a_float_model(tiny_dit):
    assert resident_bytes(tiny_dit) == sum(p.numel() * 4 for p in tiny_dit.parameters()) + sum(
        b.numel() * b.element_size() for b in tiny_dit.buffers())


def test_cli_knows_the_deploy_bench():
    assert build_parser().parse_args(["bench", "deploy", "--json"]).which == "deploy"


def test_converted_path_reproduces_fake_quant_without_a_copy(tiny_dit):
    """The DiT-XL/2 path converts each fake-quantized model in place (a copy of it would not fit in memory)."""
    rows = _bench_model("tiny", tiny_dit, 2, 0, 1, dict(steps=2), exported=False)
    keyed = {(row["setting"], row["runtime"]): row for row in rows}
    assert {("W8A8", "ours"), ("W4A4", "ours+packed")} <= set(keyed)
    assert all(row["runtime"] != "fake_quant" for row in rows)  # no fake-quantized model is kept to be timed
    for setting in ("W8A8", "W4A4"):
        assert keyed[(setting, "ours")]["rel_error_vs_fake_quant"] < 1e-3


def test_conversion_happens_in_place(tiny_dit):
    quantized = quantize(tiny_dit, preset_config(tiny_dit, "W4A4"), Recipe(methods=("hadamard",)))
    prepacked, packed = _converted(quantized)
    assert prepacked is quantized and packed is not quantized
    assert not any(isinstance(module, QuantLinear) for module in prepacked.modules())
    assert any(isinstance(module, IntLinear) for module in packed.modules())
