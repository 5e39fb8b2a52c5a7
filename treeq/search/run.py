"""One search run from the command line's settings: model, calibration, scorer, method, and its files.

`treeq search` calls run_search. Files beside the bit configuration `out` (bits.json): the state
(`.state.json`), the log of scored candidates (`.log.jsonl`), results (`.results.json`) and, for tree
search, the plots. Under torchrun (WORLD_SIZE > 1) candidates are split across ranks and rank 0 writes.
A tree search prints its cost first (search/estimate.py), and one above `max_cost` image equivalents is
refused before the model is quantized; the results file says what the search's scoring ran (`compute`).
"""
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..bits import layer_macs, save_config, uniform_config
from ..io import atomic_write
from ..ptq.recipe import Recipe
from .baselines import evolutionary, greedy, ilp, random_search, uniform
from .cost import cost_model, parse_target
from .estimate import MAX_COST, check_cost, describe, estimate_tree_search, image_block_rows, plan_tree_search
from .objective import DEFAULT_READOUT, ModelObjective, model_rows, output_error
from .refine import exchange, refine
from .schedule import Schedule, model_schedule
from .space import DEFAULT_CANDIDATES, SearchSpace, budget_for, floored, parse_candidates
from .state import LoggedScorer
from .pareto import BUDGET_WINDOW
from .tree import expected_evaluations, tree_search

METHODS = ("tss", "ilp", "evo", "greedy", "random", "uniform")
# The recipe a search runs on unless told otherwise: the uniform baseline with the lowest model-output
# error at W4A4 and W3A3 on the testbed (`treeq bench recipes`, docs/RESULTS.md).
SEARCH_RECIPE = Recipe(methods=("hadamard", "gptq"), activations="dynamic-asym")


