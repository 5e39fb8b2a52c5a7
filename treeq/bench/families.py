"""`treeq bench families`: the transformer families (PixArt, SD3, FLUX, Sana, Wan) on this machine, one thread.

Three parts (`--settings` picks parts and families, e.g. `--settings blocks,quantize,pixart,sd3`):

blocks   Real shapes, random weights. Parameters, quantizable linears and blocks of the published
         transformer, counted on the meta device (no memory). One block of each kind is built at real
         width (the full model is never built: FLUX.1 is 12B parameters, 48 GB in float32) and its forward
         timed at the real tokens per sample (image + text at the family's published resolution), float32
         and fake-quantized W4A4. The W4A4 block is the search's recipe with round-to-nearest codes instead
         of GPTQ's (hadamard,rtn + dynamic-asym): the forward is the same work, GPTQ only chooses other codes.
         Times at 16 rows (the search's default calibration rows; a row is one sample with all its tokens)
         are measured where they fit in `max_seconds`, else projected linearly from the most rows measured.
         Then the projected search: evaluations at queue 16 (`expected_evaluations` on the real layer list,
         the target's default candidates), block-runs per evaluation counted by simulating the scorer's
         block accounting (objective.ModelObjective: from the segment's first block to one past its last,
         resuming at the first differing layer) in a tree search with random metrics and real budget
         pruning, times the W4A4 block time at 16 rows.
quantize The published transformer built (random weights) and quantized W4A4 round-to-nearest with dynamic
         activations (no calibration: GPTQ at real size needs calibration through the full pipeline,
         beyond this CPU), in place, in a subprocess per family so peaks do not mix: wall times and peak
         RSS, and the resident bytes after every layer made its codes, beside treeq.memory's projection.
         FLUX.1 does not fit in this machine's memory: its row is the projection alone.
tiny     The test-size pipelines: uniform W4A4 (hadamard,gptq + dynamic-asym) against TreeQ W4A4 (tree
         search at queue 16, default candidates, the same recipe), PSNR of sampled images against FP from
         the same noise and prompts, and the relative error of held-out transformer outputs. Random weights
         say little about quality.

Rows are long-format: {family, part, quantity, value, unit, basis, note}; basis is measured, counted,
projected, or "measured per block" (one block built at real shapes, not the whole model). This module only
reports: the shapes, meta and reduced models and their inputs are models/shapes.py's, the timing and the
simulated search search/estimate.py's (what `treeq search` estimates with, no benchmark imported).
"""
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..models.families import FAMILIES
from ..models.shapes import (REDUCED, meta_transformer, reduced_transformer, sampling_settings, synthetic_inputs,
                             token_counts, transformer_config)
from ..search.estimate import project_search, wall_seconds

PARTS = ("blocks", "quantize", "tiny")
# hadamard,rtn: the forward of the search's recipe (hadamard,gptq + dynamic-asym) with codes needing no calibration
BLOCK_RECIPE_METHODS = ("hadamard", "rtn")
QUANTIZE_METHODS = ("rtn",)
ACTIVATIONS = "dynamic-asym"
SEARCH_ROWS = 16        # search/run.py's default calibration rows
QUEUE_SIZE = 16         # its default queue
READOUT_BLOCKS = 1      # its default readout
MALLOC_MMAP_THRESHOLD = 2 ** 20  # bytes: glibc's, in the quantize subprocess (see quantize_subprocess)
# Whose float32 transformer fits in this machine's memory (24 GiB): FLUX.1's 48 GB does not.
FITS_IN_MEMORY = ("pixart", "sd3", "sana", "wan")
KIND_NAMES = {"pixart": ("block",), "sd3": ("joint block", "last joint block (context_pre_only)"),
              "flux": ("double-stream block", "single-stream block"), "sana": ("block",), "wan": ("block",)}


def threads_note():
    return f"torch threads {torch.get_num_threads()}"


