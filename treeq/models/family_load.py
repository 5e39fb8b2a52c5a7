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
from .sizes import SIZE_KEYS, vae_scale

# A component's config file: models (config.json), schedulers, tokenizers, processors
CONFIG_NAMES = ("config.json", "scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json",
                "vocab.json", "spiece.model", "tokenizer.json")


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


def family_of(path):
    """The text-to-image family a model path holds (read from its JSON, nothing loaded), or None (a DiT, a
    file, a name)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    try:
        name = transformer_class(folder)
    except (FileNotFoundError, ValueError):
        return None
    return next((family for family, f in FAMILIES.items() if f.transformer == name), None)


def load_family_transformer(folder, class_name, dtype=None):
    """The diffusers transformer `class_name` from `folder` (pipeline or transformer folder), in eval mode,
    read straight into `dtype` (None or "auto": the dtype its files hold; never a float32 copy first)."""
    from .dtype import resolve_dtype, torch_dtype

    import diffusers

    if class_name not in ADAPTERS or not hasattr(diffusers, class_name):
        supported = ", ".join(sorted(name for name in ADAPTERS if name != "DiT"))
        raise ValueError(f"{folder} holds a {class_name}, not a supported transformer; supported: "
                         f"DiTTransformer2DModel, {supported}")
    folder = Path(folder)
    pipeline_folder = folder if (folder / "model_index.json").exists() else None
    if pipeline_folder:
        _check_components(pipeline_folder)
    settings = read_settings(pipeline_folder) if pipeline_folder else {}  # a broken one is refused before loading
    weights = folder / "transformer" if pipeline_folder else folder
    diffusers.utils.logging.set_verbosity_error()  # what its warnings say, _check_loaded says in one line
    model, info = getattr(diffusers, class_name).from_pretrained(
        weights, output_loading_info=True, dtype=torch_dtype(resolve_dtype(dtype, folder)))
    _check_loaded(weights, info)
    model.eval()
    family = next((name for name, f in FAMILIES.items() if f.transformer == class_name), None)
    if family and not settings:
        settings = FAMILIES[family].folder_sampling(model.config)
    model.source = {"path": str(pipeline_folder) if pipeline_folder else None, "family": ADAPTERS[class_name].family,
                    **_token_counts(model, pipeline_folder, settings)}
    model.sampling = {key: settings[key] for key in ("height", "width", "num_frames", "steps", "cfg_scale",
                                                     "max_sequence_length") if key in settings}
    return model


def resize_(model, sampling):
    """Give a loaded family transformer the run's sizes (the size keys of `sampling` that are set): its sampling
    settings and the token counts its linears see, which the memory plan and the search's cost read."""
    sizes = {key: sampling[key] for key in SIZE_KEYS if sampling.get(key) is not None}
    if not sizes or not getattr(model, "source", {}).get("path"):
        return model
    model.sampling = {**model.sampling, **sizes}
    model.source = {**model.source, **_token_counts(model, Path(model.source["path"]), model.sampling)}
    return model


def _check_components(folder):
    """Every component model_index.json names has its folder with a config, checked before any loading (the
    pipeline would fail on the first missing one, minutes later at real size, without naming it)."""
    for name, entry in _read(folder / "model_index.json").items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        part = folder / name
        if not part.is_dir() or not any((part / config).exists() for config in CONFIG_NAMES):
            raise FileNotFoundError(f"{part}: the {entry[1]} that {folder / 'model_index.json'} names is missing "
                                    f"(a folder with its config); restore it or give a complete pipeline folder")


def _check_loaded(weights, info):
    """Strict loading: every weight in the files has its place in the model its config.json builds, and every
    place its weight (diffusers would leave a missing one random, and drop an unexpected one, with a warning)."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [key if isinstance(key, str) else key[0] for key in info.get(kind) or ()]
        if keys:
            raise ValueError(f"{weights}: the weights do not fit its config.json ({len(keys)} "
                             f"{kind.replace('_', ' ')}, e.g. {keys[0]})")


def _token_counts(model, pipeline_folder, settings):
    """Image and text tokens per sample at the folder's resolution and prompt length (None: the family's default).

    The VAE's spatial compression is sizes.vae_scale's; Wan's VAE compresses time 4x (1 + (frames - 1) / 4
    latent frames, the first frame alone)."""
    if not settings or pipeline_folder is None:
        return {"image_tokens": None, "text_tokens": None}
    vae_config = _read(pipeline_folder / "vae" / "config.json") if (pipeline_folder / "vae").is_dir() else {}
    family = ADAPTERS[type(model).__name__].family
    scale = vae_scale(vae_config)
    patch = model.config.get("patch_size", 1)
    patch = (1, patch, patch) if isinstance(patch, int) else tuple(patch)
    side = (settings["height"] // scale // patch[-2], settings["width"] // scale // patch[-1])
    if family == "flux":  # latents are packed 2x2 into tokens
        side = (side[0] // 2, side[1] // 2)
    frames = 1
    if family == "wan":
        temporal = vae_config.get("scale_factor_temporal", 4)
        frames = ((settings.get("num_frames", 81) - 1) // temporal + 1) // patch[0]
    text = settings.get("max_sequence_length")
    if family == "sd3" and text:
        text += 77  # the CLIP tokens beside T5's
    return {"image_tokens": frames * side[0] * side[1], "text_tokens": text}


def _read(path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
