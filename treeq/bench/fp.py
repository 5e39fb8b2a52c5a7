"""`treeq bench fp`: the full-precision testbed's metrics and its CPU sampling throughput."""
import torch

from ..testbed.experiment import sample_and_measure
from ..models.load import load
from ..testbed import SAMPLING


def bench_fp(num_samples=500, seed=0):
    """One row: metrics of `num_samples` FP samples at the default settings, and images/s."""
    model = load("default")
    metrics, _, seconds = sample_and_measure(model, num_samples, seed)
    return [{"model": "default", "num_samples": num_samples, **SAMPLING, "threads": torch.get_num_threads(),
             **{k: v for k, v in metrics.items() if not k.endswith("_vs_fp")},
             "seconds": seconds, "images_per_second": num_samples / seconds}]
