"""The `treeq` command line: train, sample, eval, info, init, quantize, export, bench and demo.

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
    """The sampling flags given on the command line; the model's defaults fill the rest."""
    keys = ("sampler", "steps", "cfg_scale", "guidance_channels", "clip_sample")
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
    from .data import mnist
    from .diffusion.train import TrainConfig, train

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    images, labels = mnist("train")
    train(config, images, labels, args.out, resume=args.resume)
    print(f"wrote {args.out}/model.safetensors and {args.out}/model.json")
    return 0


def cmd_sample(args):
    from .diffusion.defaults import resolve_sampling
    from .distributed import setup, teardown
    from .pipeline import latent_decoder, prepare_model, resolve_classes, sample_to_folder

    rank, world_size, device = setup(args.device)
    try:
        model = prepare_model(_load(args), device, args.dtype, quantized=bool(args.quant))
        vae, vae_path = latent_decoder(model, args.vae, device, args.dtype)
        settings = resolve_sampling(model, **_sampling_overrides(args))
        classes = resolve_classes(args.classes, model.config.num_classes,
                                  getattr(model, "source", {}).get("id2label"))
        record = {"model": args.model, "quant": args.quant, "vae": vae_path, "device": args.device,
                  "dtype": args.dtype}
        done = sample_to_folder(model, args.out, num_samples=args.num_samples, settings=settings, seed=args.seed,
                                batch_size=args.batch_size, vae=vae, classes=classes, record=record, rank=rank,
                                world_size=world_size, progress=not args.quiet)
    finally:
        teardown()
    if rank == 0:
        rate = done["written"] / done["seconds"] if done["seconds"] > 0 else float("nan")
        print(f"{args.num_samples} samples ({done['written']} drawn now by rank 0, {rate:.2f} images/s) "
              f"-> {args.out}/samples.npz, {args.out}/grid.png, {args.out}/sampling.json")
    return 0


def cmd_eval(args):
    if args.samples:
        from .eval.inception import evaluate_folder
        _print(evaluate_folder(args.samples, args.inception_weights, args.reference), args.json)
        return 0
    from .experiment import generate, sample_and_measure

    model = _load(args)
    if model.config.in_channels not in (1, 3) or model.config.input_size != 32:
        raise ValueError("`treeq eval --model` measures testbed-sized digits; for this model run `treeq sample "
                         "--out S`, then `treeq eval --samples S --inception-weights W --reference REF.npz`")
    overrides = _sampling_overrides(args)
    fp_images = None
    if args.quant:  # fidelity to full precision: the FP model with identical seeds
        from .models.load import load
        fp_images = generate(load(args.model), args.num_samples, args.seed, **overrides)[0]
    metrics, _, _ = sample_and_measure(model, args.num_samples, args.seed, fp_images, **overrides)
    _print(metrics, args.json)
    return 0


def cmd_init(args):
    from .models.init import init_checkpoint

    written = init_checkpoint(args.size, args.out, format=args.format, seed=args.seed,
                              input_size=args.input_size, num_classes=args.num_classes, depth=args.depth,
                              hidden_size=args.hidden_size, num_heads=args.num_heads,
                              vae_channels=args.vae_channels)
    kind = "AutoencoderKL" if args.size == "vae" else f"{args.size} ({args.format})"
    print(f"random {kind} -> {written}")
    return 0


def cmd_info(args):
    from .bits import layer_macs, quantizable_layers

    model = _load(args)
    macs = layer_macs(model)
    layers = quantizable_layers(model)
    params = sum(p.numel() for p in model.parameters())
    from .diffusion.defaults import sampling_defaults
    info = {"config": model.config.to_dict(), "sampling": sampling_defaults(model),
            "source": getattr(model, "source", None), "parameters": params, "quantizable_layers": len(layers),
            "macs_per_image": sum(macs.values()),
            "layers": [{"name": n, "shape": list(model.get_submodule(n).weight.shape), "macs": macs[n]} for n in layers]}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"parameters {params:,}; {len(layers)} quantizable linears; {info['macs_per_image'] / 1e6:.1f} M MACs per image")
    shown = {k: v for k, v in info["sampling"].items() if k != "scheduler"}
    scheduler = info["sampling"]["scheduler"]
    print(f"sampling defaults: {shown}" + (f" with {scheduler['_class_name']}" if scheduler else ""))
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


