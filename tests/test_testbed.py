"""The committed testbed: it loads, and quantization behaves on it as the method expects."""
import torch

from treeq.bench.ptq import bench_ptq
from treeq.bits import preset_config
from treeq.models.load import load
from treeq.ptq.apply import quantize


def _relative_error(model, reference, x, t, y):
    with torch.no_grad():
        expected = reference(x, t, y)
        return ((model(x, t, y) - expected).norm() / expected.norm()).item()


def test_w8a8_rtn_is_nearly_lossless_and_w4a4_is_not():
    model = load("default")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((16, 1, 32, 32), generator=generator)
    t = torch.randint(0, 1000, (16,), generator=generator)
    y = torch.arange(16) % 10
    w8a8 = _relative_error(quantize(model, preset_config(model, "W8A8")), model, x, t, y)
    w4a4 = _relative_error(quantize(model, preset_config(model, "W4A4")), model, x, t, y)
    assert w8a8 < 0.02
    assert w4a4 > 5 * w8a8


def test_bench_ptq_rows_have_the_promised_columns():
    rows = bench_ptq(num_samples=10, settings=("W8A8",), baselines=(("rtn", "dynamic-asym"),))
    assert [(r["setting"], r["method"], r["activations"]) for r in rows] == [("FP32", "-", "-"),
                                                                             ("W8A8", "rtn", "dynamic-asym")]
    assert set(rows[1]) == {"setting", "method", "activations", "fid", "sfid", "class_accuracy", "psnr_vs_fp"}
    assert rows[0]["psnr_vs_fp"] is None and rows[1]["psnr_vs_fp"] > 20
