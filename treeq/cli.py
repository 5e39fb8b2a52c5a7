"""The `treeq` command line: train, sample, eval, info, init, quantize, export, bench and demo.

Every command is `main(argv) -> exit code`, so tests call it in-process. Expected
failures (bad paths, wrong checkpoints, impossible settings) print one line on
stderr and exit 2, never a traceback.
"""
import argparse
import json
import os
import shlex
import sys
from dataclasses import fields, replace
from pathlib import Path

# OpenMP threads that spin while waiting collapse when the cores are shared: a deployed W8A8 layer
# on 2 threads beside other busy processes took 112 ms spinning against 44 ms sleeping
# (scripts/thread_policy.py, docs/RESULTS.md). Read when torch loads OpenMP, so set before any import
# of torch; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .flags import add_dataclass_arguments, number  # noqa: E402  (light: no torch)
from .flags import DTYPE_CHOICES  # noqa: E402  (light: no torch)
from .models.sizes import SIZE_KEYS  # noqa: E402  (light: no torch)
from .search.pareto import BUDGET_WINDOW  # noqa: E402  (light: no torch)
from .search.readouts import DEFAULT_READOUT, READOUTS  # noqa: E402  (light: no torch)

# Shared ranges of flags that several commands take (docs/CLI-FLAGS.md lists every one).
COUNT = number(int, 1)          # images, steps, sizes: at least one
SEED = number(int, 0)           # per-sample seeds hash (seed, index): non-negative
DIT_EVAL_SAMPLES, FAMILY_EVAL_SAMPLES = 500, 16  # `eval`'s sample counts by default (family: pipeline samples)
STEPS = number(int, 1, 1000)    # sampling steps within the 1000 training timesteps
CFG = number(float, 0)          # 0 samples unconditionally, 1 unguided, above 1 guides (docs/DESIGN.md)


def _load(args):
    """The model named by --model in --dtype, or the quantized model in --quant (in the dtype it was made in)."""
    dtype = getattr(args, "dtype", "auto")
    if getattr(args, "quant", None):
        from .ptq.run import load_quantized
        from .models.dtype import dtype_name
        model = load_quantized(args.quant)
        held = dtype_name(next(model.parameters()).dtype)
        if dtype not in ("auto", held):
            raise ValueError(f"{args.quant} holds a {held} run: it samples as it was quantized (omit --dtype, or "
                             f"quantize again with --dtype {dtype})")
        return model
    from .models.load import load
    return load(args.model, dtype)


def _env_bits():
    """ENG's environment bits: a supported bit-width (2..8 quantized, 16 or 32 full precision)."""
    from .bits import SUPPORTED_BITS
    return number(int, min(SUPPORTED_BITS), max(SUPPORTED_BITS), allowed=SUPPORTED_BITS)


def _workers(text):
    """--workers: "auto" or a count of processes (at least 1)."""
    return text if text == "auto" else COUNT(text)


def _add_workers(parser):
    parser.add_argument("--workers", type=_workers, default="auto",
                        help="CPU: processes that score the search's candidates, one thread each (auto: one per "
                             "thread torch uses, up to 8, as memory allows; 1: this process's threads); on GPUs "
                             "use torchrun")


def _sampling_overrides(args):
    """The sampling flags given on the command line; the model's defaults fill the rest."""
    keys = ("sampler", "steps", "cfg_scale", "guidance_channels", "clip_sample", *SIZE_KEYS)
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "scheduler", None):
        from .models.diffusers_load import read_json
        overrides.update(sampler="pipeline", scheduler=read_json(args.scheduler))
    return overrides


def _print(result, as_json):
    if as_json:
        print(json.dumps(result, indent=None if isinstance(result, dict) else 1))
    elif isinstance(result, dict):
        for key, value in result.items():
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    else:
        from .bench.table import format_table
        print(format_table(result))


def cmd_train(args):
    from .testbed.data import mnist
    from .diffusion.train import TrainConfig, train

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    images, labels = mnist("train")
    train(config, images, labels, args.out, resume=args.resume)
    print(f"wrote {args.out}/model.safetensors and {args.out}/model.json")
    return 0


def cmd_sample(args):
    from .diffusion.defaults import resolve_sampling
    from .distributed import setup, teardown
    from .eval.sample_folder import latent_decoder, resolve_classes, sample_to_folder
    from .models.dtype import dtype_name

    model = _load(args)
    from .diffusion.pipelines import is_pipeline_model
    if is_pipeline_model(model):
        return _sample_family(model, args)
    rank, world_size, device = setup(args.device)
    try:
        if args.prompts:
            raise ValueError(f"--prompts condition text-to-image families; {type(model).__name__} is class-conditional "
                             "(give --classes)")
        model = model.to(device)
        vae, vae_path = latent_decoder(model, args.vae, device)
        settings = resolve_sampling(model, **_sampling_overrides(args))
        classes = resolve_classes(args.classes, model.config.num_classes,
                                  getattr(model, "source", {}).get("id2label"))
        record = {"model": args.model, "quant": args.quant, "vae": vae_path, "device": args.device,
                  "dtype": dtype_name(next(model.parameters()).dtype)}
        done = sample_to_folder(model, args.out, num_samples=args.num_samples, settings=settings, seed=args.seed,
                                batch_size=args.batch_size, vae=vae, classes=classes, record=record, rank=rank,
                                world_size=world_size, progress=not args.quiet)
    finally:
        teardown()
    if rank == 0:
        from .memory import describe_peak_memory
        rate = done["written"] / done["seconds"] if done["seconds"] > 0 else float("nan")
        print(f"{args.num_samples} samples ({done['written']} drawn now by rank 0, {rate:.2f} images/s) "
              f"-> {args.out}/samples.npz, {args.out}/grid.png, {args.out}/sampling.json; {describe_peak_memory()}")
    return 0


