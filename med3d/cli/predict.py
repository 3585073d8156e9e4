"""Subcommands predict and evaluate."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..errors import Med3DError
from ._common import Subparsers


def _predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.image import read_channels, write_image
    from ..preview import save_preview

    from ..inference.classify import is_classifier

    from ..inference.ensemble import load_models, write_record
    from ..values import check_window

    check_window(args.overlap, args.sw_batch)  # one line for the whole run, not one per case
    if args.overlap > 0.9:  # windows grow as 1 / (1 - overlap)^3: 0.99 means a million times those at 0
        print(f"note: --overlap {args.overlap} runs about {1 / (1 - args.overlap) ** 3:.0f}x as many windows as "
              "--overlap 0 (the default 0.5: 8x); this can take hours per scan")
    cases = _check_outputs(args)  # before the models are loaded: nothing is read or written in vain
    predictor = load_models(args.checkpoint, args.ensemble, args.device)  # several: their averaged probabilities
    task = predictor.task(args.task)
    if is_classifier(predictor, task):
        return _classify(args, predictor, task)
    if cases is None:  # a classification dataset given to a segmentation model: its scans are segmented
        cases = _check_outputs(args, scans=True)
    if getattr(predictor, "meta", {}).get("onnx_providers") and not args.quiet:
        print("onnxruntime providers: " + ", ".join(predictor.meta["onnx_providers"]))
    out = Path(args.out)
    if not cases:
        raise Med3DError("no input scans found in " + ", ".join(args.inputs))
    failed = 0
    for case_id, files in tqdm(cases, desc="predict", unit="case", disable=args.quiet):
        target = out / _output_names(case_id, files[0])[0]
        try:
            if target.exists() and not args.overwrite:
                raise Med3DError(f"{target}: already exists; pass --overwrite to replace it")
            image = read_channels(files, series=args.series)
            pred = predictor(image, task, overlap=args.overlap, mirror=args.mirror, sw_batch_size=args.sw_batch,
                             where=str(files[0]), probabilities=args.probabilities)
            write_image(target, pred.labels, pred.geometry, overwrite=args.overwrite)
            _drift_check(image, predictor.meta["plans"][task], out / f"{case_id}_drift.json", str(files[0]))
            if args.probabilities:
                write_image(out / f"{case_id}_probs.nii.gz", pred.probabilities.astype("float32"), pred.geometry,
                            overwrite=args.overwrite)
            if args.preview:
                save_preview(image.array[0], pred.labels, out / f"{case_id}_preview.png", image.geometry.spacing_zyx,
                             title=f"{case_id} ({task})", direction=image.geometry.direction)
        except Med3DError as err:
            failed += 1
            tqdm.write(f"error: {err}")
    write_record(predictor, task, out)
    print(f"{len(cases) - failed} of {len(cases)} case(s) predicted into {out}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def _output_names(case_id: str, first: Path) -> List[str]:
    """The files ``predict`` writes for a case (segmentation), in ``--out``."""
    from ..data.image import image_suffix

    suffix = (image_suffix(first) if first.is_file() else "") or ".nii.gz"
    return [f"{case_id}{suffix}", f"{case_id}_drift.json", f"{case_id}_probs.nii.gz", f"{case_id}_preview.png"]


def _check_outputs(args: argparse.Namespace, scans: bool = False) -> Optional[List[Tuple[str, List[Path]]]]:
    """Refuse, before any work, an ``--out`` that cannot be written or would destroy an input, and a run
    whose every input has a header that would be refused when read.

    Args:
        args: the parsed command line.
        scans: take a classification dataset as the scans it lists (for a segmentation model).

    Returns:
        The segmentation cases (``collect_inputs``), or None for a classification dataset (its own reader)
        unless ``scans``.
    """
    from ..data.classification import is_classification_dataset
    from ..data.image import inspect_image
    from ..inference import collect_inputs
    from ..paths import check_output_dir, check_targets

    out = check_output_dir(args.out, args.inputs)
    models = [args.checkpoint, *args.ensemble]
    if not scans and len(args.inputs) == 1 and is_classification_dataset(args.inputs[0]):
        check_targets([out / "predictions.csv"], [*args.inputs, *models])
        return None
    cases = collect_inputs(args.inputs)
    targets = [out / "predictions.csv"] + [out / name for case, files in cases
                                           for name in _output_names(case, files[0])]
    check_targets(targets, [*(f for _, files in cases for f in files), *models])
    # Headers only (geometry, declared size, DICOM series): when no input would be read, refuse now rather
    # than after loading the model; otherwise each bad case is reported as it comes and the rest are done.
    refusals = []
    for _, files in cases:
        try:
            for f in files:
                inspect_image(f, series=args.series)
        except Med3DError as err:
            refusals.append(str(err))
    if cases and len(refusals) == len(cases):
        more = f" (and {len(refusals) - 1} more input(s) refused; nothing to predict)" if len(refusals) > 1 else ""
        raise Med3DError(refusals[0] + more)
    return cases


def _drift_check(image: Any, plan: dict, target: Path, where: str) -> None:
    """Compare the scan's intensities with the training scans': a warning line when outside, always a JSON."""
    from tqdm import tqdm

    from ..atomic import write_json_atomic
    from ..inference.drift import drift_report, drift_warning

    report = drift_report(image, plan)
    line = drift_warning(report, where)
    if line:
        tqdm.write(line)
    write_json_atomic(target, {"scan": where, **report})


def _classify(args: argparse.Namespace, predictor: Any, task: str) -> int:
    """``med3d predict`` for a classification task: one CSV row of class probabilities per scan."""
    from tqdm import tqdm

    from ..data.classification import ClassCase, roi_center_mm
    from ..data.image import read_channels
    from ..inference.classify import write_predictions_csv
    from ..inference.ensemble import classify_scan, write_record
    from ..inference.inputs import roi_jobs

    target = Path(args.out) / "predictions.csv"
    if target.exists() and not args.overwrite:  # before the work, not after it
        raise Med3DError(f"{target}: already exists; pass --overwrite to replace it")
    jobs = roi_jobs(args.inputs, args.center, args.roi_mask)
    if not jobs:
        raise Med3DError("no input scans found in " + ", ".join(args.inputs))
    rows, failed = [], 0
    for case_id, files, mask, center in tqdm(jobs, desc="classify", unit="case", disable=args.quiet):
        try:
            image = read_channels(files, series=args.series)
            if center is None and mask is not None:
                center = roi_center_mm(ClassCase(case_id, list(files), None, mask=mask), image)
            rows.append(classify_scan(predictor, image, task, center, case_id, where=str(files[0])))
        except Med3DError as err:
            failed += 1
            tqdm.write(f"error: {err}")
    write_predictions_csv(target, rows, overwrite=args.overwrite)
    write_record(predictor, task, target.parent)
    names = predictor.meta["plans"][task]["classes"]
    for r in rows[:20]:
        print(f"{r.case_id}: {names[str(r.predicted)]} (p = {r.probabilities[r.predicted]:.3f})")
    print(f"{len(rows)} of {len(jobs)} case(s) classified into {target}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def _fmt(v: float) -> str:
    return "   nan" if not math.isfinite(v) else f"{v:6.3f}"


def _evaluate(args: argparse.Namespace) -> int:
    from ..paths import check_output_dir

    # Outputs may go into PRED (the default) but never into the references, checked before any work.
    out = check_output_dir(args.out or (args.pred if Path(args.pred).is_dir() else Path(args.pred).parent),
                           [args.pred, args.ref], allow_inside=[args.pred])
    if Path(args.pred).suffix.lower() == ".csv":  # image-level classification: one row of probabilities per case
        from ..classification_eval import evaluate_classification, format_summary

        report = evaluate_classification(args.pred, args.ref, out,
                                         n_boot=args.bootstrap, seed=args.seed, plots=not args.no_plot)
        print(format_summary(report))
        return 1 if report["unmatched"]["predictions_without_reference"] else 0
    from ..evaluate import FIELDS, dice_boxplot, evaluate_folders, summarize, write_csv

    rows, problems = evaluate_folders(Path(args.pred), Path(args.ref), args.classes, args.tolerance,
                                      progress=not args.quiet)
    for line in problems:
        print(f"error: {line}")
    if not rows:
        raise Med3DError(f"no prediction in {args.pred} could be evaluated against {args.ref}")
    write_csv(out / "metrics.csv", rows, FIELDS)
    summary = summarize(rows)
    write_csv(out / "summary.csv", summary)
    if not args.no_plot:
        dice_boxplot(rows, out / "dice_boxplot.png")
    print(f"{'class':<24} {'cases':>5} {'Dice mean':>9} {'std':>6} {'median':>6} {'HD95 mm':>8} "
          f"{'NSD@' + str(args.tolerance) + 'mm':>10}")
    for s in summary:
        print(f"{s['label']:<24} {s['cases']:>5} {_fmt(s['dice_mean']):>9} {_fmt(s['dice_std']):>6} "
              f"{_fmt(s['dice_median']):>6} {_fmt(s['hd95_mm_mean']):>8} {_fmt(s['nsd_mean']):>10}")
    print(f"per-case metrics in {out / 'metrics.csv'}, summary in {out / 'summary.csv'}")
    return 1 if problems else 0


def add_predict(sub: Subparsers) -> None:
    """Add ``med3d predict``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("predict", help="segment new scans (label maps in the scans' own geometry) or classify "
                       "them (predictions.csv of class probabilities)")
    p.add_argument("checkpoint", help="med3d checkpoint (from pretrain / finetune), or its ONNX export "
                   "(med3d export --format onnx; run by onnxruntime)")
    p.add_argument("--ensemble", action="append", default=[], metavar="CHECKPOINT",
                   help="also use this checkpoint (repeatable; e.g. the other folds' best.pt) and average the "
                   "probabilities; every one must share the plan. ensemble.json beside the outputs names them")
    p.add_argument("inputs", nargs="+", help="image files (NIfTI, NRRD, MHA), DICOM series folders, image "
                   "folders or dataset folders")
    p.add_argument("--out", required=True, help="output folder (outside the input folders: outputs never "
                   "replace inputs)")
    p.add_argument("--series", metavar="UID", help="the SeriesInstanceUID to read from DICOM folders that hold "
                   "several series (a folder holding several is refused without it)")
    p.add_argument("--task", help="which head (needed when the checkpoint has several)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5; "
                   "the window count grows as 1 / (1 - overlap)^3)")
    p.add_argument("--mirror", action="store_true", help="test-time augmentation: average over mirrored copies")
    p.add_argument("--sw-batch", type=int, default=2, help="windows per forward pass (default 2)")
    p.add_argument("--probabilities", action="store_true", help="also write softmax maps (CASE_probs.nii.gz)")
    p.add_argument("--preview", action="store_true", help="also write a PNG preview per case")
    p.add_argument("--center", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="classification: the ROI centre of the one scan, world mm in ITK's LPS convention "
                   "(3D Slicer shows RAS: negate x and y)")
    p.add_argument("--roi-mask", nargs="+", metavar="MASK",
                   help="classification: a mask per scan (same order) whose centroid is the ROI centre")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_predict)


