"""`treeq bench search`: every search method of the harness at W4A4 and W3A3, then the PTQ quality of
the configuration it found, all on one recipe, one calibration set, one metric and the same seeds.

Evolutionary and random search get the evaluations the tree search used at that target (rows evo,
random) and, in rows evo@compute and random@compute, the tree's compute: its block runs in whole-model
evaluations (ten times fewer at 28 blocks). Each
search writes its files under the bench folder; a finished search (its results.json exists) is
read back instead of run again, so an interrupted bench continues, and searches can be run ahead
in parallel processes with `treeq search ... --out FOLDER/<target>-<method>.json`.

`treeq bench eng`: the tree search at each environmental-noise setting e (the bits of every layer
outside the scored segment), then PTQ quality of what it found. `treeq bench rank`: does the
search metric order configurations as FID does? Spearman correlation over configurations of the
tree search's root front and random configurations at the same costs.
"""
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

from scipy.stats import spearmanr
import torch
from tqdm import tqdm

from ..bits import average_bits, load_config, quantizable_layers
from ..io import atomic_write
from .objective import psnr_difference, sample_errors
from ..testbed.experiment import generate, measure
from ..models.adapters import adapter_for
from ..models.load import load
from ..ptq.apply import quantize, set_bits_
from ..ptq.calibration import load_or_collect, load_or_record_states, split_rows, spread_rows
from ..search.cost import parse_target
from ..search.estimate import stop_after, tree_block_runs
from ..search.objective import ModelObjective, output_errors
from ..search.run import SEARCH_RECIPE, run_search
from ..search.space import DEFAULT_CANDIDATES, SearchSpace

TARGETS = ("W4A4", "W3A3")
REFINE_SWEEPS = 2
REFINE_ROWS = 32
EXCHANGE_ROUNDS = 2
SCORED_ROWS = 16  # run_search's default calibration_rows
# bench row -> run_search's method and options. tss before evo and random: they match its count.
# tss-plain: the tree with the plain Pareto drop (no budget window). tss+refine: the tree's result
# refined by coordinate descent on REFINE_ROWS rows the search did not score (search/refine.py).
# tss+exchange: the tree's result improved by budget exchanges on the same rows (refine.exchange).
# tss+ilp: the tree seeded with the integer program's configuration (run_search's seed_ilp).
# tss-lens: nodes read the head's sampler step a block past their segment, not the hidden tokens.
# ilp@output: the integer program on single-layer sensitivities read at the model output (HAWQ's reading),
# not a block past the layer as the tree's nodes read them.
# +floor: cheap layers (adaLN) held at W3A4 or above (run_search's floor). ilp@output+refine: that integer
# program followed by the tree's joint refinement (coordinate descent on REFINE_ROWS rows). tss@output: every
# node reads the objective at the model output (exact, several times the block runs).
# evo, random: as many evaluations as the tree made (each runs the whole model, the tree's mostly a few
# blocks: about 10x the tree's compute at 28 blocks); evo@compute, random@compute: the tree's compute,
# its block runs (search/estimate.py) over the model's depth in whole-model evaluations.
# The cost levers (issue 31), each the default tree with one setting changed, then together: the readout at the
# segment's end (not a block past); the low levels (segments within the smallest block) scoring a quarter of the
# rows, or keeping a queue of 8; a queue of 8 at every level. tss-cheap: the first three (a third of FLUX.1's
# default cost); tss-fast: also queues of 8 above and 4 below (a tenth). Their rows compare with `tss` as well
# (psnr_minus_tss, held_out_db_minus_tss). tss-exit: every merge stops once a chunk of its best-predicted products
# changes nothing in its queue (search/early_exit.py); its cost is measured, not planned.
LEVERS = {
    "tss-end": {"method": "tss", "readout_blocks": 0},
    "tss-lowrows": {"method": "tss", "low_rows": 4},
    "tss-lowq": {"method": "tss", "low_queue": 8},
    "tss-q8": {"method": "tss", "queue_size": 8},
    "tss-cheap": {"method": "tss", "readout_blocks": 0, "low_rows": 4, "low_queue": 8},
    "tss-fast": {"method": "tss", "readout_blocks": 0, "low_rows": 4, "queue_size": 8, "low_queue": 4},
    "tss-exit": {"method": "tss", "early_exit": True},
}
SEARCHES = {
    "uniform": {"method": "uniform"},
    "greedy": {"method": "greedy"},
    "ilp": {"method": "ilp"},
    "tss-plain": {"method": "tss", "budget_window": None},
    "tss": {"method": "tss"},
    "tss-lens": {"method": "tss", "readout": "lens"},
    "ilp@output": {"method": "ilp", "readout_blocks": None},
    "ilp@output+refine": {"method": "ilp", "readout_blocks": None, "refine_sweeps": REFINE_SWEEPS,
                          "refine_rows": REFINE_ROWS},
    "tss@output": {"method": "tss", "readout_blocks": None},
    "ilp@output+floor": {"method": "ilp", "readout_blocks": None, "floor": "W3A4"},
    "tss+floor": {"method": "tss", "floor": "W3A4"},
    "tss+refine": {"method": "tss", "refine_sweeps": REFINE_SWEEPS, "refine_rows": REFINE_ROWS},
    "tss+exchange": {"method": "tss", "exchange_rounds": EXCHANGE_ROUNDS, "refine_rows": REFINE_ROWS},
    "tss+ilp": {"method": "tss", "seed_ilp": True},
    **LEVERS,
    "evo": {"method": "evo"},
    "random": {"method": "random"},
    "evo@compute": {"method": "evo"},
    "random@compute": {"method": "random"},
}
METHODS = tuple(SEARCHES)
# Rows that refine the tree of another row: they start from that row's finished tree (its state and log
# copied, then resumed), so the tree is scored once.
REFINES = {"tss+refine": "tss", "tss+exchange": "tss"}
FOLDER = Path("runs") / "bench-search"


