"""`treeq sample` end to end: diffusers pipelines equal DiTPipeline, latents through a VAE, sharding and resuming."""
import json

import numpy as np
import pytest
import torch

from treeq.cli import main
from treeq.diffusion.defaults import resolve_sampling
from treeq.diffusion.sampling import sample, sample_generators
from treeq.diffusion.vae import decode, load_vae
from treeq.models.load import load
from treeq.eval.sample_folder import resolve_classes, run_labels, sample_to_folder


def _samples(folder):
    with np.load(folder / "samples.npz") as data:
        return data["arr_0"], data["arr_1"]


def test_pipeline_folder_equals_ditpipeline(tiny_pipeline, tmp_path):
    """Same per-sample generators, labels, scheduler and steps: our images are DiTPipeline's."""
    pipeline, folder = tiny_pipeline
    labels = [0, 1, 2, 3]
    generators = sample_generators(0, range(4))
    with torch.no_grad():
        expected = pipeline(class_labels=labels, generator=generators, num_inference_steps=4, output_type="pt").images
    model = load(str(folder))
    latents = sample(model, torch.tensor(labels), seed=0, progress=False, **resolve_sampling(model, steps=4))
    ours = (decode(load_vae(folder / "vae"), latents) / 2 + 0.5).clamp(0, 1)
    assert (ours - expected).abs().max() < 1e-4

    # and the command line writes the same images as uint8 RGB
    assert main(["sample", "--model", str(folder), "--num-samples", "4", "--steps", "4", "--batch-size", "3",
                 "--quiet", "--out", str(tmp_path / "s")]) == 0
    images, written_labels = _samples(tmp_path / "s")
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert written_labels.tolist() == labels
    reference = (127.5 * (2 * expected - 1) + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(int) - reference).max() <= 1
    record = json.loads((tmp_path / "s" / "sampling.json").read_text())
    assert record["sampling"]["sampler"] == "pipeline" and record["sampling"]["steps"] == 4


def test_shards_union_is_one_process(tiny_pipeline, tmp_path):
    """Rank r of W draws batches r, r+W, ...: two ranks write exactly the parts one process writes."""
    _, folder = tiny_pipeline
    model = load(str(folder))
    vae = load_vae(folder / "vae")
    settings = resolve_sampling(model, steps=2)
    options = dict(num_samples=5, settings=settings, seed=3, batch_size=2, vae=vae, progress=False)
    sample_to_folder(model, tmp_path / "one", **options)
    sample_to_folder(model, tmp_path / "two", rank=1, world_size=2, **options)  # rank 0 gathers, so it goes last
    assert not (tmp_path / "two" / "samples.npz").exists()
    sample_to_folder(model, tmp_path / "two", rank=0, world_size=2, **options)
    one, two = _samples(tmp_path / "one"), _samples(tmp_path / "two")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


def test_interrupted_run_resumes_and_refuses_other_settings(tiny_dit, tmp_path):
    settings = resolve_sampling(tiny_dit, steps=2)
    options = dict(num_samples=6, settings=settings, batch_size=2, progress=False)
    out = tmp_path / "s"
    sample_to_folder(tiny_dit, out, **options)
    first = _samples(out)
    (out / "parts" / "00000002.npz").unlink()  # as if killed while drawing the second batch
    (out / "samples.npz").unlink()
    done = sample_to_folder(tiny_dit, out, **options)
    assert done["written"] == 2
    assert np.array_equal(first[0], _samples(out)[0])
    with pytest.raises(ValueError, match="other settings.*seed"):
        sample_to_folder(tiny_dit, out, **{**options, "seed": 1})


