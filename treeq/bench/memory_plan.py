"""`treeq bench memory-plan`: what `treeq quantize` holds at once for each family's published transformer, by
memory.quantize_plan on the model built on the meta device (shapes only), and the GPU that fits it.

The default recipe of a real-size run: hadamard,gptq with dynamic-asym activations, W4A4, in bfloat16, at
the family's published resolution, calibrated on the recipe's 32 images x 10 kept steps (guided families:
twice the rows). The search's phase adds the codes of every default candidate width (the search switches
bits from them) to the weights and one block's Hessians and batch; the rows the scorer caches per block
come on top and are not counted here. The search's host row: the calibration set (every row's transformer
inputs, in the run's dtype) and the trajectory states recorded from the same trajectories (the same inputs
again, and each state's J in float32, shaped as the latent): the search holds both.
"""
import dataclasses

import torch

from ..bits import preset_config
from ..memory import quantize_plan
from ..models.adapters import CallInputs
from ..models.families import family_names
from ..models.shapes import meta_transformer, synthetic_inputs
from ..ptq.recipe import Recipe
from ..search.space import DEFAULT_CANDIDATES

RECIPE = Recipe(methods=("hadamard", "gptq"), activations="dynamic-asym", dtype="bfloat16")
GPUS = ((24, "24 GB (RTX 4090)"), (40, "40 GB (A100-40GB)"), (48, "48 GB (L40S, RTX 6000 Ada)"),
        (80, "80 GB (A100-80GB, H100)"), (141, "141 GB (H200)"))


def bench_memory_plan(settings=None):
    """Rows {family, phase, rows, weights_gb, codes_gb, block_gb, total_gb, fits}: GB are 1e9 bytes; `fits` is
    the smallest common GPU that holds the phase's device memory."""
    rows = []
    for name in settings or family_names():
        model = meta_transformer(name).to(torch.bfloat16)
        config = preset_config(model, "W4A4")
        steps, guided = model.sampling["steps"], model.sampling["cfg_scale"] > 1
        calibration_rows = RECIPE.calibration_images * min(RECIPE.calibration_timesteps, steps) * (2 if guided else 1)
        quantize = quantize_plan(model, config, RECIPE, calibration_rows)
        device, host = quantize["quantize (device)"], quantize["quantize (host)"]
        search = quantize_plan(model, config, dataclasses.replace(RECIPE, switch_bits=DEFAULT_CANDIDATES[4.0]),
                               16)["quantize (device)"]
        states = {"set_and_states": calibration_host_bytes(name, model, calibration_rows, guided)}
        states["total"] = states["set_and_states"]
        for phase, parts, count in (("quantize, device", device, calibration_rows),
                                    ("quantize, host: block states", host, calibration_rows),
                                    ("search, device: weights and codes", search, 16),
                                    ("search, host: calibration set and states", states, calibration_rows)):
            block = sum(parts.get(part, 0) for part in ("hessians", "batch", "block_states", "set_and_states"))
            rows.append({"family": name, "phase": phase, "rows": count, "weights_gb": parts.get("weights", 0) / 1e9,
                         "codes_gb": parts.get("codes", 0) / 1e9, "block_gb": block / 1e9,
                         "total_gb": parts["total"] / 1e9, "fits": _gpu(parts["total"]) if "device" in phase else "-"})
    return rows


def calibration_host_bytes(name, model, rows, guided, size="full"):
    """Bytes the search holds on the host for `rows` calibration rows of family `name`: the set's per-row
    transformer inputs and the states' copy of them, in the model's dtype (integer ids at their own width),
    and a float32 J per state (a guided state is two rows) shaped as the latent (`hidden_states`)."""
    batched = CallInputs.from_call(synthetic_inputs(name, model, 1, size)).batched
    element = model.dtype.itemsize
    row = sum(t.numel() * (element if t.is_floating_point() else t.element_size()) for t in batched.values())
    states = rows // 2 if guided else rows
    return 2 * rows * row + states * 4 * batched["hidden_states"].numel()


def _gpu(size):
    """The smallest common GPU whose memory holds `size` bytes with 10% left for the runtime and CUDA context."""
    return next((label for gigabytes, label in GPUS if size * 1.1 <= gigabytes * 1e9), "more than one GPU")