ENG_FOLDER = Path("runs") / "bench-eng"


def bench_folder(folder, model):
    """The bench's folder for `model`: `folder` itself for the default testbed, else a sibling named for it."""
    folder = Path(folder)
    return folder if model == "default" else folder.with_name(f"{folder.name}-{Path(str(model)).stem}")


def searched(target, method, folder=FOLDER, evaluations=None, recipe=SEARCH_RECIPE, env_bits=None, name=None,
             **options):
    """(config, summary) of one search (a SEARCHES row), run now unless its files are already in `folder`
    (as `name`, default <target>-<method>). options: more run_search keywords (queue_size)."""
    out = Path(folder) / f"{name or f'{target}-{method}'}.json"
    results = out.with_suffix(".results.json")
    if not results.exists():
        tree = Path(folder) / f"{target}-{REFINES.get(method)}.json"
        resume = method in REFINES and not options and env_bits is None and tree.with_suffix(".results.json").exists()
        if resume and not out.with_suffix(".state.json").exists():
            for suffix in (".state.json", ".log.jsonl"):
                shutil.copyfile(tree.with_suffix(suffix), out.with_suffix(suffix))
        # An interrupted tree search continues where it stopped.
        resume = resume or (SEARCHES[method]["method"] == "tss" and out.with_suffix(".state.json").exists())
        run_search(recipe, target, out=out, evaluations=evaluations, env_bits=env_bits, progress=False,
                   resume=resume, **{**SEARCHES[method], **options})
    return load_config(out), json.loads(results.read_text())


