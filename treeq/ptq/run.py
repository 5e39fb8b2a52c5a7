"""A quantization run folder: the whole state of a quantized model, so it reloads without recomputing.

`treeq quantize --out DIR` writes DIR/state.safetensors (or its shards, state_files.py; the quantized model's state dict: residual
weights with transforms folded in, transform buffers, branches, static scales per a_bits, GPTQ codes
per w_bits), DIR/bits.json (the bit configuration) and DIR/config.json (the recipe, whole). Loading
rebuilds the empty structure from the recipe and loads the state: no calibration, no GPTQ, and
learned state (a fine-tuned branch) survives. A folder written by `treeq export` holds packed
integer weights instead and loads as the integer model.
"""
import json
from pathlib import Path

import torch

from ..bits import load_config, save_config, validate_config
from ..deploy.export import META_FILE, load_exported
from ..deploy.torchao_export import META_FILE as TORCHAO_META_FILE
from ..deploy.torchao_export import load_torchao
from ..io import atomic_write
from ..models.checkpoint import CheckpointError
from ..models.family_load import resize_
from ..models.load import load
from .apply import quantization_map, quantize, quantized_structure, set_bits_
from .calibration import expected_rows, load_or_collect, num_rows
from .recipe import Recipe
from .state_files import read_state, write_state

BITS_FILE, CONFIG_FILE = "bits.json", "config.json"
RUN_FORMAT_VERSION = 2


def build(recipe, calibration=None, device="cpu", progress=False):
    """The model `recipe` quantizes, quantized by it in place on `device` (one copy of the weights),
    collecting (and caching) calibration if it needs it."""
    model = resize_(load(recipe.model, recipe.dtype).to(device), recipe.sampling)
    config = recipe.resolve_bits(model)
    validate_config(config, model)
    if progress:
        from ..memory import describe_plan, quantize_plan
        rows = expected_rows(model, recipe) if calibration is None else num_rows(calibration, model)
        print(f"memory plan ({recipe.dtype}, {rows} calibration rows, {device}): "
              + describe_plan(quantize_plan(model, config, recipe, rows)), flush=True)
    if calibration is None and recipe.needs_calibration():
        calibration = load_or_collect(model, **recipe.calibration_options())
    return quantize(model, config, recipe, calibration=calibration, inplace=True, progress=progress)


def save_run(folder, recipe, quantized, **metadata):
    """Write the run folder; config.json goes last, so a folder with one holds a complete run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).unlink(missing_ok=True)
    write_state(folder, quantized.state_dict())
    save_config(quantization_map(quantized), folder / BITS_FILE)
    config = {"format_version": RUN_FORMAT_VERSION, "recipe": recipe.to_dict(), **metadata}
    atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))


def load_run(folder):
    """(recipe, quantized model) of a run folder; (None, deployed model) for a packed or torchao export."""
    folder = Path(folder)
    if (folder / META_FILE).exists():
        return None, load_exported(folder)
    if (folder / TORCHAO_META_FILE).exists():
        return None, load_torchao(folder)
    if not (folder / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{folder} holds no quantization run ({CONFIG_FILE}), packed export ({META_FILE}) "
                                f"or torchao export ({TORCHAO_META_FILE})")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("format_version") != RUN_FORMAT_VERSION:
            raise ValueError(f"format version {config.get('format_version')!r}, this TreeQ reads "
                             f"{RUN_FORMAT_VERSION}: quantize again")
        recipe = Recipe.from_dict(config["recipe"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{folder / CONFIG_FILE}: not a TreeQ run: {error}") from None
    bits = load_config(folder / BITS_FILE)
    model = quantized_structure(load(recipe.model, recipe.dtype), bits, recipe, inplace=True)
    state = read_state(folder)
    try:
        model.load_state_dict(state, assign=True)  # the loaded tensors become the model's: no second copy
    except (RuntimeError, OSError) as error:
        raise CheckpointError(f"{folder}'s state does not fit the recipe's model: "
                              f"{str(error).splitlines()[0]}") from None
    # safetensors and diffusers leave tensors at offsets CPU GEMMs round differently on; one tensor at a time,
    # reallocate them as a model quantized in memory holds them, so a reloaded run computes what it did
    return recipe, set_bits_(model._apply(torch.clone), bits).eval()


def load_quantized(folder):
    """The quantized model in `folder` (run folder or packed export)."""
    return load_run(folder)[1]
