"""`treeq bench xl` on a tiny latent DiT (the DiT-XL/2 code path at toy size) on the CPU."""
import pytest

import treeq.bench.xl as xl
from treeq.memory import describe_peak_memory, peak_memory


# Every setting but the compiled ones (minutes of compilation for a unit test); Triton's needs CUDA.
CPU_SETTINGS = ("fp32", "bf16", "W4A4", "W8A8-int", "W4A4-torchao", "W4A8-torchao", "W4A8-triton")


def test_rows_for_every_setting_batch_and_phase(tiny_latent_dit, monkeypatch):
    pytest.importorskip("torchao")
    monkeypatch.setattr(xl, "_xl", lambda model, seed: tiny_latent_dit)
    rows = xl.bench_xl("cpu", batches=(1, 2), steps=2, settings=CPU_SETTINGS)
    timed = [(row["setting"], row["batch"]) for row in rows if row["batch"] is not None]
    assert timed == [(setting, batch) for setting in CPU_SETTINGS if setting != "W4A8-triton" for batch in (1, 2)]
    assert all(0 < row["min"] <= row["seconds_per_step"] <= row["max"] for row in rows if row["batch"])
    assert [row["setting"] for row in rows if row["batch"] is None] == [
        "calibrate", "quantize W4A4", "quantize + export + load W8A8", "torchao export (W4A4 run bits)",
        "torchao export (W4A8)", "W4A8-triton"]
    assert "CUDA" in rows[-1]["error"]


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="unknown bench xl setting 'W2A2'"):
        xl.bench_xl("cpu", settings=("W2A2",))


def test_step_seconds_times_each_model_call_after_the_first(tiny_latent_dit):
    assert len(xl.step_seconds(tiny_latent_dit, batch=1, steps=3)) == 3


def test_gpu_kernels_refuse_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(xl.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        xl.bench_gpu_kernels()


def test_gpu_runtimes_compute_the_same_product():
    x, weight = xl.torch.randn(32, 64), xl.torch.randn(48, 64) / 8
    runtimes = xl._gpu_runtimes(x, weight)
    reference = runtimes["fp32"]()
    for name, run in runtimes.items():
        error = (run().float() - reference).norm() / reference.norm()
        assert error < (0.02 if name in ("bf16", "int8_w8a8") else 1e-6), name


def test_peak_memory_reports_the_resident_set():
    assert peak_memory()["peak_rss_mb"] > 10 and describe_peak_memory().startswith("peak memory: RSS")