def bench_families(settings=None, seed=0, max_seconds=40.0, calibration_images=4, num_samples=4,
                   queue_size=QUEUE_SIZE):
    """Rows of the parts and families `settings` names (default every part of every family)."""
    torch.set_num_threads(1)
    print(f"bench families: {threads_note()} (one thread: the other core of this machine is busy)",
          file=sys.stderr)
    settings = tuple(settings or ())
    unknown = [s for s in settings if s not in PARTS and s not in FAMILIES]
    if unknown:
        raise ValueError(f"bench families --settings: unknown {unknown}; parts {PARTS}, families {tuple(FAMILIES)}")
    parts = [p for p in PARTS if p in settings] or list(PARTS)
    families = [f for f in FAMILIES if f in settings] or list(FAMILIES)
    rows = []
    for name in families:
        if "blocks" in parts or "quantize" in parts:
            rows += structure_rows(name)
        if "blocks" in parts:
            block_rows = time_blocks(name, "full", max_seconds=max_seconds, seed=seed)
            rows += block_rows
            rows += search_projection_rows(name, block_seconds(block_rows), queue_size=queue_size, seed=seed)
        if "quantize" in parts:
            rows += quantize_rows(name)
        if "tiny" in parts:
            rows += tiny_fidelity_rows(name, calibration_images=calibration_images, num_samples=num_samples,
                                       queue_size=queue_size, seed=seed)
    return rows


def _row(family, part, quantity, value, unit="", basis="measured", note=""):
    return {"family": family, "part": part, "quantity": quantity, "value": value, "unit": unit, "basis": basis,
            "note": note}


# --- structure at real shapes (models/shapes.py builds them) -----------------------------------------------

def structure_rows(name):
    from ..bits import quantizable_layers
    from ..models.adapters import adapter_for

    model = meta_transformer(name)
    adapter = adapter_for(model)
    blocks = adapter.block_names(model)
    kinds = [REDUCED[name][1](b, len(blocks)) for b in range(len(blocks))]
    layout = ", ".join(f"{kinds.count(k)} {kind}" for k, kind in enumerate(KIND_NAMES[name]))
    counts = model.source
    return [_row(name, "full", "parameters", sum(p.numel() for p in model.parameters()) / 1e9, "B", "counted",
                 f"{4 * sum(p.numel() for p in model.parameters()) / 1e9:.1f} GB in float32"),
            _row(name, "full", "quantizable linears", len(quantizable_layers(model)), "", "counted"),
            _row(name, "full", "blocks", len(blocks), "", "counted", layout),
            _row(name, "full", "tokens per sample", counts["image_tokens"] + counts["text_tokens"], "", "counted",
                 f"{counts['image_tokens']} image + {counts['text_tokens']} text at "
                 f"{_resolution(sampling_settings(name))}")]


def _resolution(settings):
    frames = f"{settings['num_frames']} frames of " if "num_frames" in settings else ""
    return f"{frames}{settings['height']}x{settings['width']}"


# --- block times ----------------------------------------------------------------------------------------

