"""Fidelity of a quantized text-to-image transformer to its full-precision original, without downloaded weights.

Both sample through the family's pipeline from the same noise and prompts (PSNR of the images), and
both see the same held-out transformer inputs, recorded from FP sampling with a seed the calibration
did not use (MSE and relative error of the transformer's outputs).
"""
import torch

from ..diffusion.pipelines import collect_pipeline_calibration, sample_pipeline
from ..models.adapters import adapter_for
from .metrics import psnr

HELD_OUT_SEED = 98765  # calibration sets default to seed 1234: these inputs were never calibrated on


@torch.no_grad()
def fp_reference(fp_model, num_samples=4, seed=0, prompts=None, **sampling):
    """(FP images, held-out inputs): what every quantized model of `fp_model` is measured against."""
    images, _ = sample_pipeline(fp_model, num_samples, seed, prompts, **sampling)
    held_out = collect_pipeline_calibration(fp_model, num_images=num_samples, num_timesteps=2, seed=HELD_OUT_SEED,
                                            prompts=prompts, **sampling)
    return images, held_out


@torch.no_grad()
def family_fidelity(model, fp_model, num_samples=4, seed=0, prompts=None, reference=None, **sampling):
    """{psnr_vs_fp, output_mse_vs_fp, output_relative_error, num_samples} of `model` against `fp_model`.
    reference: `fp_reference`'s result for the same settings, when several models are measured against one FP."""
    images, _ = sample_pipeline(model, num_samples, seed, prompts, **sampling)
    fp_images, held_out = reference or fp_reference(fp_model, num_samples, seed, prompts, **sampling)
    to_unit = lambda pixels: torch.from_numpy(pixels).float() / 127.5 - 1  # noqa: E731  (data range 2, as psnr)
    adapter, error, norm, count = adapter_for(model), 0.0, 0.0, 0
    for inputs in adapter.batches(held_out, 8):
        output, target = adapter.forward(model, inputs).double(), adapter.forward(fp_model, inputs).double()
        error += (output - target).square().sum().item()
        norm += target.square().sum().item()
        count += target.numel()
    return {"psnr_vs_fp": psnr(to_unit(images), to_unit(fp_images)), "output_mse_vs_fp": error / count,
            "output_relative_error": (error / norm) ** 0.5, "num_samples": num_samples}
