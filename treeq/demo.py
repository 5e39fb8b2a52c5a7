"""`make demo`: quantize the embedded testbed and show what each setting costs in image quality.

Samples the full-precision testbed, then W8A8 / W4A8 / W4A4 round-to-nearest and W4A4
with Hadamard rotation, all with identical seeds; prints their metrics and writes a
grid per setting and comparison.png (one strip per setting, digits 0-9) to the run folder.
"""
import json
from pathlib import Path

from .bench.table import format_table
from .bits import preset_config
from .eval.export import save_comparison_png, save_grid_png
from .experiment import generate, measure
from .io import atomic_write
from .models.load import load
from .quant.apply import quantize

SETTINGS = [("W8A8", "rtn"), ("W4A8", "rtn"), ("W4A4", "rtn"), ("W4A4", "hadamard")]  # no calibration needed


def run_demo(out, num_samples=200, seed=0):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load("default")
    fp_images, labels, _ = generate(model, num_samples, seed)
    rows = [{"setting": "FP32", "method": "-", **measure(fp_images, labels)}]
    save_grid_png(fp_images[:100], out / "fp.png", nrow=10)
    strips = [("FP32", fp_images)]
    for setting, method in SETTINGS:
        quantized = quantize(model, preset_config(model, setting), method=method)
        images, _, _ = generate(quantized, num_samples, seed)
        rows.append({"setting": setting, "method": method, **measure(images, labels, fp_images)})
        save_grid_png(images[:100], out / f"{setting}-{method}.png", nrow=10)
        strips.append((f"{setting} {method}", images))
    save_comparison_png(strips, out / "comparison.png")
    keys = ("setting", "method", "fid", "sfid", "class_accuracy", "psnr_vs_fp")
    table = [{k: row[k] for k in keys} for row in rows]
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(rows, indent=2)))
    print(format_table(table))
    print(f"grids and results.json in {out}/")
    return 0