def time_blocks(name, size="full", *, max_seconds=40.0, seed=0, target_rows=SEARCH_ROWS, rows_tried=(16, 4)):
    """Rows of one block of each kind: forward seconds at 1 row and at `target_rows` (measured when the
    1-row time says it takes under max_seconds, else projected from the most rows measured), float32 and W4A4."""
    from ..bits import preset_config
    from ..models.adapters import adapter_for
    from ..ptq.apply import quantize
    from ..ptq.recipe import Recipe
    from ..quant.linear import QuantLinear

    model = reduced_transformer(name, size, seed)
    adapter = adapter_for(model)
    kinds = KIND_NAMES[name]
    states = {}

    def state(rows):
        if rows not in states:
            with torch.no_grad():
                states[rows] = adapter.embed(model, synthetic_inputs(name, model, rows, size, seed))
        return states[rows]

    out = []
    counts = model.source
    for setting in ("fp32", "W4A4"):
        if setting == "W4A4":
            quantize(model, preset_config(model, "W4A4"), Recipe(methods=BLOCK_RECIPE_METHODS, activations=ACTIVATIONS),
                     inplace=True)
            for module in model.modules():  # codes made now, not inside the first timed forward
                if isinstance(module, QuantLinear):
                    module.quantized_weight()
        for kind, kind_name in enumerate(kinds):
            run = lambda rows: adapter.run_blocks(model, state(rows), kind, kind + 1)  # noqa: E731
            measured = {}
            with torch.no_grad():
                measured[1] = wall_seconds(lambda: run(1))
                for rows in sorted(rows_tried, reverse=True):
                    if rows > 1 and measured[1] * rows <= max_seconds:
                        measured[rows] = wall_seconds(lambda: run(rows))
                        break
            note = (f"{kind_name}; {counts['image_tokens']}+{counts['text_tokens']} tokens/row; {threads_note()}"
                    + ("; hadamard,rtn codes (forward as hadamard,gptq), dynamic-asym" if setting == "W4A4" else ""))
            out.append(_row(name, "blocks", f"{kind_name} forward {setting}, 1 row", measured[1], "s",
                            "measured per block", note))
            most = max(measured)
            basis = "measured per block" if most == target_rows else "projected"
            out.append(_row(name, "blocks", f"{kind_name} forward {setting}, {target_rows} rows",
                            measured[most] * target_rows / most, "s", basis,
                            note if most == target_rows else f"{measured[most]:.3g} s at {most} row(s) x "
                            f"{target_rows}/{most} (rows are independent samples)"))
    return out


def block_seconds(rows, setting="W4A4", target_rows=SEARCH_ROWS):
    """{kind index: seconds} of the W4A4 block forwards at target_rows from time_blocks' rows."""
    times = {}
    for row in rows:
        for kind, kind_name in enumerate(KIND_NAMES[row["family"]]):
            if row["quantity"] == f"{kind_name} forward {setting}, {target_rows} rows":
                times[kind] = row["value"]
    return times


# --- the projected search -----------------------------------------------------------------------------

def search_projection_rows(name, seconds, queue_size=QUEUE_SIZE, seed=0):
    model = meta_transformer(name)
    projection = project_search(model, REDUCED[name][1], seconds, queue_size=queue_size, seed=seed)
    note = f"W4A4 target, queue {queue_size}, {SEARCH_ROWS} calibration rows, readout {READOUT_BLOCKS} block"
    days = projection["search_seconds"] / 86400
    return [_row(name, "search", "evaluations (expected_evaluations)", projection["expected_evaluations"], "",
                 "counted", note + "; upper bound (budget pruning only lowers it)"),
            _row(name, "search", "evaluations scored (simulated, budget pruning)",
                 projection["simulated_evaluations"], "", "counted", "tree search with random metrics"),
            _row(name, "search", "block-runs per evaluation", projection["block_runs_per_evaluation"], "",
                 "counted", "the scorer's block accounting simulated; setup (~2 x depth runs) left out"),
            _row(name, "search", f"block time, W4A4, {SEARCH_ROWS} rows (run-weighted)", projection["block_seconds"],
                 "s", "projected" if len(seconds) > 1 else "measured per block", "from the blocks rows"),
            _row(name, "search", "one evaluation", projection["evaluation_seconds"], "s", "projected",
                 "block-runs per evaluation x block time"),
            _row(name, "search", "whole search (scoring)", projection["search_seconds"], "s", "projected",
                 f"evaluations x block-runs x block time = {days:.3g} days; calibration and GPTQ not included")]


# --- quantizing the published transformer ----------------------------------------------------------------

