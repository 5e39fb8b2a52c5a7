"""How far an exported model's samples drift from the fake-quant model's, against how far the fake-quant
model drifts from itself under a 1e-7 relative perturbation of its input: is the drift an export error or
the sampler's sensitivity to any rounding change? Testbed, 16 images, 20 DPM-Solver++ steps.

    OMP_NUM_THREADS=1 python scripts/trajectory_sensitivity.py
"""
import tempfile

import torch

from treeq.bits import preset_config
from treeq.testbed.experiment import generate
from treeq.models.load import load
from treeq.ptq.apply import quantize
from treeq.deploy.export import export, load_exported
from treeq.ptq.recipe import Recipe

SETTINGS = (("W8A8", Recipe(methods=("rtn",), activations="dynamic")),
            ("W4A4", Recipe(methods=("hadamard",), activations="dynamic-asym")))


def drift(images, reference):
    return ((images - reference).norm() / reference.norm()).item()


def perturbed_samples(model, num_samples, seed):
    """Samples of `model` with its input multiplied by 1 + 1e-7 noise at every call."""
    forward, noise = model.forward, torch.Generator().manual_seed(seed)
    model.forward = lambda x, t, y: forward(x * (1 + 1e-7 * torch.randn(x.shape, generator=noise)), t, y)
    try:
        return generate(model, num_samples, seed, progress=False)[0]
    finally:
        del model.forward


def main(num_samples=16, seed=0):
    model = load("default")
    fp, _, _ = generate(model, num_samples, seed, progress=False)
    print(f"FP with 1e-7 relative input noise vs FP: {drift(perturbed_samples(model, num_samples, seed), fp):.2e}")
    for setting, recipe in SETTINGS:
        fake_model = quantize(model, preset_config(model, setting), recipe)
        fake, _, _ = generate(fake_model, num_samples, seed, progress=False)
        print(f"{setting} fake-quant vs FP: {drift(fake, fp):.4f}")
        for scale_dtype in (torch.float16, torch.float32):
            with tempfile.TemporaryDirectory() as folder:
                export(fake_model, folder, scale_dtype=scale_dtype)
                exported, _, _ = generate(load_exported(folder), num_samples, seed, progress=False)
            print(f"{setting} exported ({scale_dtype}) vs fake-quant: {drift(exported, fake):.4f}")
        perturbed = perturbed_samples(fake_model, num_samples, seed)
        print(f"{setting} fake-quant with 1e-7 relative input noise vs fake-quant: {drift(perturbed, fake):.4f}")


if __name__ == "__main__":
    main()
