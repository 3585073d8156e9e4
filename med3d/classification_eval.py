"""Image-level classification evaluation: accuracy, balanced accuracy, AUC with a bootstrap CI, calibration.

Predictions come from a CSV ``case,predicted,prob_0,...,prob_{K-1}`` (what ``med3d predict`` writes for
classification checkpoints); references from a Decathlon-style dataset.json whose entries carry a
``"class"``, or from a CSV ``image,class``. Values that are undefined (the sensitivity of a class with no
cases, an AUC without both outcomes) are ``None``, so the report is plain, valid JSON.
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .atomic import write_json_atomic
from .data.image import strip_suffix
from .errors import Med3DError
from .plotting import pyplot, save_png

PathLike = Union[str, Path]
PROB_TOLERANCE = 0.01  # rows written with a few decimals still sum to 1 within this
METRICS_FILE = "classification_metrics.json"
PLOT_FILES = {"roc": "roc_curve.png", "confusion": "confusion_matrix.png", "reliability": "reliability_diagram.png"}
PRED_HEADER = "case,predicted,prob_0,...,prob_{K-1}"
REF_CSV_HEADER = "image,class[,center_x,center_y,center_z]"


@dataclass
class Predictions:
    """The rows of a predictions CSV, in file order."""

    cases: List[str]
    predicted: np.ndarray  # (N,) class ids
    probs: np.ndarray  # (N, K) class probabilities

    @property
    def num_classes(self) -> int:
        return int(self.probs.shape[1])


# ---------------------------------------------------------------- metrics


def _roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    from monai.metrics import compute_roc_auc

    return float(compute_roc_auc(torch.as_tensor(scores, dtype=torch.float64),
                                 torch.as_tensor(positive, dtype=torch.int64)))


def _auc(y: np.ndarray, probs: np.ndarray, present: Sequence[int]) -> float:
    """Binary: AUC of class 1. Several classes: mean one-vs-rest AUC over ``present`` (classes with cases)."""
    if probs.shape[1] == 2:
        return _roc_auc(probs[:, 1], y == 1)
    return float(np.mean([_roc_auc(probs[:, c], y == c) for c in present]))


def _bootstrap_auc(y: np.ndarray, probs: np.ndarray, present: Sequence[int], n_boot: int,
                   seed: int) -> Tuple[Optional[List[float]], int]:
    """Percentile 95% interval of the AUC over case resamples, and how many resamples it used."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), size=len(y))
        if not np.isin(present, y[idx]).all():
            continue  # without some class the AUC is undefined (not 0 or 1), so the resample is left out
        values.append(_auc(y[idx], probs[idx], present))
    if not values:
        return None, 0
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)], len(values)


def _ratio(num: float, den: float) -> Optional[float]:
    return float(num / den) if den else None