def _sample_family(model, args):
    """`treeq sample` of a text-to-image family: its own pipeline, prompts from --prompts or a built-in list."""
    from .memory import describe_peak_memory
    from .eval.sample_folder import sample_family_to_folder

    if args.classes or args.sampler or args.scheduler or args.guidance_channels is not None:
        raise ValueError(f"{type(model).__name__} samples through its own pipeline: --classes, --sampler, "
                         "--scheduler and --guidance-channels do not apply (give --prompts, --steps, --cfg-scale)")
    done = sample_family_to_folder(model.to(args.device or "cpu"), args.out, num_samples=args.num_samples,
                                   seed=args.seed, batch_size=args.batch_size, prompts=_prompts(args),
                                   record={"model": args.model, "quant": args.quant}, steps=args.steps,
                                   cfg_scale=args.cfg_scale, **{key: getattr(args, key) for key in SIZE_KEYS})
    videos = f"{args.out}/videos.npz (every frame; samples.npz: middle frames), " if done.get("videos") else ""
    print(f"{args.num_samples} samples in {done['seconds']:.1f} s -> {videos}{args.out}/samples.npz, "
          f"{args.out}/grid.png, {args.out}/sampling.json; {describe_peak_memory()}")
    return 0


def _prompts(args):
    """The prompts of --prompts FILE (one a line), or None for the built-in list."""
    if not getattr(args, "prompts", None):
        return None
    from .diffusion.pipelines import read_prompts
    return read_prompts(args.prompts)


def cmd_eval(args):
    if args.samples:
        from .eval.inception import evaluate_folder
        _print(evaluate_folder(args.samples, args.inception_weights, args.reference), args.json)
        return 0
    from .testbed.experiment import generate, sample_and_measure
    from .models.load import load

    overrides = _sampling_overrides(args)
    fp_images = None
    if args.quant:  # fidelity to full precision: the recipe's FP model with identical seeds
        from .ptq.run import load_run
        recipe, model = load_run(args.quant)
        if recipe is not None:
            overrides = {**recipe.sampling, **overrides}
        fp_model = load(recipe.model, recipe.dtype) if recipe is not None else load(args.model)
    else:
        if _family_of(args.model):
            raise ValueError(f"`treeq eval` of a {_family_of(args.model)} model measures a quantized run against its "
                             "FP transformer: give --quant RUN")
        model = load(args.model)
    from .diffusion.pipelines import is_pipeline_model
    if is_pipeline_model(model):
        if not args.quant:
            raise ValueError(f"`treeq eval` of a {type(model).__name__} measures a quantized run against its FP "
                             "transformer: give --quant RUN")
        from .eval.fidelity import family_fidelity
        # the run's own steps, guidance and prompts unless a flag overrides them, as the DiT path does
        recorded = {key: overrides.get(key) for key in ("steps", "cfg_scale")}
        recorded.update({key: overrides[key] for key in SIZE_KEYS if overrides.get(key) is not None})
        prompts = _prompts(args) or (list(recipe.prompts) if recipe is not None and recipe.prompts else None)
        _print(family_fidelity(model, fp_model, args.num_samples or FAMILY_EVAL_SAMPLES, args.seed, prompts,
                               **recorded), args.json)
        return 0
    if model.config.in_channels not in (1, 3) or model.config.input_size != 32:
        raise ValueError("`treeq eval --model` measures testbed-sized digits; for this model run `treeq sample "
                         "--out S`, then `treeq eval --samples S --inception-weights W --reference REF.npz`")
    num_samples = args.num_samples or DIT_EVAL_SAMPLES
    _check_measured(num_samples)
    if args.quant:
        fp_images = generate(fp_model, num_samples, args.seed, **overrides)[0]
    metrics, _, _ = sample_and_measure(model, num_samples, args.seed, fp_images, **overrides)
    _print(metrics, args.json)
    return 0


def cmd_init(args):
    if args.family:
        return _init_family(args)
    if args.size is None:
        raise ValueError("give --size (a model name such as DiT-XL/2, or 'vae'), or --family F --size tiny|full")
    from .models.init import init_checkpoint

    written = init_checkpoint(args.size, args.out, format=args.format, seed=args.seed,
                              input_size=args.input_size, num_classes=args.num_classes, depth=args.depth,
                              hidden_size=args.hidden_size, num_heads=args.num_heads,
                              vae_channels=args.vae_channels)
    from .models.init import format_for
    kind = "AutoencoderKL" if args.size == "vae" else f"{args.size} ({args.format or format_for(args.out)})"
    print(f"random {kind} -> {written}")
    return 0


def _init_family(args):
    """`init --family F --size tiny|full`: a random diffusers pipeline folder of a transformer family."""
    size = args.size or "tiny"
    if size not in ("tiny", "full"):
        raise ValueError(f"--family takes --size tiny or full, got {size!r}")
    if args.family == "dit":  # our DiT's diffusers form: DiT-XL/2's layout, 2 blocks of width 64 when tiny
        from .models.init import init_checkpoint
        shape = {"depth": 2, "hidden_size": 64, "num_heads": 4, "input_size": 8} if size == "tiny" else {}
        written = init_checkpoint("DiT-XL/2", args.out, format="diffusers", seed=args.seed,
                                  vae_channels="8,8" if size == "tiny" else args.vae_channels, **shape)
    else:
        from .models.families import init_pipeline_folder
        written = init_pipeline_folder(args.family, args.out, size=size, seed=args.seed)
    print(f"random {args.family} pipeline ({size}) -> {written}")
    return 0


