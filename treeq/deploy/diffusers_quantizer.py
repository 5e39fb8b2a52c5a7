"""TreeQ as a diffusers quantization backend: `from_pretrained(..., quantization_config=TreeQConfig(run=R))`.

    from treeq import TreeQConfig                  # importing it registers "treeq" with diffusers
    transformer = FluxTransformer2DModel.from_pretrained("flux/transformer", quantization_config=TreeQConfig(run="run"))

gives the module `treeq.load_run("run")` gives (same QuantLinears, transforms, branches and per-bit state),
without the model folder the run was made from. A pipeline takes it through
`PipelineQuantizationConfig(quant_mapping={"transformer": TreeQConfig(run=R)})`.

Registration: diffusers looks quantizers up by `quant_method` in two plain dicts of diffusers.quantizers.auto
(AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING); `register_with_diffusers` adds "treeq" to
both, which every lookup (ModelMixin.from_pretrained, PipelineQuantizationConfig's checks) sees; nothing
of diffusers is patched. Its QuantizationMethod enum cannot be extended, and from_pretrained reads
`quant_method.value`, so the config's quant_method is a str enum of our own, equal to "treeq".

Loading order: diffusers loads the checkpoint's FP weights into the unmodified model first, and only then
does the quantizer swap in the run's structure and load its state (load_run's `quantized_structure` +
`load_state_dict`, in place). Swapping before the weights load is not possible as is: diffusers assigns
the checkpoint's tensors one by one to the model's parameters and buffers on the meta device, while a
QuantLinear's per-bit state (GPTQ codes, static scales) lives outside its parameters, read by its
`_load_from_state_dict`, and the transforms and branches need real weights to be built on; the run's state
replaces every tensor the FP checkpoint put in anyway. Before loading, the quantizer only checks that the
run fits the model (layer names and shapes), so a mismatched run fails fast with one ValueError line.

save_pretrained works: the saved folder holds the quantized state dict and, in config.json, the config with
the bits and recipe, so `from_pretrained(saved)` (treeq imported) rebuilds the same model from that folder
alone (pre-quantized: the state comes from its own checkpoint, not from the run).
"""
import json
from enum import Enum
from pathlib import Path

import torch
from diffusers.models.model_loading_utils import load_state_dict as load_checkpoint
from diffusers.quantizers import auto as _auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from ..bits import validate_config
from ..models.dtype import torch_dtype as torch_dtype_of
from ..ptq.apply import quantized_structure, set_bits_
from ..ptq.recipe import Recipe
from ..ptq.state_files import read_state, state_shapes

QUANT_METHOD = "treeq"
# State a QuantLinear holds beside a linear's weight and bias (in a saved TreeQ model, not in the FP model).
_QUANT_LINEAR_STATE = ("input_transform", "branch", "rounded_weights", "act_scales", "step_gain")


class TreeQMethod(str, Enum):
    """diffusers' QuantizationMethod for TreeQ (that enum is closed; a str enum compares and hashes as "treeq")."""
    TREEQ = QUANT_METHOD


class TreeQConfig(QuantizationConfigMixin):
    """A TreeQ run to load a diffusers transformer as: `TreeQConfig(run="path/to/run")`.

    `run`: a folder written by `treeq quantize --out` / `treeq finetune` (or `treeq.ptq.run.save_run`); its
    bits.json and recipe are read now, its state.safetensors when the model loads. `bits` and `recipe`
    (a recipe dict) stand in for the run's files when a saved model's config.json restores the config.
    """

    def __init__(self, run=None, bits=None, recipe=None, **kwargs):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"TreeQConfig got unknown arguments: {', '.join(sorted(kwargs))}")
        self.quant_method = TreeQMethod.TREEQ
        self.run = None if run is None else str(run)
        if bits is None or recipe is None:
            if run is None:
                raise ValueError("TreeQConfig needs a run folder: TreeQConfig(run='path/to/run')")
            bits, recipe = _read_run(Path(run))
        Recipe.from_dict(recipe)  # a malformed recipe fails here, not halfway through loading
        self.bits, self.recipe = bits, recipe

    def to_dict(self):
        return {"quant_method": QUANT_METHOD, "run": self.run, "bits": self.bits, "recipe": self.recipe}

    def to_json_string(self, use_diff=True):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self):  # the mixin's goes through a to_diff_dict only BitsAndBytesConfig defines
        return (f"TreeQConfig(run={self.run!r}, {len(self.bits)} quantized layers, "
                f"methods={','.join(self.recipe.get('methods', ())) or 'none'})")


