"""Subcommands new-dataset and new-config: from the user's files to a dataset and a config, without Python."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ._common import Subparsers


def _new_dataset(args: argparse.Namespace) -> int:
    from ..data.labelmap import parse_label_args
    from ..data.new_dataset import describe, new_dataset

    mapping = parse_label_args(args.labels) if args.labels else None
    path = new_dataset(args.images, args.label_dir, args.out, mapping, modality=args.modality, name=args.name)
    print(describe(path))
    print(f"next: med3d check-data {args.out}; med3d new-config {args.out} --out CONFIG.yaml")
    return 0


def _new_config(args: argparse.Namespace) -> int:
    from ..new_config import new_config

    out = Path(args.out or f"{Path(os.path.abspath(args.dataset)).name}_finetune.yaml")  # a link keeps its name
    path, warnings = new_config(args.dataset, out, args.weights, args.head, args.overwrite)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(f"wrote {path}")
    print(f"next: med3d config {path}; med3d prepare --config {path}; med3d finetune {path}")
    return 0


def add_new_dataset(sub: Subparsers) -> None:
    """Add ``med3d new-dataset``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("new-dataset", help="make a dataset folder (dataset.json + links) from a folder of scans and "
                       "one of label maps, paired by name",
                       description="Pair scans and label maps by file name (NIfTI, NRRD, MHA, DICOM series "
                       "folders) and write a Decathlon dataset.json in OUT with links to the files: nothing is "
                       "copied or rewritten. Scans without a label map become test cases.")
    p.add_argument("images", help="folder of scans")
    p.add_argument("label_dir", metavar="labels", help="folder of label maps named like the scans")
    p.add_argument("--out", required=True, help="the dataset folder to create")
    p.add_argument("--labels", nargs="+", metavar="NAME=VALUE",
                   help="structures to train on and their values in the label files, e.g. liver=5 spleen=1 "
                   "(kidney=2,3 joins values); every other value becomes background. Default: every value found")
    p.add_argument("--modality", default="CT", help="the channel's name; CT selects CT normalisation (default CT)")
    p.add_argument("--name", help="dataset name in dataset.json (default: the --out folder's name)")
    p.set_defaults(handler=_new_dataset)


def add_new_config(sub: Subparsers) -> None:
    """Add ``med3d new-config``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("new-config", help="write a commented fine-tuning config for a dataset (spacing and patch "
                       "size from its plan)")
    p.add_argument("dataset", help="dataset folder (e.g. from med3d new-dataset)")
    p.add_argument("--weights", help="pretrained encoder to start from; the encoder is configured to fit it")
    p.add_argument("--head", choices=["med3d", "unet"], default="med3d",
                   help="med3d: light head on stride-8 features; unet: decoder with skips (default med3d)")
    p.add_argument("--out", help="config file to write (default: DATASET-NAME_finetune.yaml here); data and "
                   "weight paths in it are relative to its folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing config file")
    p.set_defaults(handler=_new_config)
