"""Subcommands pseudo-label and teacher-student."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import Med3DError
from ._common import Subparsers


def _pseudo_label(args: argparse.Namespace) -> int:
    from ..inference.pseudo import MANIFEST, write_pseudo_labels

    record, failed = write_pseudo_labels(args.checkpoint, args.inputs, args.out, args.task, args.mirror,
                                         args.overlap, args.sw_batch, args.device, args.series, args.overwrite,
                                         progress=not args.quiet)
    n = len(record["cases"]) + len(failed)
    if not record["cases"]:
        raise Med3DError(f"none of the {n} scan(s) could be pseudo-labelled; first: {failed[0]}")
    print(f"{len(record['cases'])} of {n} scan(s) pseudo-labelled into {args.out} (labels, confidence maps, "
          f"{MANIFEST})" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def _teacher_student(args: argparse.Namespace) -> int:
    from ..study.teacher_student import load_rounds, run_rounds

    plan = load_rounds(args.config, args.set)
    rows = run_rounds(plan, progress=not args.quiet)
    for row in rows:
        print(f"round {row['round']}: {row['role']}, final score {row['final']:.3f} (best {row['best']:.3f})"
              + (f", {row['pseudo_cases']} pseudo-labelled scan(s)" if row["pseudo_cases"] else ""))
    print(f"summary in {Path(plan.out_dir) / 'rounds.md'}")
    return 0


def add_pseudo_label(sub: Subparsers) -> None:
    """Add ``med3d pseudo-label``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    from ..values import cli_type, at_least, fraction

    p = sub.add_parser("pseudo-label", help="label scans with a trained segmentation model for a student to "
                       "learn from: label maps and per-voxel confidence in each scan's own geometry",
                       description="Writes OUT/CASE.nii.gz (labels), OUT/CASE_confidence.nii.gz (probability of "
                       "the chosen class; with --mirror times the share of mirrored copies that agree) and "
                       "OUT/pseudo_labels.json, which data.datasets.<task>.pseudo.path names for fine-tuning.")
    p.add_argument("checkpoint", help="segmentation checkpoint (the teacher), or its ONNX export")
    p.add_argument("inputs", nargs="+", help="image files (NIfTI, NRRD, MHA), DICOM series folders, image "
                   "folders or dataset folders (their test images, else their training images)")
    p.add_argument("--out", required=True, help="output folder (outside the input folders)")
    p.add_argument("--task", help="which head (needed when the checkpoint has several)")
    p.add_argument("--mirror", action="store_true", help="average the 8 mirrored copies and fold their "
                   "agreement into the confidence")
    p.add_argument("--overlap", type=cli_type(fraction, "--overlap"), default=0.5,
                   help="sliding-window overlap (default 0.5)")
    p.add_argument("--sw-batch", type=cli_type(at_least(1), "--sw-batch", int), default=2,
                   help="windows per forward pass")
    p.add_argument("--series", metavar="UID", help="the SeriesInstanceUID to read from DICOM folders that hold "
                   "several series")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier pseudo-labels in --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_pseudo_label)


def add_teacher_student(sub: Subparsers) -> None:
    """Add ``med3d teacher-student``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("teacher-student", help="noisy-student rounds: a teacher trained on the labelled cases "
                       "pseudo-labels unlabelled scans, a student trains on both and becomes the next teacher",
                       description="A fine-tuning config with a 'teacher_student:' section (unlabelled, rounds, "
                       "threshold, loss_weight, mirror, augment). Runs go to RUN/round_N, pseudo-labels to "
                       "RUN/pseudo_N; run it again to continue (finished rounds are skipped).")
    p.add_argument("config", help="YAML config with a teacher_student section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_teacher_student)
