"""Subcommand explain: class-activation maps (Grad-CAM) on the scans' own grids."""
from __future__ import annotations

import argparse

from ._common import Subparsers


def _explain(args: argparse.Namespace) -> int:
    from ..explain import explain
    from ..paths import check_output_dir

    check_output_dir(args.out, args.inputs)  # before the model is loaded: never into an input folder
    results = explain(args.checkpoint, args.inputs, args.out, task=args.task, class_index=args.class_index,
                      method=args.method, layer=args.layer, center_mm=args.center, roi_masks=args.roi_mask,
                      device=args.device, max_voxels=args.max_voxels or None, overwrite=args.overwrite,
                      series=args.series)
    for r in results:
        print(f"{r.case}: {r.task} class {r.class_index} (score {r.score:.4g}), peak at voxel (z, y, x) "
              f"{r.peak_zyx} -> {r.cam_path}")
    print(f"{len(results)} case(s) explained into {args.out}")
    return 0


def add_explain(sub: Subparsers) -> None:
    """Add ``med3d explain``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    from ..choices import EXPLAIN_LAYERS as LAYERS, EXPLAIN_MAX_VOXELS as DEFAULT_MAX_VOXELS
    from ..choices import EXPLAIN_METHODS as METHODS

    p = sub.add_parser("explain", help="class-activation maps (Grad-CAM) of a class, on the scans' own grids")
    p.add_argument("checkpoint", help="med3d checkpoint (from pretrain / finetune)")
    p.add_argument("inputs", nargs="+", help="image files (NIfTI, NRRD, MHA), DICOM series folders, image "
                   "folders or dataset folders")
    p.add_argument("--out", required=True, help="output folder: CASE_cam.nii.gz (map in [0, 1]) and CASE_cam.png")
    p.add_argument("--series", metavar="UID", help="the SeriesInstanceUID to read from DICOM folders that hold "
                   "several series (a folder holding several is refused without it), as for predict")
    p.add_argument("--task", help="which head (needed when the checkpoint has several)")
    p.add_argument("--class", dest="class_index", type=int, metavar="K",
                   help="class to explain (default: the predicted class; for segmentation the foreground class "
                   "with the largest mean logit over the volume)")
    p.add_argument("--method", default="gradcam", choices=METHODS, help=f"{' or '.join(METHODS)} (default gradcam)")
    p.add_argument("--layer", default="layer4", choices=LAYERS, help=f"encoder stage whose features are weighted: "
                   f"{', '.join(LAYERS)} (default layer4; earlier stages give finer, less class-specific maps)")
    p.add_argument("--center", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="classification: the ROI centre of the one scan, world mm in ITK's LPS convention "
                   "(3D Slicer shows RAS: negate x and y)")
    p.add_argument("--roi-mask", nargs="+", metavar="MASK",
                   help="classification: a mask per scan (same order) whose centroid is the ROI centre")
    p.add_argument("--max-voxels", type=int, default=DEFAULT_MAX_VOXELS,
                   help=f"refuse network inputs larger than this (default {DEFAULT_MAX_VOXELS}; 0: no limit); a "
                   "segmentation task's whole scan goes through one forward and backward pass")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(handler=_explain)