def _add_sampling(parser, num_samples):
    parser.add_argument("--model", default="default",
                        help="'default' (the embedded testbed), a TreeQ .safetensors, an official .pt, "
                             "a diffusers DiT pipeline or transformer folder")
    parser.add_argument("--num-samples", type=int, default=num_samples)
    parser.add_argument("--seed", type=int, default=0, help="sample i draws its noise from seed (SEED, i)")
    parser.add_argument("--sampler", choices=("dpm++", "ddim", "ddpm", "pipeline"), default=None,
                        help="default: the model's (testbed dpm++, official DiT ddpm, a pipeline its scheduler)")
    parser.add_argument("--scheduler", help="a diffusers scheduler_config.json to sample with (sets --sampler pipeline)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--guidance-channels", type=int, default=None,
                        help="guide only the first N output channels (3 reproduces the official DiT sampler)")
    parser.add_argument("--clip-sample", action=argparse.BooleanOptionalAction, default=None,
                        help="clip samples to [-1, 1] at every step (default: the model's)")


def _cuda():
    import torch
    return torch.cuda.is_available()


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

    sample = sub.add_parser("sample", help="sample images into a folder: ADM .npz, PNG grid, settings (resumable; "
                                           "shard with `torchrun --nproc_per_node N -m treeq sample ...`)")
    _add_sampling(sample, 100)
    sample.add_argument("--quant", help="a folder written by `treeq quantize` or `treeq export`")
    sample.add_argument("--out", required=True, help="run folder; rerun the same command to resume")
    sample.add_argument("--batch-size", type=int, default=16)
    sample.add_argument("--vae", help="diffusers AutoencoderKL folder to decode latents (default: the pipeline's)")
    sample.add_argument("--classes", help="comma-separated class ids or id2label names to cycle (default: all, balanced)")
    sample.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu, cuda or cuda:N")
    sample.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="of the full-precision model and the VAE")
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    sample.set_defaults(func=cmd_sample)

    evaluate = sub.add_parser("eval", help="sample and measure FID, sFID, IS, precision/recall, accuracy; "
                                           "or measure a sample folder")
    _add_sampling(evaluate, 500)
    evaluate.add_argument("--quant", help="measure this quantized model (and its PSNR vs --model)")
    evaluate.add_argument("--samples", help="measure the samples in this folder (or ADM .npz) instead of sampling")
    evaluate.add_argument("--inception-weights", help="Inception FID with these weights (pip install treeq[fid])")
    evaluate.add_argument("--reference", help="reference images for Inception FID: an ADM .npz (arr_0) or sample folder")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_eval)

    init = sub.add_parser("init", help="write a randomly initialised checkpoint at a real (or given) size")
    init.add_argument("--size", required=True, help="a model name (DiT-XL/2, DiT-S/8, ...) or 'vae' (an SD-VAE-shaped "
                                                    "AutoencoderKL folder)")
    init.add_argument("--out", required=True, help=".pt (official), a folder (diffusers pipeline or VAE) or a "
                                                   ".safetensors (TreeQ)")
    init.add_argument("--format", choices=("official", "diffusers", "treeq"), default="official")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--input-size", type=int, default=None, help="latent side (DiT-XL/2 at 256px: 32)")
    init.add_argument("--num-classes", type=int, default=None)
    init.add_argument("--depth", type=int, default=None)
    init.add_argument("--hidden-size", type=int, default=None)
    init.add_argument("--num-heads", type=int, default=None)
    init.add_argument("--vae-channels", default="128,256,512,512",
                      help="block widths of the random VAE (diffusers format and 'vae'); SD-VAE's by default")
    init.set_defaults(func=cmd_init)

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
