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
        bench.train_bench(iterations=args.iterations or 10, device=args.device)
    elif args.what == "onnx":
        bench.onnx_bench(repeats=args.repeats)
    elif args.what == "memory":
        bench.memory_bench(shape_zyx=args.shape or (96, 256, 256), num_classes=args.classes)
    elif args.what == "scaling":
        bench.scaling_bench(large=args.large, repeats=args.repeats, device=args.device, cpu_time=args.cpu_time)
    elif args.what == "loop":
        bench.loop_bench(iterations=args.iterations or 40, workers=args.workers[0])
    else:
        bench.infer_bench(device=args.device, repeats=args.repeats, cpu_time=args.cpu_time)
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
    p.add_argument("what", choices=["loader", "train", "infer", "onnx", "memory", "scaling", "loop"],
                   help="loader: cache vs MONAI decode; train: fp32 vs bf16; infer: predict vs plain MONAI; "
                   "onnx: predict with onnxruntime vs PyTorch eager (CPU); memory: peak RSS of prepare, predict "
                   "and evaluate on a generated CT; scaling: predict time against volume size; loop: the "
                   "training loop's throughput against the model-only step")
    p.add_argument("--dataset", help="loader: a dataset folder (default: generated demo spleen data)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="loader: worker counts to measure; loop: the first is the loader's")
    p.add_argument("--patches", type=int, default=40, help="loader: baseline patches per measurement")
    p.add_argument("--iterations", type=int, help="train: timed iterations (default 10); loop: training "
                   "iterations (default 40)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   help="memory: the generated CT's size (default 96 256 256; 400 512 512 is the issue's large CT)")
    p.add_argument("--classes", type=int, default=2, help="memory: classes of the checkpoint's head (default 2)")
    p.add_argument("--large", action="store_true", help="scaling: add a 400x512x512 volume (slow)")
    p.add_argument("--repeats", type=int, default=3, help="infer/scaling/onnx: timed calls, the fastest counts "
                   "(onnx: and turns of 10 window batches)")
    p.add_argument("--cpu-time", action="store_true", help="infer/scaling: CPU seconds on one thread instead of "
                   "wall time on all (steady on a machine shared with other jobs)")
    p.add_argument("--device", help="train/infer: cpu or cuda (default: cuda when available)")
    p.set_defaults(handler=_bench)
