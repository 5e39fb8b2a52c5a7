"""TreeQ: tree-structured mixed-precision quantization of Diffusion Transformers (W4A4 / W3A3).

The Python API (treeq/api.py): `calibrate`, `quantize_`, `search_bits`, `generate`, `load_run` and the `Recipe`;
and
`TreeQConfig`, the diffusers quantization config of a run (treeq/deploy/diffusers_quantizer.py: importing it
registers TreeQ with diffusers). Loaded on first use, so that `treeq.cli` can set OpenMP's wait policy
before anything imports torch.
"""
__all__ = ["Recipe", "TreeQConfig", "calibrate", "generate", "load_run", "quantize_", "search_bits"]
_MODULES = {"TreeQConfig": "deploy.diffusers_quantizer"}


def __getattr__(name):
    if name in __all__:
        import importlib
        return getattr(importlib.import_module(f".{_MODULES.get(name, 'api')}", __name__), name)
    raise AttributeError(f"module 'treeq' has no attribute {name!r}")
