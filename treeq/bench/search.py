"""`treeq bench search`: every search method of the harness at W4A4 and W3A3, then the PTQ quality of
the configuration it found, all on one recipe, one calibration set, one metric and the same seeds.

Evolutionary and random search get the evaluations the tree search used at that target. Each
search writes its files under the bench folder; a finished search (its results.json exists) is
read back instead of run again, so an interrupted bench continues, and searches can be run ahead
in parallel processes with `treeq search ... --out FOLDER/<target>-<method>.json`.
"""
import json
from pathlib import Path

from tqdm import tqdm

from ..bits import average_bits, load_config
from ..experiment import generate, measure
from ..models.load import load
from ..quant.apply import quantize
from ..quant.calibration import load_or_collect
from ..search.run import SEARCH_RECIPE, run_search

TARGETS = ("W4A4", "W3A3")
METHODS = ("uniform", "greedy", "ilp", "tss", "evo", "random")  # tss before evo and random: they match its count
FOLDER = Path("runs") / "bench-search"


def searched(target, method, folder=FOLDER, evaluations=None, recipe=SEARCH_RECIPE):
    """(config, summary) of one search, run now unless its files are already in `folder`."""
    out = Path(folder) / f"{target}-{method}.json"
    results = out.with_suffix(".results.json")
    if not results.exists():
        run_search(recipe, target, method, out=out, evaluations=evaluations, progress=False)
    return load_config(out), json.loads(results.read_text())


def bench_search(targets=TARGETS, methods=METHODS, num_samples=250, seed=0, folder=FOLDER):
    """Rows {target, method, evaluations, seconds, bops_bits, search_metric, fid, class_accuracy, psnr_vs_fp}."""
    recipe = SEARCH_RECIPE
    model = load(recipe.model)
    fp_images, labels, _ = generate(model, num_samples, seed, progress=False)
    rows = [{"target": "FP32", "method": "-", "evaluations": None, "seconds": None, "bops_bits": 32.0,
             "search_metric": None, **_quality(measure(fp_images, labels))}]
    calibration = load_or_collect(model, **recipe.calibration_options())
    for target in targets:
        tss_evaluations = None
        for method in tqdm(methods, desc=f"search and sample ({target})"):
            evaluations = tss_evaluations if method in ("evo", "random") else None
            config, summary = searched(target, method, folder, evaluations, recipe)
            if method == "tss":
                tss_evaluations = summary["evaluations"]
            quantized = quantize(model, config, recipe, calibration=calibration)
            images, _, _ = generate(quantized, num_samples, seed, progress=False)
            rows.append({"target": target, "method": method, "evaluations": summary["evaluations"],
                         "seconds": summary["seconds"], "bops_bits": average_bits(config, model),
                         "search_metric": summary["metric"], **_quality(measure(images, labels, fp_images))})
    return rows


def _quality(metrics):
    return {key: metrics[key] for key in ("fid", "class_accuracy", "psnr_vs_fp")}
