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
        from .quant.run import load_quantized
        return load_quantized(args.quant)
    from .models.load import load
    return load(args.model)


def _positive_int(text):
    """argparse type: an int of at least 1, with a one-line error otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
    from .models.load import load

    overrides = _sampling_overrides(args)
    fp_images = None
    if args.quant:  # fidelity to full precision: the recipe's FP model with identical seeds
        from .quant.run import load_run
        recipe, model = load_run(args.quant)
        if recipe is not None:
            overrides = {**recipe.sampling, **overrides}
        fp_model = load(recipe.model if recipe is not None else args.model)
        fp_images = generate(fp_model, args.num_samples, args.seed, **overrides)[0]
    else:
        model = load(args.model)
    metrics, _, _ = sample_and_measure(model, args.num_samples, args.seed, fp_images, **overrides)
    _print(metrics, args.json)
    return 0


def cmd_info(args):
    from .bits import layer_macs, quantizable_layers

    model = _load(args)
    macs = layer_macs(model)
    layers = {name: model.get_submodule(name) for name in quantizable_layers(model)}
    params = sum(p.numel() for p in model.parameters())
    info = {"config": model.config.to_dict(), "parameters": params, "quantizable_layers": len(layers),
            "macs_per_image": sum(macs.values()),
            "layers": [{"name": name, "shape": [layer.out_features, layer.in_features], "macs": macs[name],
                        "w_bits": getattr(layer, "w_bits", 32), "a_bits": getattr(layer, "a_bits", 32)}
                       for name, layer in layers.items()]}
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
    from .quant.recipe import recipe_from_args
    from .quant.run import build, save_run

    recipe = recipe_from_args(args, sampling=_sampling_overrides(args))
    model, quantized = build(recipe)
    bits = quantization_map(quantized)
    save_run(args.out, recipe, quantized)
    print(f"{len(bits)} layers quantized with {','.join(recipe.methods)} ({recipe.activations} activations); "
          f"average bits (BOPs) {average_bits(bits, model):.2f}; run in {args.out}/ (use --quant {args.out})")
    return 0


def cmd_export(args):
    from .quant.export import export
    from .quant.run import load_quantized

    export(load_quantized(args.quant), args.out)
    print(f"packed checkpoint in {args.out}/")
    return 0


def cmd_bench(args):
    if args.which == "kernels":
        from .bench.kernels import bench_kernels
        rows = bench_kernels(seed=args.seed)
    elif args.which == "deploy":  # its own sample counts (64 testbed images, 8 DiT-XL/2 ones): --num-samples is fp/ptq's
        from .bench.deploy import bench_deploy
        rows = bench_deploy(seed=args.seed)
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


def _add_sampling(parser, num_samples):
    parser.add_argument("--model", default="default",
                        help="'default' (the embedded testbed), a TreeQ .safetensors, an official .pt or a diffusers folder")
    parser.add_argument("--num-samples", type=_positive_int, default=num_samples)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=("dpm++", "ddim", "ddpm"), default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--guidance-channels", type=int, default=None,
                        help="guide only the first N output channels (3 reproduces the official DiT sampler)")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), as every other treeq error."""

    def error(self, message):
        self.exit(2, f"treeq: error: {message} (see {self.prog} --help)\n")


def build_parser():
    from .diffusion.train import TrainConfig
    from .quant.recipe import add_recipe_arguments

    parser = _Parser(prog="treeq", description=__doc__.splitlines()[0])
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

    quant = sub.add_parser("quantize", help="quantize a model by a recipe; the run folder holds its whole state")
    add_recipe_arguments(quant)
    for flag in ("--sampler", "--steps", "--cfg-scale", "--guidance-channels"):
        quant.add_argument(flag, type=float if flag == "--cfg-scale" else None if flag == "--sampler" else int,
                           default=None, help="sampling setting of the calibration trajectories")
    quant.add_argument("--out", required=True)
    quant.set_defaults(func=cmd_quantize)

    export = sub.add_parser("export", help="write a packed integer checkpoint of a quantization run")
    export.add_argument("--quant", required=True, help="a folder written by `treeq quantize`")
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench.add_argument("which", choices=("fp", "ptq", "kernels", "deploy"))
    bench.add_argument("--num-samples", type=_positive_int, default=500)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="the main job on the embedded testbed")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--num-samples", type=_positive_int, default=200)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a flag error already printed
        return stop.code
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"treeq: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
