"""`treeq bench search-cost`: what one tree search costs at DiT-XL/2's real shapes, per device.

A random-weight DiT-XL/2 cut to a few blocks (width 1152, 256 tokens, every layer at its real shape) is
quantized with the search recipe and the per-bit state of every candidate width, then scored as the
search scores it: the seconds of one block run on the scored rows are measured here, the block runs
of the whole 28-block search (140 leaves) are counted node by node (search/estimate.py), and their
product is the extrapolated time, stated as such. Memory: the quantized model's resident bytes and the
scorer's float caches, measured on the few blocks and against their formulas (memory.py,
`cache_formula_bytes`), then each formula at 28 blocks.
"""
import time

import torch

from ..bits import quantizable_layers, uniform_config
from ..memory import model_shapes, project_resident_bytes, resident_bytes
from ..models.adapters import adapter_for
from ..models.init import random_dit
from ..models.registry import create_model
from ..ptq.apply import quantize
from ..search.estimate import seconds_per_block, stop_after, tree_block_runs
from ..search.objective import ModelObjective
from ..search.run import SEARCH_RECIPE
from ..search.space import DEFAULT_CANDIDATES, SearchSpace
from ..search.tree import expected_evaluations

from dataclasses import replace


def cache_formula_bytes(config, depth, rows, env_settings=1):
    """The scorer's float caches (ModelObjective.cache_bytes) by formula, float32 throughout:

        (1 + depth + e (depth - 1)) R T H + R H + R C' S^2   (x 4 bytes)

    the embedded input and an FP readout after each of `depth` blocks, one entering state per block
    after the first for each of e environments (rows R x tokens T x hidden H each), the conditioning
    vector (shared by every state) and the FP output (C' output channels of S x S pixels or latents)."""
    tokens = (config.input_size // config.patch_size) ** 2
    out_channels = config.in_channels * (2 if config.learn_sigma else 1)
    states = 1 + depth + env_settings * (depth - 1)
    return 4 * rows * (states * tokens * config.hidden_size + config.hidden_size
                       + out_channels * config.input_size ** 2)


def bench_search_cost(device="cpu", blocks=2, rows=16, target="W4A4", queue_size=16, seed=0, name="DiT-XL/2"):
    """Rows {quantity, measured, formula_at_blocks, at_full_depth, unit}: one evaluation's block run, the
    search's evaluations, block runs and time, and its memory, at the shapes of `name` on `device`."""
    device = torch.device(device)
    bits = 4.0 if target == "W4A4" else 3.0
    candidates = DEFAULT_CANDIDATES[bits]
    widths = sorted({w for w, _ in candidates} | {round(bits)})
    model = random_dit(name, seed, depth=blocks).to(device)
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    calibration = (torch.randn(rows, config.in_channels, config.input_size, config.input_size, generator=generator),
                   torch.randint(0, 1000, (rows,), generator=generator),
                   torch.randint(0, config.num_classes, (rows,), generator=generator))
    recipe = replace(SEARCH_RECIPE, switch_bits=sorted(set(candidates) | {(round(bits), round(bits))}))
    started = time.perf_counter()
    quantized = quantize(model, uniform_config(model, *candidates[0]), recipe, calibration=calibration)
    quantize_seconds = time.perf_counter() - started
    objective = ModelObjective(quantized, calibration, round(bits), readout_blocks=1, batch_size=rows)
    objective.entering(blocks - 1)  # every block's entering state cached, as a whole search leaves it
    block_seconds = seconds_per_block(objective)
    names = quantizable_layers(quantized)
    held = resident_bytes(quantized)
    shapes, other = model_shapes(model, names)
    projected = project_resident_bytes(shapes, other, code_widths=len(widths), symmetric=recipe.weight_symmetric, group_size=recipe.group_size)
    cache_formula = cache_formula_bytes(config, blocks, rows)

    with torch.device("meta"):
        full = create_model(name)
    full_names = quantizable_layers(full)
    block_of = adapter_for(full).block_of(full)
    space = SearchSpace.build(full_names, candidates)
    full_shapes, full_other = model_shapes(full, full_names)
    runs = tree_block_runs(space, queue_size, [block_of[name] for name in full_names],
                           stop_after([block_of[name] for name in full_names], full.config.depth, 1))
    full_projected = project_resident_bytes(full_shapes, full_other, code_widths=len(widths),
                                            symmetric=recipe.weight_symmetric, group_size=recipe.group_size)
    gb = 1e9
    return [
        {"quantity": "seconds per block run", "measured": block_seconds, "formula_at_blocks": None,
         "at_full_depth": None, "unit": f"s ({rows} rows, {device})"},
        {"quantity": "tree search evaluations (bound)", "measured": None, "formula_at_blocks": None,
         "at_full_depth": expected_evaluations(space, queue_size), "unit": f"{len(full_names)} leaves, queue {queue_size}"},
        {"quantity": "tree search block runs", "measured": None, "formula_at_blocks": None, "at_full_depth": runs,
         "unit": "block runs"},
        {"quantity": "tree search time", "measured": None, "formula_at_blocks": None,
         "at_full_depth": runs * block_seconds / 3600, "unit": "hours, extrapolated"},
        {"quantity": "quantize with per-bit state", "measured": quantize_seconds, "formula_at_blocks": None,
         "at_full_depth": quantize_seconds * full.config.depth / blocks, "unit": "s, extrapolated"},
        # memory.py's formula has no term for the Hadamard transforms: they are added as measured, per block.
        {"quantity": "quantized model resident", "measured": held["total"] / gb,
         "formula_at_blocks": (projected["total"] + held["transforms"]) / gb,
         "at_full_depth": (full_projected["total"] + held["transforms"] * full.config.depth / blocks) / gb,
         "unit": f"GB ({len(widths)} code widths held; transforms {held['transforms'] / 1e6:.2f} MB as measured)"},
        {"quantity": "scorer caches", "measured": objective.cache_bytes() / gb, "formula_at_blocks": cache_formula / gb,
         "at_full_depth": cache_formula_bytes(config, full.config.depth, rows) / gb, "unit": "GB"},
        {"quantity": "full-precision model", "measured": sum(p.numel() * 4 for p in model.parameters()) / gb,
         "formula_at_blocks": None, "at_full_depth": sum(p.numel() * 4 for p in full.parameters()) / gb, "unit": "GB"},
    ]
