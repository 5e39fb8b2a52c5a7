"""One entry point for every model source: the embedded default, our files, official `.pt`, diffusers.

`load(spec)` decides by what `spec` names: "default", a `.safetensors`/`.json` pair
written by TreeQ, an official facebookresearch/DiT `.pt` (architecture read off its tensor
shapes), or a diffusers `DiTTransformer2DModel` folder.
"""
from pathlib import Path

from .checkpoint import load_model, load_official


def load(spec):
    """A DiT in eval mode from `spec` (see module docstring)."""
    if spec == "default":
        from ..diffusion.defaults import set_sampling_defaults_
        from ..testbed import TESTBED, WEIGHTS
        return set_sampling_defaults_(load_model(WEIGHTS), TESTBED)
    path = Path(spec)
    if path.is_dir():
        from .diffusers_load import load_diffusers
        return load_diffusers(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        return load_official(path)
    if path.suffix in (".safetensors", ".json") or path.with_suffix(".json").exists():
        return load_model(path)
    raise FileNotFoundError(f"no model at {spec!r}: give 'default', a .safetensors/.json pair, "
                            "an official .pt checkpoint or a diffusers folder")
