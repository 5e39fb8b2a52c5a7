"""`treeq bench objective`: which readouts rank configurations as the samples do.

Nodes: a tree node only compares candidates of its own segment. For random segments of a testbed and
random candidates of each, every readout a node can use (hidden tokens or the head's sampler step, k blocks
past the segment) ranks the candidates; the rows give their Spearman correlation with the ranking of the
sampler-step objective read at the model output, under the same environment (ENG at the target's bits).
Samples: configurations of every search method (read back from `bench search`'s folder), with swaps and
hybrids between them, scored by each objective on held-out states and sampled; rows give each objective's
Spearman correlation with PSNR vs FP of the samples, and paired bootstrap intervals of the PSNR differences.
"""
import random
from dataclasses import replace

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from ..bits import uniform_config
from ..eval.metrics import DATA_RANGE
from ..models.load import load
from ..ptq.apply import quantize
from ..ptq.calibration import load_or_collect, load_or_record_states, split_rows
from ..search.cost import parse_target
from ..search.objective import ModelObjective
from ..search.run import SEARCH_RECIPE
from ..search.space import DEFAULT_CANDIDATES

# (readout, readout_blocks) a node can read at; the model output (readout_blocks None) is the reference.
NODE_READOUTS = (("hidden", 0), ("hidden", 1), ("lens", 0), ("lens", 1), ("lens", 3))
SEGMENT_LAYERS = (1, 2, 5, 10)  # a layer, a pair, a block, two blocks


def bench_node_agreement(model="default", targets=("W4A4", "W3A3"), segments=6, candidates=32, rows=16, seed=0):
    """Rows {model, target, readout, readout_blocks, segment_layers, spearman_mean, spearman_min}: how well
    a node's readout ranks `candidates` random candidates of its segment, against the output's ranking."""
    fp = load(model)
    calibration = load_or_collect(fp, **SEARCH_RECIPE.calibration_options())
    states = split_rows(load_or_record_states(fp, **SEARCH_RECIPE.calibration_options()), (rows,), fp)[0]
    rng = random.Random(seed)
    table = []
    for target in targets:
        bits = parse_target(target)
        pairs = DEFAULT_CANDIDATES[bits]
        env = round(bits)
        recipe = replace(SEARCH_RECIPE, switch_bits=sorted(set(pairs) | {(env, env)}))
        quantized = quantize(fp, uniform_config(fp, env, env), recipe, calibration=calibration)
        output = ModelObjective(quantized, states, env, readout_blocks=None)
        scorers = {(readout, blocks): ModelObjective(quantized, states, env, readout_blocks=blocks, readout=readout)
                   for readout, blocks in NODE_READOUTS}
        n = len(output.layers)
        for size in tqdm(SEGMENT_LAYERS, desc=f"node readouts ({model}, {target})"):
            correlations = {key: [] for key in NODE_READOUTS}
            for _ in range(segments):
                start = rng.randrange(n - size + 1)
                drawn = [tuple(rng.choice(pairs) for _ in range(size)) for _ in range(candidates)]
                reference = output.score(start, start + size, drawn)
                for key in NODE_READOUTS:
                    correlations[key].append(spearmanr(scorers[key].score(start, start + size, drawn),
                                                       reference).statistic)
            for (readout, blocks), values in correlations.items():
                table.append({"model": model, "target": target, "readout": readout, "readout_blocks": blocks,
                              "segment_layers": size, "spearman_mean": float(np.mean(values)),
                              "spearman_min": float(np.min(values))})
    return table


def sample_errors(images, fp_images):
    """Each sample's MSE against the full-precision sample of its seed (pixels clamped to [-1, 1])."""
    return (images.clamp(-1, 1) - fp_images.clamp(-1, 1)).pow(2).flatten(1).mean(dim=1).double()


