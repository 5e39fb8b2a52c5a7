"""`treeq bench deploy` on a tiny DiT: every runtime gets a row, ours reproduces fake quant and holds less."""
import torch

from treeq.bench.deploy import _bench_model, resident_bytes
from treeq.cli import build_parser


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


def test_resident_bytes_of_a_float_model(tiny_dit):
    assert resident_bytes(tiny_dit) == sum(p.numel() * 4 for p in tiny_dit.parameters()) + sum(
        b.numel() * b.element_size() for b in tiny_dit.buffers())


def test_cli_knows_the_deploy_bench():
    assert build_parser().parse_args(["bench", "deploy", "--json"]).which == "deploy"
