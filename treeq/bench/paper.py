"""`treeq bench paper`: the TreeQ paper's main table on the embedded testbed; `treeq bench ablation`:
its ablations.

Rows: FP; the uniform baselines (RTN, Hadamard, smoothing, GPTQ, SVDQuant = smoothing + low-rank
branch); integer-programming mixed precision (HAWQ-style ILP); TreeQ (tree search + ENG); TreeQ with
a General Monarch Branch. Each under PTQ and under PEFT (QLoRA-style: the quantized base frozen, a
branch trained against FP; rows without a branch get a low-rank (LoRA) branch of the same parameter
share as the Monarch one), at W4A4 and W3A3. Every row samples the same labels from the same noise.

The FP row is the reference of both regimes (its regime reads "ptq"). `size_mb`: quantized weights
at their bits, everything else (branches, scales, biases, embeddings) at 32 bits. `seconds`: what
the row cost to make: calibration, search, quantization and fine-tuning (a search that a bench
folder already holds counts with its recorded time).

Each finished row is kept in FOLDER/rows/, so an interrupted bench continues and a long one splits
over processes (`--settings W4A4` and `--settings W3A3` side by side, then one run without it
gathers every row); delete that folder after changing the code.
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..bits import average_bits, is_full_precision, preset_config, quantizable_layers
from ..testbed.data import mnist
from ..demo import BRANCH_RATIO, treeq_recipe
from ..testbed.experiment import generate, measure
from ..finetune.distill import FinetuneConfig, finetune_
from ..io import atomic_write
from ..models.load import load
from ..ptq.apply import quantize
from ..ptq.calibration import load_or_collect
from ..ptq.recipe import Recipe
from ..quant.statistics import quantized_layers
from ..search.cost import parse_target
from ..search.run import SEARCH_RECIPE
from .ptq import baseline_recipe
from .search import ENG_FOLDER, FOLDER, env_settings, searched

TARGETS = ("W4A4", "W3A3")
REGIMES = ("ptq", "peft")
COLUMNS = ("fid", "sfid", "inception_score", "precision", "recall", "class_accuracy", "psnr_vs_fp")
PAPER_FOLDER = Path("runs") / "bench-paper"
BRANCHES = ("lowrank", "monarch")


@dataclass(frozen=True)
class Search:
    """Where a row's bit configuration comes from: a search run, read back from `folder` when it is
    already there (searches on the search recipe are shared with `treeq bench search`)."""
    method: str = "tss"
    recipe: Recipe = field(default_factory=lambda: SEARCH_RECIPE)
    folder: Path = FOLDER
    name: str = "{target}-{method}"  # file stem
    options: dict = field(default_factory=dict)  # more run_search keywords: queue_size, env_bits

    def config(self, target):
        return searched(target, self.method, self.folder, recipe=self.recipe,
                        name=self.name.format(target=target, method=self.method), **self.options)


# row name -> (recipe, the search that gives its bits; None: the uniform preset of the target)
METHODS = {
    "rtn": (Recipe(methods=("rtn",), activations="dynamic-asym"), None),
    "hadamard": (Recipe(methods=("hadamard",), activations="dynamic-asym"), None),
    "smooth": (Recipe(methods=("smooth",), activations="dynamic-asym"), None),
    "gptq": (Recipe(methods=("gptq",), activations="dynamic-asym"), None),
    "svdquant": (baseline_recipe("smooth,lowrank", "dynamic-asym"), None),
    "ilp": (SEARCH_RECIPE, Search("ilp")),
    "treeq": (SEARCH_RECIPE, Search()),
    # the search scores every candidate with the branch attached
    "treeq+gmb": (treeq_recipe(), Search(recipe=treeq_recipe(), folder=PAPER_FOLDER, name="{target}-tss-gmb")),
}
# the ablations' rows: TreeQ's configuration with each branch, at other queue sizes and ENG settings
VARIANTS = {
    "treeq-lowrank": (SEARCH_RECIPE.with_branch("lowrank", ratio=BRANCH_RATIO), Search()),
    "treeq-monarch": (treeq_recipe(), Search()),
    **{f"treeq-q{q}": (SEARCH_RECIPE, Search(folder=PAPER_FOLDER, name=f"{{target}}-tss-q{q}",
                                             options={"queue_size": q})) for q in (4, 8)},
    **{f"treeq-monarch-e{e}": (treeq_recipe(), Search(folder=ENG_FOLDER, name=f"{{target}}-e{e}",
                                                      options={"env_bits": e})) for e in (2, 3, 8, 32)},
}
ROWS = {**METHODS, **VARIANTS}


def bench_paper(targets=TARGETS, regimes=REGIMES, methods=tuple(METHODS), num_samples=250, seed=0,
                finetune=FinetuneConfig(), folder=PAPER_FOLDER):
    """Rows {setting, regime, method, fid, sfid, inception_score, precision, recall, class_accuracy,
    psnr_vs_fp, size_mb, seconds}, the FP row first."""
    bench = _Bench(num_samples, seed, finetune, folder)
    runs = [(target, regime, method) for target in targets for regime in regimes for method in methods]
    rows = [bench.fp_row()]
    for target, regime, method in tqdm(runs, desc="bench paper"):
        rows.append(bench.row(target, regime, method))
    return rows


def ablation_runs(target):
    """[(ablation, variant, regime, row name)]: the branch at equal parameters (none, low-rank, Monarch
    on TreeQ's configuration), the tree's queue size, and ENG's e under PTQ and PEFT (with GMB)."""
    bits = round(parse_target(target))
    runs = [("branch", "none", "ptq", "treeq"), ("branch", "lowrank", "ptq", "treeq-lowrank"),
            ("branch", "lowrank", "peft", "treeq")]  # the paper's PEFT row of TreeQ: the same LoRA branch
    runs += [("branch", "monarch", regime, "treeq-monarch") for regime in REGIMES]
    runs += [("queue_size", str(q), "ptq", f"treeq-q{q}") for q in (4, 8)] + [("queue_size", "16", "ptq", "treeq")]
    for env_bits in env_settings(target):
        name = "treeq-monarch" if env_bits == bits else f"treeq-monarch-e{env_bits}"
        runs += [("env_bits", str(env_bits), regime, name) for regime in REGIMES]
    return runs


def bench_ablation(targets=("W3A3",), ablations=("branch", "queue_size", "env_bits"), regimes=REGIMES, num_samples=250,
                   seed=0, finetune=FinetuneConfig(), folder=PAPER_FOLDER):
    """Rows {ablation, setting, variant, regime, branch_params, branch_macs_per_token, fid, sfid, class_accuracy,
    psnr_vs_fp, bops_bits}; they share the paper bench's rows (treeq, and its LoRA PEFT row)."""
    bench = _Bench(num_samples, seed, finetune, folder)
    runs = [(target, *run) for target in targets for run in ablation_runs(target)
            if run[0] in ablations and run[2] in regimes]
    rows = []
    for target, ablation, variant, regime, name in tqdm(runs, desc="bench ablation"):
        row = bench.row(target, regime, name)
        rows.append({"ablation": ablation, "setting": target, "variant": variant, "regime": regime,
                     **{key: row[key] for key in ("branch_params", "branch_macs_per_token", "fid", "sfid",
                                                  "class_accuracy", "psnr_vs_fp", "bops_bits")}})
    return rows


class _Bench:
    """The FP samples, calibration and training digits every row shares, and the rows kept on disk."""

    def __init__(self, num_samples, seed, finetune, folder):
        self.num_samples, self.seed, self.finetune, self.folder = num_samples, seed, finetune, Path(folder)
        self.model = load("default")
        self.fp_images, self.labels, _ = generate(self.model, num_samples, seed, progress=False)
        started = time.perf_counter()
        self.calibration = load_or_collect(self.model, **SEARCH_RECIPE.calibration_options())
        self.calibration_seconds = time.perf_counter() - started
        self._training = None

    def fp_row(self):
        return {"setting": "FP32", "regime": "ptq", "method": "fp",
                **_columns(measure(self.fp_images, self.labels)), "size_mb": model_size_mb(self.model),
                "seconds": 0.0}

    def row(self, target, regime, method):
        """One row, read back from the rows folder when it was made with these samples and seed."""
        path = self.folder / "rows" / f"{target}-{regime}-{method}.json"
        key = {"num_samples": self.num_samples, "seed": self.seed, "finetune_steps": self.finetune.steps}
        kept = json.loads(path.read_text()) if path.exists() else None
        if kept is not None and kept["key"] == key:
            return kept["row"]
        quantized, seconds, bops_bits = self._make(target, regime, method)
        images, _, _ = generate(quantized, self.num_samples, self.seed, progress=False)
        branches = [layer.branch for layer in quantized_layers(quantized).values() if layer.branch is not None]
        row = {"setting": target, "regime": regime, "method": method,
               **_columns(measure(images, self.labels, self.fp_images)), "size_mb": model_size_mb(quantized),
               "seconds": self.calibration_seconds + seconds, "bops_bits": bops_bits,
               "branch_params": sum(branch.parameter_count() for branch in branches),
               "branch_macs_per_token": sum(branch.macs_per_token() for branch in branches)}
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"key": key, "row": row}, indent=1)))
        return row

    def _make(self, target, regime, method):
        """(quantized model, seconds spent on search, quantization and fine-tuning, BOPs bits) of one row."""
        if method not in ROWS:
            raise ValueError(f"unknown bench row {method!r}; known: {', '.join(ROWS)}")
        recipe, search = ROWS[method]
        seconds = 0.0
        if search is None:
            config = preset_config(self.model, target)
        else:
            config, summary = search.config(target)
            seconds += summary["seconds"]
        if regime == "peft" and not any(name in recipe.methods for name in BRANCHES):
            recipe = recipe.with_branch("lowrank", ratio=BRANCH_RATIO)  # QLoRA: a LoRA branch to train
        started = time.perf_counter()
        quantized = quantize(self.model, config, recipe, calibration=self.calibration)
        if regime == "peft":
            if self._training is None:
                self._training = mnist("train")
            finetune_(quantized, self.model, *self._training, self.finetune,
                      self.folder / f"{target}-{method}-peft", progress=False)
        return quantized.eval(), seconds + time.perf_counter() - started, average_bits(config, self.model)


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
