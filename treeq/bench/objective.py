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