def test_latent_model_needs_a_vae_then_decodes(tiny_latent_dit, tmp_path, capsys, monkeypatch):
    torch.save(tiny_latent_dit.state_dict(), tmp_path / "tiny.pt")
    from treeq.models.registry import FAMILY
    monkeypatch.setitem(FAMILY, "T", (2, 64, 4))  # let the loader read this tiny size off the shapes
    base = ["sample", "--model", str(tmp_path / "tiny.pt"), "--num-samples", "2", "--steps", "2", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert "give --vae" in capsys.readouterr().err
    assert main(["init", "--size", "vae", "--vae-channels", "8,16", "--out", str(tmp_path / "vae")]) == 0
    assert main([*base, "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "b")]) == 0
    images, _ = _samples(tmp_path / "b")
    assert images.shape == (2, 16, 16, 3) and images.std() > 0
    record = json.loads((tmp_path / "b" / "sampling.json").read_text())
    assert record["sampling"]["guidance_channels"] == 3 and record["sampling"]["cfg_scale"] == 1.5  # official


def test_bfloat16_samples_stay_close_to_float32(tiny_pipeline, tmp_path):
    _, folder = tiny_pipeline
    base = ["sample", "--model", str(folder), "--num-samples", "2", "--steps", "2", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "fp32")]) == 0
    assert main([*base, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    difference = np.abs(_samples(tmp_path / "fp32")[0].astype(int) - _samples(tmp_path / "bf16")[0].astype(int))
    assert difference.mean() < 8


def test_classes_by_id_and_name():
    labels = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus"}
    classes = resolve_classes("goldfish,7, Tinca tinca", 1000, labels)
    assert classes == [1, 7, 0]
    assert run_labels(torch.arange(5), 1000, classes).tolist() == [1, 7, 0, 1, 7]
    with pytest.raises(ValueError, match="unknown class 'shark'"):
        resolve_classes("shark", 1000, labels)


def test_eval_reads_a_sample_folder_back(tiny_dit, tmp_path, capsys):
    from treeq.models.checkpoint import save_model
    save_model(tiny_dit, tmp_path / "tiny")
    out = str(tmp_path / "s")
    assert main(["sample", "--model", str(tmp_path / "tiny.safetensors"), "--num-samples", "10", "--steps", "2",
                 "--quiet", "--out", out]) == 0
    capsys.readouterr()
    assert main(["eval", "--samples", out, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_samples"] == 10 and "class_accuracy" in metrics


def test_eval_of_large_samples_without_inception_points_to_adm(tiny_pipeline, tmp_path, capsys):
    _, folder = tiny_pipeline
    out = str(tmp_path / "s")
    assert main(["sample", "--model", str(folder), "--num-samples", "2", "--steps", "2", "--quiet", "--out", out]) == 0
    assert main(["eval", "--samples", out]) == 2
    assert "evaluator.py" in capsys.readouterr().err


def test_init_diffusers_pipeline_runs_in_diffusers_and_here(tmp_path):
    """`treeq init --format diffusers` writes a folder DiTPipeline loads, computing what our loader computes."""
    from diffusers import DiTPipeline

    out = tmp_path / "pipe"
    assert main(["init", "--size", "DiT-S/8", "--format", "diffusers", "--input-size", "8", "--depth", "2",
                 "--hidden-size", "64", "--num-heads", "4", "--vae-channels", "8,16", "--out", str(out)]) == 0
    theirs = DiTPipeline.from_pretrained(out).transformer.eval()
    ours = load(str(out))
    assert not ours.config.per_block_embedders  # written with one shared embedder, as the Hub's conversion
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([5, 1000])
    with torch.no_grad():
        assert (theirs(x, timestep=t, class_labels=y).sample - ours(x, t, y)).abs().max() < 1e-4


def test_init_official_pt_loads_as_the_named_size(tmp_path, monkeypatch):
    from treeq.models.registry import FAMILY
    monkeypatch.setitem(FAMILY, "T", (2, 64, 4))  # a tiny "published" size, read back off the shapes
    assert main(["init", "--size", "DiT-T/2", "--input-size", "8", "--num-classes", "10",
                 "--out", str(tmp_path / "t.pt")]) == 0
    model = load(str(tmp_path / "t.pt"))
    assert (model.config.depth, model.config.hidden_size, model.config.input_size) == (2, 64, 8)
    assert model.blocks[0].adaLN_modulation[1].weight.abs().sum() > 0  # not the identity adaLN-Zero start


@pytest.mark.slow
def test_torchrun_two_processes_write_what_one_does(tiny_pipeline, tmp_path):
    """The real thing: `torchrun --nproc_per_node 2 -m treeq sample` over gloo equals one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, folder = tiny_pipeline
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    args = ["sample", "--model", str(folder), "--num-samples", "7", "--steps", "2", "--batch-size", "2",
            "--quiet", "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    subprocess.run([*torchrun, "-m", "treeq", *args, "--out", str(tmp_path / "two")], env=env, check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "treeq", *args, "--out", str(tmp_path / "one")], env=env, check=True,
                   timeout=300)
    one, two = _samples(tmp_path / "one"), _samples(tmp_path / "two")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


def test_inception_fid_without_its_extra_is_one_clear_line(tiny_pipeline, tmp_path, capsys):
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity is installed here")
    except ImportError:
        pass
    _, folder = tiny_pipeline
    out = str(tmp_path / "s")
    assert main(["sample", "--model", str(folder), "--num-samples", "2", "--steps", "1", "--quiet", "--out", out]) == 0
    weights = tmp_path / "inception.pth"
    assert main(["eval", "--samples", out, "--inception-weights", str(weights), "--reference", out]) == 2
    assert "no Inception weights" in capsys.readouterr().err
    weights.write_bytes(b"not really")
    assert main(["eval", "--samples", out, "--inception-weights", str(weights), "--reference", out]) == 2
    assert "treeq[fid]" in capsys.readouterr().err


def _pipeline_images(model, folder, labels, **settings):
    latents = sample(model, torch.tensor(labels), seed=0, progress=False, **resolve_sampling(model, **settings))
    return (decode(load_vae(folder / "vae"), latents) / 2 + 0.5).clamp(0, 1)


def _diffusers_loop(pipeline, scheduler, labels, steps):
    """The sampling loop of diffusers' documentation and of its other pipelines, unguided, on the pipeline's own
    transformer and VAE: noise times init_noise_sigma, the model on scale_model_input(x), the step from x."""
    from treeq.diffusion.sampling import initial_noise

    x = initial_noise(sample_generators(0, range(len(labels))), (4, 8, 8))
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    y = torch.tensor(labels)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = pipeline.transformer(scheduler.scale_model_input(x, t), timestep=t[None].expand(len(x)),
                                       class_labels=y).sample
            x = scheduler.step(out[:, :4], t, x).prev_sample
        images = pipeline.vae.decode(x / pipeline.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def test_a_scheduler_whose_initial_sigma_is_not_one_gets_scaled_noise(tiny_pipeline):
    """Decided (docs/DESIGN.md): with Euler (init_noise_sigma > 1, a scale_model_input that is not the identity)
    we sample as diffusers' schedulers expect; DiTPipeline neither scales the initial noise nor steps from the
    unscaled sample, so it differs there (it is exact only for schedulers like its own DDIM)."""
    from diffusers import EulerDiscreteScheduler

    pipeline, folder = tiny_pipeline
    config = dict(EulerDiscreteScheduler.from_config(pipeline.scheduler.config).config)
    labels = [0, 1]
    ours = _pipeline_images(load(str(folder)), folder, labels, steps=4, cfg_scale=1.0, scheduler=config)
    reference = _diffusers_loop(pipeline, EulerDiscreteScheduler.from_config(config), labels, 4)
    assert (ours - reference).abs().max() < 1e-4
    euler_pipeline = pipeline.__class__(pipeline.transformer, pipeline.vae, EulerDiscreteScheduler.from_config(config))
    with torch.no_grad():
        theirs = euler_pipeline(class_labels=labels, generator=sample_generators(0, range(2)), guidance_scale=1.0,
                                num_inference_steps=4, output_type="pt").images
    assert (ours - theirs).abs().max() > 0.05


def test_guidance_below_one_guides_where_ditpipeline_does_not(tiny_pipeline):
    """Decided (docs/DESIGN.md): --cfg-scale s always means uncond + s (cond - uncond), so 0 samples the
    unconditional model and 0.5 lies between; DiTPipeline (and the official sample.py) skip guidance at s <= 1."""
    pipeline, folder = tiny_pipeline
    model = load(str(folder))
    labels = [0, 1]
    half = _pipeline_images(model, folder, labels, steps=4, cfg_scale=0.5)
    unguided = _pipeline_images(model, folder, labels, steps=4, cfg_scale=1.0)
    assert (half - unguided).abs().max() > 1e-3
    with torch.no_grad():
        theirs = pipeline(class_labels=labels, generator=sample_generators(0, range(2)), guidance_scale=0.5,
                          num_inference_steps=4, output_type="pt").images
    assert (theirs - unguided).abs().max() < 1e-4  # DiTPipeline ignores a scale <= 1
    null = model.config.num_classes
    unconditional = _pipeline_images(model, folder, [null, null], steps=4, cfg_scale=1.0)
    assert (_pipeline_images(model, folder, labels, steps=4, cfg_scale=0.0) - unconditional).abs().max() < 1e-4
