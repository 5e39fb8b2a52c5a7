"""`make demo`: TreeQ end to end on the embedded testbed, against full precision and the strongest
uniform baseline, from the same seeds.

1. Tree-Structured Search with Environmental Noise Guidance (environment at the target) finds a
   W4A4 bit configuration for the search's recipe with a General Monarch Branch attached.
2. That configuration is quantized with the same recipe; the baseline is the same recipe without the
   branch at uniform W4A4 (the strongest uniform baseline of `treeq bench recipes`).
3. FP, baseline and TreeQ sample the same labels from the same noise; the table, sample strips, the
   search's Pareto plots and a self-contained report.html go to the run folder.
Shrunk for a 2-core CPU: 100 samples per model (the 10 x 10 grids), the search at its defaults (16
calibration rows, queue 16: at W3A3 a queue of 8 loses most of the quality, see `treeq bench ablation`),
its candidates scored by one-thread workers as `treeq search` scores them.
"""
import json
from pathlib import Path

from .bench.ptq import COLUMNS, compare_settings
from .bench.table import format_table
from .bits import average_bits, preset_config
from .eval.export import save_comparison_png, save_grid_png
from .io import atomic_write
from .models.load import load
from .report import figure_html, note_html, table_html, write_report
from .search.run import SEARCH_RECIPE, run_search

TARGET = "W4A4"
BRANCH_RATIO = 0.05  # the Monarch branch's share of each layer's parameters
OBJECTIVE = ("the latent's error after one sampler step from full-precision trajectory states (guided, the "
             "channels the sampler reads)")


def treeq_recipe(recipe=SEARCH_RECIPE, ratio=BRANCH_RATIO):
    """`recipe` with a General Monarch Branch between its transform and its rounding."""
    return recipe.with_branch("monarch", ratio=ratio)


def run_demo(out, num_samples=100, seed=0):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load("default")
    recipe = treeq_recipe()
    print(f"TreeQ search ({TARGET}, environment {TARGET}, recipe {','.join(recipe.methods)}, objective: {OBJECTIVE})")
    search = run_search(recipe, TARGET, "tss", out=out / "bits.json", workers="auto")
    runs = [(TARGET, SEARCH_RECIPE), (("TreeQ " + TARGET, search.config), recipe)]
    names = ("fp", "uniform " + ",".join(SEARCH_RECIPE.methods), "treeq (tss + eng + gmb)")
    configs = (None, preset_config(model, TARGET), search.config)
    rows, strips = [], []
    for index, (setting, _, images, metrics) in enumerate(compare_settings(model, runs, num_samples, seed)):
        rows.append({"setting": setting, "method": names[index], **{k: metrics[k] for k in COLUMNS},
                     "bops_bits": 32.0 if configs[index] is None else average_bits(configs[index], model)})
        save_grid_png(images[:100], out / f"{names[index].split()[0]}.png", nrow=10)
        strips.append((names[index], images))
    save_comparison_png(strips, out / "comparison.png")
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(
        {"rows": rows, "search": search.summary(), "recipe": recipe.to_dict()}, indent=2)))
    _report(out, rows, search)
    print(format_table(rows))
    print(f"report: {out / 'report.html'} (grids, Pareto plots, results.json in {out}/)")
    return 0


def _report(out, rows, search):
    plots = sorted(out.glob("bits-tss-level*.png"))
    write_report(out / "report.html", "TreeQ demo: W4A4 on the embedded testbed", [
        ("Results (same labels and noise for every row)", [
            table_html(rows, highlight=lambda row: row["method"].startswith("treeq")),
            note_html(f"Search: {search.evaluations} evaluations in {search.seconds:.0f} s, BOPs average bits "
                      f"{search.average_bits:.3f}; its objective: {OBJECTIVE}. FID/sFID use the testbed classifier's features against 1,000 "
                      "held-out digits; PSNR vs FP compares each sample with the FP sample from the same noise.")]),
        ("Samples: FP | uniform baseline | TreeQ", [figure_html(out / "comparison.png", "digits 0-9, same noise")]),
        ("The search's root front", [figure_html(out / "bits-front.png", "candidates kept at the root")]),
        ("Each tree level: kept and dropped candidates", [figure_html(path, path.stem) for path in plots]),
    ])
