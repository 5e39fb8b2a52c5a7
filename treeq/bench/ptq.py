"""`treeq bench ptq`: every PTQ baseline at every uniform setting on the testbed, same seeds.

One full-precision sample set is the reference for PSNR; each quantized model samples
the same labels from the same noise. Rows carry FID, sFID, class accuracy and PSNR vs FP.
"""
from tqdm import tqdm

from ..bits import preset_config
from ..experiment import generate, measure
from ..models.load import load
from ..quant.apply import CALIBRATED_METHODS, quantize
from ..quant.calibration import load_or_collect

SETTINGS = ("W8A8", "W4A8", "W4A4", "W3A3")
METHODS = ("rtn", "hadamard", "smooth", "gptq", "lowrank")
COLUMNS = ("fid", "sfid", "class_accuracy", "psnr_vs_fp")
# Rank 4 gives the branch ~5% of a testbed linear's parameters, near SVDQuant's share at
# DiT-XL/2 width (rank 32: ~3.5%); the default rank 32 would hold 44% of a 96-wide layer.
OPTIONS = {"lowrank": {"rank": 4}}


def bench_ptq(num_samples=500, seed=0, settings=SETTINGS, methods=METHODS):
    """Rows {setting, method, fid, sfid, class_accuracy, psnr_vs_fp}, the FP model first."""
    pairs = [(s, m) for s in settings for m in methods]
    return [_row(setting, method, metrics)
            for setting, method, _, metrics in compare_settings(load("default"), pairs, num_samples, seed)]


def compare_settings(model, pairs, num_samples, seed=0):
    """Yield (setting, method, images, metrics): ("FP32", "-") first, then each (setting, method)
    pair quantized from `model`, all sampling the same labels from the same noise."""
    fp_images, labels, _ = generate(model, num_samples, seed, progress=False)
    yield "FP32", "-", fp_images, measure(fp_images, labels)
    calibrated = {method for _, method in pairs} & set(CALIBRATED_METHODS)
    calibration = load_or_collect(model) if calibrated else None
    for setting, method in tqdm(pairs, desc="quantize and sample"):
        quantized = quantize(model, preset_config(model, setting), method=method, calibration=calibration,
                             **OPTIONS.get(method, {}))
        images, _, _ = generate(quantized, num_samples, seed, progress=False)
        yield setting, method, images, measure(images, labels, fp_images)


def _row(setting, method, metrics):
    return {"setting": setting, "method": method, **{k: metrics[k] for k in COLUMNS}}