def bench_search(targets=TARGETS, methods=METHODS, num_samples=250, seed=0, folder=FOLDER, model="default"):
    """Rows {target, method, evaluations, seconds, bops_bits, search_metric, held_out, fid, sfid, class_accuracy,
    psnr_vs_fp, psnr_minus_ilp} on the testbed `model` (default or deep). held_out: the configuration's
    objective (one sampler step) on the trajectory states that neither the search (its SCORED_ROWS) nor
    tss+refine (its REFINE_ROWS) saw, the same states for every method. psnr_minus_ilp: PSNR vs FP minus the
    ilp row's at the target, with its paired bootstrap interval. With a lever row (LEVERS) and tss: also
    psnr_minus_tss and held_out_db_minus_tss (10 log10 of tss's held-out objective over the row's: + is lower),
    paired over the samples and over the held-out states. Each sampled row is kept in <folder>/rows (kept_row):
    an interrupted bench continues from the rows it finished."""
    unknown = [method for method in methods if method not in SEARCHES]
    if unknown:
        raise ValueError(f"unknown bench search method {unknown[0]!r}; known: {', '.join(SEARCHES)}")
    recipe = replace(SEARCH_RECIPE, model=model)
    folder = bench_folder(folder, model)
    model = load(recipe.model)
    fp_images, labels, _ = generate(model, num_samples, seed, progress=False)
    rows = [{"target": "FP32", "method": "-", "evaluations": None, "seconds": None, "bops_bits": 32.0,
             "search_metric": None, "held_out": None, **_quality(measure(fp_images, labels), "sfid")}]
    calibration = load_or_collect(model, **recipe.calibration_options())
    states = load_or_record_states(model, **recipe.calibration_options())
    *_, held_out = split_rows(states, (SCORED_ROWS, REFINE_ROWS), model)
    errors, held = {}, {}
    for target in targets:
        tss_evaluations = None
        for method in tqdm(methods, desc=f"search and sample ({target})"):
            evaluations = tss_evaluations if method in ("evo", "random") else None
            if method.endswith("@compute"):
                evaluations = tree_compute_evaluations(model, target)
            config, summary = searched(target, method, folder, evaluations, recipe)
            if method == "tss":
                tss_evaluations = summary["evaluations"]

            def sampled():
                quantized = quantize(model, config, recipe, calibration=calibration)
                held_errors = output_errors(quantized, held_out, config).double()
                images, _, _ = generate(quantized, num_samples, seed, progress=False)
                row = {"target": target, "method": method, "evaluations": summary["evaluations"],
                       "seconds": summary["seconds"], "bops_bits": average_bits(config, model),
                       "search_metric": summary["metric"], "held_out": held_errors.mean().item(),
                       **_quality(measure(images, labels, fp_images), "sfid")}
                return row, sample_errors(images, fp_images), held_errors
            key = {"num_samples": num_samples, "seed": seed, "config": config, "held_out_states": len(held_out)}
            row, errors[target, method], held[target, method] = kept_row(folder / "rows" / f"{target}-{method}.json",
                                                                         key, sampled)
            rows.append(row)
    levers = "tss" in methods and any(method in LEVERS for method in methods)
    for row in rows:
        row["psnr_minus_ilp"] = _against(errors, row["target"], row["method"])
        if levers:  # a lever's cost in quality: samples and the held-out objective (in dB: + is lower) against tss
            row["psnr_minus_tss"] = _against(errors, row["target"], row["method"], "tss")
            row["held_out_db_minus_tss"] = _against(held, row["target"], row["method"], "tss")
    return rows


def kept_row(path, key, make):
    """(row, sample errors, held-out errors) of one bench row, read back from `path` when it was made with `key`
    (samples, seed, configuration), else made by `make()` and kept there: a bench interrupted after some rows
    keeps them, and its paired intervals are computed from the kept errors. Delete the folder after changing the
    code that quantizes or samples."""
    kept = json.loads(path.read_text()) if path.exists() else None
    if kept is not None and kept["key"] == key:
        return kept["row"], torch.tensor(kept["sample_errors"], dtype=torch.float64), torch.tensor(
            kept["held_errors"], dtype=torch.float64)
    row, per_sample, held_errors = make()
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(
        {"key": key, "row": row, "sample_errors": per_sample.tolist(), "held_errors": held_errors.tolist()})))
    return row, per_sample, held_errors


def _against(errors, target, method, baseline="ilp"):
    """PSNR vs FP of a row minus the baseline's at its target, with its paired 95% interval, as text."""
    if (target, baseline) not in errors or (target, method) not in errors or method == baseline:
        return None
    difference, low, high = psnr_difference(errors[target, method], errors[target, baseline])
    return f"{difference:+.2f} [{low:+.2f}, {high:+.2f}]"


def tree_compute_evaluations(model, target, queue_size=16, readout_blocks=1):
    """Whole-model evaluations costing what the default tree search's scoring costs on `model`: its block
    runs (estimated node by node, as `treeq search` prints before it scores) over the model's depth."""
    adapter = adapter_for(model)
    block_of = adapter.block_of(model)
    layers = quantizable_layers(model)
    depth = len(adapter.block_names(model))
    space = SearchSpace.build(layers, DEFAULT_CANDIDATES[parse_target(target)])
    blocks = [block_of[name] for name in layers]
    return round(tree_block_runs(space, queue_size, blocks, stop_after(blocks, depth, readout_blocks)) / depth)


def env_settings(target):
    """ENG's sweep at a target: one bit below it, the target (TreeQ's PTQ setting), 8, and 32 (full precision)."""
    bits = round(parse_target(target))
    return (bits - 1, bits, 8, 32)


