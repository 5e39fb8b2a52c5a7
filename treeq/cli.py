"""The `treeq` command line: train, sample, eval, info, quantize, export, bench and demo.

Every command is `main(argv) -> exit code`, so tests call it in-process. Expected
failures (bad paths, wrong checkpoints, impossible settings) print one line on
stderr and exit 2, never a traceback.
"""
import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path


def _load(args):
    """The model named by --model, or the quantized model in --quant when given."""
    if getattr(args, "quant", None):
        from .quant.recipe import load_quantized
        return load_quantized(args.quant)
    from .models.load import load
    return load(args.model)


def _sampling_overrides(args):
    keys = ("sampler", "steps", "cfg_scale", "guidance_channels")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


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
    from .data import mnist
    from .diffusion.train import TrainConfig, train

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    images, labels = mnist("train")
    train(config, images, labels, args.out, resume=args.resume)
    print(f"wrote {args.out}/model.safetensors and {args.out}/model.json")
    return 0


def cmd_sample(args):
    from .eval.export import save_adm_npz, save_grid_png
    from .experiment import generate

    model = _load(args)
    images, labels, seconds = generate(model, args.num_samples, args.seed, **_sampling_overrides(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_adm_npz(images, out / "samples.npz")
    save_grid_png(images[:100], out / "grid.png", nrow=10)
    print(f"{len(images)} samples in {seconds:.1f} s -> {out}/samples.npz, {out}/grid.png")
    return 0


def cmd_eval(args):
    from .experiment import generate, sample_and_measure

    model = _load(args)
    overrides = _sampling_overrides(args)
    fp_images = None
    if args.quant:  # fidelity to full precision: the FP model with identical seeds
        from .models.load import load
        fp_images = generate(load(args.model), args.num_samples, args.seed, **overrides)[0]
    metrics, _, _ = sample_and_measure(model, args.num_samples, args.seed, fp_images, **overrides)
    _print(metrics, args.json)
    return 0


def cmd_info(args):
    from .bits import layer_macs, quantizable_layers

    model = _load(args)
    macs = layer_macs(model)
    layers = quantizable_layers(model)
    params = sum(p.numel() for p in model.parameters())
    info = {"config": model.config.to_dict(), "parameters": params, "quantizable_layers": len(layers),
            "macs_per_image": sum(macs.values()),
            "layers": [{"name": n, "shape": list(model.get_submodule(n).weight.shape), "macs": macs[n]} for n in layers]}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"parameters {params:,}; {len(layers)} quantizable linears; {info['macs_per_image'] / 1e6:.1f} M MACs per image")
    for row in info["layers"]:
        print(f"  {row['name']:<28} {str(tuple(row['shape'])):<14} {row['macs'] / 1e6:8.3f} M MACs")
    return 0


def cmd_quantize(args):
    from .bits import average_bits
    from .quant.apply import quantization_map
    from .quant.recipe import build, save_recipe

    options = {"rank": args.rank, "group_size": args.group_size, "clip": args.clip, "alpha": args.alpha}
    calibration = {"num_images": args.calibration_images, "num_timesteps": args.calibration_timesteps}
    model, quantized = build(args.model, args.config, args.method, options, calibration, args.activations)
    bits = quantization_map(quantized)
    save_recipe(args.out, args.model, bits, args.method, options, calibration, args.activations)
    print(f"{len(bits)} layers quantized with {args.method}; average bits (BOPs) "
          f"{average_bits(bits, model):.2f}; recipe in {args.out}/ (use --quant {args.out})")
    return 0


def cmd_export(args):
    from .quant.export import export
    from .quant.recipe import load_quantized

    export(load_quantized(args.quant), args.out)
    print(f"packed checkpoint in {args.out}/")
    return 0


def cmd_bench(args):
    if args.which == "kernels":
        from .bench.kernels import bench_kernels
        rows = bench_kernels()
    elif args.which == "fp":
        from .bench.fp import bench_fp
        rows = bench_fp(args.num_samples, args.seed)
    else:
        from .bench.ptq import bench_ptq
        rows = bench_ptq(args.num_samples, args.seed)
    _print(rows, args.json)
    return 0


def cmd_demo(args):
    from .demo import run_demo
    return run_demo(args.out, num_samples=args.num_samples)


def cmd_search(args):
    from .search.run import run_search

    result = run_search(args.model, args.target, args.method, out=args.out, env_bits=args.env_bits,
                        queue_size=args.queue_size, candidates=args.candidates, calibration_rows=args.calibration_rows,
                        readout_blocks=None if args.readout_blocks < 0 else args.readout_blocks,
                        evaluations=args.evaluations, seed=args.seed, resume=args.resume, log=args.log, cost=args.cost)
    print(f"{args.method}: average bits {result.average_bits:.3f}, metric {result.metric:.4g}, "
          f"{result.evaluations} evaluations in {result.seconds:.1f} s -> {args.out}")
    return 0


def _add_search(sub):
    search = sub.add_parser("search", help="mixed-precision search (TreeQ tree search or a baseline) -> bits.json")
    search.add_argument("--model", default="default")
    search.add_argument("--target", default="W4A4", help="W4A4, W3A3 or average bits, e.g. 3.5")
    search.add_argument("--method", default="tss", choices=("tss", "ilp", "evo", "greedy", "random", "uniform"))
    search.add_argument("--env-bits", type=int, default=None,
                        help="environmental noise: bits of every layer outside the scored segment (default the "
                             "target; 32 = full precision)")
    search.add_argument("--queue-size", type=int, default=16)
    search.add_argument("--candidates", default=None, help="(w,a) pairs, e.g. '4,4 3,4 4,3 8,8' (default by target)")
    search.add_argument("--calibration-rows", type=int, default=16,
                        help="rows of the calibration set scored per candidate (16: a W4A4 testbed search in ~4 CPU "
                             "minutes; see docs/search-measurements.md)")
    search.add_argument("--readout-blocks", type=int, default=1,
                        help="read the metric this many blocks past the segment; -1 = at the model output")
    search.add_argument("--evaluations", type=int, default=None,
                        help="evo/random: configurations to score (default: the tree search's upper bound)")
    search.add_argument("--cost", choices=("bops", "memory"), default="bops")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--resume", action="store_true", help="continue from the state file beside --out")
    search.add_argument("--log", default=None, help="JSON lines of every scored candidate (default beside --out)")
    search.add_argument("--out", default="bits.json")
    search.set_defaults(func=cmd_search)


def _add_sampling(parser, num_samples):
    parser.add_argument("--model", default="default",
                        help="'default' (the embedded testbed), a TreeQ .safetensors, an official .pt or a diffusers folder")
    parser.add_argument("--num-samples", type=int, default=num_samples)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=("dpm++", "ddim", "ddpm"), default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--guidance-channels", type=int, default=None,
                        help="guide only the first N output channels (3 reproduces the official DiT sampler)")