def psnr_difference(errors_a, errors_b, resamples=2000, seed=0):
    """(difference, low, high): PSNR vs FP of sample set a minus that of b (each from its mean MSE, as
    `psnr_vs_fp`), and the 95% paired bootstrap interval over the samples both drew from the same seeds."""
    def psnr(errors):
        return 10 * torch.log10(DATA_RANGE ** 2 / errors.mean(-1))
    index = torch.randint(0, len(errors_a), (resamples, len(errors_a)), generator=torch.Generator().manual_seed(seed))
    spread = psnr(errors_a[index]) - psnr(errors_b[index])
    return ((psnr(errors_a) - psnr(errors_b)).item(), spread.quantile(0.025).item(), spread.quantile(0.975).item())


# Objectives a configuration can be scored by, each read on the held-out states: per state, from the model
# rows of the state (conditional, null) at full precision and quantized.
def _both_channels(states, fp, q, weights):
    """The search's earlier metric: the raw output, every channel, every row."""
    return (q - fp).pow(2).flatten(1).mean(1).unflatten(0, (-1, states.rows_per_state)).mean(1)


def _eps_channels(states, fp, q, weights):
    """The raw output's noise channels only, every row."""
    channels = states.guidance_channels
    return (q - fp)[:, :channels].pow(2).flatten(1).mean(1).unflatten(0, (-1, states.rows_per_state)).mean(1)


def _guided_eps(states, fp, q, weights):
    """The noise channels after guidance, as the sampler combines a state's rows."""
    from ..models.dit import guided_output

    def guided(out):
        return guided_output(out[0::2], out[1::2], states.cfg_scale, states.guidance_channels)[:, :states.guidance_channels]
    return (guided(q) - guided(fp)).pow(2).flatten(1).mean(1)


def _sampler_step(states, fp, q, weights):
    """The search's objective: the latent's error after one sampler step."""
    return (states.consumed(q, weights) - states.consumed(fp, weights)).pow(2).flatten(1).mean(1)


OBJECTIVES = {"both_channels": _both_channels, "eps_channels": _eps_channels, "guided_eps": _guided_eps,
              "sampler_step": _sampler_step}


def objective_values(quantized, states, config, batch_size=64):
    """{objective: its mean over `states`} for `config` (one forward per batch for all of them)."""
    from ..ptq.apply import set_bits_

    totals = dict.fromkeys(OBJECTIVES, 0.0)
    with torch.no_grad():
        for inputs, weights in states.batches(batch_size):
            fp = set_bits_(quantized, {})(*inputs)
            q = set_bits_(quantized, config)(*inputs)
            for name, objective in OBJECTIVES.items():
                totals[name] += objective(states, fp, q, weights).sum().item()
    return {name: total / len(states) for name, total in totals.items()}


def _swapped(config, model, rng, swaps):
    """`config` with the bits of `swaps` random pairs of layers of equal MACs exchanged (the same cost)."""
    from ..bits import layer_macs

    macs = layer_macs(model)
    config = {name: dict(entry) for name, entry in config.items()}
    names = sorted(config)
    for _ in range(swaps):
        first = rng.choice(names)
        peers = [name for name in names if macs[name] == macs[first] and config[name] != config[first]]
        if peers:
            second = rng.choice(peers)
            config[first], config[second] = config[second], config[first]
    return config


def _hybrid(base, donor, part):
    """`base` with `donor`'s bits on the layers whose names contain `part` (e.g. adaLN's)."""
    return {name: dict(donor[name] if part in name else entry) for name, entry in base.items()}