def cmd_info(args):
    from .bits import layer_macs, layer_overhead_macs, quantizable_layers
    from .diffusion.defaults import sampling_defaults

    model = _load(args)
    macs, overhead = layer_macs(model), layer_overhead_macs(model)
    layers = {name: model.get_submodule(name) for name in quantizable_layers(model)}
    params = sum(p.numel() for p in model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    from .models.adapters import adapter_for
    info = {"family": adapter_for(model).family, "config": adapter_for(model).describe(model),
            "sampling": sampling_defaults(model),
            "source": getattr(model, "source", None), "parameters": params, "state_mb": state_bytes / 2 ** 20,
            "quantizable_layers": len(layers), "macs_per_image": sum(macs.values()),
            "overhead_macs_per_image": sum(overhead.values()),
            "layers": [{"name": name, "shape": [layer.out_features, layer.in_features], "macs": macs[name],
                        "overhead_macs": overhead[name], "w_bits": getattr(layer, "w_bits", 32),
                        "a_bits": getattr(layer, "a_bits", 32)}
                       for name, layer in layers.items()]}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"parameters {params:,} ({info['state_mb']:.2f} MB held); {len(layers)} quantizable linears; "
          f"{info['macs_per_image'] / 1e6:.1f} M GEMM MACs per image + {info['overhead_macs_per_image'] / 1e6:.2f} M "
          "in transforms and branches")
    shown = {k: v for k, v in info["sampling"].items() if k != "scheduler"}
    scheduler = info["sampling"].get("scheduler")
    print(f"sampling defaults: {shown}" + (f" with {scheduler['_class_name']}" if scheduler else ""))
    for row in info["layers"]:
        print(f"  {row['name']:<28} {str(tuple(row['shape'])):<14} W{row['w_bits']}A{row['a_bits']:<3} "
              f"{row['macs'] / 1e6:8.3f} M MACs  +{row['overhead_macs'] / 1e6:.3f} M")
    return 0

def cmd_quantize(args):
    from .bits import average_bits
    from .distributed import check_device
    from .memory import describe_peak_memory
    from .models.dtype import check_device_dtype
    from .ptq.apply import quantization_map
    from .ptq.recipe import recipe_from_args
    from .ptq.run import build, save_run

    recipe = recipe_from_args(args, sampling=_sampling_overrides(args), prompts=tuple(_prompts(args) or ()))
    recipe = recipe.resolved_dtype()
    device = check_device(args.device)
    check_device_dtype(recipe.dtype, device)
    if args.target:  # TreeQ in one command: search the bits with this recipe (its branch attached), then quantize
        from .search.run import run_search
        if args.bits != "W4A4":
            raise ValueError(f"give either --target (search the bits) or --config {args.bits}, not both")
        bits = Path(args.out) / "search" / "bits.json"
        run_search(recipe, args.target, args.search, out=bits, env_bits=args.env_bits, queue_size=args.queue_size,
                   device=device, seed_ilp=args.seed_ilp, max_cost=args.max_cost, workers=args.workers)
        recipe = replace(recipe, bits=str(bits))
    quantized = build(recipe, device=device, progress=True)
    bits = quantization_map(quantized)
    save_run(args.out, recipe, quantized)
    print(f"{len(bits)} layers quantized with {','.join(recipe.methods)} ({recipe.activations} activations, "
          f"{recipe.dtype}); average bits (BOPs) {average_bits(bits, quantized):.2f}; run in {args.out}/ "
          f"(use --quant {args.out}); " + describe_peak_memory())
    return 0


def cmd_finetune(args):
    from .testbed.data import mnist
    from .diffusion.pipelines import is_pipeline_model
    from .finetune.distill import FinetuneConfig, finetune_, summary
    from .models.load import load
    from .ptq.calibration import load_or_collect
    from .ptq.run import load_run, save_run

    recipe, student = load_run(args.quant)
    if recipe is None:
        raise ValueError(f"{args.quant} is an export (packed or torchao), not a run: fine-tune the run folder it "
                         "was exported from")
    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    teacher = load(recipe.model, recipe.dtype)
    if is_pipeline_model(teacher):  # a text-to-image family learns on the inputs its pipeline recorded
        if config.label_dropout != FinetuneConfig.label_dropout:
            raise ValueError(f"--label-dropout drops class labels; {type(teacher).__name__} is conditioned on text "
                             "and learns on its recorded calibration inputs")
        images, labels = load_or_collect(teacher, **recipe.calibration_options()), None
    else:
        images, labels = mnist("train")
    losses = finetune_(student, teacher, images, labels, config, args.out, resume=args.resume)
    save_run(args.out, recipe, student, finetune=summary(losses, config), finetuned_from=str(args.quant))
    print(f"fine-tuned {config.steps} steps: distillation loss {summary(losses, config)['first_loss']:.4g} -> "
          f"{summary(losses, config)['final_loss']:.4g}; run in {args.out}/")
    return 0


def cmd_export(args):
    from .ptq.run import load_quantized

    if args.format == "packed" and args.activation_bits != "run":
        raise ValueError("--activation-bits is the torchao export's; the packed export keeps the run's bits")
    family = _family_of_run(args.quant)
    if family and args.format == "packed":
        raise ValueError(f"{args.quant} is a {family} run: the packed export holds our DiT only; export it with "
                         "--format torchao, or deploy the run folder as it is (treeq.load_run, or diffusers' "
                         "from_pretrained with TreeQConfig)")
    _one_export_per_folder(args)
    model = load_quantized(args.quant)
    if args.format == "torchao":
        from .deploy.torchao_export import export_torchao
        export_torchao(model, args.out, activation_bits=_activation_bits(args.activation_bits))
        print(f"torchao export in {args.out}/")
        return 0
    from .deploy.export import export
    export(model, args.out)
    print(f"packed checkpoint in {args.out}/")
    return 0