def run_search(recipe=None, target="W4A4", method="tss", *, out="bits.json", env_bits=None, queue_size=16,
               candidates=None, calibration_rows=16, readout_blocks=1, readout=DEFAULT_READOUT, evaluations=None, seed=0, resume=False,
               log=None, cost="bops", progress=True, device=None, refine_sweeps=0, seed_ilp=False, model=None,
               calibration=None, budget_window=BUDGET_WINDOW, refine_rows=None, exchange_rounds=0, floor=None,
               max_cost=None, low_queue=None, low_rows=None, low_levels=None, workers=1, early_exit=False):
    """Run `method` on the model `recipe` quantizes, with its methods and activation quantizer, and write
    its files; returns the SearchResult (on every rank). recipe: default SEARCH_RECIPE. device: where
    calibration, quantization and scoring run (default this rank's GPU if any, else the CPU).
    refine_sweeps: coordinate-descent sweeps on the end-to-end metric after the search (search/refine.py),
    on `refine_rows` calibration rows the search did not score (None: on the scored rows); before them,
    `exchange_rounds` budget exchanges on the same rows (refine.exchange).
    budget_window: tree search only, see tree.tree_search. Every method's configuration is then measured
    on the held-out rows (those neither scored nor refined on): `held_out_metric` in the results file.
    floor: e.g. "W3A4": cheap layers (space.CHEAP_SHARE of the mean MACs: adaLN) take only candidates at or
    above it, for every method.
    seed_ilp: tree search only: run the integer program first, on sensitivities read at the model output (its
    scores logged to <stem>.ilp.log.jsonl)
    and keep its configuration in every node's queue (tree.tree_search's seeds); method "tss+ilp".
    model, calibration: the full-precision model and its calibration inputs, when the caller holds them
    (the Python API); by default the recipe's model is loaded and its calibration collected (and cached).
    max_cost: tree search only: refuse (ValueError), before quantizing, a search planned above this many image
    equivalents (estimate.plan_tree_search; None: no ceiling).
    low_queue, low_rows, low_levels: tree search only: the levels below `low_levels` (None: those whose segments fit
    in the smallest block, schedule.block_levels) keep `low_queue` candidates and score `low_rows` of the
    calibration rows (None: queue_size, every row); schedule.Schedule. early_exit: tree search only: each merge
    stops scoring once a chunk of its best-predicted products changes nothing (search/early_exit.py).
    workers: on the CPU, processes that score each node's candidates, one thread each (search/pool.py), or
    "auto" (pool.auto_workers: one per thread where memory allows); 1 scores in this process. Under torchrun
    the ranks split the candidates instead."""
    from ..memory import keep_freed_memory
    from ..models.family_load import resize_
    from ..models.load import load
    from ..ptq.apply import quantize
    from ..ptq.calibration import load_or_collect, num_rows, split_rows

    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}; known: {', '.join(METHODS)}")
    if seed_ilp and method != "tss":
        raise ValueError("seed_ilp seeds the tree search (method tss) with the integer program's configuration")
    bits = parse_target(target)
    env_bits = _default_env_bits(bits) if env_bits is None else env_bits
    if candidates is None:
        if bits not in DEFAULT_CANDIDATES:
            raise ValueError(f"no default candidates for {bits:g} average bits; give --candidates, e.g. '4,4 3,4 8,8'")
        candidates = DEFAULT_CANDIDATES[bits]
    elif isinstance(candidates, str):
        candidates = parse_candidates(candidates)
    _check_settings(out, method, resume, queue_size, evaluations, env_bits, max_cost)
    _check_workers(workers, device)
    Schedule(queue_size, low_levels or 0, low_queue, low_rows)  # refused before loading
    if early_exit and method != "tss":
        raise ValueError(f"early_exit stops a tree search's merges (--method tss), not {method}")
    if (low_queue or low_rows or low_levels is not None) and method != "tss":
        raise ValueError(f"low_queue, low_rows and low_levels schedule a tree search (--method tss), not {method}")
    _check_rows(recipe or SEARCH_RECIPE, calibration_rows, refine_rows, calibration)
    if refine_rows is not None and not (refine_sweeps or exchange_rounds):
        raise ValueError("refine_rows are the rows a refinement scores; give refine_sweeps or exchange_rounds too")
    recipe = recipe or SEARCH_RECIPE
    owned = model is None  # loaded here: quantized in place (one copy of the weights); a caller's model is copied
    model = resize_(load(recipe.model, recipe.dtype), recipe.sampling) if owned else model
    space = SearchSpace.build(list(uniform_config(model, 8, 8)), candidates)
    if floor is not None:
        space = floored(space, layer_macs(model), parse_candidates(floor)[0] if isinstance(floor, str) else floor)
    costs = cost_model(model, cost)
    budget_for(space, costs, bits)  # an impossible budget is refused before calibrating and quantizing
    # Per-bit state (GPTQ codes, static scales) for every candidate and the environment, so the scorer
    # can switch any layer to any of them in place.
    switch = {pair for layer in space.candidates for pair in layer} | {(env_bits, env_bits)}
    recipe = replace(recipe, switch_bits=sorted(set(recipe.switch_bits) | switch))
    distributed = _init_distributed()
    device = _device() if device is None else torch.device(device)
    model = model.to(device)
    writer = not distributed or torch.distributed.get_rank() == 0
    # under torchrun every rank records its share of the calibration images, rank 0 caches the joined set
    if calibration is None:
        calibration = load_or_collect(model, **recipe.calibration_options())
    scored = objective_rows(model, calibration, recipe)
    # A bad row count is refused before quantizing.
    rows, *refined, held_out = split_rows(scored, (calibration_rows, *([refine_rows] if refine_rows else [])), model)
    plan = None
    schedule = model_schedule(model, space.layers, queue_size, low_levels, low_queue, low_rows)
    low = split_rows(rows, (low_rows,), model)[0] if low_rows and low_rows < num_rows(rows, model) else None
    if method == "tss":  # what the search will cost, refused above the ceiling before quantizing (hours at real size)
        plan = plan_tree_search(model, space, schedule, model_rows(rows, model), readout_blocks=readout_blocks,
                                sampling=recipe.sampling, seed_ilp=seed_ilp,
                                low_rows=model_rows(low, model) if low is not None else None)
        check_cost(plan, max_cost)
    first = space.config([layer[0] for layer in space.candidates])
    quantized = quantize(model, first, recipe, calibration=calibration if recipe.needs_calibration() else None,
                         inplace=owned)
    # Every scored candidate allocates its activations anew: kept in the heap they do not fault in again (at
    # the deep testbed's size half the search's time went to the kernel without it). Process-wide.
    keep_freed_memory()
    # HAWQ measures each layer's sensitivity with the rest of the network in full precision.
    objective = ModelObjective(quantized, rows, 32 if method == "ilp" else env_bits, readout_blocks=readout_blocks,
                               readout=readout)
    low_objective = None if low is None else ModelObjective(quantized, low, env_bits, readout_blocks=readout_blocks,
                                                            readout=readout)
    pool = _pool(workers, [objective, *([low_objective] if low_objective else [])], device, distributed)
    try:
        def shared(part, index):  # scored by the torchrun ranks, by this pool's workers, or here
            return _spread(part) if distributed else pool.scorer(index) if pool else part
        scorer = shared(objective, 0)
        spread = scorer if distributed else None
        low_scorer = None if low_objective is None else shared(low_objective, 1)
        out = Path(out)
        stem = out.with_suffix("")
        log = log or f"{stem}.log.jsonl"
        hawq = None
        if method == "tss":
            if progress and writer and not resume:
                print(describe(estimate_tree_search(objective, space, schedule, sampling=recipe.sampling,
                                                    seed_ilp=seed_ilp, low_objective=low_objective,
                                                    workers=pool.workers if pool else 1)),
                      file=sys.stderr, flush=True)
            if seed_ilp:
                # HAWQ's sensitivities, read where they are strongest: the rest of the network in full precision,
                # the objective at the model output (a block past the layer ranks them worse: docs/RESULTS.md)
                sensitivities = ModelObjective(quantized, rows, 32, readout_blocks=None)
                hawq = ilp(LoggedScorer(sensitivities, space, costs, f"{stem}.ilp.log.jsonl", writer=writer), space, costs,
                           bits)
            seeds = [space.assignment(hawq.config)] if hawq else []
            result = tree_search(scorer, space, costs, bits, queue_size=schedule, state_path=f"{stem}.state.json",
                                 log_path=log, resume=resume, progress=progress, writer=writer, seeds=seeds,
                                 budget_window=budget_window, low_scorer=low_scorer, early_exit=early_exit)
            if hawq:
                result = replace(result, method="tss+ilp", evaluations=result.evaluations + hawq.evaluations,
                                 seconds=result.seconds + hawq.seconds)
        else:
            scorer = LoggedScorer(scorer, space, costs, log, writer=writer)
            if method in ("evo", "random"):
                evaluations = evaluations or expected_evaluations(space, queue_size)
                search = evolutionary if method == "evo" else random_search
                result = search(scorer, space, costs, bits, evaluations, seed=seed)
            else:
                result = {"ilp": ilp, "greedy": greedy, "uniform": uniform}[method](scorer, space, costs, bits)
        # the search's own scoring: a refinement after it scores on the same objective and is not counted
        # the spread scorers' counts are each rank's share; the integer program's (seed_ilp) ran whole on every rank
        spread_parts, whole = [objective, *([low_objective] if low_objective else [])], [sensitivities] if hawq else []
        block_runs = _over_ranks(sum(p.block_runs for p in spread_parts), spread) + sum(p.block_runs for p in whole)
        block_row_runs = (_over_ranks(sum(p.block_runs * p.model_rows for p in spread_parts), spread)
                          + sum(p.block_runs * p.model_rows for p in whole))
        refiner = ModelObjective(quantized, refined[0], env_bits, readout_blocks=None) if refined else scorer
        if exchange_rounds:
            result = exchange(refiner, space, costs, bits, result, exchange_rounds)
        if refine_sweeps:
            result = refine(refiner, space, costs, bits, result, refine_sweeps)
    finally:
        if pool:
            pool.close()
    held_out_metric = output_error(quantized, held_out, result.config) if num_rows(held_out, model) else None
    if writer:
        save_config(result.config, out)
        settings = {"recipe": recipe.to_dict(), "target": bits, "method": method, "env_bits": env_bits,
                    "queue_size": queue_size, "candidates": [list(pair) for pair in space.candidates[0]]
                    if len(set(space.candidates)) == 1 else "per layer", "calibration_rows": objective.rows,
                    "readout_blocks": readout_blocks, "readout": readout, "objective": objective.settings["objective"],
                    "cost": cost, "seed": seed,
                    "refine_sweeps": refine_sweeps, "refine_rows": refine_rows, "floor": floor, "exchange_rounds": exchange_rounds, "seed_ilp": seed_ilp,
                    "budget_window": budget_window if method == "tss" else None,
                    "schedule": schedule.to_dict() if method == "tss" else None,
                    "early_exit": early_exit, "workers": pool.workers if pool else 1}
        compute = _compute(block_runs, block_row_runs, objective.model_rows, image_block_rows(model, recipe.sampling),
                           plan)
        text = json.dumps({"settings": settings, **result.summary(), "held_out_metric": held_out_metric,
                           "held_out_rows": num_rows(held_out, model), "compute": compute, "front": result.front},
                          indent=1)
        atomic_write(f"{stem}.results.json", lambda p: p.write_text(text))
        if method == "tss":
            from .plots import plot_front, plot_levels
            plot_levels(result.levels, out.parent, prefix=f"{stem.name}-tss")
            plot_front(result.front, f"{stem}-front.png", chosen={"average_bits": result.average_bits,
                                                                  "metric": result.metric})
    return result