def add_evaluate(sub: Subparsers) -> None:
    """Add ``med3d evaluate``.

    Args:
        sub: the subcommands of the ``med3d`` parser.
    """
    p = sub.add_parser("evaluate", help="Dice / HD95 / surface Dice of predictions against references; "
                       "accuracy / AUC / calibration for a classification predictions CSV")
    p.add_argument("pred", help="folder of predicted label maps, or a classification predictions CSV "
                   "(case,predicted,prob_0,...,prob_{K-1})")
    p.add_argument("ref", help="folder of reference label maps, or a dataset folder (labelsTr, label names); for a "
                   "predictions CSV: a dataset.json (or its folder) with a 'class' per entry, or a CSV image,class")
    p.add_argument("--classes", type=int, nargs="+", help="label values to evaluate (default: all present)")
    p.add_argument("--tolerance", type=float, default=2.0, help="surface-Dice tolerance in mm (default 2)")
    p.add_argument("--out", help="where metrics.csv, summary.csv and the box plot go (default: PRED); for a "
                   "predictions CSV, classification_metrics.json and the plots (default: the CSV's folder)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                   help="classification: bootstrap resamples for the AUC 95%% CI (default 2000; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="classification: bootstrap seed (default 0)")
    p.add_argument("--no-plot", action="store_true", help="skip the plots")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_evaluate)