def _rss_gb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def quantize_worker(name, size="full", seed=0):
    """In this process: build the family's transformer (random weights), quantize it W4A4 round-to-nearest
    with dynamic-asym activations in place, make every layer's codes; wall times, RSS and resident bytes."""
    import diffusers

    from ..bits import preset_config
    from ..memory import resident_bytes
    from ..models.families import _randomize_zero_init
    from ..ptq.apply import quantize
    from ..ptq.recipe import Recipe
    from ..quant.linear import QuantLinear

    torch.set_num_threads(1)
    result = {"threads": torch.get_num_threads(), "rss_start_gb": _rss_gb(),
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = getattr(diffusers, FAMILIES[name].transformer)(**transformer_config(name, size)).eval()
    _randomize_zero_init(model)
    model.source = token_counts(name, size)
    result.update(build_s=time.perf_counter() - start, rss_built_gb=_rss_gb())
    start = time.perf_counter()
    quantize(model, preset_config(model, "W4A4"), Recipe(methods=QUANTIZE_METHODS, activations=ACTIVATIONS),
             inplace=True)
    result["quantize_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for module in model.modules():  # what the first forward would do: round every weight to its codes
        if isinstance(module, QuantLinear):
            module.quantized_weight()
    result.update(codes_s=time.perf_counter() - start, rss_quantized_gb=_rss_gb(), peak_rss_gb=_peak_rss_gb(),
                  resident_gb=resident_bytes(model)["total"] / 1e9)
    return result


def quantize_subprocess(name, size="full", seed=0, timeout=480):
    """quantize_worker in a fresh Python process (its own peak RSS)."""
    command = [sys.executable, "-m", "treeq.bench.families", "quantize", name, size, str(seed)]
    # A fixed glibc mmap threshold returns each freed temporary of the rounding to the system at once; with
    # the default (dynamic) threshold glibc keeps them and RSS at codes time is twice the tensors (measured:
    # PixArt 6.7 GiB for 3.1 GB resident, Sana 15.1 GiB for 7.2 GB), which SD3 would push past 24 GiB.
    env = {"MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD), **os.environ, "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        raise RuntimeError(f"quantize worker for {name} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def projected_memory(name, size="full"):
    """treeq.memory's projections (GB) for the family's quantizable linears, round-to-nearest W4A4."""
    from ..bits import quantizable_layers
    from ..memory import model_shapes, project_resident_bytes, projected_peaks

    model = meta_transformer(name, size)
    shapes, other = model_shapes(model, quantizable_layers(model))
    resident = project_resident_bytes(shapes, other, code_widths=1, symmetric=True)
    peaks = projected_peaks(shapes, other, code_widths=1)
    return {"fp_model_gb": peaks["quantize"]["fp_model"] / 1e9, "resident_gb": resident["total"] / 1e9,
            "quantize_copy_gb": peaks["quantize"]["total"] / 1e9}


def quantize_rows(name, size="full", seed=0):
    projection = projected_memory(name, size)
    note = f"W4A4 rtn + {ACTIVATIONS}, in place; {threads_note()} in a subprocess"
    rows = []
    if name in FITS_IN_MEMORY:
        measured = quantize_subprocess(name, size, seed)
        note = (f"W4A4 rtn + {ACTIVATIONS}, in place; torch threads {measured['threads']}, own process, "
                f"MALLOC_MMAP_THRESHOLD_={measured['malloc_mmap_threshold']}")
        rows += [_row(name, "quantize", "build (random init)", measured["build_s"], "s", "measured", note),
                 _row(name, "quantize", "quantize (swap + rtn)", measured["quantize_s"], "s", "measured", note),
                 _row(name, "quantize", "codes of every layer", measured["codes_s"], "s", "measured",
                      "what the first forward does"),
                 _row(name, "quantize", "peak RSS", measured["peak_rss_gb"], "GiB", "measured",
                      f"built {measured['rss_built_gb']:.2f} GiB, after codes {measured['rss_quantized_gb']:.2f} GiB"),
                 _row(name, "quantize", "resident bytes (resident_bytes)", measured["resident_gb"], "GB", "measured")]
    else:
        rows.append(_row(name, "quantize", "quantize", None, "", "not run",
                         f"float32 model {projection['fp_model_gb']:.1f} GB exceeds this machine's 24 GiB"))
    rows += [_row(name, "quantize", "resident bytes (project_resident_bytes)", projection["resident_gb"], "GB",
                  "projected", "float weights + int8 codes of one width + scales + fingerprints"),
             _row(name, "quantize", "treeq quantize peak (projected_peaks)", projection["quantize_copy_gb"], "GB",
                  "projected", "FP model kept beside its quantized copy, as the CLI does; runtime not included")]
    return rows


# --- tiny pipelines: uniform W4A4 against TreeQ W4A4 -------------------------------------------------------

def tiny_fidelity_rows(name, *, calibration_images=4, num_samples=4, queue_size=QUEUE_SIZE,
                       calibration_rows=SEARCH_ROWS, seed=0, folder=None):
    """Uniform W4A4 against a TreeQ W4A4 search on the tiny pipeline of `name`: fidelity to FP of each."""
    from ..bits import average_bits, preset_config
    from ..eval.fidelity import family_fidelity, fp_reference
    from ..models.adapters import adapter_for
    from ..models.families import init_pipeline_folder
    from ..models.load import load
    from ..ptq.apply import quantize
    from ..ptq.calibration import collect_calibration
    from ..search.run import SEARCH_RECIPE, run_search

    torch.set_num_threads(1)
    recipe = replace(SEARCH_RECIPE, calibration_images=calibration_images)
    with contextlib.ExitStack() as stack:
        root = Path(folder or stack.enter_context(tempfile.TemporaryDirectory()))
        pipeline_folder = init_pipeline_folder(name, root / f"{name}-tiny", "tiny", seed)
        model = load(pipeline_folder)
        calibration = collect_calibration(model, **recipe.calibration_options())
        start = time.perf_counter()
        uniform = quantize(model, preset_config(model, "W4A4"), recipe, calibration=calibration)
        uniform_s = time.perf_counter() - start
        result = run_search(recipe, "W4A4", "tss", out=root / f"{name}-bits.json", queue_size=queue_size,
                            calibration_rows=calibration_rows, progress=False, model=model, calibration=calibration)
        searched = quantize(model, result.config, recipe, calibration=calibration)
        reference = fp_reference(model, num_samples=num_samples, seed=seed)  # FP sampled once for both rows
        fidelity = {label: family_fidelity(quantized, model, num_samples=num_samples, seed=seed, reference=reference)
                    for label, quantized in (("uniform", uniform), ("treeq", searched))}
    rows_of = adapter_for(model).num_rows(calibration)
    note = (f"tiny random pipeline; {calibration_images} calibration images ({rows_of} rows), {num_samples} "
            f"samples; {threads_note()}")
    rows = []
    for label, title in (("uniform", "uniform W4A4"), ("treeq", "TreeQ W4A4")):
        rows += [_row(name, "tiny", f"{title} PSNR vs FP", fidelity[label]["psnr_vs_fp"], "dB", "measured", note),
                 _row(name, "tiny", f"{title} output relative error", fidelity[label]["output_relative_error"], "",
                      "measured", "held-out transformer inputs")]
    rows += [_row(name, "tiny", "TreeQ average bits (BOPs)", result.average_bits, "bits", "measured",
                  f"uniform: {average_bits(preset_config(model, 'W4A4'), model):.3f}"),
             _row(name, "tiny", "TreeQ search", result.seconds, "s", "measured",
                  f"{result.evaluations} evaluations, queue {queue_size}, {calibration_rows} trajectory states; "
                  f"uniform quantize {uniform_s:.1f} s")]
    return rows


def main(argv):
    if argv[:1] == ["quantize"]:
        name, size, seed = argv[1], argv[2] if len(argv) > 2 else "full", int(argv[3]) if len(argv) > 3 else 0
        print(json.dumps(quantize_worker(name, size, seed)))
        return 0
    raise SystemExit("usage: python -m treeq.bench.families quantize FAMILY [SIZE [SEED]]")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
