"""Checkpoint conversion between flame (torch DCP) and Hugging Face format.

    python -m flame.convert to-hf --checkpoint <dump>/checkpoint/step-N --out <dir> [--dtype bfloat16]
    python -m flame.convert from-hf --model <dir or hub id> --out <dump>/checkpoint/step-0 [--dtype float32]

to-hf reads the run's saved config.toml (beside the checkpoint or in the dump folder; --config
overrides) and works on the CPU from a checkpoint sharded by any number of ranks. from-hf writes
a model-only checkpoint that the trainer loads like any other (see flame/hf/convert.py).
"""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flame.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="DCP checkpoint -> Hugging Face folder")
    to_hf.add_argument("--checkpoint", required=True, help="<dump_folder>/checkpoint/step-N")
    to_hf.add_argument("--out", required=True, help="new folder for the Hugging Face model")
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="dtype of the saved weights (default: as stored in the checkpoint)")
    to_hf.add_argument("--config", default=None, help="the run's TOML (default: its saved config.toml)")
    to_hf.add_argument("--max-shard-gib", type=float, default=5.0,
                       help="largest safetensors file; also the memory the conversion needs (default 5)")
    from_hf = sub.add_parser("from-hf", help="Hugging Face folder or hub id -> DCP checkpoint (model only)")
    from_hf.add_argument("--model", required=True, help="a flame model folder or hub id")
    from_hf.add_argument("--out", required=True, help="new checkpoint folder, e.g. <dump_folder>/checkpoint/step-0")
    from_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                         help="dtype of the checkpoint (default float32, the trainer's master weights)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flame.hf import convert

    try:
        if args.command == "to-hf":
            if not args.max_shard_gib > 0:
                raise ValueError(f"--max-shard-gib {args.max_shard_gib}: must be positive")
            out = convert.to_hf(args.checkpoint, args.out, dtype=args.dtype, config=args.config,
                                max_shard_bytes=int(args.max_shard_gib * 2**30))
        else:
            out = convert.from_hf(args.model, args.out, dtype=args.dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
