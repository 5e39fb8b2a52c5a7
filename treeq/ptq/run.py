"""A quantization run folder: the whole state of a quantized model, so it reloads without recomputing.

`treeq quantize --out DIR` writes DIR/state.safetensors (the quantized model's state dict: residual
weights with transforms folded in, transform buffers, branches, static scales per a_bits, GPTQ codes
per w_bits), DIR/bits.json (the bit configuration) and DIR/config.json (the recipe, whole). Loading
rebuilds the empty structure from the recipe and loads the state: no calibration, no GPTQ, and
learned state (a fine-tuned branch) survives. A folder written by `treeq export` holds packed
integer weights instead and loads as the integer model.
"""
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..bits import load_config, save_config
from ..deploy.export import META_FILE, load_exported
from ..deploy.torchao_export import META_FILE as TORCHAO_META_FILE
from ..deploy.torchao_export import load_torchao
from ..io import atomic_write
from ..models.checkpoint import CheckpointError
from ..models.load import load
from .apply import quantization_map, quantize, quantized_structure, set_bits_
from .calibration import load_or_collect
from .recipe import Recipe

STATE_FILE, BITS_FILE, CONFIG_FILE = "state.safetensors", "bits.json", "config.json"
RUN_FORMAT_VERSION = 2


def build(recipe, calibration=None, device="cpu"):
    """(fp_model, quantized_model) made by `recipe` on `device`, collecting (and caching) calibration if
    it needs it."""
    model = load(recipe.model).to(device)
    if calibration is None and recipe.needs_calibration():
        calibration = load_or_collect(model, **recipe.calibration_options())
    return model, quantize(model, recipe.resolve_bits(model), recipe, calibration=calibration)


def save_run(folder, recipe, quantized, **metadata):
    """Write the run folder; config.json goes last, so a folder with one holds a complete run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).unlink(missing_ok=True)
    state = {key: value.detach().cpu().contiguous().clone() for key, value in quantized.state_dict().items()}
    atomic_write(folder / STATE_FILE, lambda p: save_file(state, str(p)))
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
    model = quantized_structure(load(recipe.model), bits, recipe)
    state = _read_state(folder / STATE_FILE)
    try:
        model.load_state_dict(state)
    except (RuntimeError, OSError) as error:
        raise CheckpointError(f"{folder / STATE_FILE} does not fit the recipe's model: "
                              f"{str(error).splitlines()[0]}") from None
    return recipe, set_bits_(model, bits).eval()


def _read_state(path):
    """The run's state dict; a missing, empty or truncated file is a CheckpointError (one line), not a
    SafetensorError traceback (safetensors raises its own error types)."""
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path} (the run folder is incomplete: quantize again)")
    try:
        return load_file(str(path))
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(error).splitlines()[0]}): "
                              "the run folder is damaged; quantize again") from None


def load_quantized(folder):
    """The quantized model in `folder` (run folder or packed export)."""
    return load_run(folder)[1]
