"""`treeq bench additivity` on a tiny DiT: pair rows per distance and one configuration row."""
from treeq.bench.search_analysis import bench_additivity
from treeq.models.checkpoint import save_model


def test_additivity_rows(tiny_dit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the calibration cache goes to ./runs
    save_model(tiny_dit, tmp_path / "tiny")
    rows = bench_additivity(str(tmp_path / "tiny.safetensors"), distances=(1, 4), pairs=3, configs=6)
    assert [(row["kind"], row["distance"], row["count"]) for row in rows] == [
        ("pair", 1, 3), ("pair", 4, 3), ("config", None, 6)]
    for row in rows:
        assert 0 < row["joint_over_sum_min"] <= row["joint_over_sum_mean"] <= row["joint_over_sum_max"]
    assert -1 <= rows[-1]["spearman"] <= 1 and rows[0]["spearman"] is None
