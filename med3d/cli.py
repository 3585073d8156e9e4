"""The ``med3d`` command: thin subcommands over the library.

Bad input raises ``Med3DError``; ``main`` prints it as one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from . import __version__
from .errors import Med3DError

Handler = Callable[[argparse.Namespace], int]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.01 (repeatable)")


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .data.demo import TASK_NAMES, write_demo_data

    unknown = [t for t in args.tasks or [] if t not in TASK_NAMES]
    if unknown:
        raise Med3DError(f"--tasks: unknown demo task {unknown[0]}; choose from {', '.join(TASK_NAMES)}")
    out = Path(args.out)
    existing = [out / t for t in (args.tasks or TASK_NAMES) if (out / t).exists()]
    if existing and not args.overwrite:
        raise Med3DError(f"{existing[0]}: already exists; pass --overwrite to write the demo data again")
    paths = write_demo_data(out, seed=args.seed, n_train=args.train, n_test=args.test, tasks=args.tasks)
    for p in paths:
        print(p)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from .config import load_config, to_dict

    cfg = load_config(args.config, args.set)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_encoders(args: argparse.Namespace) -> int:
    from .api import create_encoder, list_encoders

    print(f"{'arch':<10} {'shortcut':>8} {'params (M)':>11}")
    for name in list_encoders():
        enc = create_encoder(name)
        n = sum(p.numel() for p in enc.parameters()) / 1e6
        print(f"{name:<10} {enc.config['shortcut']:>8} {n:>11.2f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if any(o.startswith(("run.out_dir=", "data.datasets", "data.cache_dir=")) for o in args.set):
        raise Med3DError("--set: the demo places its runs, data and cache under --out; give --out instead")
    return run_demo(args.set, quick=args.quick, out_dir=args.out, progress=not args.quiet)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.what == "loader":
        bench.loader_bench(Path(args.dataset) if args.dataset else None, workers=args.workers, n=args.patches)
    elif args.what == "train":
        bench.train_bench(iterations=args.iterations, device=args.device)
    else:
        bench.infer_bench(device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="med3d", description="Med3D-style 3D-ResNet pretraining and transfer "
                                     "for medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"med3d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: Dict[str, Handler] = {}

    p = sub.add_parser("demo", help="the built-in demo on generated data")
    _add_config_args(p)
    p.add_argument("--quick", action="store_true", help="a few iterations only, for a smoke test")
    p.add_argument("--out", default="runs/demo", help="folder for data, cache, runs and the exported encoder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    handlers["demo"] = cmd_demo

    p = sub.add_parser("demo-data", help="write the synthetic demo datasets in Decathlon (MSD) layout")
    p.add_argument("out", help="folder to write the task folders into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=10, help="training cases per task")
    p.add_argument("--test", type=int, default=2, help="test cases per task")
    p.add_argument("--tasks", nargs="+", help="only these task folders")
    p.add_argument("--overwrite", action="store_true", help="write over existing task folders")
    handlers["demo-data"] = cmd_demo_data

    p = sub.add_parser("config", help="print a config fully resolved (inheritance, overrides, defaults)")
    p.add_argument("config", help="YAML config file")
    _add_config_args(p)
    handlers["config"] = cmd_config

    p = sub.add_parser("encoders", help="list the encoders and their parameter counts")
    handlers["encoders"] = cmd_encoders

    p = sub.add_parser("bench", help="throughput benchmarks against a baseline run in the same process")
    p.add_argument("what", choices=["loader", "train", "infer"],
                   help="loader: cache vs MONAI decode; train: fp32 vs bf16; infer: predict vs plain MONAI")
    p.add_argument("--dataset", help="loader: a dataset folder (default: generated demo spleen data)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader: worker counts to measure")
    p.add_argument("--patches", type=int, default=40, help="loader: baseline patches per measurement")
    p.add_argument("--iterations", type=int, default=10, help="train: timed iterations")
    p.add_argument("--device", help="train/infer: cpu or cuda (default: cuda when available)")
    handlers["bench"] = cmd_bench

    from . import cli_predict, cli_train, cli_transfer

    handlers.update(cli_train.add_parsers(sub))
    handlers.update(cli_predict.add_parsers(sub))
    handlers.update(cli_transfer.add_parsers(sub))

    parser.set_defaults(_handlers=handlers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args._handlers[args.command](args)
    except Med3DError as err:
        print(f"med3d {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"med3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