def _family_of(path):
    from .models.family_load import family_of
    return family_of(path)


def _family_of_run(folder):
    """The family of the model a run folder's recipe names (read from its config.json), or None."""
    try:
        return _family_of(json.loads((Path(folder) / "config.json").read_text())["recipe"]["model"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a run folder: load_run says what it is


def _one_export_per_folder(args):
    """A folder holds one export (a loader reads the first it finds): the other format's files are refused,
    or with --overwrite removed, before any work."""
    from .deploy import export, torchao_export
    other = (export if args.format == "torchao" else torchao_export)
    files = [Path(args.out) / name for name in (other.META_FILE, other.WEIGHTS_FILE)]
    if not any(file.exists() for file in files):
        return
    if not args.overwrite:
        raise ValueError(f"--out {args.out} holds a {'packed' if other is export else 'torchao'} export; choose "
                         "another --out or pass --overwrite to replace it")
    for file in files:
        file.unlink(missing_ok=True)


def _activation_bits(text):
    return text if text == "run" else int(text)


# name -> (module of treeq.bench, function, its keyword arguments from the flags)
_BENCHES = {
    "fp": ("fp", "bench_fp", lambda a: {"num_samples": a.num_samples, "seed": a.seed}),
    "ptq": ("ptq", "bench_ptq", lambda a: {"num_samples": a.num_samples, "seed": a.seed,
                                           **_settings(a, "settings")}),
    "recipes": ("ptq", "bench_output_error", lambda a: {}),
    "dtype": ("dtype", "bench_dtype", lambda a: _settings(a, "settings")),
    "search-plan": ("search_plan", "bench_search_plan", lambda a: _settings(a, "settings")),
    "memory-plan": ("memory_plan", "bench_memory_plan", lambda a: _settings(a, "settings")),
    "block-inputs": ("ptq", "bench_block_inputs", lambda a: {"num_samples": a.num_samples, "seed": a.seed,
                                                             **_settings(a, "settings")}),
    "search": ("search", "bench_search", lambda a: {"num_samples": a.num_samples, "seed": a.seed,
                                                    "model": a.model or "default", **_settings(a, "targets"),
                                                    **({"methods": tuple(a.methods.split(","))} if a.methods else {})}),
    "eng": ("search", "bench_eng", lambda a: {"num_samples": a.num_samples, "seed": a.seed,
                                              **_settings(a, "targets")}),
    "rank": ("search", "bench_rank", lambda a: {"num_samples": a.num_samples, "seed": a.seed}),
    "paper": ("paper", "bench_paper", lambda a: {"num_samples": a.num_samples, "seed": a.seed,
                                                 **_settings(a, "targets")}),
    "ablation": ("paper", "bench_ablation", lambda a: {"num_samples": a.num_samples, "seed": a.seed,
                                                       **_settings(a, "targets")}),
    "objective": ("objective", "bench_objective", lambda a: {"model": a.model or "default", "seed": a.seed,
                                                             "num_samples": a.num_samples, **_settings(a, "targets")}),
    "nodes": ("objective", "bench_node_agreement", lambda a: {"model": a.model or "default", "seed": a.seed,
                                                              **_settings(a, "targets")}),
    "depth": ("search_analysis", "bench_depth", lambda a: {}),
    "search-cost": ("search_cost", "bench_search_cost", lambda a: {"device": a.device, "seed": a.seed}),
    # parts (blocks, quantize, tiny) and families (pixart, sd3, flux, sana, wan) in --settings; one thread
    "families": ("families", "bench_families", lambda a: {"seed": a.seed, **_settings(a, "settings")}),
    "locality": ("search_analysis", "bench_locality", lambda a: {"model": a.model or "default"}),
    "search-compute": ("search_analysis", "bench_search_compute", lambda a: {
        "model": a.model or "default", **_settings(a, "targets"),
        **({"methods": tuple(a.methods.split(","))} if a.methods else {})}),
    "additivity": ("search_analysis", "bench_additivity", lambda a: {"model": a.model or "default", "seed": a.seed}),
    "kernels": ("kernels", "bench_kernels", lambda a: {"seed": a.seed}),
    "kernel-parts": ("kernel_parts", "bench_kernel_parts", lambda a: {"seed": a.seed}),
    # its own sample counts (64 testbed images, 8 DiT-XL/2 ones)
    "deploy": ("deploy", "bench_deploy", lambda a: {"seed": a.seed}),
    "xl": ("xl", "bench_xl", lambda a: {"device": a.device, "model": a.model, "seed": a.seed,
                                        **_settings(a, "settings")}),
    "gpu-kernels": ("xl", "bench_gpu_kernels", lambda a: {"seed": a.seed}),
}


def _settings(args, keyword):
    """{keyword: the --settings presets} when given: each bench has its own default."""
    return {keyword: tuple(args.settings.split(","))} if args.settings else {}


def cmd_bench(args):
    from importlib import import_module
    module, function, arguments = _BENCHES[args.which]
    _print(getattr(import_module(f"treeq.bench.{module}"), function)(**arguments(args)), args.json)
    return 0


def cmd_demo(args):
    from .demo import run_demo
    return run_demo(args.out, num_samples=args.num_samples)


def cmd_search(args):
    from .memory import describe_peak_memory
    from .search.run import SEARCH_RECIPE, run_search

    recipe = replace(SEARCH_RECIPE, model=args.model, activations=args.activations or SEARCH_RECIPE.activations,
                     methods=args.ptq_method or SEARCH_RECIPE.methods,
                     calibration_images=args.calibration_images or SEARCH_RECIPE.calibration_images,
                     calibration_timesteps=args.calibration_timesteps or SEARCH_RECIPE.calibration_timesteps,
                     prompts=tuple(_prompts(args) or ()), dtype=args.dtype, sampling=_sampling_overrides(args))
    recipe = recipe.resolved_dtype()
    if args.device:
        from .models.dtype import check_device_dtype
        check_device_dtype(recipe.dtype, args.device)
    result = run_search(recipe, args.target, args.method, out=args.out, env_bits=args.env_bits,
                        queue_size=args.queue_size, candidates=args.candidates, calibration_rows=args.calibration_rows,
                        readout_blocks=None if args.readout_blocks < 0 else args.readout_blocks, readout=args.readout,
                        evaluations=args.evaluations, seed=args.seed, resume=args.resume, log=args.log, cost=args.cost,
                        device=args.device, refine_sweeps=args.refine_sweeps, seed_ilp=args.seed_ilp,
                        budget_window=None if args.budget_window < 0 else args.budget_window,
                        refine_rows=args.refine_rows, exchange_rounds=args.exchange_rounds, floor=args.floor,
                        max_cost=args.max_cost, low_queue=args.low_queue, low_rows=args.low_rows,
                        low_levels=args.low_levels, workers=args.workers, early_exit=args.early_exit)
    print(f"{result.method}: average bits {result.average_bits:.3f}, metric {result.metric:.4g}, "
          f"{result.evaluations} evaluations in {result.seconds:.1f} s -> {args.out}; {describe_peak_memory()}")
    return 0


def _add_search(sub):
    from .search.estimate import MAX_COST

    search = sub.add_parser("search", help="mixed-precision search (TreeQ tree search or a baseline) -> bits.json")
    search.add_argument("--model", default="default")
    search.add_argument("--target", default="W4A4", help="W4A4, W3A3 or average bits, e.g. 3.5")
    search.add_argument("--method", default="tss", choices=("tss", "ilp", "evo", "greedy", "random", "uniform"))
    search.add_argument("--ptq-method", default=None,
                        help="the recipe's PTQ methods the search scores and quantize applies (default hadamard,gptq)")
    search.add_argument("--activations", default=None, choices=("dynamic", "dynamic-asym", "static"),
                        help="the recipe's activation quantizer (default dynamic-asym)")
    search.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="the run's floating-point type (auto: the checkpoint's own)")
    search.add_argument("--steps", "--num-inference-steps", dest="steps", type=STEPS, default=None,
                        help="sampling steps of the calibration trajectories (default: the model's)")
    _add_sizes(search)
    search.add_argument("--env-bits", type=_env_bits(), default=None,
                        help="environmental noise: bits of every layer outside the scored segment (default the "
                             "target; 32 = full precision)")
    search.add_argument("--queue-size", type=COUNT, default=16)
    search.add_argument("--low-queue", type=COUNT, default=None,
                        help="tss: the queue of the low levels (--low-levels), whose products the next level scores "
                             "(default: --queue-size)")
    search.add_argument("--low-rows", type=COUNT, default=None,
                        help="tss: calibration rows the low levels score, out of --calibration-rows (default: all)")
    search.add_argument("--low-levels", type=number(int, 0), default=None,
                        help="tss: how many levels from the leaves are low (default: those whose segments fit in "
                             "the model's smallest block)")
    search.add_argument("--calibration-images", type=COUNT, default=None,
                        help="images whose sampling trajectories calibrate (default 32)")
    search.add_argument("--calibration-timesteps", type=COUNT, default=None,
                        help="sampling steps recorded per trajectory (default 10)")
    search.add_argument("--candidates", default=None, help="(w,a) pairs, e.g. '4,4 3,4 4,3 8,8' (default by target)")
    search.add_argument("--calibration-rows", type=COUNT, default=16,
                        help="trajectory states scored per candidate (a guided state runs two model rows); the tree "
                             "search prints what they cost before it scores")
    search.add_argument("--readout-blocks", type=number(int, -1), default=1,
                        help="read the metric this many blocks past the segment; -1 = at the model output")
    search.add_argument("--readout", choices=READOUTS, default=DEFAULT_READOUT,
                        help="what a segment's metric reads --readout-blocks past it: its hidden tokens, or the "
                             "head's output there read as the sampler's step (lens)")
    search.add_argument("--evaluations", type=COUNT, default=None,
                        help="evo/random: configurations to score (default: the tree search's upper bound)")
    search.add_argument("--cost", choices=("bops", "memory"), default="bops")
    search.add_argument("--refine-sweeps", type=number(int, 0), default=0,
                        help="after the search, this many coordinate-descent sweeps on the end-to-end metric "
                             "within the budget (0: none)")
    search.add_argument("--exchange-rounds", type=number(int, 0), default=0,
                        help="after the search, this many budget exchanges: every layer's candidates scored around "
                             "the current configuration, then the integer program on them (0: none)")
    search.add_argument("--refine-rows", type=COUNT, default=None,
                        help="with --refine-sweeps or --exchange-rounds: refine on this many calibration rows the search did not score "
                             "(default: on the scored rows)")
    search.add_argument("--budget-window", type=number(float, -1), default=BUDGET_WINDOW,
                        help="tss: each queue keeps candidates within this many average bits of the segment's share "
                             "of the budget first; -1 = the plain Pareto drop over every cost")
    search.add_argument("--floor", default=None, metavar="WxAy",
                        help="cheap layers (under a tenth of the mean layer's MACs: adaLN modulation) take only "
                             "candidates at or above these bits, e.g. W3A4 (default: none; the objective decides)")
    search.add_argument("--seed-ilp", action="store_true",
                        help="tss: run the integer program first and keep its configuration in every node's queue "
                             "(the tree then ends at or below its metric)")
    search.add_argument("--max-cost", type=MAX_COST, default=None, metavar="N",
                        help="tss: refuse, before quantizing and scoring, a search that costs more than N image "
                             "equivalents (block-row runs over those of sampling one image; printed first)")
    search.add_argument("--early-exit", action="store_true",
                        help="tss: each merge scores its products best-predicted first and stops once a chunk of 64 "
                             "puts nothing into its queue (a cost lever; docs/RESULTS.md says what it costs)")
    _add_workers(search)
    search.add_argument("--seed", type=SEED, default=0)
    search.add_argument("--resume", action="store_true", help="continue from the state file beside --out")
    search.add_argument("--log", default=None, help="JSON lines of every scored candidate (default beside --out)")
    search.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: this rank's GPU if any)")
    search.add_argument("--out", default="bits.json")
    _add_prompts(search)
    _add_overwrite(search)
    _add_cache_dir(search)
    search.set_defaults(func=cmd_search, kept=_search_kept, output_kind="bits", inputs=("model", "prompts"))


def _sample_kept(args):
    """DiT sampling keeps each finished batch in OUT/parts (a rerun resumes); a family's pipeline keeps none."""
    parts = Path(args.out) / "parts"
    return (f"the finished parts in {parts}", None) if any(parts.glob("*.npz")) else None


def _search_kept(args):
    """A tree search keeps its finished nodes in the state file beside --out; the baselines keep nothing."""
    if args.method != "tss":
        return None
    state = Path(f"{Path(args.out).with_suffix('')}.state.json")  # as search.run names it
    return f"the finished nodes in {state}", state


def _add_cache_dir(parser):
    parser.add_argument("--cache-dir", default=None,
                        help="where calibration sets are cached and reused (default $TREEQ_CACHE_DIR, else "
                             "./runs/calibration)")


def _add_overwrite(parser):
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out folder of another kind, or a file treeq did not write "
                             "(refused without it)")


