"""TreeQ: tree-structured mixed-precision quantization of Diffusion Transformers (W4A4 / W3A3).

The Python API (treeq/api.py): `calibrate`, `quantize_`, `search_bits`, `load_run` and the `Recipe`. Loaded on
first use, so that `treeq.cli` can set OpenMP's wait policy before anything imports torch.
"""
__all__ = ["Recipe", "calibrate", "load_run", "quantize_", "search_bits"]


def __getattr__(name):
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'treeq' has no attribute {name!r}")