def build_parser():
    from .diffusion.train import TrainConfig

    parser = argparse.ArgumentParser(prog="treeq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a DiT on the embedded MNIST digits")
    for field in fields(TrainConfig):
        train.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    train.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl, model.safetensors")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="sample images (ADM .npz and a PNG grid)")
    _add_sampling(sample, 100)
    sample.add_argument("--quant", help="a folder written by `treeq quantize` or `treeq export`")
    sample.add_argument("--out", required=True)
    sample.set_defaults(func=cmd_sample)

    evaluate = sub.add_parser("eval", help="sample and measure FID, sFID, IS, precision/recall, accuracy")
    _add_sampling(evaluate, 500)
    evaluate.add_argument("--quant", help="measure this quantized model (and its PSNR vs --model)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_eval)

    info = sub.add_parser("info", help="layers, parameters and MACs of a model")
    info.add_argument("--model", default="default")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info, quant=None)

    quant = sub.add_parser("quantize", help="quantize a model with a preset or a bit-configuration file")
    quant.add_argument("--model", default="default")
    quant.add_argument("--config", required=True, help="W8A8, W6A6, W4A8, W4A4, W3A3 or a bits .json file")
    quant.add_argument("--method", default="rtn", choices=("rtn", "hadamard", "smooth", "gptq", "lowrank"))
    quant.add_argument("--out", required=True)
    quant.add_argument("--rank", type=int, default=32, help="rank of the low-rank branch (method lowrank)")
    quant.add_argument("--group-size", type=int, default=None, help="group-wise weight scales (default per channel)")
    quant.add_argument("--clip", choices=("minmax", "mse"), default="minmax")
    quant.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    quant.add_argument("--activations", choices=("dynamic", "static"), default="dynamic",
                       help="per-token scales at run time, or per-tensor scales from calibration")
    quant.add_argument("--calibration-images", type=int, default=32)
    quant.add_argument("--calibration-timesteps", type=int, default=10)
    quant.set_defaults(func=cmd_quantize)

    export = sub.add_parser("export", help="write a packed integer checkpoint of a quantization run")
    export.add_argument("--quant", required=True, help="a folder written by `treeq quantize`")
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench.add_argument("which", choices=("fp", "ptq", "kernels"))
    bench.add_argument("--num-samples", type=int, default=500)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="the main job on the embedded testbed")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--num-samples", type=int, default=200)
    demo.set_defaults(func=cmd_demo)
    _add_search(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"treeq: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
