"""The quantization recipe: one dataclass that says completely how a quantized model is made.

A run folder stores it whole (config.json), the CLI's `quantize` flags are generated from its
fields, and the benchmarks build their rows from it, so there is one place where a setting lives.
"""
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..bits import PRESETS, check_bits, load_config, preset_config
from ..flags import DTYPE_CHOICES, number
from ..methods.registry import METHODS, method_options, parse_methods
from ..quant.activations import CLIPS
from ..quant.linear import ACTIVATION_QUANTIZERS
from ..quant.quantizers import CLIP_METHODS
from ..quant.statistics import BLOCK_INPUTS


def _flag(help, flag=None, valid=None, **argparse):
    """Field metadata for its generated flag; `valid`: the flags.Number of a numeric field (required)."""
    return {"help": help, "flag": flag, "valid": valid, "argparse": argparse}


@dataclass
class Recipe:
    # where the full-precision model comes from: 'default' (the testbed), a TreeQ .safetensors,
    # an official facebookresearch/DiT .pt or a diffusers folder
    model: str = field(default="default", metadata=_flag("the model to quantize"))
    # the dtype the run computes and stores in; "auto": the checkpoint's own (a bf16 checkpoint stays bf16).
    # Scales, Hessians and the search's errors are accumulated in float32 whatever it is.
    dtype: str = field(default="auto", metadata=_flag("float32, bfloat16 or float16; auto: the checkpoint's own",
                                                      choices=DTYPE_CHOICES))
    # a preset or a bit-configuration .json; a run folder keeps the resolved mapping in bits.json
    bits: str = field(default="W4A4", metadata=_flag("W8A8, W6A6, W4A8, W4A4, W3A3 or a bits .json file", "--config"))
    # PTQ steps in order: a transform, then a branch, then a rounding (see methods/registry.py)
    methods: tuple = field(default=("rtn",), metadata=_flag(
        "comma-separated steps, e.g. smooth,lowrank (SVDQuant) or hadamard,gptq; known: " + ", ".join(METHODS),
        "--method"))
    # per-method overrides of the registry's defaults, e.g. {"smooth": {"alpha": 0.6}}; filled in by
    # `resolved()` so a saved recipe shows every option of the methods it uses, and only those
    method_options: dict = field(default_factory=dict)
    # dynamic: per-token symmetric; dynamic-asym: per-token over [min, max]; static: one calibrated
    # per-tensor scale per a_bits
    activations: str = field(default="dynamic", metadata=_flag("activation quantizer", choices=ACTIVATION_QUANTIZERS))
    # how static scales clip: max keeps every calibration input representable, percentile lets the
    # rarest saturate, mse minimises the squared error at each a_bits
    activation_clip: str = field(default="max", metadata=_flag("static scales' clipping", "--clip", choices=CLIPS))
    percentile: float = field(default=99.99, metadata=_flag("clip percentile of |input| (--clip percentile)",
                                                           valid=number(float, 0, 100, low_open=True)))
    weight_symmetric: bool = True  # symmetric weight codes; asymmetric ones use all 2^b levels
    group_size: int | None = field(default=None, metadata=_flag("weight scales per group of inputs (default per channel)",
                                                                valid=number(int, 1)))
    weight_clip: str = field(default="minmax", metadata=_flag("weight clipping", choices=CLIP_METHODS))
    # extra (w_bits, a_bits) pairs whose per-bit state (static scales, GPTQ codes) is prepared, so that
    # set_bits_ may switch to them; a mixed-precision search puts its candidates here
    switch_bits: tuple = ()
    # the calibration set: FP sampling trajectories of this many images, recorded at this many evenly
    # spaced steps (both halves of a guided batch: 2 rows per image and step)
    calibration_images: int = field(default=32, metadata=_flag("images whose sampling trajectories calibrate",
                                                               valid=number(int, 1)))
    calibration_timesteps: int = field(default=10, metadata=_flag("sampling steps recorded per trajectory",
                                                                  valid=number(int, 1)))
    calibration_seed: int = 1234
    # text-to-image families: the prompts of the calibration images, cycled (empty: a built-in list)
    prompts: tuple = ()
    batch_size: int = 16  # rows per calibration forward
    # statistics (GPTQ's Hessians, smoothing's maxima) are collected block by block; a block's inputs come
    # from the full-precision blocks before it, or from those blocks already quantized (GPTQ's order for LLMs)
    block_inputs: str = field(default="fp", metadata=_flag(
        "where block-by-block calibration takes a block's inputs: fp (the full-precision model's) or quantized "
        "(the blocks before it already quantized)", choices=BLOCK_INPUTS))
    # overrides of the model's sampling defaults (sampler, steps, cfg_scale, guidance_channels), used for
    # the calibration trajectories and by `treeq eval --quant`
    sampling: dict = field(default_factory=dict)

    def __post_init__(self):
        self.methods = parse_methods(self.methods)
        if isinstance(self.bits, str) and self.bits not in PRESETS and Path(self.bits).suffix != ".json" \
                and not Path(self.bits).exists():
            raise ValueError(f"bits must be a preset ({', '.join(PRESETS)}) or a .json bit configuration, "
                             f"got {self.bits!r}")
        self.prompts = tuple(self.prompts)
        self.switch_bits = tuple((check_bits(int(w)), check_bits(int(a))) for w, a in self.switch_bits)
        for name, allowed in (("dtype", DTYPE_CHOICES), ("block_inputs", BLOCK_INPUTS),
                              ("activations", ACTIVATION_QUANTIZERS), ("activation_clip", CLIPS),
                              ("weight_clip", CLIP_METHODS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):  # the flags' ranges hold for a recipe read from config.json too
            if f.metadata.get("valid") is not None and getattr(self, f.name) is not None:
                f.metadata["valid"].check(getattr(self, f.name), f.name)
        self.method_options = method_options(self.methods, self.method_options)

    def with_branch(self, branch, **options):
        """This recipe with the branch method `branch` placed after its transform and before its rounding."""
        rounding = [name for name in self.methods if METHODS[name].kind == "rounding"]
        methods = [name for name in self.methods if name not in rounding] + [branch] + rounding
        method_options = {**self.method_options, branch: {**self.method_options.get(branch, {}), **options}}
        return dataclasses.replace(self, methods=methods, method_options=method_options)

    def steps(self):
        """[(name, Method, options)] in the order they run."""
        return [(name, METHODS[name], self.method_options[name]) for name in self.methods]

    def weight_options(self):
        return {"symmetric": self.weight_symmetric, "group_size": self.group_size, "clip": self.weight_clip}

    def needs_calibration(self):
        return self.activations == "static" or any(method.statistic for _, method, _ in self.steps())

    def calibration_options(self):
        prompts = {"prompts": list(self.prompts)} if self.prompts else {}  # absent by default: DiT cache keys stay
        return {"num_images": self.calibration_images, "num_timesteps": self.calibration_timesteps,
                "seed": self.calibration_seed, **prompts, **self.sampling}

    def resolved_dtype(self):
        """This recipe with `dtype` a concrete name (what a run folder records)."""
        from ..models.dtype import resolve_dtype
        return dataclasses.replace(self, dtype=resolve_dtype(self.dtype, self.model))

    def resolve_bits(self, model):
        """The bit configuration `bits` names, as a mapping for `model`."""
        if Path(self.bits).suffix == ".json" or Path(self.bits).exists():
            return load_config(self.bits)
        return preset_config(model, self.bits)

    def to_dict(self):
        data = dataclasses.asdict(self)
        data["methods"], data["switch_bits"] = list(self.methods), [list(pair) for pair in self.switch_bits]
        data["prompts"] = list(self.prompts)
        return data

    @classmethod
    def from_dict(cls, data):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"recipe has unknown fields: {', '.join(unknown)}")
        return cls(**data)

    def save(self, path):
        from ..io import atomic_write
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write(path, lambda p: p.write_text(text))


