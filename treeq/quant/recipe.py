"""A quantization run folder: the recipe that rebuilds a fake-quant model, or a packed export.

`treeq quantize --out DIR` writes DIR/config.json (model, method, options, calibration
settings) and DIR/bits.json (the bit configuration). Rebuilding from them is
deterministic: the calibration set is seeded and cached. A folder written by
`treeq export` holds packed integer weights instead and loads as the integer model.
"""
import json
from pathlib import Path

from ..io import atomic_write
from ..bits import load_config, preset_config, save_config
from ..models.load import load
from .apply import CALIBRATED_METHODS, calibrate_activations_, quantize
from .calibration import load_or_collect
from .export import META_FILE, load_exported



def resolve_config(model, config):
    """A preset name (W4A4, ...) or a path to a bit-configuration JSON file, as a mapping."""
    if Path(config).suffix == ".json" or Path(config).exists():
        return load_config(config)
    return preset_config(model, config)


def build(model_spec, config, method, options=None, calibration_options=None, activations="dynamic"):
    """(fp_model, quantized_model) from a model spec, a preset or bits file, and a method.

    activations: "dynamic" (per-token scales at run time) or "static" (per-tensor scales from calibration).
    """
    if activations not in ("dynamic", "static"):
        raise ValueError(f"activations must be 'dynamic' or 'static', got {activations!r}")
    model = load(model_spec)
    bits = resolve_config(model, config) if isinstance(config, str) else config
    calibration = None
    if method in CALIBRATED_METHODS or activations == "static":
        calibration = load_or_collect(model, **(calibration_options or {}))
    quantized = quantize(model, bits, method=method, calibration=calibration, **(options or {}))
    if activations == "static":
        calibrate_activations_(quantized, calibration)
    return model, quantized


def save_recipe(out, model_spec, bits, method, options, calibration_options, activations="dynamic"):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(bits, out / "bits.json")
    recipe = {"model": str(model_spec), "method": method, "options": options, "activations": activations,
              "calibration": calibration_options}
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(recipe, indent=2, sort_keys=True)))


def load_quantized(folder):
    """The quantized model in `folder`: integer model for a packed export, else rebuilt fake-quant."""
    folder = Path(folder)
    if (folder / META_FILE).exists():
        return load_exported(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no quantization run (config.json) or packed export ({META_FILE})")
    recipe = json.loads((folder / "config.json").read_text())
    return build(recipe["model"], load_config(folder / "bits.json"), recipe["method"],
                 recipe["options"], recipe["calibration"], recipe.get("activations", "dynamic"))[1]
