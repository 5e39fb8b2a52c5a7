"""Reading diffusers folders: a DiT pipeline (model_index.json beside transformer/, vae/, scheduler/),
a transformer folder or a weights file, stored whole, sharded (`*.index.json`) or as a variant (`*.fp16.*`).

The DiT converts to ours (treeq.models.diffusers_convert). A pipeline's scheduler becomes the
model's sampling defaults; its VAE folder and `id2label` travel on `model.source`. Never downloads.
"""
import json
import re
from pathlib import Path

from safetensors.torch import load_file

from ..diffusion.defaults import OFFICIAL, pipeline_defaults, set_sampling_defaults_
from .checkpoint import CheckpointError, build_loaded, read_torch_checkpoint
from .diffusers_convert import config_from_diffusers, convert_diffusers_state_dict, embedders_differ

_SINGLE = re.compile(r"diffusion_pytorch_model(?:\.(?P<variant>\w+))?\.(?P<format>safetensors|bin)$")
_INDEX = re.compile(r"diffusion_pytorch_model\.(?P<format>safetensors|bin)\.index(?:\.(?P<variant>\w+))?\.json$")


def find_weights(folder, variant=None):
    """(files, variant) of the weights in a diffusers model folder: the plain files first, else the
    variant asked for or the only one present; safetensors before .bin; an index names its shards."""
    folder = Path(folder)
    found = {}  # (variant, format) -> single file or index
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _SINGLE.match(path.name) or _INDEX.match(path.name)
        if match:
            found.setdefault((match["variant"], match["format"]), []).append(path)
    variants = sorted({v for v, _ in found}, key=lambda v: (v is not None, v or ""))
    if variant is not None:
        variants = [v for v in variants if v == variant]
    if not variants:
        wanted = f"variant {variant!r} of " if variant else ""
        raise FileNotFoundError(f"no diffusers weights in {folder}: looked for {wanted}"
                                "diffusion_pytorch_model[.VARIANT].safetensors/.bin or their .index.json")
    if variant is None and variants[0] is not None and len(variants) > 1:
        raise ValueError(f"{folder} holds several weight variants ({', '.join(variants)}) and no plain files; "
                         "pass variant=... to choose one")
    chosen = variants[0]
    paths = found.get((chosen, "safetensors")) or found[(chosen, "bin")]
    single = [p for p in paths if _SINGLE.match(p.name)]
    if single:
        return single, chosen
    return _shards(paths[0]), chosen


def _shards(index_path):
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_path} is not a weights index (no weight_map): {error}") from None
    shards = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    missing = [str(shard) for shard in shards if not shard.exists()]
    if missing:
        raise FileNotFoundError(f"{index_path} names shards that are missing: {', '.join(missing[:4])}")
    return shards


def read_weights(files):
    """One state dict from one or more safetensors / .bin files (the shards of one model)."""
    state = {}
    for path in files:
        path = Path(path)
        if path.suffix == ".safetensors":
            try:
                part = load_file(str(path))
            except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
                raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
        else:
            part = read_torch_checkpoint(path)
        overlap = set(part) & set(state)
        if overlap:
            raise CheckpointError(f"{path} repeats keys of another shard: {', '.join(sorted(overlap)[:4])}")
        state.update(part)
    return state


def read_json(path):
    """A JSON object from `path`; CheckpointError if it is not one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not a JSON config: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def read_pipeline(folder):
    """{"transformer", "vae", "scheduler": folder or None, "id2label": dict or None} of a pipeline folder."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").exists() else {}
    parts = {name: folder / name if (folder / name).is_dir() else None for name in ("transformer", "vae", "scheduler")}
    for name in ("transformer", "vae", "scheduler"):
        if name in index and parts[name] is None:
            raise FileNotFoundError(f"{folder}/model_index.json names a {name} but {folder / name} is missing")
    id2label = index.get("id2label")
    if id2label is not None:
        id2label = {int(key): value for key, value in id2label.items()}
    return {**parts, "id2label": id2label}


def _locate(path, config_path, variant):
    """(weight files, config.json, pipeline parts) for a pipeline folder, a transformer folder or a file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    pipeline = {"vae": None, "scheduler": None, "id2label": None}
    if path.is_dir():
        if (path / "transformer").is_dir() or (path / "model_index.json").exists():
            pipeline = read_pipeline(path)
            if pipeline["transformer"] is None:
                raise FileNotFoundError(f"pipeline folder {path} has no transformer/ folder")
            path = pipeline["transformer"]
        files, _ = find_weights(path, variant)
        default_config = path / "config.json"
    else:
        files, default_config = [path], path.parent / "config.json"
    config_path = Path(config_path) if config_path is not None else default_config
    if not config_path.exists():
        raise FileNotFoundError(f"no such file: {config_path}")
    return files, config_path, pipeline


def load_diffusers(path, config_path=None, variant=None):
    """Our DiT (eval mode) from diffusers DiT weights, with the sampling defaults of its source.

    `path` is a pipeline folder (its scheduler, VAE folder and id2label come along), a transformer
    folder (config.json + weights, whole or sharded, plain or a variant such as fp16) or a weights
    file whose config.json lies beside it unless `config_path` says where. A DiT whose blocks learned
    their own embedders (trained natively in diffusers) loads with per-block embedders. A bare
    transformer samples with the official DiT settings; a pipeline with its own scheduler.
    Never downloads: fetch Hub repositories yourself and pass the local folder.
    """
    files, config_path, pipeline = _locate(path, config_path, variant)
    config = config_from_diffusers(read_json(config_path))
    state = read_weights(files)
    config.per_block_embedders = embedders_differ(state, config.depth)
    model = build_loaded(config, convert_diffusers_state_dict(state, config), files[0])
    if pipeline["scheduler"] is not None:
        set_sampling_defaults_(model, pipeline_defaults(read_json(pipeline["scheduler"] / "scheduler_config.json")))
    else:
        set_sampling_defaults_(model, OFFICIAL)
    model.source = {"path": str(path), "vae": None if pipeline["vae"] is None else str(pipeline["vae"]),
                    "id2label": pipeline["id2label"]}
    return model