def _compute(block_runs, block_row_runs, rows, image_rows, plan):
    """The results' `compute`: the block runs and block-row runs the search's scoring ran (all ranks; a resumed
    search counts what this run scored; `rows` model rows a block run above the low levels), in image
    equivalents (`image_rows` block-row runs each), beside the block-row runs its plan printed (tree search)."""
    return {"block_runs": block_runs, "rows": rows, "block_row_runs": block_row_runs, "image_block_rows": image_rows,
            "image_equivalents": block_row_runs / image_rows,
            "planned_block_row_runs": plan["block_row_runs"] if plan else None}


def _spread(objective):
    """The objective's candidates split across the torchrun ranks."""
    from .distributed import DistributedScorer
    return DistributedScorer(objective)


def _pool(workers, objectives, device, distributed):
    """A ForkedPool over `objectives` when more than one worker scores (resolving "auto"), else None."""
    from .pool import ForkedPool, auto_workers

    if workers == "auto":
        workers = 1 if distributed else auto_workers(objectives[0].state_bytes(), device)
    return ForkedPool(objectives, workers) if workers > 1 else None


def _over_ranks(count, spread):
    """`count` summed over the ranks that each scored their share of every node (`spread`; None: one process)."""
    if spread is None:
        return count
    total = torch.tensor([float(count)], dtype=torch.float64, device=spread.device)
    torch.distributed.all_reduce(total, group=spread.group)
    return round(total.item())


