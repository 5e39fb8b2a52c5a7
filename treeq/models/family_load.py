"""Loading a diffusers transformer of any supported family in place, from a pipeline or transformer folder.

The transformer stays the diffusers module (the family's pipeline runs it unchanged); `model.source`
records the pipeline folder (calibration and sampling run through it) and the token counts its
linears see per sample, and `model.sampling` the folder's sampling settings (treeq.json, else the
family's published defaults). Our DiT and diffusers DiT folders load through models.load as before.
"""
import json
from pathlib import Path

from .adapters import ADAPTERS
from .families import FAMILIES, read_settings


def transformer_class(folder):
    """The transformer class a diffusers folder holds (pipeline: model_index.json; transformer: config.json)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.exists():
        entry = _read(index).get("transformer")
        if not entry or entry[1] is None or not (folder / "transformer").is_dir():
            raise FileNotFoundError(f"pipeline folder {folder} has no transformer (model_index.json names none, "
                                    "or transformer/ is missing)")
        return entry[1]
    config = folder / "config.json"
    if config.exists():
        return _read(config).get("_class_name")
    return None


def load_family_transformer(folder, class_name):
    """The diffusers transformer `class_name` from `folder` (pipeline or transformer folder), in eval mode."""
    import diffusers

    if class_name not in ADAPTERS or not hasattr(diffusers, class_name):
        supported = ", ".join(sorted(name for name in ADAPTERS if name != "DiT"))
        raise ValueError(f"{folder} holds a {class_name}, not a supported transformer; supported: "
                         f"DiTTransformer2DModel, {supported}")
    folder = Path(folder)
    pipeline_folder = folder if (folder / "model_index.json").exists() else None
    weights = folder / "transformer" if pipeline_folder else folder
    model = getattr(diffusers, class_name).from_pretrained(weights).eval()
    settings = read_settings(pipeline_folder) if pipeline_folder else {}
    family = next((name for name, f in FAMILIES.items() if f.transformer == class_name), None)
    if family and not settings:
        settings = dict(FAMILIES[family].full_sampling)
    model.source = {"path": str(pipeline_folder) if pipeline_folder else None, "family": ADAPTERS[class_name].family,
                    **_token_counts(model, pipeline_folder, settings)}
    model.sampling = {key: settings[key] for key in ("height", "width", "steps", "cfg_scale", "max_sequence_length")
                      if key in settings}
    return model


def _token_counts(model, pipeline_folder, settings):
    """Image and text tokens per sample at the folder's resolution and prompt length (None: the family's default)."""
    if not settings or pipeline_folder is None:
        return {"image_tokens": None, "text_tokens": None}
    vae_config = _read(pipeline_folder / "vae" / "config.json") if (pipeline_folder / "vae").is_dir() else {}
    scale = 2 ** (len(vae_config.get("block_out_channels", (0,) * 4)) - 1)
    patch = model.config.get("patch_size", 1)
    patch = patch if isinstance(patch, int) else patch[-1]
    side = (settings["height"] // scale // patch, settings["width"] // scale // patch)
    family = ADAPTERS[type(model).__name__].family
    if family == "flux":  # latents are packed 2x2 into tokens
        side = (side[0] // 2, side[1] // 2)
    text = settings.get("max_sequence_length")
    if family == "sd3" and text:
        text += 77  # the CLIP tokens beside T5's
    return {"image_tokens": side[0] * side[1], "text_tokens": text}


def _read(path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
