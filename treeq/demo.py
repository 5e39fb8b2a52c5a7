"""`make demo`: quantize the embedded testbed and show what each setting costs in image quality.

Samples the full-precision testbed, then W8A8 / W4A8 / W4A4 round-to-nearest and W4A4
with Hadamard rotation, all with identical seeds; prints their metrics and writes a
grid per setting and comparison.png (one strip per setting, digits 0-9) to the run folder.
"""
import json
from pathlib import Path

from .bench.ptq import COLUMNS, baseline_recipe, compare_settings
from .bench.table import format_table
from .eval.export import save_comparison_png, save_grid_png
from .io import atomic_write
from .models.load import load

SETTINGS = [("W8A8", "rtn"), ("W4A8", "rtn"), ("W4A4", "rtn"), ("W4A4", "hadamard")]  # no calibration needed
ACTIVATIONS = "dynamic-asym"


def run_demo(out, num_samples=200, seed=0):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, strips = [], []
    runs = [(setting, baseline_recipe(method, ACTIVATIONS)) for setting, method in SETTINGS]
    for setting, recipe, images, metrics in compare_settings(load("default"), runs, num_samples, seed):
        method = "-" if recipe is None else ",".join(recipe.methods)
        rows.append({"setting": setting, "method": method, **metrics})
        name = "fp" if recipe is None else f"{setting}-{method}"
        save_grid_png(images[:100], out / f"{name}.png", nrow=10)
        strips.append((setting if recipe is None else f"{setting} {method}", images))
    save_comparison_png(strips, out / "comparison.png")
    keys = ("setting", "method", *COLUMNS)
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(rows, indent=2)))
    print(format_table([{k: row[k] for k in keys} for row in rows]))
    print(f"grids and results.json in {out}/")
    return 0
