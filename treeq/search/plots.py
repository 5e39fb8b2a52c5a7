"""Figures of a tree search, as in the TreeQ paper's TSS figure: per tree level, every scored candidate
(cost on x, metric on y, log scale) kept or dropped by the Pareto drop, and the root's front."""
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on search machines
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)

from ..io import atomic_write  # noqa: E402


def plot_levels(levels, out_dir, prefix="tss"):
    """One PNG per level with scored nodes: `<prefix>-level<i>.png`; returns the paths written."""
    paths = []
    for index, nodes in enumerate(levels):
        scored = [node for node in nodes if "kept" in node]
        if not scored:
            continue
        kept = [point for node in scored for point in node["kept"]]
        dropped = [point for node in scored for point in node["dropped"]]
        sizes = sorted({node["segment"][1] - node["segment"][0] for node in scored})
        title = (f"level {index}: {len(scored)} nodes of {'/'.join(map(str, sizes))} layers, "
                 f"{len(kept)} kept, {len(dropped)} dropped")
        path = Path(out_dir) / f"{prefix}-level{index}.png"
        _scatter(path, title, "segment average bits", [("dropped", dropped, "x", "tab:red"),
                                                        ("kept", kept, "o", "tab:green")])
        paths.append(path)
    return paths


def plot_front(front, path, chosen=None):
    """The root's non-dominated candidates (average bits of the model vs metric), the chosen one marked."""
    points = [[entry["average_bits"], entry["metric"]] for entry in front]
    series = [("root front", points, "o", "tab:green")]
    if chosen is not None:
        series.append(("chosen", [[chosen["average_bits"], chosen["metric"]]], "*", "tab:blue"))
    _scatter(Path(path), f"root front: {len(points)} candidates", "average bits", series)
    return Path(path)


def _scatter(path, title, xlabel, series):
    figure, axes = plt.subplots(figsize=(5, 4), dpi=100)
    hidden = 0
    for label, points, marker, color in series:
        # A log axis cannot show 0 or inf (a full-precision candidate, a failed one); count them in the title.
        shown = [(x, y) for x, y in points if y > 0 and math.isfinite(y)]
        hidden += len(points) - len(shown)
        if shown:
            axes.plot(*zip(*shown), linestyle="none", marker=marker, color=color, label=label, markersize=4)
    axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("metric (MSE to full precision)")
    axes.set_title(title + (f"; {hidden} at 0 or inf not shown" if hidden else ""), fontsize=8)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.subplots_adjust(left=0.17, right=0.97, top=0.92, bottom=0.12)  # fixed margins: tight_layout is slow
    atomic_write(path, lambda p: figure.savefig(p, format="png"))
    plt.close(figure)