def bench_eng(targets=TARGETS, num_samples=250, seed=0, folder=ENG_FOLDER):
    """Rows {target, env_bits, evaluations, bops_bits, search_metric, fid, sfid, class_accuracy, psnr_vs_fp,
    psnr_minus_target}: the tree search at each e of `env_settings`, its configuration after PTQ on the search
    recipe. e = the target is the default tree, read from the search bench's folder (the same search); the
    others are read back from `folder` (<target>-e<e>.json) when finished there. psnr_minus_target: PSNR vs
    FP minus the e = target row's, with its paired bootstrap interval over the samples."""
    recipe = SEARCH_RECIPE
    model = load(recipe.model)
    fp_images, labels, _ = generate(model, num_samples, seed, progress=False)
    calibration = load_or_collect(model, **recipe.calibration_options())
    rows, errors = [], {}
    for target in targets:
        for env_bits in tqdm(env_settings(target), desc=f"ENG sweep ({target})"):
            if env_bits == round(parse_target(target)):
                config, summary = searched(target, "tss", FOLDER, recipe=recipe)
            else:
                config, summary = searched(target, "tss", folder, recipe=recipe, env_bits=env_bits,
                                           name=f"{target}-e{env_bits}")
            quantized = quantize(model, config, recipe, calibration=calibration)
            images, _, _ = generate(quantized, num_samples, seed, progress=False)
            errors[target, env_bits] = sample_errors(images, fp_images)
            rows.append({"target": target, "env_bits": env_bits, "evaluations": summary["evaluations"],
                         "bops_bits": average_bits(config, model), "search_metric": summary["metric"],
                         **_quality(measure(images, labels, fp_images), "sfid")})
    for row in rows:
        row["psnr_minus_target"] = _against(errors, row["target"], row["env_bits"],
                                            round(parse_target(row["target"])))
    return rows


def bench_rank(target="W4A4", count=10, num_samples=250, seed=0, folder=FOLDER, calibration_rows=16):
    """Rows {kind, bops_bits, search_metric, fid, class_accuracy, psnr_vs_fp} for `count` configurations of the
    tree search's root front nearest the target and `count` random ones at the same costs, then rows with
    the Spearman correlations of the search metric against FID and against PSNR vs FP (all, front, random).

    Every configuration is scored by the same end-to-end objective the root of the tree uses (model
    output error with the whole model in the segment), then sampled from the same seeds."""
    recipe = SEARCH_RECIPE
    _, summary = searched(target, "tss", folder, recipe=recipe)
    bits = parse_target(target)
    front = sorted(summary["front"], key=lambda point: abs(point["average_bits"] - bits))[:count]
    model = load(recipe.model)
    candidates = DEFAULT_CANDIDATES[bits]
    rng = random.Random(seed)
    configs = [("front", point["config"]) for point in front]
    configs += [("random", _random_config(model, candidates, point["average_bits"], rng)) for point in front]
    calibration = load_or_collect(model, **recipe.calibration_options())
    quantized = quantize(model, configs[0][1], replace(recipe, switch_bits=candidates), calibration=calibration)
    objective = ModelObjective(quantized, spread_rows(calibration, calibration_rows), round(bits), readout_blocks=None)
    names = objective.layers
    fp_images, labels, _ = generate(model, num_samples, seed, progress=False)
    rows = []
    for kind, config in tqdm(configs, desc="score and sample"):
        assignment = [(config[name]["w_bits"], config[name]["a_bits"]) for name in names]
        metric = objective.score(0, len(names), [assignment])[0]
        images, _, _ = generate(set_bits_(quantized, config), num_samples, seed, progress=False)
        rows.append({"kind": kind, "bops_bits": average_bits(config, model), "search_metric": metric,
                     **_quality(measure(images, labels, fp_images))})
    for subset in ("all", "front", "random"):
        chosen = [row for row in rows if subset == "all" or row["kind"] == subset]
        metric = [row["search_metric"] for row in chosen]
        rows.append({"kind": f"spearman ({subset})", "bops_bits": None, "search_metric": None,
                     "fid": spearmanr(metric, [row["fid"] for row in chosen]).statistic, "class_accuracy": None,
                     "psnr_vs_fp": spearmanr(metric, [row["psnr_vs_fp"] for row in chosen]).statistic})
    return rows


def _random_config(model, candidates, bits, rng):
    """A random configuration at about `bits` average bits: a uniform draw per layer, then random layers
    moved to a cheaper candidate (fewer w x a bit operations) until the cost is within the budget."""
    choice = {name: rng.choice(candidates) for name in quantizable_layers(model)}

    def config():
        return {name: {"w_bits": w, "a_bits": a} for name, (w, a) in choice.items()}
    while average_bits(config(), model) > bits:
        name = rng.choice(list(choice))
        cheaper = [pair for pair in candidates if pair[0] * pair[1] < choice[name][0] * choice[name][1]]
        if cheaper:
            choice[name] = rng.choice(cheaper)
    return config()


def _quality(metrics, *extra):
    return {key: metrics[key] for key in ("fid", *extra, "class_accuracy", "psnr_vs_fp")}
