"""One entry point for every model source: the embedded default, our files, official `.pt`, diffusers.

`load(spec)` decides by what `spec` names: an embedded testbed ("default", "deep"), a `.safetensors`/`.json` pair
written by TreeQ, an official facebookresearch/DiT `.pt` (architecture read off its tensor
shapes), a diffusers `DiTTransformer2DModel` folder (converted to our DiT), or a diffusers pipeline or
transformer folder of another supported family (PixArt, SD3, FLUX, Sana, Wan: loaded in place).
"""
from pathlib import Path

from .checkpoint import load_model, load_official


def load(spec, dtype=None):
    """A transformer in eval mode from `spec` (see module docstring), in `dtype` (a name in
    models.dtype.DTYPES; None or "auto": as the checkpoint stores it)."""
    model = _load(spec, dtype)
    if dtype not in (None, "auto"):
        from .dtype import torch_dtype
        model = model.to(torch_dtype(dtype))
    return model


def _load(spec, dtype):
    from ..testbed import EMBEDDED
    if spec in EMBEDDED:
        from ..diffusion.defaults import TESTBED, set_sampling_defaults_
        return set_sampling_defaults_(load_model(EMBEDDED[spec]), TESTBED)
    path = Path(spec)
    if path.is_dir():
        from .family_load import load_family_transformer, transformer_class
        class_name = transformer_class(path)
        if class_name not in (None, "DiTTransformer2DModel"):
            return load_family_transformer(path, class_name, dtype)
        from .diffusers_load import load_diffusers
        return load_diffusers(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        return load_official(path)
    if path.suffix in (".safetensors", ".json") or path.with_suffix(".json").exists():
        return load_model(path)
    raise FileNotFoundError(f"no model at {spec!r}: give 'default', 'deep', a .safetensors/.json pair, "
                            "an official .pt checkpoint or a diffusers folder")