def add_recipe_arguments(parser):
    """Flags for every recipe field that carries help text, plus `--<method>-<option>` for method options."""
    for f in dataclasses.fields(Recipe):
        if "help" not in f.metadata:
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        numeric = f.type in (int, int | None, float)
        if numeric and f.metadata["valid"] is None:
            raise ValueError(f"recipe field {f.name} has a flag but no valid range")
        kind = f.metadata["valid"] if numeric else str
        default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        parser.add_argument(flag, dest=f.name, type=kind, default=default, help=f.metadata["help"],
                            **f.metadata["argparse"])
    branches = [name for name, method in METHODS.items() if method.kind == "branch"]
    parser.add_argument("--branch", choices=(*branches, "none"), default="none",
                        help="add a full-precision branch after the transform (same as naming it in --method)")
    parser.add_argument("--branch-ratio", type=number(float, 0, 1, low_open=True), default=None,
                        help="the branch's parameters as a share of each layer's (sets --<branch>-ratio)")
    for name, method in METHODS.items():
        for option, value in method.options.items():
            parser.add_argument(f"--{name}-{option.replace('_', '-')}", dest=f"option_{name}_{option}",
                                type=method.bounds[option], default=None, help=f"{name}: {option} (default {value})")


def recipe_from_args(args, **fields):
    """The Recipe the parsed flags describe (method options only for methods in the list)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if hasattr(args, f.name)}
    recipe = Recipe(**{**values, **fields})
    if args.branch != "none":
        recipe = recipe.with_branch(args.branch)
    options = {}
    for name in recipe.methods:
        given = {option: getattr(args, f"option_{name}_{option}") for option in METHODS[name].options}
        if args.branch_ratio is not None and METHODS[name].kind == "branch":
            given["ratio"] = args.branch_ratio
        options[name] = {key: value for key, value in given.items() if value is not None}
    return dataclasses.replace(recipe, method_options=options)