def _per_class(conf: np.ndarray, names: Sequence[str]) -> List[Dict[str, Any]]:
    """One-vs-rest counts, sensitivity and specificity per class from the confusion matrix."""
    n = int(conf.sum())
    rows = []
    for c, name in enumerate(names):
        tp = int(conf[c, c])
        fn, fp = int(conf[c].sum()) - tp, int(conf[:, c].sum()) - tp
        tn = n - tp - fn - fp
        rows.append({"class": c, "name": name, "cases": tp + fn, "predicted": tp + fp, "tp": tp, "fp": fp,
                     "fn": fn, "tn": tn, "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp)})
    return rows


def _calibration(confidence: np.ndarray, correct: np.ndarray, bins: int) -> Tuple[float, List[Dict[str, Any]]]:
    """Expected calibration error over equal-width bins [i/bins, (i+1)/bins) (the last includes 1)."""
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    ece, rows = 0.0, []
    for b in range(bins):
        sel = which == b
        count = int(sel.sum())
        acc = float(correct[sel].mean()) if count else None
        conf = float(confidence[sel].mean()) if count else None
        if count:
            ece += count / len(confidence) * abs(acc - conf)
        rows.append({"lower": b / bins, "upper": (b + 1) / bins, "cases": count, "confidence": conf, "accuracy": acc})
    return float(ece), rows


def _check_shapes(y: np.ndarray, probs: np.ndarray) -> None:
    if y.ndim != 1 or not len(y) or probs.ndim != 2 or probs.shape[1] < 2 or probs.shape[0] != len(y):
        raise Med3DError(f"probs has shape {tuple(probs.shape)} for labels of shape {tuple(y.shape)}; expected "
                         "(N, K) probabilities for N >= 1 labels and K >= 2 classes")


def _check_values(y: np.ndarray, y_pred: np.ndarray, k: int, names: Sequence[str], n_boot: int, bins: int) -> None:
    for what, v in (("y_true", y), ("y_pred", y_pred)):
        if v.shape != y.shape or v.min() < 0 or v.max() >= k:
            raise Med3DError(f"{what} must hold one class id in 0..{k - 1} per case")
    if len(names) != k:
        raise Med3DError(f"class_names has {len(names)} names for {k} classes")
    if n_boot < 0 or bins < 1:
        raise Med3DError(f"n_boot ({n_boot}) must be >= 0 and bins ({bins}) >= 1")


def classification_report(y_true: Sequence[int], probs: Any, class_names: Optional[Sequence[str]] = None,
                          n_boot: int = 2000, seed: int = 0, bins: int = 10,
                          y_pred: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Accuracy, balanced accuracy, AUC with a bootstrap 95% CI, per-class sensitivity/specificity, ECE.

    The AUC is that of class 1 for two classes, else the mean one-vs-rest AUC over the classes that have
    cases (each class's one-vs-rest AUC is listed too); both come from ``monai.metrics.compute_roc_auc``.
    Its interval is the 2.5/97.5 percentile of the AUC over ``n_boot`` resamples of the cases (with
    replacement, ``numpy.random.default_rng(seed)``); resamples missing one of those classes are skipped
    (``bootstrap.used`` counts the others).
    Balanced accuracy is the mean sensitivity over classes that have cases. ECE bins the top probability
    into ``bins`` equal-width bins and weights each bin's ``|accuracy - confidence|`` by its share of cases.

    Args:
        y_true: the true class id (0..K-1) of each case.
        probs: ``(N, K)`` class probabilities.
        class_names: K names (default ``"0"``..``"K-1"``).
        n_boot: bootstrap resamples for the AUC interval (0: no interval).
        seed: seed of the bootstrap resampling.
        bins: calibration bins.
        y_pred: the predicted class of each case (default: arg-max of ``probs``); ``med3d predict`` writes it.

    Returns:
        A JSON-serialisable dict: ``cases``, ``num_classes``, ``class_names``, ``accuracy``,
        ``balanced_accuracy``, ``auc`` (``value``, ``ci95``, ``bootstrap``, and ``per_class`` for K > 2),
        ``per_class`` (counts, ``sensitivity``, ``specificity``), ``confusion_matrix`` (rows truth,
        columns prediction), ``ece`` and ``calibration_bins``. Undefined values are None.

    Raises:
        Med3DError: shapes or class ids that do not fit, a negative ``n_boot`` or ``bins`` < 1.
    """
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    _check_shapes(y, p)
    k = p.shape[1]
    pred = p.argmax(1) if y_pred is None else np.asarray(y_pred, dtype=np.int64)
    names = [str(c) for c in range(k)] if class_names is None else [str(n) for n in class_names]
    _check_values(y, pred, k, names, n_boot, bins)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (y, pred), 1)
    per_class = _per_class(conf, names)
    present = [c for c in range(k) if conf[c].sum()]
    ece, calib = _calibration(p.max(1), pred == y, bins)
    return {"cases": int(len(y)), "num_classes": k, "class_names": names,
            "accuracy": float((pred == y).mean()),
            "balanced_accuracy": float(np.mean([per_class[c]["sensitivity"] for c in present])),
            "auc": _auc_entry(y, p, present, n_boot, seed),
            "per_class": per_class, "confusion_matrix": conf.tolist(), "ece": ece, "calibration_bins": calib}


def _auc_entry(y: np.ndarray, p: np.ndarray, present: List[int], n_boot: int, seed: int) -> Dict[str, Any]:
    k = p.shape[1]
    entry: Dict[str, Any] = {"kind": "binary, class 1 positive" if k == 2 else "macro one-vs-rest"}
    if k > 2:
        with warnings.catch_warnings():  # MONAI warns for a class without cases; it is reported as None
            warnings.simplefilter("ignore")
            entry["per_class"] = [_roc_auc(p[:, c], y == c) if c in present and len(present) > 1 else None
                                  for c in range(k)]
    defined = len(present) == k if k == 2 else len(present) > 1
    value = _auc(y, p, present) if defined else None
    ci, used = _bootstrap_auc(y, p, present, n_boot, seed) if defined else (None, 0)
    entry.update({"value": value, "ci95": ci, "classes": present if k > 2 else [0, 1],
                  "bootstrap": {"method": "percentile", "requested": n_boot, "used": used, "seed": seed}})
    return entry


# ---------------------------------------------------------------- readers


def _read_rows(path: Path, what: str) -> Tuple[List[str], List[Tuple[int, List[str]]]]:
    """Header and ``(line number, fields)`` of each non-blank row of a CSV file."""
    if not path.is_file():
        raise Med3DError(f"{path}: {what} not found; check the path")
    try:
        reader = csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline=""))
        rows = [(reader.line_num, [f.strip() for f in row]) for row in reader if any(f.strip() for f in row)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise Med3DError(f"{path}: not a readable CSV ({err}); save it as UTF-8 text with comma separators")
    if not rows:
        raise Med3DError(f"{path}: empty; expected a header line and one row per case")
    return rows[0][1], rows[1:]


def _class_id(value: Any, where: str) -> int:
    """A non-negative integer class id from JSON or CSV (``1``, ``1.0`` or ``"1"``; not ``1.5`` or ``true``)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and float(value).is_integer():
        return int(value)
    raise Med3DError(f"{where}: class {value!r} is not a class id; use an integer 0, 1, ...")


def _prob_row(fields: List[str], where: str) -> np.ndarray:
    try:
        row = np.array([float(f) for f in fields])
    except ValueError:
        raise Med3DError(f"{where}: probability {fields} is not a number; write plain decimals")
    if not np.isfinite(row).all() or (row < 0).any() or (row > 1 + PROB_TOLERANCE).any():
        raise Med3DError(f"{where}: probabilities {fields} must each lie in [0, 1]")
    if abs(row.sum() - 1) > PROB_TOLERANCE:
        raise Med3DError(f"{where}: probabilities sum to {row.sum():.4f}; they must sum to 1 "
                         "(softmax outputs, not logits)")
    return row


def read_predictions_csv(path: PathLike) -> Predictions:
    """Read a classification predictions CSV with header ``case,predicted,prob_0,...,prob_{K-1}``.

    Args:
        path: the CSV file (one row per case; K >= 2 probability columns).

    Returns:
        The cases, predicted class ids and ``(N, K)`` probabilities in file order.

    Raises:
        Med3DError: a missing file, another header, a short row, a repeated case, probabilities that are
            not numbers in [0, 1] summing to 1, or a ``predicted`` that is not the most probable class.
    """
    path = Path(path)
    header, rows = _read_rows(path, "predictions CSV")
    k = len(header) - 2
    if k < 2 or header != ["case", "predicted"] + [f"prob_{i}" for i in range(k)]:
        raise Med3DError(f"{path}: header is '{','.join(header)}'; expected '{PRED_HEADER}' with K >= 2")
    cases, seen, predicted, probs = [], {}, [], []
    for line, fields in rows:
        where = f"{path}, line {line}"
        if len(fields) != len(header) or not fields[0]:
            raise Med3DError(f"{where}: {len(fields)} fields, expected {len(header)} ({PRED_HEADER}) with a case id")
        case = fields[0]
        if case in seen:
            raise Med3DError(f"{where}: case {case} already on line {seen[case]}; give each case one row")
        seen[case] = line
        row = _prob_row(fields[2:], f"{where} (case {case})")
        pred = _class_id(fields[1], f"{where} (case {case})")
        if pred >= k or row[pred] < row.max():
            raise Med3DError(f"{where} (case {case}): predicted is {pred} but the most probable class is "
                             f"{int(row.argmax())}; 'predicted' must be the arg-max of prob_0..prob_{k - 1}")
        cases.append(case)
        predicted.append(pred)
        probs.append(row)
    if not cases:
        raise Med3DError(f"{path}: no rows after the header; expected one row per case")
    return Predictions(cases, np.array(predicted, dtype=np.int64), np.stack(probs))


def _add_case(classes: Dict[str, int], origin: Dict[str, str], image: Any, value: Any, where: str,
              names: Optional[Dict[int, str]]) -> None:
    first = image[0] if isinstance(image, list) and image else image  # one path per channel: the first names it
    if not isinstance(first, str) or not first.strip():
        raise Med3DError(f"{where}: 'image' must be a file path such as ./imagesTr/case_001.nii.gz")
    case = strip_suffix(first.strip())
    if case in classes:
        raise Med3DError(f"{where}: case {case} is already listed at {origin[case]}; list each case once")
    by_name = {v: k for k, v in (names or {}).items()}
    text = value.strip() if isinstance(value, str) else None
    if text is not None and by_name and text not in by_name and not text.isdigit():
        raise Med3DError(f"{where}: class {value!r} is neither a class id nor one of the names {sorted(by_name)}")
    classes[case] = by_name[text] if text in by_name else _class_id(value, where)
    origin[case] = where


def _names_table(raw: Any, path: Path) -> Optional[Dict[int, str]]:
    """Class names from ``{"0": "benign", ...}``, ``{"benign": 0, ...}`` or ``["benign", ...]``."""
    if raw is None:
        return None
    if isinstance(raw, list):
        raw = {str(i): name for i, name in enumerate(raw)}
    if isinstance(raw, dict) and raw and all(str(k).strip().isdigit() for k in raw):
        return {int(k): str(v) for k, v in raw.items()}
    if isinstance(raw, dict) and raw and all(type(v) is int and v >= 0 for v in raw.values()):
        return {v: str(k) for k, v in raw.items()}  # name -> id, as nnU-Net writes labels
    raise Med3DError(f"{path}: 'classes' must map class ids to names, e.g. {{\"0\": \"benign\", "
                     "\"1\": \"malignant\"}")


def _reference_json(path: Path) -> Tuple[Dict[str, int], Optional[Dict[int, str]]]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Med3DError(f"{path}: not valid JSON ({err}); fix the file or pass a CSV with header {REF_CSV_HEADER}")
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise Med3DError(f"{path}: no 'training' list; list cases as {{\"image\": ..., \"class\": ...}} under "
                         "'training' (and 'validation', 'test')")
    names = _names_table(meta.get("classes"), path)
    classes: Dict[str, int] = {}
    origin: Dict[str, str] = {}
    for section in ("training", "validation", "test"):
        for i, entry in enumerate(meta.get(section) or []):
            where = f"{path}: {section}[{i}]"
            if section == "test" and (not isinstance(entry, dict) or "class" not in entry):
                continue  # unlabelled test entries (plain paths) are normal in Decathlon files
            if not isinstance(entry, dict) or "class" not in entry:
                raise Med3DError(f"{where} has no 'class'; give every {section} entry a class id")
            _add_case(classes, origin, entry.get("image"), entry["class"], where, names)
    if not classes:
        raise Med3DError(f"{path}: no entry with a 'class'; list cases as {{\"image\": ..., \"class\": ...}}")
    return classes, names


def _csv_names(values: List[str]) -> Optional[Dict[int, str]]:
    """Names when the class column holds names only: sorted and numbered from 0, as training numbers them."""
    if not values or any(v.lstrip("-").isdigit() for v in values):
        return None
    return dict(enumerate(sorted(set(values))))


class _NumberedNames(dict):
    """Class names numbered from the names a reference CSV happens to hold (not a declared table)."""


def _reference_csv(path: Path) -> Tuple[Dict[str, int], Optional[Dict[int, str]]]:
    header, rows = _read_rows(path, "reference CSV")
    header = [h.lower() for h in header]
    if "image" not in header or "class" not in header:
        raise Med3DError(f"{path}: header is '{','.join(header)}'; expected '{REF_CSV_HEADER}'")
    col_image, col_class = header.index("image"), header.index("class")
    for line, fields in rows:
        if len(fields) != len(header):
            raise Med3DError(f"{path}, line {line}: {len(fields)} fields, expected {len(header)} as in the header")
    labelled = [(line, fields) for line, fields in rows if fields[col_class].strip()]  # empty class: unlabelled
    found = _csv_names([fields[col_class].strip() for _, fields in labelled])
    names = _NumberedNames(found) if found is not None else None
    classes: Dict[str, int] = {}
    origin: Dict[str, str] = {}
    for line, fields in labelled:
        image = fields[col_image].split(";")  # one file per channel, as in training CSVs: the first names it
        _add_case(classes, origin, image, fields[col_class], f"{path}, line {line}", names)
    if not classes:
        raise Med3DError(f"{path}: no rows after the header; expected one row per case")
    return classes, names


def read_reference(path: PathLike) -> Tuple[Dict[str, int], Optional[Dict[int, str]]]:
    """Read true classes from a dataset.json (or its folder) or from a CSV ``image,class[,center_x,...]``.

    A case id is the image file name without its image suffix (``./imagesTr/case_001.nii.gz`` ->
    ``case_001``; for a list of channel files, the first). In a dataset.json every ``training`` and
    ``validation`` entry needs ``"image"`` and ``"class"``; ``test`` entries without a class are skipped.
    Names come from top-level ``"classes"`` (``{"0": "benign", ...}``, ``{"benign": 0, ...}`` or a list), and
    a class may be given by its name. A CSV may hold names instead of ids in its class column; they are then
    numbered in sorted order from 0, as for training.

    Args:
        path: a dataset.json, a folder holding one, or a ``.csv`` file.

    Returns:
        Case id -> class id, and class id -> name (None when the file names no classes).

    Raises:
        Med3DError: a missing or malformed file, an entry without image or class, a class that is neither a
            non-negative integer nor a declared name, or a case listed twice.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise Med3DError(f"{path}: reference not found; pass a dataset.json (or its folder) or a CSV with "
                         f"header {REF_CSV_HEADER}")
    if path.suffix.lower() == ".csv":
        return _reference_csv(path)
    return _reference_json(path)


# ---------------------------------------------------------------- plots


def _roc_points(scores: np.ndarray, positive: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at each distinct threshold (for drawing; the AUC comes from MONAI)."""
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positive[order].astype(float)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # tied scores move the curve in one step
    tps, fps = np.cumsum(pos)[last], np.cumsum(1 - pos)[last]
    return np.r_[0.0, fps] / max(fps[-1], 1), np.r_[0.0, tps] / max(tps[-1], 1)


def plot_roc(y_true: Sequence[int], probs: Any, report: Dict[str, Any], path: PathLike) -> Optional[Path]:
    """ROC curve of class 1 (two classes) or one-vs-rest curves of each class with cases.

    Args:
        y_true: true class ids.
        probs: ``(N, K)`` probabilities.
        report: ``classification_report``'s result for the same cases (AUCs and names for the legend).
        path: the PNG to write.

    Returns:
        ``path``, or None without matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return None
    y, p = np.asarray(y_true), np.asarray(probs, dtype=float)
    names, auc = report["class_names"], report["auc"]
    curves = [(1, auc["value"])] if p.shape[1] == 2 else list(zip(range(p.shape[1]), auc["per_class"]))
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    curves = [(c, value) for c, value in curves if value is not None]  # no curve without both outcomes
    for c, value in curves:
        fpr, tpr = _roc_points(p[:, c], y == c)
        ax.plot(fpr, tpr, label=f"{names[c]} (AUC {value:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title="ROC" if curves else "ROC (undefined: a class has no cases)")
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    return save_png(fig, path)


def plot_confusion(report: Dict[str, Any], path: PathLike) -> Optional[Path]:
    """Confusion matrix (rows truth, columns prediction) with counts in the cells.

    Args:
        report: ``classification_report``'s result.
        path: the PNG to write.

    Returns:
        ``path``, or None without matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return None
    conf, names = np.array(report["confusion_matrix"]), report["class_names"]
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.0 * k + 2.5, 1.0 * k + 2))
    ax.imshow(conf, cmap="Blues")
    for (i, j), v in np.ndenumerate(conf):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > conf.max() / 2 else "black")
    ax.set_xticks(range(k), names, rotation=30, ha="right")
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    return save_png(fig, path)


def plot_reliability(report: Dict[str, Any], path: PathLike) -> Optional[Path]:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the ECE in the title.

    Args:
        report: ``classification_report``'s result.
        path: the PNG to write.

    Returns:
        ``path``, or None without matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return None
    bins = [b for b in report["calibration_bins"] if b["cases"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    ax.bar([b["lower"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
           edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C3", label="mean confidence")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="confidence (top probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.01),
           title=f"Reliability (ECE {report['ece']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    return save_png(fig, path)


# ---------------------------------------------------------------- evaluation


def _names_for(names: Optional[Dict[int, str]], k: int, reference: PathLike, pred_csv: PathLike) -> List[str]:
    if isinstance(names, _NumberedNames) and len(names) != k:
        # Numbering names by sorting is only the training numbering when every class appears.
        raise Med3DError(f"{reference}: its class column names {len(names)} of the {k} classes, so their ids "
                         "cannot be known; give class ids (0..K-1) instead of names, or a dataset.json with "
                         "'classes'")
    names = names or {}
    if names and max(names) >= k:
        raise Med3DError(f"{reference}: names {max(names) + 1} classes but {pred_csv} has {k} probability "
                         "columns; evaluate predictions of a model trained on these classes")
    return [names.get(c, str(c)) for c in range(k)]


def _join(preds: Predictions, truth: Dict[str, int], pred_csv: PathLike, reference: PathLike) -> List[int]:
    """Row indices of the predictions that have a reference class (checked to be in 0..K-1)."""
    k = preds.num_classes
    for case, c in truth.items():
        if c >= k:
            raise Med3DError(f"{reference}: case {case} has class {c} but {pred_csv} has only prob_0..prob_{k - 1}; "
                             "check that both are for the same task")
    rows = [i for i, case in enumerate(preds.cases) if case in truth]
    if not rows:
        raise Med3DError(f"no case of {pred_csv} (e.g. {preds.cases[0]}) is in {reference} (e.g. {next(iter(truth))}); "
                         "case ids must be the image file names without suffix in both")
    return rows


def evaluate_classification(pred_csv: PathLike, reference: PathLike, out_dir: PathLike, n_boot: int = 2000,
                            seed: int = 0, bins: int = 10, plots: bool = True) -> Dict[str, Any]:
    """Evaluate a predictions CSV against reference classes; write the metrics JSON and plots.

    Predictions and references are joined by case id; cases in only one of them are listed in the report
    (``unmatched``) and left out of the metrics.

    Args:
        pred_csv: predictions CSV (``case,predicted,prob_0,...,prob_{K-1}``).
        reference: dataset.json, its folder, or a CSV ``image,class``.
        out_dir: where ``classification_metrics.json`` and the PNGs go (created if missing).
        n_boot: bootstrap resamples for the AUC interval.
        seed: seed of the bootstrap.
        bins: calibration bins.
        plots: write ``roc_curve.png``, ``confusion_matrix.png`` and ``reliability_diagram.png``
            (skipped without matplotlib).

    Returns:
        ``classification_report``'s dict plus ``inputs``, ``unmatched`` and ``files`` (paths written).

    Raises:
        Med3DError: unreadable or malformed inputs (see the readers), classes that do not fit the
            probability columns, or no case in common.
    """
    preds = read_predictions_csv(pred_csv)
    truth, names = read_reference(reference)
    class_names = _names_for(names, preds.num_classes, reference, pred_csv)
    rows = _join(preds, truth, pred_csv, reference)
    y = [truth[preds.cases[i]] for i in rows]
    report = classification_report(y, preds.probs[rows], class_names, n_boot, seed, bins, preds.predicted[rows])
    report["inputs"] = {"predictions": str(pred_csv), "reference": str(reference)}
    report["unmatched"] = {"predictions_without_reference": [c for c in preds.cases if c not in truth],
                           "references_without_prediction": sorted(set(truth) - set(preds.cases))}
    out = Path(out_dir)
    files = {"metrics": str(out / METRICS_FILE)}
    if plots:
        written = {"roc": plot_roc(y, preds.probs[rows], report, out / PLOT_FILES["roc"]),
                   "confusion": plot_confusion(report, out / PLOT_FILES["confusion"]),
                   "reliability": plot_reliability(report, out / PLOT_FILES["reliability"])}
        files.update({k: str(v) for k, v in written.items() if v is not None})
    report["files"] = files
    write_json_atomic(out / METRICS_FILE, report)
    return report


def _num(v: Optional[float]) -> str:
    return "  n/a" if v is None else f"{v:.3f}"


def format_summary(report: Dict[str, Any], limit: int = 10) -> str:
    """A few lines for the terminal: headline metrics, per-class table, unmatched cases, output files.

    Args:
        report: ``evaluate_classification``'s result.
        limit: at most this many unmatched predictions are named.

    Returns:
        The text (no trailing newline).
    """
    auc, boot = report["auc"], report["auc"]["bootstrap"]
    ci = (f"  95% CI {auc['ci95'][0]:.3f}-{auc['ci95'][1]:.3f} ({boot['used']} of {boot['requested']} resamples)"
          if auc["ci95"] else "")
    lines = [f"{report['cases']} case(s), {report['num_classes']} classes ({', '.join(report['class_names'])})",
             f"accuracy           {_num(report['accuracy'])}",
             f"balanced accuracy  {_num(report['balanced_accuracy'])}",
             f"AUC                {_num(auc['value'])}{ci}; {auc['kind']}",
             f"ECE                {_num(report['ece'])}  ({len(report['calibration_bins'])} bins)",
             f"{'class':<24} {'cases':>5} {'sensitivity':>11} {'specificity':>11}"
             + (f" {'AUC OvR':>7}" if "per_class" in auc else "")]
    for i, c in enumerate(report["per_class"]):
        lines.append(f"{c['name']:<24} {c['cases']:>5} {_num(c['sensitivity']):>11} {_num(c['specificity']):>11}"
                     + (f" {_num(auc['per_class'][i]):>7}" if "per_class" in auc else ""))
    missing = report["unmatched"]["predictions_without_reference"]
    where = report["inputs"]
    lines += [f"error: {where['predictions']}: no reference for case {c} in {where['reference']}"
              for c in missing[:limit]]
    if len(missing) > limit:
        lines.append(f"error: ... and {len(missing) - limit} more prediction(s) without a reference")
    extra = len(report["unmatched"]["references_without_prediction"])
    if extra:
        lines.append(f"{extra} reference case(s) without a prediction were left out")
    files = report["files"]
    plots = [Path(v).name for k, v in files.items() if k != "metrics"]
    lines.append(f"metrics in {files['metrics']}" + (f"; plots {', '.join(plots)} beside it" if plots else ""))
    return "\n".join(lines)