def objective_rows(model, calibration, recipe):
    """What every method's objective is scored on: trajectory states of the calibration trajectories (the
    error of one sampler step), recorded through our sampling loop (the DiT) or the family's own pipeline.
    A family transformer handed over without its pipeline folder (the Python API's pipe.transformer) cannot
    record them: it is scored on the calibration rows given (model-output MSE), and says so."""
    from ..diffusion.pipelines import has_pipeline_folder, is_pipeline_model
    from ..ptq.calibration import load_or_record_states

    if is_pipeline_model(model) and not has_pipeline_folder(model):
        print("search objective: the model-output MSE of the calibration rows given (the transformer came without "
              "its pipeline folder, so the sampler's trajectory states cannot be recorded)", file=sys.stderr)
        return calibration
    return load_or_record_states(model, **recipe.calibration_options())


def _check_settings(out, method, resume, queue_size, evaluations, env_bits, max_cost):
    """Everything a search can refuse, refused before the model loads and calibrates (minutes to hours
    of work): a search that would fail at its end leaves no state or log behind."""
    from ..bits import check_bits

    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the bit configuration's file, e.g. {out / 'bits.json'}")
    check_bits(env_bits)
    for name, value in (("queue_size", queue_size), ("evaluations", evaluations)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if resume and method != "tss":
        raise ValueError(f"--resume continues a tree search (--method tss); {method} keeps no state")
    if max_cost is not None:
        MAX_COST.check(max_cost, "max_cost")
        if method != "tss":
            raise ValueError(f"--max-cost bounds a tree search (--method tss), whose cost is planned; {method}'s is not")
    state = Path(f"{out.with_suffix('')}.state.json")
    if resume and not state.exists():
        raise FileNotFoundError(f"nothing to resume: no {state}; run without --resume to start afresh")


def _check_workers(workers, device):
    """Refuse before loading what forked workers cannot do: a GPU (CUDA does not survive a fork) or torchrun
    (whose ranks already split the candidates)."""
    if workers == "auto":
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be 'auto' or a positive int, got {workers!r}")
    if workers == 1:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"workers={workers} under torchrun: its ranks split the candidates; give one worker")
    if (torch.device(device) if device is not None else _device()).type != "cpu":
        raise ValueError(f"workers={workers} forks CPU processes; on GPUs split the candidates with torchrun "
                         "(one rank per GPU)")


def _check_rows(recipe, calibration_rows, refine_rows, calibration):
    """Refuse, before loading and calibrating, rows the calibration set cannot hold: it records images x
    timesteps states (rows; twice as many for a family whose pipeline guides in one batch)."""
    if calibration is not None:
        return
    recorded = recipe.calibration_images * recipe.calibration_timesteps
    needed = calibration_rows + (refine_rows or 0)
    if 2 * recorded < needed:
        raise ValueError(f"{needed} calibration rows to score (and refine on) need more than the {recorded} "
                         f"(guided: {2 * recorded}) that {recipe.calibration_images} images x "
                         f"{recipe.calibration_timesteps} timesteps record; raise --calibration-images")


def _default_env_bits(target_bits):
    """ENG default: the environment at the target (TreeQ's PTQ setting), rounded to a whole bit-width."""
    return max(2, round(target_bits))


def _device():
    """This process's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def _init_distributed():
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU); False when run alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True
