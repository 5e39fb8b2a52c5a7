"""Sana (SanaPipeline, SanaTransformer2DModel) and Wan (WanPipeline, WanTransformer3DModel, video) in place:
random tiny pipeline folders built in code, loading, W8A8 PTQ, the adapter's block chain, sampling through
the family's pipeline, the CLI chain, and the full-size transformers' shapes (on the meta device)."""
import json

import numpy as np
import pytest
import torch

from treeq.bits import uniform_config
from treeq.cli import main
from treeq.models.adapters import adapter_for
from treeq.models.families import FAMILIES, build_pipeline, init_pipeline_folder
from treeq.models.load import load
from treeq.eval.sample_folder import sample_family_to_folder
from treeq.ptq.apply import quantize
from treeq.ptq.calibration import collect_calibration
from treeq.ptq.recipe import Recipe

FAMILY_NAMES = ("sana", "wan")
CLASSES = {"sana": ("SanaTransformer2DModel", "SanaPipeline"), "wan": ("WanTransformer3DModel", "WanPipeline")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One tiny pipeline folder per family, written once for the module."""
    root = tmp_path_factory.mktemp("families")
    return {name: init_pipeline_folder(name, root / name, size="tiny") for name in FAMILY_NAMES}


@pytest.fixture(scope="module")
def calibrations(folders):
    """(model, calibration of 2 prompts at 2 steps) per family, recorded once through the pipeline."""
    out = {}
    for name in FAMILY_NAMES:
        model = load(str(folders[name]))
        out[name] = (model, collect_calibration(model, num_images=2, num_timesteps=2))
    return out


def _relative_error(output, reference):
    return ((output - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_folder_loads_the_diffusers_class(folders, name):
    transformer_class, pipeline_class = CLASSES[name]
    model = load(str(folders[name]))
    assert type(model).__name__ == transformer_class
    assert adapter_for(model).pipeline == pipeline_class
    assert json.loads((folders[name] / "model_index.json").read_text())["_class_name"] == pipeline_class
    sampling = FAMILIES[name].sampling
    assert model.sampling == {key: sampling[key] for key in model.sampling} and model.sampling["steps"] == 4
    assert model.config.num_attention_heads * model.config.attention_head_dim >= 64  # Monarch needs 64-wide linears
    # token counts: Sana's tiny DC-AE compresses 4x (32px -> 8x8, patch 1); Wan's VAE 8x in space and 4x in
    # time (9 frames -> 3 latent frames of 4x4, patches (1, 2, 2) -> 2x2)
    image_tokens = {"sana": 8 * 8, "wan": 3 * 2 * 2}[name]
    assert model.source["image_tokens"] == image_tokens and model.source["text_tokens"] == 32
    assert adapter_for(model).image_tokens(model) == image_tokens


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_layers_and_rows(folders, name):
    model = load(str(folders[name]))
    adapter = adapter_for(model)
    layers, rows = adapter.layers(model), adapter.layer_rows(model)
    blocks = adapter.block_names(model)
    assert len(blocks) == FAMILIES[name].tiny["num_layers"]
    per_block = {"sana": 8, "wan": 10}[name]  # Sana: attention only (GLUMBConv stays FP); Wan: + 2 FFN linears
    assert len(layers) == per_block * len(blocks)
    assert all(isinstance(model.get_submodule(layer), torch.nn.Linear) for layer in layers)
    if name == "sana":
        assert not any(".ff." in layer for layer in layers)  # the feed-forward's convolutions are not layers
    text = [layer for layer in layers if rows[layer] == model.source["text_tokens"]]
    assert sorted({layer.split(".", 2)[2] for layer in text}) == ["attn2.to_k", "attn2.to_v"]
    assert all(rows[layer] == model.source["image_tokens"] for layer in layers if layer not in text)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_calibration_rows(calibrations, name):
    _, calibration = calibrations[name]
    # 2 prompts x 2 steps x 2 (guidance): Sana runs both halves as one batch, Wan as two calls a step
    assert len(calibration) == 8
    assert calibration.batched["hidden_states"].shape[0] == 8
    if name == "wan":
        assert calibration.batched["hidden_states"].shape[1:] == (16, 3, 4, 4)  # (C, latent frames, H, W)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_w8a8_close_to_full_precision(calibrations, name):
    model, calibration = calibrations[name]
    adapter = adapter_for(model)
    recipe = Recipe(methods=("hadamard", "gptq"), activations="dynamic-asym")
    quantized = quantize(model, uniform_config(model, 8, 8), recipe, calibration=calibration)
    inputs = calibration.kwargs(slice(0, 4))
    with torch.no_grad():
        reference, output = adapter.forward(model, inputs), adapter.forward(quantized, inputs)
    assert _relative_error(output, reference) < 0.01


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("start", [0, 1, 2])
def test_chain_equals_forward(calibrations, name, start):
    model, calibration = calibrations[name]
    adapter = adapter_for(model)
    inputs = calibration.kwargs(slice(2, 6))  # rows of both guidance halves
    with torch.no_grad():
        reference = adapter.forward(model, inputs)
        cached = adapter.run_blocks(model, adapter.embed(model, inputs), 0, start)  # the state entering block k
        state = adapter.run_blocks(model, cached, start, len(adapter.block_names(model)))
        output = adapter.head(model, inputs, state)
    assert torch.equal(output, reference)
    assert adapter.readout(state).shape[0] == 4


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_chain_misses_a_skipped_block(calibrations, name, monkeypatch):
    model, calibration = calibrations[name]
    adapter = adapter_for(model)
    inputs = calibration.kwargs(slice(0, 2))
    names = adapter.block_names(model)
    monkeypatch.setattr(adapter, "block_names", lambda m: names[:1] + names[2:])  # drop block 1
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
        state = adapter.run_blocks(model, adapter.embed(model, inputs), 0, len(names) - 1)
        output = adapter.head(model, inputs, state)
    assert not torch.allclose(output, reference, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_pipeline_samples_with_quantized_transformer(calibrations, folders, name, tmp_path):
    model, calibration = calibrations[name]
    quantized = quantize(model, uniform_config(model, 8, 8), Recipe(methods=("hadamard", "gptq"),
                                                                     activations="dynamic-asym"),
                         calibration=calibration)
    done = sample_family_to_folder(quantized, tmp_path, num_samples=2, seed=0, batch_size=2)
    assert done["written"] == 2 and done["videos"] == (name == "wan")
    side = FAMILIES[name].sampling["height"]
    with np.load(tmp_path / "samples.npz") as data:
        assert data["arr_0"].shape == (2, side, side, 3) and data["arr_0"].dtype == np.uint8
    assert (tmp_path / "grid.png").exists()
    if name == "wan":
        with np.load(tmp_path / "videos.npz") as data:
            videos = data["arr_0"]
        assert videos.shape == (2, FAMILIES[name].sampling["num_frames"], side, side, 3)
        with np.load(tmp_path / "samples.npz") as data:  # the middle frames
            assert np.abs(data["arr_0"].astype(int) - videos[:, videos.shape[1] // 2]).max() <= 1
    record = json.loads((tmp_path / "sampling.json").read_text())
    assert record["sampling"]["steps"] == 4 and len(record["prompts"]) == 2


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_cli_init_quantize_monarch_sample(name, tmp_path):
    folder, run, samples = tmp_path / "pipe", tmp_path / "run", tmp_path / "samples"
    assert main(["init", "--family", name, "--size", "tiny", "--out", str(folder)]) == 0
    assert main(["quantize", "--model", str(folder), "--config", "W4A4", "--method", "hadamard,gptq",
                 "--branch", "monarch", "--calibration-images", "2", "--calibration-timesteps", "2",
                 "--out", str(run)]) == 0
    assert main(["sample", "--quant", str(run), "--num-samples", "2", "--out", str(samples)]) == 0
    with np.load(samples / "samples.npz") as data:
        assert data["arr_0"].shape[0] == 2
    assert (samples / "videos.npz").exists() == (name == "wan")


# Sana 1600M 1024px: 1.60B parameters; Wan2.1-T2V-1.3B: 1.42B (the name rounds down)
@pytest.mark.parametrize("name, published", [("sana", 1.60e9), ("wan", 1.42e9)])
def test_full_transformer_has_published_shape(name, published, monkeypatch):
    """`build_pipeline(F, "full")` builds the real-shape transformer, here on the meta device (no memory);
    the pipeline class is stubbed (it would run the VAE and tokenizer on meta tensors)."""
    import diffusers

    from treeq.models import families

    built = {}

    class Pipeline:
        def __init__(self, **components):
            built.update(components)

    monkeypatch.setattr(diffusers, FAMILIES[name].pipeline, Pipeline)
    # a scheduler builds its tables from tensors, which on the meta device hold no values (it failed when run alone)
    monkeypatch.setattr(diffusers, FAMILIES[name].scheduler, lambda **config: None)
    monkeypatch.setattr(families, "_randomize_zero_init", lambda model: None)  # meta tensors hold no values
    with torch.device("meta"):
        build_pipeline(name, "full")
    transformer, vae, text_encoder = built["transformer"], built["vae"], built["text_encoder"]
    assert type(transformer).__name__ == FAMILIES[name].transformer
    count = sum(p.numel() for p in transformer.parameters())
    assert abs(count - published) / published < 0.02, count
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    if name == "sana":
        assert (config.num_layers, width, config.caption_channels) == (20, 2240, 2304)
        assert text_encoder.config.hidden_size == 2304  # Gemma2-2B's width feeds the caption projection
        assert len(vae.config.encoder_block_out_channels) == 6 and vae.config.latent_channels == 32  # f32c32
    else:
        assert (config.num_layers, width, config.ffn_dim, config.text_dim) == (30, 1536, 8960, 4096)
        assert text_encoder.config.d_model == 4096  # UMT5-XXL's width
        assert (vae.config.scale_factor_spatial, vae.config.scale_factor_temporal, vae.config.z_dim) == (8, 4, 16)


@pytest.mark.parametrize("name, image_tokens, text_tokens", [("sana", 32 * 32, 300), ("wan", 21 * 30 * 52, 512)])
def test_full_token_counts(name, image_tokens, text_tokens, tmp_path):
    """At the published settings: Sana 1024px through a 32x DC-AE (patch 1); Wan 81 frames of 480x832 ->
    21 latent frames of 60x104, patches (1, 2, 2). The folder's count and the adapter's default agree."""
    import diffusers

    from treeq.models.family_load import _token_counts

    family = FAMILIES[name]
    with torch.device("meta"):
        transformer = getattr(diffusers, family.transformer)(**family.full)
        getattr(diffusers, family.vae_class)(**(family.full_vae or family.vae)).save_config(tmp_path / "vae")
    counts = _token_counts(transformer, tmp_path, family.full_sampling)
    assert counts == {"image_tokens": image_tokens, "text_tokens": text_tokens}
    adapter = adapter_for(transformer)
    assert (adapter.image_tokens(transformer), adapter.text_tokens(transformer)) == (image_tokens, text_tokens)
