"""TreeQ registered with diffusers: `from_pretrained(..., quantization_config=TreeQConfig(run=R))` gives the
model `treeq.load_run(R)` gives, on tiny random pipelines quantized through the CLI."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import treeq
from treeq.cli import main
from treeq.models.adapters import adapter_for
from treeq.models.families import init_pipeline_folder
from treeq.models.load import load
from treeq.ptq.calibration import collect_calibration
from treeq.quant.linear import QuantLinear

# flux: the chain (hadamard, gptq, dynamic); pixart: a branch and static activation scales too.
METHODS = {"flux": ["--method", "hadamard,gptq"],
           "pixart": ["--method", "hadamard,monarch,gptq", "--activations", "static"]}
CLASSES = {"flux": "FluxTransformer2DModel", "pixart": "PixArtTransformer2DModel"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{family: (pipeline folder, run folder, calibration)} for flux and pixart."""
    root = tmp_path_factory.mktemp("diffusers_quantizer")
    made = {}
    for family, methods in METHODS.items():
        folder, run = init_pipeline_folder(family, root / family), root / f"{family}-run"
        assert main(["quantize", "--model", str(folder), "--config", "W4A4", *methods, "--calibration-images", "2",
                     "--calibration-timesteps", "2", "--out", str(run)]) in (0, None)
        made[family] = folder, run, collect_calibration(load(folder), num_images=1, num_timesteps=1)
    return made


def _transformer(family, folder, **kwargs):
    import diffusers
    return getattr(diffusers, CLASSES[family]).from_pretrained(folder / "transformer", **kwargs)


def _equal_outputs(model, reference, calibration):
    adapter = adapter_for(reference)
    inputs = next(adapter.batches(calibration, 4))
    with torch.no_grad():
        return torch.equal(adapter.forward(model, inputs), adapter.forward(reference, inputs))


def test_treeq_registers_with_diffusers_mappings_lazily_and_idempotently():
    code = "import sys, treeq; assert 'torch' not in sys.modules and 'TreeQConfig' in treeq.__all__"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)  # listed, and still lazy
    from diffusers.quantizers import auto

    from treeq.deploy.diffusers_quantizer import (
        TreeQConfig,
        TreeQQuantizer,
        register_with_diffusers,
    )
    before = (dict(auto.AUTO_QUANTIZER_MAPPING), dict(auto.AUTO_QUANTIZATION_CONFIG_MAPPING))
    assert register_with_diffusers() == "treeq" and register_with_diffusers() == "treeq"
    assert (dict(auto.AUTO_QUANTIZER_MAPPING), dict(auto.AUTO_QUANTIZATION_CONFIG_MAPPING)) == before
    assert auto.AUTO_QUANTIZER_MAPPING["treeq"] is TreeQQuantizer and treeq.TreeQConfig is TreeQConfig
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["treeq"] is TreeQConfig


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_from_pretrained_with_a_treeq_config_equals_load_run(runs, family):
    folder, run, calibration = runs[family]
    model = _transformer(family, folder, quantization_config=treeq.TreeQConfig(run=run))
    reference = treeq.load_run(run)
    layers = [name for name, module in reference.named_modules() if isinstance(module, QuantLinear)]
    assert layers and all(isinstance(model.get_submodule(name), QuantLinear) for name in layers)
    assert model.state_dict().keys() == reference.state_dict().keys() and not model.training
    assert _equal_outputs(model, reference, calibration)


def test_without_the_registration_diffusers_refuses_the_config(runs, monkeypatch):
    from diffusers.quantizers import auto
    folder, run, _ = runs["flux"]
    config = treeq.TreeQConfig(run=run)
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "treeq")
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "treeq")
    with pytest.raises(ValueError, match="Unknown quantization type"):
        _transformer("flux", folder, quantization_config=config)


def test_a_pipeline_loads_its_transformer_from_a_run(runs):
    from diffusers import DiffusionPipeline
    from diffusers.quantizers import PipelineQuantizationConfig
    folder, run, calibration = runs["flux"]
    quantization = PipelineQuantizationConfig(quant_mapping={"transformer": treeq.TreeQConfig(run=run)})
    pipe = DiffusionPipeline.from_pretrained(folder, quantization_config=quantization)
    assert _equal_outputs(pipe.transformer, treeq.load_run(run), calibration)
    image = pipe("a red fox", num_inference_steps=2, height=16, width=16,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (16, 16)


def test_save_pretrained_reloads_the_same_model_without_the_run(runs, tmp_path):
    folder, run, calibration = runs["pixart"]
    reference = treeq.load_run(run)
    copy = shutil.copytree(run, tmp_path / "run")
    model = _transformer("pixart", folder, quantization_config=treeq.TreeQConfig(run=copy))
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(copy)  # the saved folder holds the state; its config.json the bits and the recipe
    reloaded = type(model).from_pretrained(tmp_path / "saved")
    assert isinstance(reloaded.transformer_blocks[0].attn1.to_q, QuantLinear)
    assert _equal_outputs(reloaded, reference, calibration)


def _one_line_value_error(call):
    with pytest.raises(ValueError) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_mismatched_run_is_one_value_error_line(runs, tmp_path):
    folder, run, _ = runs["flux"]
    config = treeq.TreeQConfig(run=runs["pixart"][1])  # another family: its layer names
    message = _one_line_value_error(lambda: _transformer("flux", folder, quantization_config=config))
    assert "does not fit this FluxTransformer2DModel: unknown layer names" in message
    resized = shutil.copytree(run, tmp_path / "resized")  # another size: one tensor's shape
    state = load_file(str(resized / "state.safetensors"))
    state["proj_out.weight"] = state["proj_out.weight"][:-1].contiguous()
    save_file(state, str(resized / "state.safetensors"))
    message = _one_line_value_error(lambda: _transformer("flux", folder,
                                                         quantization_config=treeq.TreeQConfig(run=resized)))
    assert "proj_out.weight is" in message and "in the run" in message
    assert "holds no TreeQ run" in _one_line_value_error(lambda: treeq.TreeQConfig(run=folder))
    assert "float32" in _one_line_value_error(lambda: _transformer(
        "flux", folder, quantization_config=treeq.TreeQConfig(run=run), torch_dtype=torch.bfloat16))


def test_the_readme_diffusers_example_runs(runs, tmp_path, monkeypatch):
    code = re.search(r"Loading a run through diffusers.*?```python\n(.*?)```", (ROOT / "README.md").read_text(),
                     re.DOTALL).group(1)
    folder, run, calibration = runs["flux"]
    (tmp_path / "runs").mkdir()
    (tmp_path / "flux-tiny").symlink_to(folder)
    (tmp_path / "runs" / "flux-gmb").symlink_to(run)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert _equal_outputs(scope["transformer"], treeq.load_run(run), calibration)
    assert isinstance(scope["pipe"].transformer.transformer_blocks[0].attn.to_q, QuantLinear)
