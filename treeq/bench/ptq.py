"""`treeq bench ptq`: the PTQ baselines at every uniform setting on the testbed, same seeds.

One full-precision sample set is the reference for PSNR; each quantized model samples the
same labels from the same noise. Each baseline runs in its strongest form that the project
has: per-token asymmetric activations except for the `rtn`/`dynamic` reference row, smoothing
before the low-rank SVD (SVDQuant), GPTQ after the rotation (QuaRot-style).
"""
import torch
from tqdm import tqdm

from ..bits import preset_config
from ..testbed.experiment import generate, measure
from ..models.load import load
from ..ptq.apply import quantize
from ..ptq.calibration import collect_calibration, load_or_collect, spread_rows
from ..ptq.recipe import Recipe
from ..quant.statistics import BLOCK_INPUTS

SETTINGS = ("W8A8", "W4A8", "W4A4", "W3A3")
# (methods, activation quantizer) of each row
BASELINES = (("rtn", "dynamic"), ("rtn", "dynamic-asym"), ("hadamard", "dynamic-asym"), ("smooth", "dynamic-asym"),
             ("gptq", "dynamic-asym"), ("lowrank", "dynamic-asym"), ("smooth,lowrank", "dynamic-asym"),
             ("hadamard,gptq", "dynamic-asym"))
COLUMNS = ("fid", "sfid", "class_accuracy", "psnr_vs_fp")
# Rank 4 gives the branch ~5% of a testbed linear's parameters, near SVDQuant's share at
# DiT-XL/2 width (rank 32: ~3.5%); the default rank 32 would hold 44% of a 96-wide layer.
METHOD_OPTIONS = {"lowrank": {"rank": 4}}


def baseline_recipe(methods, activations, **fields):
    """The Recipe of one benchmark row (the testbed's rank-4 low-rank branch where one is used)."""
    names = methods.split(",")
    options = {name: METHOD_OPTIONS[name] for name in names if name in METHOD_OPTIONS}
    return Recipe(methods=names, activations=activations, method_options=options, **fields)


def bench_ptq(num_samples=500, seed=0, settings=SETTINGS, baselines=BASELINES):
    """Rows {setting, method, activations, fid, sfid, class_accuracy, psnr_vs_fp}, the FP model first."""
    model = load("default")
    for setting in settings:  # refuse an unknown preset before minutes of sampling
        preset_config(model, setting)
    runs = [(setting, baseline_recipe(*baseline)) for setting in settings for baseline in baselines]
    return [{"setting": setting, "method": ",".join(recipe.methods) if recipe else "-",
             "activations": recipe.activations if recipe else "-", **{k: metrics[k] for k in COLUMNS}}
            for setting, recipe, _, metrics in compare_settings(model, runs, num_samples, seed)]


def compare_settings(model, runs, num_samples, seed=0):
    """Yield (setting, recipe, images, metrics): ("FP32", None) first, then each (setting, recipe)
    of `runs` quantized from `model`, all sampling the same labels from the same noise. A setting is
    a preset name or a (label, bit configuration) pair."""
    fp_images, labels, _ = generate(model, num_samples, seed, progress=False)
    yield "FP32", None, fp_images, measure(fp_images, labels)
    calibration = None
    for setting, recipe in tqdm(runs, desc="quantize and sample"):
        if calibration is None and recipe.needs_calibration():
            calibration = load_or_collect(model, **recipe.calibration_options())
        setting, config = (setting, preset_config(model, setting)) if isinstance(setting, str) else setting
        quantized = quantize(model, config, recipe, calibration=calibration)
        images, _, _ = generate(quantized, num_samples, seed, progress=False)
        yield setting, recipe, images, measure(images, labels, fp_images)


def bench_output_error(settings=("W4A4", "W3A3"), baselines=BASELINES, rows=64):
    """Rows {setting, method, activations, output_error}: relative L2 error of the model output against FP
    on `rows` calibration inputs spread over the sampling trajectory. Seconds, not the minutes that
    sampling takes: how the search's default recipe was chosen."""
    model = load("default")
    calibration = load_or_collect(model, **Recipe().calibration_options())
    inputs = spread_rows(calibration, rows)
    with torch.no_grad():
        reference = model(*inputs)
    out = []
    for setting in settings:
        for methods, activations in baselines:
            recipe = baseline_recipe(methods, activations)
            quantized = quantize(model, preset_config(model, setting), recipe, calibration=calibration)
            with torch.no_grad():
                error = ((quantized(*inputs) - reference).norm() / reference.norm()).item()
            out.append({"setting": setting, "method": methods, "activations": activations, "output_error": error})
    return out


def bench_block_inputs(num_samples=100, seed=0, settings=("W4A4", "W3A3"), models=("default", "deep"),
                       methods="hadamard,gptq", rows=64):
    """Rows {model, setting, block_inputs, output_error, psnr_vs_fp}: where block-by-block GPTQ takes a
    block's inputs (the full-precision model's, or the blocks before it already quantized), on both
    testbeds, same calibration, seeds and held-out rows (the states the calibration did not record)."""
    out = []
    for name in models:
        model = load(name)
        calibration = load_or_collect(model, **Recipe().calibration_options())
        held_out = spread_rows(collect_calibration(model, num_images=8, num_timesteps=8, seed=seed + 1), rows)
        fp_images, labels, _ = generate(model, num_samples, seed, progress=False)
        with torch.no_grad():
            reference = model(*held_out)
        for setting in settings:
            for inputs in BLOCK_INPUTS:
                recipe = baseline_recipe(methods, "dynamic-asym", block_inputs=inputs)
                quantized = quantize(model, preset_config(model, setting), recipe, calibration=calibration)
                with torch.no_grad():
                    error = ((quantized(*held_out) - reference).norm() / reference.norm()).item()
                images, _, _ = generate(quantized, num_samples, seed, progress=False)
                out.append({"model": name, "setting": setting, "block_inputs": inputs, "output_error": error,
                            "psnr_vs_fp": measure(images, labels, fp_images)["psnr_vs_fp"]})
    return out
