"""`treeq bench kernel-parts` on a small shape: every kernel and part gets a row, timed against our whole layer."""
import torch

from treeq.bench.kernel_parts import bench_kernel_parts, layer_parts
from treeq.bench.kernels import _deployed
from treeq.cli import build_parser


def test_rows_for_the_whole_layer_its_parts_and_its_peers():
    rows = bench_kernel_parts(shapes=(("tiny.qkv", 16, 64, 96),), repeats=2)
    kernels = {row["kernel"]: row for row in rows}
    assert {"dynamic_fbgemm", "dynamic_onednn", "ours", "ours_without_rotation", "part:rotation",
            "part:quantize_input", "part:gemm", "part:epilogue"} <= set(kernels)
    assert kernels["ours"]["share_of_ours"] == 1.0
    assert all(row["ms"] > 0 and row["iqr_ms"] >= 0 for row in rows)


def test_the_parts_compose_to_the_layer():
    """Run in order on each other's outputs, the parts give the layer's output: they time its real steps."""
    linear = torch.nn.Linear(64, 96)
    layer = _deployed(linear, 4, 4, "hadamard", "auto", "prepacked", activations="dynamic-asym")
    x = torch.randn(16, 64)
    parts = layer_parts(layer, x)
    with torch.no_grad():
        assert torch.allclose(parts["epilogue"](), layer(x), atol=1e-5)
        assert torch.equal(parts["rotation"](), layer.input_transform(x))


def test_cli_knows_the_bench():
    assert build_parser().parse_args(["bench", "kernel-parts", "--json"]).which == "kernel-parts"
