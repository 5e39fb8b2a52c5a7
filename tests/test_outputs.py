"""One output check for every command that writes: no output inside, around or over an input, a model or
pipeline folder, or another TreeQ output; no file replaced that treeq did not write, unless --overwrite."""
import json

import pytest

from treeq.cli import main
from treeq.models.checkpoint import save_model


@pytest.fixture
def places(tiny_dit, tmp_path):
    """A TreeQ model file, a diffusers-style pipeline folder (files only: the check reads names), a run folder."""
    save_model(tiny_dit, tmp_path / "tiny")
    pipeline = tmp_path / "pipe"
    (pipeline / "transformer").mkdir(parents=True)
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (pipeline / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "bits.json").write_text("{}")
    (run / "state.safetensors").write_bytes(b"")
    return {"TINY": str(tmp_path / "tiny.safetensors"), "PIPE": str(pipeline), "RUN": str(run), "TMP": str(tmp_path)}


# (command, where --out goes): every writing command, every kind of place it must not write to
CASES = [
    (["quantize", "--model", "TINY", "--config", "W4A4", "--method", "rtn"], "PIPE/transformer"),
    (["quantize", "--model", "PIPE", "--config", "W4A4", "--method", "rtn"], "PIPE/transformer"),
    (["quantize", "--model", "TINY", "--config", "W4A4", "--method", "rtn"], "RUN/inner"),
    (["quantize", "--model", "PIPE", "--config", "W4A4"], "TMP"),
    (["search", "--model", "PIPE"], "PIPE/model_index.json"),
    (["search", "--model", "TINY"], "PIPE/transformer/bits.json"),
    (["search", "--model", "TINY"], "RUN/bits.json"),
    (["search", "--model", "TINY"], "TMP/notes.txt"),
    (["sample", "--model", "TINY", "--num-samples", "1"], "PIPE"),
    (["sample", "--quant", "RUN", "--num-samples", "1"], "RUN/samples"),
    (["finetune", "--quant", "RUN"], "RUN/tuned"),
    (["export", "--quant", "RUN"], "RUN/export"),
    (["train"], "PIPE/transformer"),
    (["init", "--size", "DiT-S/8"], "TMP/notes.txt"),
    (["init", "--size", "DiT-S/8"], "PIPE/transformer"),
    (["init", "--family", "flux"], "RUN"),
    (["demo"], "PIPE/transformer"),
    (["demo"], "RUN"),
]


@pytest.mark.parametrize("argv,out", CASES)
def test_an_output_over_an_input_or_a_model_is_refused_before_any_work(argv, out, places, capsys):
    (places["TMP"] + "/notes.txt") and open(places["TMP"] + "/notes.txt", "w").write("mine")
    before = {path: open(path).read() for path in (places["PIPE"] + "/model_index.json",
                                                  places["PIPE"] + "/transformer/config.json",
                                                  places["RUN"] + "/config.json", places["TMP"] + "/notes.txt")}
    head, _, tail = out.partition("/")
    target = places[head] + ("/" + tail if tail else "")
    assert main([places.get(a, a) for a in argv] + ["--out", target]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("treeq: error: --out") and "\n" not in err
    assert {path: open(path).read() for path in before} == before


def test_a_search_may_rewrite_its_own_bit_configuration(tmp_path):
    from treeq.io import check_output

    bits = tmp_path / "bits.json"
    bits.write_text(json.dumps({"blocks.0.attn.qkv": {"w_bits": 4, "a_bits": 4}}))
    check_output(bits, "bits")  # accepted: treeq wrote it
    bits.write_text("my notes")
    with pytest.raises(ValueError, match="not a file `treeq search` wrote"):
        check_output(bits, "bits")
    check_output(bits, "bits", overwrite=True)
