"""The `treeq` command line: train, sample, eval, info, quantize, export and bench.

Every command is `main(argv) -> exit code`, so tests call it in-process. Expected
failures (bad paths, wrong checkpoints, impossible settings) print one line on
stderr and exit 2; no traceback.
"""
import argparse
import sys


def cmd_train(args):
    from dataclasses import fields

    from .data import mnist
    from .diffusion.train import TrainConfig, train

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    images, labels = mnist("train")
    train(config, images, labels, args.out, resume=args.resume)
    print(f"wrote {args.out}/model.safetensors and {args.out}/model.json")
    return 0


def add_train_parser(sub):
    from dataclasses import fields

    from .diffusion.train import TrainConfig

    parser = sub.add_parser("train", help="train a DiT on the embedded MNIST digits")
    for field in fields(TrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    parser.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl, model.safetensors")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.set_defaults(func=cmd_train)


def build_parser():
    parser = argparse.ArgumentParser(prog="treeq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, OSError) as error:
        print(f"treeq: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
