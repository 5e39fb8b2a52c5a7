"""Diffusers folders: pipelines with scheduler, VAE and labels; sharded and fp16 weights; per-block embedders."""
import json
import shutil

import pytest
import torch
from diffusers import DiTTransformer2DModel

from treeq.diffusion.defaults import OFFICIAL, sampling_defaults
from treeq.models.diffusers_convert import diffusers_config, to_diffusers_state_dict
from treeq.models.diffusers_load import find_weights, load_diffusers
from treeq.models.load import load


def _inputs(config, batch=3):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=generator)
    return x, torch.tensor([0, 500, 999])[:batch], torch.tensor([0, 3, config.num_classes])[:batch]


def test_pipeline_folder_brings_scheduler_vae_and_labels(tiny_pipeline):
    pipeline, folder = tiny_pipeline
    model = load(str(folder))
    settings = sampling_defaults(model)
    assert settings["sampler"] == "pipeline" and settings["scheduler"]["_class_name"] == "DDIMScheduler"
    assert settings["guidance_channels"] is None
    assert model.source["vae"] == str(folder / "vae")
    assert model.source["id2label"][1].startswith("goldfish")


def test_native_diffusers_dit_loads_with_per_block_embedders(tiny_pipeline):
    """Random per-block embedders (a DiT trained in diffusers) no longer block loading: outputs match."""
    pipeline, folder = tiny_pipeline
    model = load_diffusers(folder)
    assert model.config.per_block_embedders and len(model.block_embedders) == 1
    x, t, y = _inputs(model.config)
    with torch.no_grad():
        expected = pipeline.transformer(x, timestep=t, class_labels=y).sample
        got = model(x, t, y)
    assert (expected - got).abs().max() < 1e-4
    # the extra embedders stay out of the quantizable layers
    from treeq.bits import quantizable_layers
    assert len(quantizable_layers(model)) == 10


def test_sharded_fp16_variant_folder_loads(tiny_pipeline, tmp_path):
    pipeline, folder = tiny_pipeline
    pipeline.transformer.save_pretrained(tmp_path / "t", max_shard_size="200KB", variant="fp16")
    files, variant = find_weights(tmp_path / "t")
    assert variant == "fp16" and len(files) > 1
    shutil.copy(folder / "transformer" / "config.json", tmp_path / "t" / "config.json")
    sharded, whole = load_diffusers(tmp_path / "t"), load_diffusers(folder / "transformer")
    assert all(torch.equal(a, b) for a, b in zip(sharded.state_dict().values(), whole.state_dict().values()))
    assert sampling_defaults(sharded) == OFFICIAL  # a bare transformer brings no scheduler


def test_missing_shard_is_named(tiny_pipeline, tmp_path):
    pipeline, _ = tiny_pipeline
    pipeline.transformer.save_pretrained(tmp_path / "t", max_shard_size="200KB")
    victim = sorted((tmp_path / "t").glob("*-00002-of-*"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_diffusers(tmp_path / "t")


@pytest.mark.parametrize("per_block", [False, True])
def test_export_to_diffusers_is_exact(per_block):
    """Our DiT -> diffusers keys and config -> DiTTransformer2DModel computes the same thing."""
    from treeq.models.diffusers_convert import config_from_diffusers
    from treeq.models.dit import DiT

    config = config_from_diffusers({"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 4,
                                    "sample_size": 8, "in_channels": 4, "out_channels": 8,
                                    "num_embeds_ada_norm": 10})
    config.per_block_embedders = per_block
    torch.manual_seed(0)
    ours = DiT(config).eval()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name != "pos_embed":  # diffusers recomputes the fixed table; it is not in its files
                param.normal_(std=0.1)
    theirs = DiTTransformer2DModel.from_config(diffusers_config(config)).eval()
    theirs.load_state_dict(to_diffusers_state_dict(ours), strict=True)
    x, t, y = _inputs(config)
    with torch.no_grad():
        assert (theirs(x, timestep=t, class_labels=y).sample - ours(x, t, y)).abs().max() < 1e-4


def test_model_index_naming_a_missing_part_is_clear(tiny_pipeline, tmp_path):
    _, folder = tiny_pipeline
    copy = tmp_path / "p"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "scheduler")
    with pytest.raises(FileNotFoundError, match="names a scheduler"):
        load_diffusers(copy)
    json.loads((copy / "model_index.json").read_text())
