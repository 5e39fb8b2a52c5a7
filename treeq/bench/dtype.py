"""`treeq bench dtype`: a run in bfloat16 against its float32 twin, on every family's tiny random pipeline
and the testbed, and the torchao export of the bf16 run against the run.

Each model is quantized W4A4 with the search's recipe (hadamard,gptq, dynamic-asym) from the same
calibration trajectories (2 images x 2 steps) in each dtype; errors are relative L2 of the transformer's
output on one calibration batch against the float32 full-precision model. Random weights: what is
compared is the dtype, not the quality.
"""
import copy
from pathlib import Path

import torch

from ..bits import preset_config
from ..deploy.torchao_export import to_torchao_, torchao_available
from ..models.adapters import adapter_for
from ..models.families import family_names, init_pipeline_folder
from ..models.load import load
from ..ptq.apply import quantize
from ..ptq.calibration import collect_calibration
from ..search.run import SEARCH_RECIPE


def bench_dtype(settings=None, folder="runs/bench-dtype"):
    """Rows {model, fp32_error, bf16_error, bf16_vs_fp32, torchao_vs_bf16_run}."""
    rows = []
    for name in settings or ("testbed", *family_names()):
        spec = "default" if name == "testbed" else _tiny_folder(name, Path(folder) / name)
        reference = load(spec, "float32")
        outputs = {}
        for dtype in ("float32", "bfloat16"):
            model = load(spec, dtype)
            calibration = collect_calibration(model, num_images=2, num_timesteps=2)
            if dtype == "float32":
                inputs = next(adapter_for(reference).batches(calibration, 8))
            quantized = quantize(model, preset_config(model, "W4A4"), SEARCH_RECIPE, calibration=calibration,
                                 inplace=True)
            outputs[dtype] = _output(quantized, inputs)
        ao = _output(to_torchao_(copy.deepcopy(quantized)), inputs) if torchao_available() else None
        fp = _output(reference, inputs)
        rows.append({"model": name, "fp32_error": _relative(outputs["float32"], fp),
                     "bf16_error": _relative(outputs["bfloat16"], fp),
                     "bf16_vs_fp32": _relative(outputs["bfloat16"], outputs["float32"]),
                     "torchao_vs_bf16_run": None if ao is None else _relative(ao, outputs["bfloat16"])})
    return rows


def _tiny_folder(name, folder):
    """The family's tiny random pipeline folder, written once (seed 0: the same weights every run)."""
    return str(folder if folder.exists() else init_pipeline_folder(name, folder))


def _output(model, inputs):
    """The model's output on `inputs` cast to its dtype, in float32."""
    dtype = next(model.parameters()).dtype
    if isinstance(inputs, tuple):
        cast = tuple(part.to(dtype) if part.is_floating_point() else part for part in inputs)
    else:
        cast = {key: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                for key, value in inputs.items()}
    with torch.no_grad():
        return adapter_for(model).forward(model, cast).float()


def _relative(output, reference):
    return ((output - reference).norm() / reference.norm()).item()
