"""Bad input, interrupted work and overwritten runs (issue 20): each refused in one line, before any work."""
import json
from pathlib import Path

import pytest

from treeq.cli import main
from treeq.models.checkpoint import save_model


@pytest.fixture
def tiny_path(tiny_dit, tmp_path):
    save_model(tiny_dit, tmp_path / "tiny")
    return str(tmp_path / "tiny.safetensors")


@pytest.fixture
def run(tiny_path, tmp_path):
    """A W8A8 round-to-nearest run folder of the tiny model (no calibration: milliseconds)."""
    folder = tmp_path / "run"
    assert main(["quantize", "--model", tiny_path, "--config", "W8A8", "--out", str(folder)]) == 0
    return folder


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("treeq: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _no_model_loads(monkeypatch):
    """Make every model load fail loudly: what is refused must be refused before this."""
    import treeq.models.load

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(treeq.models.load, "load", refuse)


# 2. a damaged run folder
@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"])
@pytest.mark.parametrize("command", [["eval", "--num-samples", "2", "--steps", "2"], ["sample", "--num-samples", "2"],
                                     ["export"]])
def test_an_empty_or_truncated_state_file_is_one_line(command, content, run, tmp_path, capsys):
    (run / "state.safetensors").write_bytes(content)
    out = [] if command[0] == "eval" else ["--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert main([command[0], "--quant", str(run), *command[1:], *out]) == 2
    _one_line(capsys, "state.safetensors", "not a readable safetensors file")


# 4. runs destroyed or mixed
def test_an_output_that_is_its_own_input_is_refused(run, capsys):
    before = sorted(p.name for p in run.iterdir())
    assert main(["finetune", "--quant", str(run), "--out", str(run), "--steps", "1"]) == 2
    _one_line(capsys, "its own input")
    assert main(["export", "--quant", str(run), "--out", str(run)]) == 2
    _one_line(capsys, "its own input")
    assert main(["export", "--quant", str(run), "--out", str(run.parent), "--overwrite"]) == 2  # holds the input
    _one_line(capsys, "its own input")
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_folder_of_another_kind_needs_overwrite(run, tiny_path, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["quantize", "--model", tiny_path, "--config", "W6A6", "--out", str(other)]) == 0
    assert main(["export", "--quant", str(run), "--out", str(other)]) == 2
    _one_line(capsys, "already holds run", "--overwrite")
    assert (other / "state.safetensors").exists() and not (other / "packed.json").exists()
    assert main(["export", "--quant", str(run), "--out", str(other), "--overwrite"]) == 0
    assert sorted(p.name for p in other.iterdir()) == ["packed.json", "packed.safetensors"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main(["sample", "--model", tiny_path, "--num-samples", "1", "--out", str(tmp_path / "notes")]) == 2
    _one_line(capsys, "other files")
    # the same kind is accepted: a run folder quantized again
    assert main(["quantize", "--model", tiny_path, "--config", "W4A4", "--out", str(run)]) == 0


# 5. a search refuses its settings before the model loads, and writes nothing
def test_search_refuses_a_directory_out_before_any_work(tmp_path, monkeypatch, capsys):
    _no_model_loads(monkeypatch)
    (tmp_path / "dir").mkdir()
    assert main(["search", "--out", str(tmp_path / "dir")]) == 2
    _one_line(capsys, "is a directory")
    assert main(["quantize", "--target", "W4A4", "--queue-size", "0", "--out", str(tmp_path / "q")]) == 2
    _one_line(capsys, "--queue-size")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"] and not any((tmp_path / "dir").iterdir())


def test_run_search_checks_its_settings_before_loading(tmp_path, monkeypatch):
    from treeq.search.run import run_search
    _no_model_loads(monkeypatch)
    for options, message in [(dict(out=tmp_path), "is a directory"), (dict(queue_size=0), "queue_size"),
                             (dict(method="random", evaluations=0), "evaluations"),
                             (dict(resume=True), "nothing to resume"), (dict(env_bits=9), "bits must be")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run_search(**{"out": tmp_path / "bits.json", **options})
    assert list(tmp_path.iterdir()) == []


# 6. init writes only models that every command can use
@pytest.mark.parametrize("argv, message", [
    (["--size", "DiT-S/8", "--hidden-size", "100", "--num-heads", "7", "--out", "x.safetensors"], "multiple of num_heads"),
    (["--size", "DiT-S/8", "--depth", "0", "--out", "x.safetensors"], "--depth"),
    (["--size", "DiT-S/8", "--depth", "2", "--out", "x.pt"], "no published DiT size"),
    (["--size", "DiT-S/8", "--format", "official", "--out", "x.safetensors"], "a .pt file"),
])
def test_init_refuses_models_nothing_can_use(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", *argv]) == 2
    _one_line(capsys, message)
    assert list(tmp_path.iterdir()) == []


def test_init_reads_the_format_off_the_out_suffix(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["init", "--size", "DiT-S/8", "--input-size", "8", "--depth", "2", "--hidden-size", "64",
                 "--num-heads", "4", "--out", str(out)]) == 0
    assert "(treeq)" in capsys.readouterr().out
    assert main(["info", "--model", str(out)]) == 0


def test_a_saved_model_with_an_impossible_config_is_refused_on_load(tiny_path, capsys):
    meta = Path(tiny_path).with_suffix(".json")
    config = json.loads(meta.read_text())
    for change, message in [({"num_heads": 7}, "multiple of num_heads"), ({"depth": 0}, "depth")]:
        meta.write_text(json.dumps({**config, **change}))
        assert main(["info", "--model", tiny_path]) == 2
        _one_line(capsys, message)


# 7. --resume with nothing to resume, zero evaluations
@pytest.mark.parametrize("argv, message", [
    (["search", "--resume"], "nothing to resume"),
    (["search", "--resume", "--method", "greedy"], "keeps no state"),
    (["search", "--method", "random", "--evaluations", "0"], "--evaluations"),
    (["finetune", "--quant", "RUN", "--resume"], "nothing to resume"),
    (["train", "--resume"], "nothing to resume"),
])
def test_resume_without_state_is_refused_alike(argv, message, tmp_path, monkeypatch, capsys):
    _no_model_loads(monkeypatch)
    (tmp_path / "run").mkdir()
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    assert main([*argv, "--out", str(tmp_path / "out" / "bits.json" if argv[0] == "search" else tmp_path / "o")]) == 2
    _one_line(capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# 8. Ctrl-C
def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, monkeypatch, capsys):
    import treeq.search.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(treeq.search.run, "run_search", interrupted)
    out = str(tmp_path / "bits.json")
    assert main(["search", "--out", out]) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"kept the finished nodes in {tmp_path / 'bits.state.json'}" in err
    assert err.endswith(f"continue with `treeq search --out {out} --resume`")
    assert main(["quantize", "--target", "W4A4", "--out", str(tmp_path / "q")]) == 130
    assert "quantize keeps no partial work: rerun `treeq quantize" in capsys.readouterr().err


def test_ctrl_c_on_sampling_says_truthfully_whether_parts_were_kept(tiny_dit, tmp_path, monkeypatch, capsys):
    """A family's pipeline keeps nothing; DiT sampling keeps finished batches: the line says which. A bar left
    open by the interrupt is ended first, so the line stands alone."""
    import treeq.eval.sample_folder
    from tqdm import tqdm

    from treeq.models.checkpoint import save_model

    save_model(tiny_dit, tmp_path / "tiny")
    out = tmp_path / "s"

    bars = []

    def interrupted(*args, **kwargs):
        bars.append(tqdm(total=10, desc="sampling"))  # a bar still open when Ctrl-C comes
        bars[-1].update(3)
        raise KeyboardInterrupt
    monkeypatch.setattr(treeq.eval.sample_folder, "sample_to_folder", interrupted)
    argv = ["sample", "--model", str(tmp_path / "tiny.safetensors"), "--num-samples", "10", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "sample keeps no partial work" in err and "kept" not in err
    assert err.splitlines()[-1].startswith("treeq: interrupted")
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "0.npz").write_bytes(b"")
    assert main(argv) == 130
    assert f"kept the finished parts in {out / 'parts'}" in capsys.readouterr().err