def _add_sampling(parser, num_samples, samples_help=None):
    parser.add_argument("--model", default="default",
                        help="'default' (the embedded testbed), a TreeQ .safetensors, an official .pt, "
                             "a diffusers DiT pipeline or transformer folder")
    parser.add_argument("--num-samples", type=COUNT, default=num_samples, help=samples_help)
    parser.add_argument("--seed", type=SEED, default=0, help="sample i draws its noise from seed (SEED, i)")
    parser.add_argument("--sampler", choices=("dpm++", "ddim", "ddpm", "pipeline"), default=None,
                        help="default: the model's (testbed dpm++, official DiT ddpm, a pipeline its scheduler)")
    parser.add_argument("--scheduler", help="a diffusers scheduler_config.json to sample with (sets --sampler pipeline)")
    parser.add_argument("--steps", "--num-inference-steps", dest="steps", type=STEPS, default=None)
    parser.add_argument("--cfg-scale", type=CFG, default=None)
    parser.add_argument("--guidance-channels", type=COUNT, default=None,
                        help="guide only the first N output channels (3 reproduces the official DiT sampler)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="the model's and the VAE's (auto: the checkpoint's own; a run samples in its own)")
    _add_sizes(parser)
    parser.add_argument("--clip-sample", action=argparse.BooleanOptionalAction, default=None,
                        help="clip samples to [-1, 1] at every step (default: the model's)")
    _add_prompts(parser)


def _add_sizes(parser):
    """Sampling size flags of a text-to-image family (checked against its VAE and patch before it loads)."""
    for flag, dest in (("--height", "height"), ("--width", "width"), ("--frames", "num_frames"),
                       ("--max-sequence-length", "max_sequence_length")):
        parser.add_argument(flag, dest=dest, type=COUNT, default=None,
                            help="text-to-image families: " + {"num_frames": "frames of a video (Wan)",
                                                                "max_sequence_length": "text tokens per prompt"}
                            .get(dest, f"sample {dest} in pixels") + " (default: the folder's treeq.json)")


def _add_prompts(parser):
    parser.add_argument("--prompts", default=None,
                        help="text-to-image families: a file of prompts, one a line (default: a built-in list)")


def _cuda():
    import torch
    return torch.cuda.is_available()


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), as every other treeq error."""

    def error(self, message):
        self.exit(2, f"treeq: error: {message} (see {self.prog} --help)\n")


def build_parser():
    from .diffusion.train import TRAIN_RANGES, TrainConfig
    from .ptq.recipe import add_recipe_arguments

    parser = _Parser(prog="treeq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a DiT on the embedded MNIST digits")
    add_dataclass_arguments(train, TrainConfig, TRAIN_RANGES)
    train.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl, model.safetensors")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    _add_overwrite(train)
    train.set_defaults(func=cmd_train, output_kind="training", inputs=(),
                       kept=lambda a: (f"{a.out}/checkpoint.pt (every {a.checkpoint_every} steps)",
                                       Path(a.out) / "checkpoint.pt"))

    sample = sub.add_parser("sample", help="sample images into a folder: ADM .npz, PNG grid, settings (resumable; "
                                           "shard with `torchrun --nproc_per_node N -m treeq sample ...`)")
    _add_sampling(sample, 100)
    sample.add_argument("--quant", help="a folder written by `treeq quantize` or `treeq export`")
    sample.add_argument("--out", required=True, help="run folder; rerun the same command to resume")
    sample.add_argument("--batch-size", type=COUNT, default=16)
    sample.add_argument("--vae", help="diffusers AutoencoderKL folder to decode latents (default: the pipeline's)")
    sample.add_argument("--classes", help="comma-separated class ids or id2label names to cycle (default: all, balanced)")
    sample.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu, cuda or cuda:N")
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_overwrite(sample)
    sample.set_defaults(func=cmd_sample, output_kind="samples", inputs=("model", "quant", "vae"),
                        kept=_sample_kept)

    evaluate = sub.add_parser("eval", help="sample and measure FID, sFID, IS, precision/recall, accuracy; "
                                           "or measure a sample folder")
    _add_sampling(evaluate, None, f"default {DIT_EVAL_SAMPLES} for a DiT, {FAMILY_EVAL_SAMPLES} pipeline samples "
                              "for a text-to-image family (each also sampled at full precision)")
    evaluate.add_argument("--quant", help="measure this quantized model (and its PSNR vs --model)")
    evaluate.add_argument("--samples", help="measure the samples in this folder (or ADM .npz) instead of sampling")
    evaluate.add_argument("--inception-weights", help="Inception FID with these weights (pip install treeq[fid])")
    evaluate.add_argument("--reference", help="reference images for Inception FID: an ADM .npz (arr_0) or sample folder")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_eval)

    from .models.families import family_names
    init = sub.add_parser("init", help="write a randomly initialised checkpoint at a real (or given) size")
    init.add_argument("--family", choices=("dit", *family_names()), default=None,
                      help="a random diffusers pipeline folder of this transformer family (--size tiny or full)")
    init.add_argument("--size", default=None, help="a model name (DiT-XL/2, DiT-S/8, ...) or 'vae' (an SD-VAE-shaped "
                                                   "AutoencoderKL folder); with --family: tiny (default) or full")
    init.add_argument("--out", required=True, help=".pt (official), a folder (diffusers pipeline or VAE) or a "
                                                   ".safetensors (TreeQ)")
    init.add_argument("--format", choices=("official", "diffusers", "treeq"), default=None,
                      help="default: the one --out names (.pt official, .safetensors treeq, a folder diffusers)")
    init.add_argument("--seed", type=SEED, default=0)
    init.add_argument("--input-size", type=COUNT, default=None, help="latent side (DiT-XL/2 at 256px: 32)")
    init.add_argument("--num-classes", type=COUNT, default=None)
    init.add_argument("--depth", type=COUNT, default=None)
    init.add_argument("--hidden-size", type=COUNT, default=None, help="a multiple of --num-heads")
    init.add_argument("--num-heads", type=COUNT, default=None)
    init.add_argument("--vae-channels", default="128,256,512,512",
                      help="block widths of the random VAE (diffusers format and 'vae'); SD-VAE's by default")
    _add_overwrite(init)
    init.set_defaults(func=cmd_init, output_kind="model", inputs=())

    info = sub.add_parser("info", help="layers, parameters and MACs of a model")
    info.add_argument("--model", default="default")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info, quant=None)

    quant = sub.add_parser("quantize", help="quantize a model by a recipe; the run folder holds its whole state")
    add_recipe_arguments(quant)
    for flags, kind in ((("--sampler",), None), (("--steps", "--num-inference-steps"), STEPS), (("--cfg-scale",), CFG),
                        (("--guidance-channels",), COUNT)):
        quant.add_argument(*flags, type=kind, default=None, help="sampling setting of the calibration trajectories")
    _add_sizes(quant)
    quant.add_argument("--device", default="cuda" if _cuda() else "cpu",
                       help="cpu, cuda or cuda:N: where calibration and the methods run")
    _add_prompts(quant)
    quant.add_argument("--target", default=None,
                       help="search the bit configuration at this budget (W4A4, W3A3 or average bits) instead of "
                            "--config; the search scores this recipe, branch included, and writes OUT/search/")
    quant.add_argument("--search", default="tss", choices=("tss", "ilp", "evo", "greedy", "random", "uniform"),
                       help="with --target: the search method (default tss, TreeQ's tree search)")
    quant.add_argument("--env-bits", type=_env_bits(), default=None, help="with --target: ENG's environment bits")
    _add_workers(quant)
    quant.add_argument("--queue-size", type=COUNT, default=16, help="with --target: the tree search's queue size")
    quant.add_argument("--seed-ilp", action="store_true",
                       help="with --target: seed the tree search with the integer program's configuration")
    from .search.estimate import MAX_COST
    quant.add_argument("--max-cost", type=MAX_COST, default=None, metavar="N",
                       help="with --target: refuse, before quantizing, a tree search that costs more than N image "
                            "equivalents (the cost it prints first)")
    quant.add_argument("--out", required=True)
    _add_overwrite(quant)
    _add_cache_dir(quant)
    quant.set_defaults(func=cmd_quantize, output_kind="run", inputs=("model", "bits"))

    from .finetune.distill import FINETUNE_RANGES, FinetuneConfig
    finetune = sub.add_parser("finetune", help="QLoRA-style: train the branches (and with --step-sizes the weight step "
                                      "sizes) of a quantized run against FP")
    finetune.add_argument("--quant", required=True, help="a run folder written by `treeq quantize`")
    finetune.add_argument("--out", required=True, help="the fine-tuned run folder (also holds the checkpoint)")
    add_dataclass_arguments(finetune, FinetuneConfig, FINETUNE_RANGES)
    finetune.add_argument("--resume", action="store_true", help="continue from OUT/finetune_checkpoint.pt")
    _add_overwrite(finetune)
    _add_cache_dir(finetune)
    finetune.set_defaults(func=cmd_finetune, output_kind="run", inputs=("quant",),
                          kept=lambda a: (f"{a.out}/finetune_checkpoint.pt (every {a.checkpoint_every} steps)",
                                          Path(a.out) / "finetune_checkpoint.pt"))

    export = sub.add_parser("export", help="write a packed integer checkpoint (or a torchao model) of a quantization run")
    export.add_argument("--quant", required=True, help="a folder written by `treeq quantize`")
    export.add_argument("--out", required=True)
    export.add_argument("--format", choices=("packed", "torchao"), default="packed",
                        help="packed: our integer layers at their bits; torchao: torchao Int8Tensor weights of the "
                             "run's own codes (needs torchao)")
    export.add_argument("--activation-bits", choices=("run", "8"), default="run",
                        help="torchao: inputs rounded to the run's a_bits (run: the run's numbers) or only to int8 "
                             "(8: W4A8, more accurate)")
    _add_overwrite(export)
    export.set_defaults(func=cmd_export, output_kind="export", inputs=("quant",))

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench.add_argument("which", choices=tuple(_BENCHES))
    bench.add_argument("--num-samples", type=COUNT, default=500)
    bench.add_argument("--seed", type=SEED, default=0)
    bench.add_argument("--settings", default=None,
                       help="ptq, paper, ablation: presets to run, e.g. W4A4,W3A3 (split a long bench over "
                            "processes; default: the bench's own); families: parts and families, e.g. "
                            "blocks,quantize,tiny,pixart,sd3; xl: settings, e.g. bf16,W4A8-torchao")
    bench.add_argument("--device", default="cuda" if _cuda() else "cpu", help="xl: cpu, cuda or cuda:N")
    bench.add_argument("--model", default=None, help="xl: a DiT-XL/2 checkpoint (default: random weights); search, "
                       "locality, additivity: the testbed (default, or deep: 28 blocks like DiT-XL/2)")
    bench.add_argument("--methods", default=None, help="search: the rows to run, e.g. ilp,tss (default: all)")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="the main job on the embedded testbed")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--num-samples", type=COUNT, default=100)
    _add_overwrite(demo)
    demo.set_defaults(func=cmd_demo, output_kind="demo", inputs=())
    _add_search(sub)
    return parser


def _check_before_work(args):
    """What every command checks before it loads a model: --resume has something to resume, and --out
    neither replaces an input nor mixes into a folder of another kind (io.check_output)."""
    kept = getattr(args, "kept", None)
    if getattr(args, "resume", False):
        state = kept(args) if kept else None
        if state is None or state[1] is None:
            raise ValueError(f"--resume continues a tree search (--method tss); {args.method} keeps no state")
        if not Path(state[1]).exists():
            raise FileNotFoundError(f"nothing to resume: no {state[1]}; run without --resume to start afresh")
    if getattr(args, "cache_dir", None):
        os.environ["TREEQ_CACHE_DIR"] = args.cache_dir  # read by ptq.calibration.cache_dir
    if getattr(args, "device", None):
        from .distributed import check_device
        check_device(args.device)
    if getattr(args, "prompts", None):
        _prompts(args)  # missing, empty or unreadable: refused before loading
    _check_sample_count(args)
    _check_sizes(args)
    if getattr(args, "dtype", "auto") != "auto" and getattr(args, "device", None):
        from .models.dtype import check_device_dtype
        check_device_dtype(args.dtype, args.device)
    if args.command == "sample" and args.quant and args.model != "default":
        raise ValueError("sample --quant runs the model its run folder names; --model does not apply (give one "
                         "of them)")
    if getattr(args, "output_kind", None):
        from .io import check_output
        check_output(args.out, args.output_kind, [getattr(args, name, None) for name in args.inputs],
                     overwrite=args.overwrite)


def _check_sizes(args):
    """--height, --width, --frames and --max-sequence-length against the family folder's VAE and patch (its
    JSON only): for --quant, the folder its run was made from."""
    sizes = {key: getattr(args, key, None) for key in SIZE_KEYS}
    if not any(value is not None for value in sizes.values()):
        return
    from .models.sizes import check_sizes
    model = getattr(args, "model", None)
    if getattr(args, "quant", None):
        try:
            model = json.loads((Path(args.quant) / "config.json").read_text())["recipe"]["model"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"--quant {args.quant}: no run folder (config.json) to read its model's sizes from") from None
    check_sizes(model, sizes)


def _check_sample_count(args):
    """Measured samples: the Inception Score's splits need at least MIN_MEASURED of them (a bench measures
    the testbed; `eval` checks a DiT's count once it has loaded it: a family's fidelity needs no IS)."""
    measured = args.command == "bench" and "num_samples" in _BENCHES[args.which][2](args)
    if measured:
        _check_measured(args.num_samples)


def _check_measured(num_samples):
    from .eval.limits import MIN_MEASURED

    if num_samples < MIN_MEASURED:
        raise ValueError(f"--num-samples {num_samples}: measuring samples needs at least {MIN_MEASURED} "
                         "(the Inception Score's splits)")


def _interrupted(args, argv):
    """The one line of a Ctrl-C: what the command kept and how to continue."""
    kept = getattr(args, "kept", None)
    state = kept(args) if kept else None
    command = "treeq " + shlex.join(argv)
    if state is None:
        return f"treeq: interrupted; {args.command} keeps no partial work: rerun `{command}`"
    what, path = state
    again = command if path is None or "--resume" in argv else command + " --resume"
    return f"treeq: interrupted; kept {what}: continue with `{again}`"


def _quiet_libraries():
    """What the libraries print on import and load (torchao's kernels this build lacks, torch's pytree
    deprecations, diffusers' and transformers' notices and loading bars) is no message of ours: a command
    prints its own lines and errors only. Strict loading (models/family_load.py) reports what matters."""
    import logging

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None):
    _quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a flag error already printed
        return stop.code
    try:
        _check_before_work(args)
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError, ImportError) as error:  # ImportError: an optional extra missing
        print(f"treeq: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
        print(_interrupted(args, argv), file=sys.stderr)
        return 130


def _end_progress_bars():
    """Close the bars a Ctrl-C left open, so the line that follows starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
