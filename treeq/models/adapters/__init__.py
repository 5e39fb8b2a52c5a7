"""How the engine sees each transformer family: one small adapter per model class, found by the class.

An adapter says where a family's quantizable linears and blocks are (module names of the model as it
is, in execution order), how many rows each linear runs on per sample (for MACs), and how to run the
block chain in pieces: embed -> blocks i..j -> head, with whatever flows between blocks. Calibration,
the PTQ methods, the search and fine-tuning use only this interface.
"""
from .base import ADAPTERS, CallInputs, adapter_for, register
from . import dit, flux, pixart, sana, sd3, wan  # noqa: F401  (each registers its model classes)

__all__ = ["ADAPTERS", "CallInputs", "adapter_for", "register"]
