"""Subcommand analyze: per-stage representation similarity (CKA, SVCCA) and weight change of two encoders."""
from __future__ import annotations

import argparse

from ._common import Subparsers


def _analyze(args: argparse.Namespace) -> int:
    from ..analysis import analyze, markdown_table

    result = analyze(args.a, args.b, args.data, args.out, patches=args.patches, patch=args.patch,
                     max_examples=args.examples, seed=args.seed, device=args.device, overwrite=args.overwrite,
                     baseline=args.baseline, arch=args.arch, in_channels=args.in_channels, layout=args.layout,
                     conv=args.conv, shortcut=args.shortcut)
    print(f"A: {args.a}\nB: {args.b}\npatches: {result.data}\n")
    print(markdown_table(result.stages, result.baseline))
    print(f"\nwrote {result.csv_path}" + (f" and {result.png_path}" if result.png_path else ""))
    return 0


def add_analyze(sub: Subparsers) -> None:
    """Add ``med3d analyze``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    from ..choices import ANALYSIS_MAX_EXAMPLES as DEFAULT_MAX_EXAMPLES, ANALYSIS_PATCH as DEFAULT_PATCH
    from ..choices import ANALYSIS_PATCHES as DEFAULT_PATCHES, CONVS, LAYOUTS

    p = sub.add_parser("analyze", help="compare two weights of one encoder per stage: linear CKA, SVCCA, "
                       "relative weight change",
                       description="Compare encoder A (e.g. pretrained, or before fine-tuning) with encoder B "
                       "(after fine-tuning, or from scratch) stage by stage (stem, layer1..layer4) on seeded "
                       "patches: linear CKA and SVCCA of the activations (one example per spatial position), "
                       "and ||w_B - w_A|| / ||w_A|| over each stage's parameters.")
    p.add_argument("a", metavar="A",
                   help="reference weights: med3d checkpoint or export, or encoder weights (with --arch)")
    p.add_argument("b", metavar="B", help="weights of the same architecture to compare with A")
    p.add_argument("--data", required=True, help="patch source: a prepared cache folder (plan.json), a dataset "
                   "folder (dataset.json; prepared by A's or B's plan for it when there is one, else z-scored), "
                   "an image folder or an image file")
    p.add_argument("--out", default="analysis", help="output folder: analysis.csv, analysis.png (default ./analysis)")
    p.add_argument("--patches", type=int, default=DEFAULT_PATCHES, metavar="N",
                   help=f"number of patches (default {DEFAULT_PATCHES})")
    p.add_argument("--patch", type=int, nargs=3, default=list(DEFAULT_PATCH), metavar=("D", "H", "W"),
                   help=f"patch size (default {' '.join(map(str, DEFAULT_PATCH))})")
    p.add_argument("--examples", type=int, default=DEFAULT_MAX_EXAMPLES, metavar="M",
                   help=f"spatial positions kept per stage, spread over the patches (default {DEFAULT_MAX_EXAMPLES})")
    p.add_argument("--seed", type=int, default=0, help="draws patches and positions (default 0)")
    p.add_argument("--baseline", action="store_true",
                   help="also compare A with a fresh random initialisation of its architecture: the reference for "
                   "how low a CKA / SVCCA is (wide random networks already agree closely)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--arch", help="encoder for plain weights, e.g. resnet50")
    p.add_argument("--in-channels", type=int, default=1, help="plain weights: input channels (default 1)")
    p.add_argument("--layout", choices=LAYOUTS, default="dilated", help="plain weights: encoder layout")
    p.add_argument("--conv", choices=CONVS, default="3d", help="plain weights: 3d or slicewise")
    p.add_argument("--shortcut", choices=["A", "B"], help="plain weights: shortcut type")
    p.set_defaults(handler=_analyze)
