"""Evaluation on the MNIST testbed: the reference classifier, the paper metrics and sample export."""
from .classifier import load_classifier
from .export import save_adm_npz, save_grid_png
from .metrics import evaluate

__all__ = ["evaluate", "load_classifier", "save_adm_npz", "save_grid_png"]
