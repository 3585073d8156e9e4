"""Subcommands config and bench."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import Subparsers, add_config_args


def _config(args: argparse.Namespace) -> int:
    import yaml

    from ..config import load_config, to_dict
    from ..errors import Med3DError
    from ..resources import config_path

    if args.schema:
        from ..config_schema import format_schema

        print(format_schema())
        return 0
    if not args.config:
        raise Med3DError("config: name a YAML config to resolve, or pass --schema for every key")
    cfg = load_config(config_path(args.config), args.set)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .. import bench

    if args.what == "loader":
        bench.loader_bench(Path(args.dataset) if args.dataset else None, workers=args.workers, n=args.patches)
    elif args.what == "train":
        bench.train_bench(iterations=args.iterations, device=args.device)
    elif args.what == "onnx":
        bench.onnx_bench()
    else:
        bench.infer_bench(device=args.device)
    return 0


def add_config(sub: Subparsers) -> None:
    """Add ``med3d config``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("config", help="print a config fully resolved (inheritance, overrides, defaults)")
    p.add_argument("config", nargs="?", help="YAML config file; a relative path that does not exist names the "
                   "config shipped with med3d, e.g. configs/demo/pretrain.yaml works from any folder. Data and "
                   "weight paths in a config are relative to the file naming them and print as absolute paths")
    add_config_args(p)
    p.add_argument("--schema", action="store_true", help="print every config key with its type, default and meaning")
    p.set_defaults(handler=_config)


def add_bench(sub: Subparsers) -> None:
    """Add ``med3d bench``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("bench", help="throughput benchmarks against a baseline run in the same process")
    p.add_argument("what", choices=["loader", "train", "infer", "onnx"],
                   help="loader: cache vs MONAI decode; train: fp32 vs bf16; infer: predict vs plain MONAI; "
                   "onnx: predict with onnxruntime vs PyTorch eager (CPU)")
    p.add_argument("--dataset", help="loader: a dataset folder (default: generated demo spleen data)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader: worker counts to measure")
    p.add_argument("--patches", type=int, default=40, help="loader: baseline patches per measurement")
    p.add_argument("--iterations", type=int, default=10, help="train: timed iterations")
    p.add_argument("--device", help="train/infer: cpu or cuda (default: cuda when available)")
    p.set_defaults(handler=_bench)