def alignment_configs(model, target, folder, seed=0):
    """[(kind, config)]: each search method's pick (from the bench search folder), the tree's root front
    nearest the target, adaLN hybrids of ILP and the tree, ILP with random equal-cost swaps, random ones."""
    from ..bits import load_config
    from .search import _random_config

    rng = random.Random(seed)
    picks = {}
    for method in ("ilp", "ilp@output", "greedy", "uniform", "tss", "tss-lens"):
        path = folder / f"{target}-{method}.json"
        if path.exists():
            picks[method] = load_config(path)
    configs = list(picks.items())
    results = folder / f"{target}-tss.results.json"
    if results.exists():
        import json
        front = json.loads(results.read_text())["front"]
        bits = parse_target(target)
        nearest = sorted(front, key=lambda point: abs(point["average_bits"] - bits))
        configs += [(f"front {point['average_bits']:.3f}", point["config"]) for point in nearest[1:4]
                    if point["average_bits"] <= bits + 1e-9]
    if "ilp" in picks and "tss" in picks:
        configs += [("ilp, tss's adaLN", _hybrid(picks["ilp"], picks["tss"], "adaLN")),
                    ("tss, ilp's adaLN", _hybrid(picks["tss"], picks["ilp"], "adaLN"))]
    if "ilp" in picks:
        configs += [(f"ilp, {count} swaps", _swapped(picks["ilp"], model, rng, count)) for count in (4, 16)]
    pairs = DEFAULT_CANDIDATES[parse_target(target)]
    configs += [(f"random {index}", _random_config(model, pairs, parse_target(target), rng)) for index in range(2)]
    return configs


def bench_objective(model="default", targets=("W4A4", "W3A3"), num_samples=250, seed=0, folder=None):
    """Rows per configuration {model, target, kind, bops_bits, <each objective>, psnr_vs_fp, psnr_minus_ilp},
    then per target two rows whose objective columns hold each objective's Spearman correlation with PSNR vs
    FP (over all configurations; without uniform and random ones; a good objective is near -1). Objectives
    are read on the held-out states of bench search, whose configurations it reads back (or runs)."""
    from ..bits import average_bits
    from ..testbed.experiment import generate
    from .search import FOLDER, REFINE_ROWS, SCORED_ROWS, bench_folder

    folder = bench_folder(FOLDER if folder is None else folder, model)
    name = model
    fp = load(model)
    calibration = load_or_collect(fp, **SEARCH_RECIPE.calibration_options())
    states = load_or_record_states(fp, **SEARCH_RECIPE.calibration_options())
    *_, held_out = split_rows(states, (SCORED_ROWS, REFINE_ROWS), fp)
    fp_images, _, _ = generate(fp, num_samples, seed, progress=False)
    rows, correlations = [], []
    for target in targets:
        configs = alignment_configs(fp, target, folder, seed)
        pairs = sorted({(e["w_bits"], e["a_bits"]) for _, config in configs for e in config.values()})
        quantized = quantize(fp, configs[0][1], replace(SEARCH_RECIPE, switch_bits=pairs), calibration=calibration)
        errors, table = {}, []
        for kind, config in tqdm(configs, desc=f"score and sample ({name}, {target})"):
            values = objective_values(quantized, held_out, config)
            images, _, _ = generate(quantized, num_samples, seed, progress=False)
            errors[kind] = sample_errors(images, fp_images)
            psnr = (10 * torch.log10(DATA_RANGE ** 2 / errors[kind].mean())).item()
            table.append({"model": name, "target": target, "kind": kind, "bops_bits": average_bits(config, fp),
                          **values, "psnr_vs_fp": psnr})
        for row in table:
            row["psnr_minus_ilp"] = None if row["kind"] == "ilp" or "ilp" not in errors else \
                "{:+.2f} [{:+.2f}, {:+.2f}]".format(*psnr_difference(errors[row["kind"]], errors["ilp"]))
        rows += table
        chosen = [row for row in table if row["kind"] != "uniform" and not row["kind"].startswith("random")]
        for label, subset in (("all", table), ("without uniform, random", chosen)):
            correlations.append({"model": name, "target": target, "kind": f"spearman vs psnr ({label}: {len(subset)})",
                                 "bops_bits": None, **{objective: spearmanr([r[objective] for r in subset],
                                                                            [r["psnr_vs_fp"] for r in subset]).statistic
                                                       for objective in OBJECTIVES},
                                 "psnr_vs_fp": None, "psnr_minus_ilp": None})
    return rows + correlations
