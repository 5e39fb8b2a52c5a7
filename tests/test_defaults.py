"""Sampling defaults travel with the model: each loader sets its source's, copies keep them, flags override."""
import copy

import pytest
import torch

from treeq.diffusion.defaults import (OFFICIAL, TESTBED, pipeline_defaults, resolve_sampling, sampling_defaults,
                                      set_sampling_defaults_)
from treeq.models.checkpoint import load_model, load_official, save_model
from treeq.models.load import load
from treeq.ptq.apply import quantize
from treeq.ptq.calibration import collect_calibration


def test_each_source_brings_its_own_defaults(tiny_latent_dit, tmp_path):
    assert sampling_defaults(load("default")) == TESTBED
    torch.save(tiny_latent_dit.state_dict(), tmp_path / "tiny.pt")
    official = load_official(tmp_path / "tiny.pt", "DiT-XL/2", depth=2, hidden_size=64, num_heads=4)
    assert sampling_defaults(official) == OFFICIAL
    assert OFFICIAL["cfg_scale"] == 1.5 and OFFICIAL["steps"] == 250 and OFFICIAL["guidance_channels"] == 3


def test_models_without_a_source_infer_from_their_channels(tiny_dit, tiny_latent_dit):
    assert sampling_defaults(tiny_dit) == TESTBED  # pixel space
    assert sampling_defaults(tiny_latent_dit) == OFFICIAL  # 4-channel latents


def test_copies_and_quantized_models_keep_them(tiny_latent_dit):
    custom = {**OFFICIAL, "steps": 7}
    set_sampling_defaults_(tiny_latent_dit, custom)
    assert sampling_defaults(copy.deepcopy(tiny_latent_dit))["steps"] == 7
    bits = {"blocks.0.attn.qkv": {"w_bits": 4, "a_bits": 8}}
    assert sampling_defaults(quantize(tiny_latent_dit, bits))["steps"] == 7
    # reading them hands out a copy: editing it changes nothing on the model
    sampling_defaults(tiny_latent_dit)["steps"] = 99
    assert tiny_latent_dit.sampling["steps"] == 7


def test_saved_pair_keeps_them(tiny_dit, tmp_path):
    set_sampling_defaults_(tiny_dit, {**TESTBED, "cfg_scale": 2.0})
    save_model(tiny_dit, tmp_path / "m")
    assert sampling_defaults(load_model(tmp_path / "m"))["cfg_scale"] == 2.0


def test_overrides_win_and_none_means_keep(tiny_latent_dit):
    settings = resolve_sampling(tiny_latent_dit, steps=3, cfg_scale=None, sampler="ddim")
    assert settings == {**OFFICIAL, "steps": 3, "sampler": "ddim"}
    with pytest.raises(ValueError, match="unknown sampling settings"):
        resolve_sampling(tiny_latent_dit, stepz=3)
    with pytest.raises(ValueError, match="scheduler config"):
        resolve_sampling(tiny_latent_dit, sampler="pipeline")


def test_pipeline_defaults_carry_the_scheduler():
    config = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}
    settings = pipeline_defaults(config)
    assert settings["sampler"] == "pipeline" and settings["scheduler"] == config
    assert settings["guidance_channels"] is None  # diffusers guides every latent channel


def test_calibration_follows_the_model_defaults(tiny_latent_dit):
    """A latent model calibrates along its own (here 4-step DDIM) trajectory, not the testbed's."""
    set_sampling_defaults_(tiny_latent_dit, {**OFFICIAL, "sampler": "ddim", "steps": 4})
    x, t, y = collect_calibration(tiny_latent_dit, num_images=2, num_timesteps=4)
    assert x.shape == (4 * 2 * 2, 4, 8, 8)  # 4 steps x (cond + null) x 2 images
    assert len(t.unique()) == 4
    with pytest.raises(ValueError, match="1..4"):
        collect_calibration(tiny_latent_dit, num_images=2, num_timesteps=5)


def test_info_shows_the_defaults(tiny_pipeline, capsys):
    import json
    from treeq.cli import main
    _, folder = tiny_pipeline
    assert main(["info", "--model", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sampling"]["sampler"] == "pipeline" and info["source"]["vae"].endswith("vae")
    assert main(["info", "--model", str(folder)]) == 0
    assert "with DDIMScheduler" in capsys.readouterr().out