class TreeQQuantizer(DiffusersQuantizer):
    """Loads a TreeQ run into the diffusers transformer being built (see the module docstring for the order)."""

    requires_calibration = False  # a run is calibrated already; nothing is computed while loading
    use_keep_in_fp32_modules = False  # the run's state holds every tensor at the dtype it was quantized in

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files = None

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and len({str(device) for device in device_map.values()}) > 1:
            raise ValueError("TreeQ loads the transformer whole onto one device; give device_map=None or one device")

    def update_torch_dtype(self, torch_dtype):
        """The run's own dtype: its state is loaded as saved, never cast (a cast would change its codes' scales)."""
        name = self.quantization_config.recipe.get("dtype", "float32")
        run_dtype = torch_dtype_of(name if name != "auto" else "float32")
        if torch_dtype not in (None, run_dtype):
            raise ValueError(f"this TreeQ run holds {name} state; load it with torch_dtype=None or {run_dtype}, "
                             f"not {torch_dtype}")
        return run_dtype

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        """Remember the checkpoint (a saved TreeQ model's state is read from it after loading); its
        QuantLinear state is not the FP model's, so it is not counted as unused weights."""
        self.checkpoint_files = list(checkpoint_files or [])
        if not self.pre_quantized:
            return loaded_keys
        layers = set(self.quantization_config.bits)
        return [key for key in loaded_keys if not _quant_linear_state(key, layers)]

    def _process_model_before_weight_loading(self, model, **kwargs):
        """Check that the run fits the model (on the meta device: names and shapes only)."""
        config = self.quantization_config
        name = type(model).__name__
        try:
            validate_config(config.bits, model)
        except ValueError as error:  # unknown layer names, or a transformer TreeQ does not support
            raise ValueError(f"TreeQ run {config.run or ''} does not fit this {name}: "
                             f"{str(error).splitlines()[0]}") from None
        if not self.pre_quantized:
            _check_shapes(model, config.run)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Swap in the run's structure and load its state: the model `treeq.load_run` gives."""
        config = self.quantization_config
        device = next(model.parameters()).device
        if self.pre_quantized:
            state = {}
            for path in self.checkpoint_files or []:
                state.update(load_checkpoint(path, map_location=str(device)))
        else:
            state = read_state(config.run, device)
        # diffusers leaves tensors at unaligned offsets of the storage it loaded; load_run's deep copy
        # reallocates them, and CPU GEMMs round differently on unaligned memory: reallocate alike.
        model._apply(torch.clone)
        quantized_structure(model, config.bits, Recipe.from_dict(config.recipe), inplace=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:  # "Error(s) in loading state_dict for ...:", then the first problem
            lines = str(error).splitlines()
            raise ValueError(f"TreeQ state {config.run or ''} does not fit this {type(model).__name__}: "
                             f"{lines[min(1, len(lines) - 1)].strip()}") from None
        return set_bits_(model, config.bits).eval()

    @property
    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False  # fine-tune a TreeQ model with `treeq finetune`, not through diffusers' training paths

    @property
    def supports_safetensors_serialization(self):
        return True


def register_with_diffusers():
    """Add "treeq" to diffusers' quantizer and config mappings (idempotent); returns the method name."""
    _auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = TreeQQuantizer
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = TreeQConfig
    return QUANT_METHOD


def _quant_linear_state(key, layers):
    """Whether `key` is a QuantLinear's own state (a transform, branch, codes, scales) of one of `layers`."""
    parts = key.split(".")
    return any(part in _QUANT_LINEAR_STATE and ".".join(parts[:index]) in layers
               for index, part in enumerate(parts) if index)


def _read_run(folder):
    """(bits, recipe dict) of a run folder, each problem one ValueError line."""
    from ..bits import load_config
    from ..ptq.run import RUN_FORMAT_VERSION
    from .export import META_FILE

    if (folder / META_FILE).exists():
        raise ValueError(f"{folder} is a packed integer export; diffusers loads a quantization run "
                         "(treeq quantize --out); load the export with treeq.load_run")
    if not (folder / "config.json").exists() or not (folder / "bits.json").exists():
        raise ValueError(f"{folder} holds no TreeQ run (config.json and bits.json of `treeq quantize --out`)")
    try:
        config = json.loads((folder / "config.json").read_text())
        recipe = config["recipe"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{folder / 'config.json'}: not a TreeQ run: {error}") from None
    if config.get("format_version") != RUN_FORMAT_VERSION:
        raise ValueError(f"{folder}: run format version {config.get('format_version')!r}, this TreeQ reads "
                         f"{RUN_FORMAT_VERSION}: quantize again")
    return load_config(folder / "bits.json"), recipe


def _check_shapes(model, run):
    """Every tensor of the FP model must be in the run's state at the same shape (read off the files' headers)."""
    shapes = state_shapes(run)
    name = type(model).__name__
    for key, tensor in model.state_dict().items():
        if key not in shapes:
            raise ValueError(f"TreeQ run {run} does not fit this {name}: its state has no {key} "
                             "(a run of another model?)")
        if shapes[key] != tuple(tensor.shape):
            raise ValueError(f"TreeQ run {run} does not fit this {name}: {key} is {shapes[key]} in the run, "
                             f"{tuple(tensor.shape)} in the model (a run of another size?)")


register_with_diffusers()
