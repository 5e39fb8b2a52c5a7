"""PixArt, SD3 and FLUX in place through diffusers, on tiny random pipelines built in code.

Each family is quantized, searched, fine-tuned, saved, reloaded and sampled through its own pipeline;
the adapter's block chain must reproduce the model's own forward exactly.
"""
import dataclasses
import json

import pytest
import torch

from treeq.bits import average_bits, preset_config, quantizable_layers, uniform_config
from treeq.cli import main
from treeq.models.adapters import adapter_for
from treeq.models.families import init_pipeline_folder
from treeq.models.load import load
from treeq.ptq.apply import quantize
from treeq.ptq.calibration import collect_calibration
from treeq.ptq.recipe import Recipe

FAMILIES = ("pixart", "sd3", "flux")
CLASSES = {"pixart": "PixArtTransformer2DModel", "sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
# W4A4 relative output error on a calibration batch, measured on these tiny random models (hadamard, gptq,
# dynamic-asym): pixart 0.055, sd3 0.027, flux 0.031; the bound leaves room for float differences.
W4A4_BOUND = 0.1
RECIPE = Recipe(methods=("hadamard", "gptq"), activations="dynamic-asym")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: init_pipeline_folder(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="module")
def calibrations(folders):
    return {name: collect_calibration(load(folders[name]), num_images=2, num_timesteps=2) for name in FAMILIES}


def _relative_error(model, reference, calibration):
    adapter = adapter_for(model)
    inputs = next(adapter.batches(calibration, 8))
    with torch.no_grad():
        out, ref = adapter.forward(model, inputs), adapter.forward(reference, inputs)
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pipeline_folder_loads_the_diffusers_transformer_in_place(folders, family):
    model = load(folders[family])
    assert type(model).__name__ == CLASSES[family]
    assert model.source["family"] == family and model.sampling["steps"] == 4
    layers = quantizable_layers(model)
    assert layers and all(isinstance(model.get_submodule(name), torch.nn.Linear) for name in layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_within_one_percent_and_w4a4_within_the_measured_bound(folders, calibrations, family):
    model = load(folders[family])
    w8 = quantize(model, preset_config(model, "W8A8"), RECIPE, calibration=calibrations[family])
    w4 = quantize(model, preset_config(model, "W4A4"), RECIPE, calibration=calibrations[family])
    error8, error4 = (_relative_error(q, model, calibrations[family]) for q in (w8, w4))
    assert error8 < 0.01
    assert error8 < error4 < W4A4_BOUND


@pytest.mark.parametrize("family", FAMILIES)
def test_the_chain_from_any_block_with_cached_inputs_equals_the_forward(folders, calibrations, family):
    model = load(folders[family])
    adapter = adapter_for(model)
    inputs = next(adapter.batches(calibrations[family], 4))
    depth = len(adapter.block_names(model))
    with torch.no_grad():
        reference = adapter.forward(model, inputs)
        state = adapter.embed(model, inputs)
        for k in range(depth):
            entering = adapter.run_blocks(model, state, 0, k)  # cached: the state entering block k
            assert torch.equal(adapter.head(model, inputs, adapter.run_blocks(model, entering, k, depth)), reference)


def _chain(model, adapter, inputs, blocks):
    """The chain's output over `blocks` blocks, or None when it breaks (a stream left None where a tensor
    belongs, or one handed on in the other's place: the shapes then disagree)."""
    try:
        return adapter.head(model, inputs, adapter.run_blocks(model, adapter.embed(model, inputs), 0, blocks))
    except (TypeError, RuntimeError):
        return None


@pytest.mark.parametrize("family", FAMILIES)
def test_the_chain_fails_when_a_block_or_a_stream_is_skipped(folders, calibrations, family, monkeypatch):
    model = load(folders[family])
    adapter = adapter_for(model)
    inputs = next(adapter.batches(calibrations[family], 4))
    with torch.no_grad():
        reference = adapter.forward(model, inputs)
        full = adapter.block_names(model)
        monkeypatch.setattr(type(adapter), "block_names", lambda self, m: full[:1] + full[2:])
        skipped = _chain(model, adapter, inputs, len(full) - 1)
        assert skipped is None or not torch.allclose(skipped, reference)
        monkeypatch.undo()
        if len(adapter.carried) > 1:  # a block's text stream must be carried on, not left at its input
            monkeypatch.setattr(type(adapter), "carried", adapter.carried[1:])
            dropped = _chain(model, adapter, inputs, len(full))
            assert dropped is None or not torch.allclose(dropped, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_rows_count_image_text_and_modulation_rows(folders, family):
    model = load(folders[family])
    rows, adapter = adapter_for(model).layer_rows(model), adapter_for(model)
    image, text = adapter.image_tokens(model), adapter.text_tokens(model)
    assert image == 16 and text == (32 + 77 if family == "sd3" else 32)
    assert set(rows.values()) <= {1, image, text, image + text}
    assert any(value == text for value in rows.values())  # every family has linears on text tokens
    if family != "pixart":  # adaLN-single sits outside PixArt's blocks
        assert rows[f"{adapter.block_names(model)[0]}.norm1.linear"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_run_reloads_to_identical_outputs_and_samples(folders, calibrations, family, tmp_path):
    from treeq.ptq.run import load_run, save_run
    from treeq.eval.sample_folder import sample_family_to_folder

    model = load(folders[family])
    recipe = dataclasses.replace(RECIPE, model=str(folders[family]), methods=("hadamard", "monarch", "gptq"))
    quantized = quantize(model, preset_config(model, "W4A4"), recipe, calibration=calibrations[family])
    save_run(tmp_path / "run", recipe, quantized)
    _, reloaded = load_run(tmp_path / "run")
    inputs = next(adapter_for(model).batches(calibrations[family], 4))
    with torch.no_grad():
        assert torch.equal(adapter_for(model).forward(reloaded, inputs), adapter_for(model).forward(quantized, inputs))
    sample_family_to_folder(reloaded, tmp_path / "samples", num_samples=2)
    import numpy as np
    with np.load(tmp_path / "samples" / "samples.npz") as samples:
        assert samples["arr_0"].shape == (2, 16, 16, 3) and samples["arr_0"].dtype == np.uint8
    assert json.loads((tmp_path / "samples" / "sampling.json").read_text())["prompts"][0]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_search_respects_its_budget_and_its_result_applies(folders, calibrations, family, tmp_path):
    from treeq.search.run import run_search

    model = load(folders[family])
    result = run_search(dataclasses.replace(RECIPE, model=str(folders[family])), "W4A4", "tss",
                        out=tmp_path / "bits.json", queue_size=2, calibration_rows=2, progress=False, model=model,
                        calibration=calibrations[family])
    assert average_bits(result.config, model) <= 4.0 + 1e-9
    assert result.config != uniform_config(model, 4, 4)  # the tree mixed precisions
    assert result.evaluations > len(quantizable_layers(model))
    applied = quantize(model, result.config, RECIPE, calibration=calibrations[family])
    assert _relative_error(applied, model, calibrations[family]) < W4A4_BOUND


@pytest.mark.parametrize("family", FAMILIES)
def test_a_finetuning_step_lowers_the_distillation_loss(folders, calibrations, family, tmp_path):
    from treeq.finetune.distill import FinetuneConfig, finetune_

    model = load(folders[family])
    recipe = dataclasses.replace(RECIPE, methods=("hadamard", "monarch", "gptq"))
    student = quantize(model, preset_config(model, "W4A4"), recipe, calibration=calibrations[family])
    before = _relative_error(student, model, calibrations[family])
    config = FinetuneConfig(steps=8, batch_size=8, lr=1e-3)
    losses = finetune_(student, model, calibrations[family], None, config, tmp_path, progress=False)
    assert len(losses) == 8 and _relative_error(student, model, calibrations[family]) < before


def test_eval_measures_a_run_against_its_fp_transformer(folders, calibrations, tmp_path, capsys):
    """PSNR of the sampled images and held-out output error; a shared FP reference gives the same figures."""
    from treeq.eval.fidelity import family_fidelity, fp_reference
    from treeq.ptq.run import save_run

    model = load(folders["flux"])
    recipe = dataclasses.replace(RECIPE, model=str(folders["flux"]))
    save_run(tmp_path / "run", recipe, quantize(model, preset_config(model, "W4A4"), recipe,
                                                calibration=calibrations["flux"]))
    capsys.readouterr()
    assert main(["eval", "--quant", str(tmp_path / "run"), "--num-samples", "2", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 < metrics["output_relative_error"] < W4A4_BOUND and 20 < metrics["psnr_vs_fp"] < float("inf")
    quantized = quantize(model, preset_config(model, "W4A4"), recipe, calibration=calibrations["flux"])
    shared = family_fidelity(quantized, model, num_samples=2, reference=fp_reference(model, num_samples=2))
    assert shared == family_fidelity(quantized, model, num_samples=2)
    assert family_fidelity(model, model, num_samples=2)["output_relative_error"] == 0


def test_the_cli_chain_of_the_issue_on_flux(tmp_path):
    """init -> quantize (GMB) -> sample -> eval; search -> quantize with its bits (a small queue)."""
    folder, run, samples = tmp_path / "P", tmp_path / "R", tmp_path / "S"
    assert main(["init", "--family", "flux", "--size", "tiny", "--out", str(folder)]) == 0
    common = ["--calibration-images", "2", "--calibration-timesteps", "2"]
    assert main(["quantize", "--model", str(folder), "--config", "W4A4", "--method", "hadamard,gptq", "--branch",
                 "monarch", *common, "--out", str(run)]) == 0
    assert main(["sample", "--quant", str(run), "--num-samples", "2", "--out", str(samples)]) == 0
    assert (samples / "samples.npz").exists() and (samples / "grid.png").exists()
    assert main(["export", "--quant", str(run), "--out", str(tmp_path / "E")]) == 2  # packed export: our DiT only
    assert not (tmp_path / "E").exists()
    assert main(["search", "--model", str(folder), "--target", "W4A4", "--queue-size", "2", "--calibration-rows",
                 "2", *common, "--out", str(tmp_path / "b.json")]) == 0
    assert main(["quantize", "--model", str(folder), "--config", str(tmp_path / "b.json"), "--out",
                 str(tmp_path / "Q")]) == 0
    assert json.loads((tmp_path / "Q" / "bits.json").read_text()) == json.loads((tmp_path / "b.json").read_text())


def test_prompts_come_from_a_file_and_an_empty_one_is_refused(tmp_path, capsys):
    folder = init_pipeline_folder("pixart", tmp_path / "P")
    (tmp_path / "prompts.txt").write_text("a green apple\n\n")
    assert main(["sample", "--model", str(folder), "--num-samples", "2", "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(tmp_path / "S")]) == 0
    assert json.loads((tmp_path / "S" / "sampling.json").read_text())["prompts"] == ["a green apple"] * 2
    (tmp_path / "empty.txt").write_text("\n")
    capsys.readouterr()
    assert main(["sample", "--model", str(folder), "--prompts", str(tmp_path / "empty.txt"),
                 "--out", str(tmp_path / "S2")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0 and not (tmp_path / "S2" / "samples.npz").exists()


def test_an_unsupported_transformer_and_a_folder_without_one_are_one_line(tmp_path, capsys):
    import diffusers
    unet = tmp_path / "unet"
    diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(unet)
    no_transformer = tmp_path / "pipe"
    no_transformer.mkdir()
    (no_transformer / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "vae": ["diffusers",
                                                                                                     "AutoencoderKL"]}))
    for folder, message in ((unet, "UNet2DModel, not a supported transformer"), (no_transformer, "has no transformer")):
        capsys.readouterr()
        assert main(["info", "--model", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_sd3s_last_block_has_no_text_outputs_and_its_segment_scores_like_the_forward(folders, calibrations):
    """context_pre_only: the last joint block keeps norm1_context (it conditions the image stream) but has no
    text projections out or text MLP, returns no text stream, and a segment there scores as the forward does."""
    from treeq.search.objective import ModelObjective, output_error

    model = load(folders["sd3"])
    layers = quantizable_layers(model)
    last = f"transformer_blocks.{len(model.transformer_blocks) - 1}."
    inside = [name for name in layers if name.startswith(last)]
    assert f"{last}norm1_context.linear" in inside
    assert not [name for name in inside if "to_add_out" in name or "ff_context" in name]
    assert [name for name in layers if "transformer_blocks.0.ff_context" in name]  # the other blocks have them
    quantized = quantize(model, uniform_config(model, 8, 8))
    rows = calibrations["sd3"]
    objective = ModelObjective(quantized, rows, 32, readout_blocks=0)
    start = layers.index(inside[0])
    metric = objective.score(start, len(layers), [((3, 3),) * len(inside)])[0]
    config = {name: {"w_bits": 3, "a_bits": 3} for name in inside}
    assert metric == pytest.approx(output_error(quantized, rows, config), rel=1e-4) and metric > 0


def test_a_transformer_whose_config_drops_weights_is_refused(folders, tmp_path):
    """Strict loading: a config.json that builds fewer blocks than the weights hold is an error naming it."""
    import shutil

    folder = tmp_path / "flux"
    shutil.copytree(folders["flux"], folder)
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": 0}))
    with pytest.raises(ValueError, match=r"transformer: the weights do not fit its config.json \(\d+ unexpected"):
        load(folder)


def test_a_folder_without_settings_samples_with_its_variants_published_defaults(folders, tmp_path):
    """FLUX.1-dev (a guidance embedding) takes dev's defaults, FLUX.1-schnell schnell's, with no treeq.json."""
    import shutil

    from diffusers import FluxTransformer2DModel

    from treeq.models.families import FAMILIES, SETTINGS_FILE

    for guidance_embeds, steps, cfg_scale in ((True, 28, 3.5), (False, 4, 0.0)):
        folder = tmp_path / f"flux-{guidance_embeds}"
        shutil.copytree(folders["flux"], folder)
        (folder / SETTINGS_FILE).unlink()
        shutil.rmtree(folder / "transformer")
        FluxTransformer2DModel(**{**FAMILIES["flux"].tiny, "guidance_embeds": guidance_embeds}).save_pretrained(
            folder / "transformer")
        model = load(folder)
        assert model.sampling["steps"] == steps and model.sampling["cfg_scale"] == cfg_scale


def test_eval_of_a_family_run_samples_as_the_run_did(folders, tmp_path, monkeypatch, capsys):
    """Its recorded steps, guidance and prompts, and 16 pipeline samples by default; a flag overrides."""
    import treeq.eval.fidelity

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a quiet harbour\n")
    run = tmp_path / "run"
    assert main(["quantize", "--model", str(folders["flux"]), "--method", "rtn", "--steps", "2", "--cfg-scale", "0.5",
                 "--prompts", str(prompts), "--out", str(run)]) == 0
    seen = []
    monkeypatch.setattr(treeq.eval.fidelity, "family_fidelity",
                        lambda model, fp, num_samples, seed, prompts, **sampling: seen.append(
                            (num_samples, prompts, sampling)) or {"psnr_vs_fp": 1.0})
    assert main(["eval", "--quant", str(run)]) == 0
    assert seen[-1] == (16, ["a quiet harbour"], {"steps": 2, "cfg_scale": 0.5})
    assert main(["eval", "--quant", str(run), "--steps", "3", "--num-samples", "2"]) == 0
    assert seen[-1] == (2, ["a quiet harbour"], {"steps": 3, "cfg_scale": 0.5})


@pytest.mark.parametrize("damage,message", [
    (lambda f: __import__("shutil").rmtree(f / "vae"), "vae: the AutoencoderKL that"),
    (lambda f: (f / "treeq.json").write_text("{broken"), "treeq.json is not JSON"),
    (lambda f: (f / "treeq.json").write_bytes(bytes(range(128, 200))), "treeq.json is not JSON"),
])
def test_a_damaged_pipeline_folder_is_named_in_one_line_before_loading(damage, message, folders, tmp_path, capsys,
                                                                        monkeypatch):
    """A missing component or a broken treeq.json names the file and the fix, on one line and nothing else
    (the libraries' import and loading chatter included)."""
    import shutil

    import diffusers

    folder = tmp_path / "flux"
    shutil.copytree(folders["flux"], folder)
    damage(folder)
    loaded = []
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(a) or (_ for _ in ()).throw(AssertionError)))
    capsys.readouterr()
    assert main(["sample", "--model", str(folder), "--num-samples", "1", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("treeq: error: ") and message in err and not loaded


def test_a_packed_export_and_eval_of_a_family_are_refused_before_loading(folders, tmp_path, monkeypatch, capsys):
    """Decided from the folders' JSON: no model is loaded (a load would fail this test)."""
    import treeq.models.load
    import treeq.ptq.run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"recipe": {"model": str(folders["sd3"])}}))
    (run / "state.safetensors").write_bytes(b"")

    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model")
    monkeypatch.setattr(treeq.models.load, "load", no_load)
    monkeypatch.setattr(treeq.ptq.run, "load_quantized", no_load)
    for argv, message in ((["export", "--quant", str(run), "--out", str(tmp_path / "E")], "is a sd3 run: the packed"),
                          (["eval", "--model", str(folders["sd3"])], "give --quant RUN")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
