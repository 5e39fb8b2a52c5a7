"""`treeq bench paper`: the TreeQ paper's main table on the embedded testbed.

Rows: FP; the uniform baselines (RTN, Hadamard, smoothing, GPTQ, SVDQuant = smoothing + low-rank
branch); integer-programming mixed precision (HAWQ-style ILP); TreeQ (tree search + ENG); TreeQ with
a General Monarch Branch. Each under PTQ and under PEFT (QLoRA-style: the quantized base frozen, a
branch trained against FP; rows without a branch get a low-rank (LoRA) branch of the same parameter
share as the Monarch one), at W4A4 and W3A3. Every row samples the same labels from the same noise.

The FP row is the reference of both regimes (its regime reads "ptq"). `size_mb`: quantized weights
at their bits, everything else (branches, scales, biases, embeddings) at 32 bits. `seconds`: what
the row cost to make: calibration, search, quantization and fine-tuning (a search that the bench
folder already holds counts with its recorded time).
"""
import time
from pathlib import Path

from tqdm import tqdm

from ..bits import is_full_precision, preset_config, quantizable_layers
from ..data import mnist
from ..demo import BRANCH_RATIO, treeq_recipe
from ..experiment import generate, measure
from ..models.load import load
from ..quant.apply import quantize
from ..quant.calibration import load_or_collect
from ..quant.finetune import FinetuneConfig, finetune_
from ..quant.recipe import Recipe
from ..search.run import SEARCH_RECIPE
from .ptq import baseline_recipe
from .search import FOLDER, searched

TARGETS = ("W4A4", "W3A3")
REGIMES = ("ptq", "peft")
COLUMNS = ("fid", "sfid", "inception_score", "precision", "recall", "class_accuracy", "psnr_vs_fp")
# row name -> (recipe, search method or None for the uniform preset)
METHODS = {
    "rtn": (Recipe(methods=("rtn",), activations="dynamic-asym"), None),
    "hadamard": (Recipe(methods=("hadamard",), activations="dynamic-asym"), None),
    "smooth": (Recipe(methods=("smooth",), activations="dynamic-asym"), None),
    "gptq": (Recipe(methods=("gptq",), activations="dynamic-asym"), None),
    "svdquant": (baseline_recipe("smooth,lowrank", "dynamic-asym"), None),
    "ilp": (SEARCH_RECIPE, "ilp"),
    "treeq": (SEARCH_RECIPE, "tss"),
    "treeq+gmb": (treeq_recipe(), "tss"),
}
PAPER_FOLDER = Path("runs") / "bench-paper"


def bench_paper(targets=TARGETS, regimes=REGIMES, methods=tuple(METHODS), num_samples=250, seed=0,
                finetune=FinetuneConfig(), folder=PAPER_FOLDER):
    """Rows {setting, regime, method, fid, sfid, inception_score, precision, recall, class_accuracy,
    psnr_vs_fp, size_mb, seconds}, the FP row first."""
    model = load("default")
    fp_images, labels, _ = generate(model, num_samples, seed, progress=False)
    rows = [{"setting": "FP32", "regime": "ptq", "method": "fp", **_columns(measure(fp_images, labels)),
             "size_mb": model_size_mb(model), "seconds": 0.0}]
    started = time.perf_counter()
    calibration = load_or_collect(model, **SEARCH_RECIPE.calibration_options())
    calibration_seconds = time.perf_counter() - started
    training = mnist("train") if "peft" in regimes else None
    runs = [(target, regime, method) for target in targets for regime in regimes for method in methods]
    for target, regime, method in tqdm(runs, desc="bench paper"):
        quantized, seconds = _make(model, target, regime, method, calibration, training, finetune, folder)
        images, _, _ = generate(quantized, num_samples, seed, progress=False)
        rows.append({"setting": target, "regime": regime, "method": method,
                     **_columns(measure(images, labels, fp_images)), "size_mb": model_size_mb(quantized),
                     "seconds": calibration_seconds + seconds})
    return rows


def _make(model, target, regime, method, calibration, training, finetune, folder):
    """(quantized model, seconds spent on search, quantization and fine-tuning) of one row."""
    recipe, search = METHODS[method]
    seconds = 0.0
    if search is None:
        config = preset_config(model, target)
    else:
        branch = "gmb" if recipe is not SEARCH_RECIPE else None
        # searches on the search recipe are shared with `treeq bench search`
        config, summary = searched(target, search, FOLDER if branch is None else folder, recipe=recipe,
                                   name=f"{target}-{search}" + (f"-{branch}" if branch else ""))
        seconds += summary["seconds"]
    if regime == "peft" and not any(name in recipe.methods for name in ("lowrank", "monarch")):
        recipe = recipe.with_branch("lowrank", ratio=BRANCH_RATIO)  # QLoRA: a LoRA branch to train
    started = time.perf_counter()
    quantized = quantize(model, config, recipe, calibration=calibration)
    if regime == "peft":
        finetune_(quantized, model, *training, finetune, Path(folder) / f"{target}-{method}-peft", progress=False)
    return quantized.eval(), seconds + time.perf_counter() - started


def model_size_mb(model):
    """Megabytes of a (quantized) DiT: each quantized layer's weight at its w_bits, every other tensor
    (branches, scales, biases, unquantized layers) at 32 bits."""
    quantized = {}
    for name in quantizable_layers(model):
        layer = model.get_submodule(name)
        bits = getattr(layer, "w_bits", 32)
        if not is_full_precision(bits):
            quantized[f"{name}.weight"] = bits
    total_bits = 0
    for key, tensor in model.state_dict().items():
        if key.endswith(".weight") and key in quantized:
            total_bits += tensor.numel() * quantized[key]
        elif tensor.is_floating_point():  # integer tensors are GPTQ codes: the weight again, at its bits
            total_bits += tensor.numel() * 32
    return total_bits / 8 / 2 ** 20


def _columns(metrics):
    return {key: metrics.get(key) for key in COLUMNS}
