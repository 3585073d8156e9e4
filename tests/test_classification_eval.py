"""Classification evaluation: metrics against hand-computed values, the readers, the CLI and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from med3d.classification_eval import (classification_report, evaluate_classification, read_predictions_csv,
                                       read_reference)
from med3d.cli import main
from med3d.errors import Med3DError

# Binary example. Class-1 scores: positives 0.65, 0.8, 0.3 and negatives 0.1, 0.6; of the 6 positive-negative
# pairs only (0.3, 0.6) is discordant, so AUC = 5/6. Arg-max predictions 0,1,1,1,0.
Y2 = [0, 0, 1, 1, 1]
P2 = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8], [0.7, 0.3]])
# Three classes, truth 0,1,2,0,1,2. One-vs-rest pair counts (ties count 1/2):
#   class 0: positives 0.7, 0.3 vs 0.2, 0.1, 0.2, 0.5 -> 4 + 3 = 7 of 8      -> 0.875
#   class 1: positives 0.5, 0.2 vs 0.2, 0.3, 0.4, 0.25 -> 4 + 0.5 = 4.5 of 8 -> 0.5625
#   class 2: positives 0.6, 0.25 vs 0.1, 0.3, 0.3, 0.6 -> 3.5 + 1 = 4.5 of 8 -> 0.5625; macro 2/3.
Y3 = [0, 1, 2, 0, 1, 2]
P3 = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3], [0.2, 0.2, 0.6],
               [0.5, 0.25, 0.25]])


def pair_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUC by counting concordant positive-negative pairs (ties 1/2), independent of MONAI."""
    pos, neg = scores[positive][:, None], scores[~positive][None]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def numpy_bootstrap(y, probs, n_boot, seed):
    """The percentile bootstrap from scratch: same resampling, resamples missing a class skipped."""
    y, probs = np.asarray(y), np.asarray(probs)
    k = probs.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), size=len(y))
        yb, pb = y[idx], probs[idx]
        if len(set(yb.tolist())) < k:
            continue
        aucs = [pair_auc(pb[:, 1], yb == 1)] if k == 2 else [pair_auc(pb[:, c], yb == c) for c in range(k)]
        values.append(np.mean(aucs))
    return np.percentile(values, [2.5, 97.5]).tolist(), len(values)


def write_pred_csv(path: Path, rows, k: int = 2) -> Path:
    header = ",".join(["case", "predicted"] + [f"prob_{i}" for i in range(k)])
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def binary_files(tmp: Path):
    """Predictions for cases a..e (the binary example) and a dataset.json naming their classes."""
    pred = write_pred_csv(tmp / "pred.csv", [(c, int(p.argmax()), *p) for c, p in zip("abcde", P2)])
    ref = tmp / "dataset.json"
    ref.write_text(json.dumps({
        "name": "toy", "classes": {"0": "benign", "1": "malignant"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "class": y} for c, y in zip("abc", Y2)],
        "test": ["./imagesTs/unlabelled.nii.gz", {"image": "./imagesTs/d.nrrd", "class": 1},
                 {"image": "./imagesTs/e.mha", "class": 1}, {"image": "./imagesTs/extra.nii.gz", "class": 0}]}))
    return pred, ref


# ---------------------------------------------------------------- metrics


def test_binary_metrics_match_hand_computed_values():
    r = classification_report(Y2, P2, ["benign", "malignant"], n_boot=0)
    assert r["auc"]["value"] == pytest.approx(5 / 6) and r["auc"]["ci95"] is None
    assert r["accuracy"] == pytest.approx(0.6)
    assert r["confusion_matrix"] == [[1, 1], [1, 2]]  # rows truth, columns prediction
    benign, malignant = r["per_class"]
    # benign: 1 of 2 found; of the 3 malignant, 2 are not called benign.
    assert benign["sensitivity"] == pytest.approx(1 / 2) and benign["specificity"] == pytest.approx(2 / 3)
    assert malignant["sensitivity"] == pytest.approx(2 / 3) and malignant["specificity"] == pytest.approx(1 / 2)
    assert r["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    json.dumps(r, allow_nan=False)


def test_ece_by_hand():
    # Top probabilities 0.9, 0.6, 0.65, 0.8, 0.7 with correct 1, 0, 1, 1, 0. Bins [0.6, 0.7): 0.6 and 0.65,
    # accuracy 1/2, confidence 0.625; [0.7, 0.8): 0.7 wrong; [0.8, 0.9): 0.8 right; [0.9, 1]: 0.9 right.
    # ECE = (2 * 0.125 + 0.7 + 0.2 + 0.1) / 5 = 0.25.
    r = classification_report(Y2, P2, n_boot=0)
    assert r["ece"] == pytest.approx(0.25)
    used = [[b["lower"], b["cases"], b["accuracy"], b["confidence"]] for b in r["calibration_bins"] if b["cases"]]
    assert np.allclose(used, [[0.6, 2, 0.5, 0.625], [0.7, 1, 0.0, 0.7], [0.8, 1, 1.0, 0.8], [0.9, 1, 1.0, 0.9]])
    # Two bins: [0, 0.5) is empty; [0.5, 1] holds all, accuracy 0.6, mean confidence 0.73.
    assert classification_report(Y2, P2, n_boot=0, bins=2)["ece"] == pytest.approx(0.13)


def test_multiclass_auc_confusion_and_rates_by_hand():
    r = classification_report(Y3, P3, n_boot=0)
    assert r["auc"]["per_class"] == pytest.approx([0.875, 0.5625, 0.5625])
    assert r["auc"]["value"] == pytest.approx(2 / 3)
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert [c["sensitivity"] for c in r["per_class"]] == pytest.approx([0.5, 0.5, 0.5])
    assert [c["specificity"] for c in r["per_class"]] == pytest.approx([0.75, 0.75, 0.75])
    assert r["accuracy"] == pytest.approx(0.5) and r["balanced_accuracy"] == pytest.approx(0.5)


def test_pair_counting_agrees_with_the_report():
    assert pair_auc(P2[:, 1], np.array(Y2) == 1) == pytest.approx(5 / 6)
    assert [pair_auc(P3[:, c], np.array(Y3) == c) for c in range(3)] == pytest.approx([0.875, 0.5625, 0.5625])


@pytest.mark.parametrize("y, probs", [(Y2, P2), (Y3, P3)], ids=["binary", "three-class"])
def test_bootstrap_ci_equals_a_from_scratch_percentile_bootstrap(y, probs):
    r = classification_report(y, probs, n_boot=300, seed=7)
    ci, used = numpy_bootstrap(y, probs, 300, seed=7)
    assert r["auc"]["ci95"] == pytest.approx(ci)
    assert r["auc"]["bootstrap"]["used"] == used and 0 < used < 300  # resamples missing a class were skipped
    lo, hi = r["auc"]["ci95"]
    assert lo <= r["auc"]["value"] <= hi


def test_bootstrap_is_seeded():
    a, b = (classification_report(Y3, P3, n_boot=200, seed=s)["auc"] for s in (1, 1))
    assert a["ci95"] == b["ci95"] and a["bootstrap"]["used"] == b["bootstrap"]["used"]
    other = classification_report(Y3, P3, n_boot=200, seed=2)["auc"]
    assert (other["ci95"], other["bootstrap"]["used"]) != (a["ci95"], a["bootstrap"]["used"])


def test_an_absent_class_gives_none_not_nan():
    # Truth 0, 0, 1; predicted 0, 1, 2: sensitivity 1/2 for class 0, 0 for class 1, none for class 2 (no cases),
    # so balanced accuracy is the mean over the two classes with cases.
    r = classification_report([0, 0, 1], P3[:3], n_boot=20)
    assert r["per_class"][2]["sensitivity"] is None and r["auc"]["per_class"][2] is None
    assert r["auc"]["classes"] == [0, 1] and r["balanced_accuracy"] == pytest.approx(0.25)
    json.dumps(r, allow_nan=False)
    assert classification_report([1, 1], P2[:2], n_boot=20)["auc"]["value"] is None


def test_report_rejects_class_ids_out_of_range():
    with pytest.raises(Med3DError, match=r"0\.\.1"):
        classification_report([0, 2], P2[:2])


# ---------------------------------------------------------------- readers


def test_read_predictions_csv(tmp_path):
    p = read_predictions_csv(write_pred_csv(tmp_path / "p.csv", [("a", 2, 0.1, 0.2, 0.7), ("b", 0, 0.5, 0.5, 0.0)],
                                            k=3))
    assert p.cases == ["a", "b"] and p.predicted.tolist() == [2, 0] and p.num_classes == 3
    assert p.probs.tolist() == [[0.1, 0.2, 0.7], [0.5, 0.5, 0.0]]


def test_read_reference_from_dataset_json_and_folder(tmp_path):
    _, ref = binary_files(tmp_path)
    classes, names = read_reference(ref)
    # suffixes .nii.gz, .nrrd, .mha stripped; the unlabelled test path skipped
    assert classes == {"a": 0, "b": 0, "c": 1, "d": 1, "e": 1, "extra": 0}
    assert names == {0: "benign", 1: "malignant"}
    assert read_reference(tmp_path) == (classes, names)


def test_read_reference_from_csv(tmp_path):
    ref = tmp_path / "ref.csv"
    ref.write_text("image,class,center_x,center_y,center_z\nimgs/a.nii.gz,1,10,20,30\nb.nrrd,0,1,2,3\n")
    assert read_reference(ref) == ({"a": 1, "b": 0}, None)
    (tmp_path / "plain.csv").write_text("image,class\nc.mha,2\n")
    assert read_reference(tmp_path / "plain.csv") == ({"c": 2}, None)
    # As the training reader: ';' separates channel files (the first names the case), an empty class is unlabelled
    (tmp_path / "channels.csv").write_text("image,class\nd_t1.nii.gz;d_t2.nii.gz,benign\ne.nrrd,\nf.nrrd,malignant\n")
    assert read_reference(tmp_path / "channels.csv") == ({"d_t1": 0, "f": 1}, {0: "benign", 1: "malignant"})


def test_reference_variants_the_training_reader_also_accepts(tmp_path):
    """Names as a list or name -> id, classes by name, a validation list, channel lists; CSV names sorted."""
    ref = tmp_path / "dataset.json"
    ref.write_text(json.dumps({"classes": {"benign": 0, "malignant": 1},
                               "training": [{"image": ["./imagesTr/a_0000.nii.gz", "./imagesTr/a_0001.nii.gz"],
                                             "class": "malignant"}, {"image": "./imagesTr/b.nii.gz", "class": 0.0}],
                               "validation": [{"image": "./imagesTr/c.nii.gz", "class": "1"}]}))
    assert read_reference(ref) == ({"a_0000": 1, "b": 0, "c": 1}, {0: "benign", 1: "malignant"})
    ref.write_text(json.dumps({"classes": ["benign", "malignant"], "training": [{"image": "a.nrrd", "class": 1}]}))
    assert read_reference(ref) == ({"a": 1}, {0: "benign", 1: "malignant"})
    csv_ref = tmp_path / "names.csv"
    csv_ref.write_text("Class,Image\nmalignant,a.nii.gz\nbenign,b.nii.gz\n")
    assert read_reference(csv_ref) == ({"a": 1, "b": 0}, {0: "benign", 1: "malignant"})


BAD_PREDICTIONS = {
    "missing": (None, "not found"),
    "header": ("case,label,p0,p1\na,0,0.5,0.5\n", "expected 'case,predicted,prob_0"),
    "one class": ("case,predicted,prob_0\na,0,1.0\n", "expected 'case,predicted,prob_0"),
    "sum": ("case,predicted,prob_0,prob_1\na,0,0.9,0.1\nb,1,0.6,0.6\n", "line 3 .*sum to 1.2000"),
    "range": ("case,predicted,prob_0,prob_1\na,1,-0.5,1.5\n", r"line 2 .*must each lie in \[0, 1\]"),
    "short row": ("case,predicted,prob_0,prob_1\na,0,0.9\n", "line 2: 3 fields"),
    "not a number": ("case,predicted,prob_0,prob_1\na,0,x,0.1\n", "line 2 .*not a number"),
    "class id": ("case,predicted,prob_0,prob_1\na,3,0.9,0.1\n", "line 2 .*predicted is 3"),
    "not arg-max": ("case,predicted,prob_0,prob_1\na,1,0.9,0.1\n", "line 2 .*most probable class is 0"),
    "repeat": ("case,predicted,prob_0,prob_1\na,0,0.9,0.1\na,0,0.8,0.2\n", "line 3: case a already on line 2"),
    "no rows": ("case,predicted,prob_0,prob_1\n", "no rows"),
}


@pytest.mark.parametrize("name", BAD_PREDICTIONS)
def test_bad_predictions_csv_is_one_line_naming_the_file(tmp_path, name):
    text, pattern = BAD_PREDICTIONS[name]
    path = tmp_path / "pred.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(Med3DError, match=pattern) as err:
        read_predictions_csv(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


BAD_REFERENCES = {
    "missing": ("dataset.json", None, "reference not found"),
    "not json": ("dataset.json", "{", "not valid JSON"),
    "no training": ("dataset.json", '{"labels": {}}', "no 'training' list"),
    "no class": ("dataset.json", '{"training": [{"image": "a.nii.gz", "class": 0}, {"image": "b.nii.gz"}]}',
                 r"training\[1\] has no 'class'"),
    "float class": ("dataset.json", '{"training": [{"image": "a.nii.gz", "class": 0.5}]}', "not a class id"),
    "bad names": ("dataset.json", '{"training": [], "classes": {"x": "y"}}',
                  "'classes' must map"),
    "repeat": ("dataset.json", '{"training": [{"image": "a.nii.gz", "class": 0}, {"image": "x/a.nrrd", "class": 1}]}',
               r"training\[1\]: case a is already listed"),
    "csv header": ("ref.csv", "file,label\na.nii.gz,0\n", "expected 'image,class"),
    "csv class": ("ref.csv", "image,class\na.nii.gz,-1\n", "line 2: class '-1' is not a class id"),
    "csv width": ("ref.csv", "image,class\na.nii.gz\n", "line 2: 1 fields, expected 2"),
    "unknown name": ("dataset.json", '{"classes": ["b", "m"], "training": [{"image": "a.nii.gz", "class": "x"}]}',
                     r"training\[0\]: class 'x' is neither a class id nor one of the names \['b', 'm'\]"),
}


@pytest.mark.parametrize("name", BAD_REFERENCES)
def test_bad_reference_is_one_line_naming_the_file(tmp_path, name):
    file, text, pattern = BAD_REFERENCES[name]
    path = tmp_path / file
    if text is not None:
        path.write_text(text)
    with pytest.raises(Med3DError, match=pattern) as err:
        read_reference(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


# ---------------------------------------------------------------- evaluation and CLI


def test_evaluate_joins_by_case_and_lists_the_unmatched(tmp_path):
    pred, ref = binary_files(tmp_path)
    with open(pred, "a") as f:
        f.write("orphan,0,0.8,0.2\n")
    r = evaluate_classification(pred, ref, tmp_path / "out", n_boot=50, plots=False)
    assert r["cases"] == 5 and r["auc"]["value"] == pytest.approx(5 / 6)
    assert r["class_names"] == ["benign", "malignant"]
    assert r["unmatched"] == {"predictions_without_reference": ["orphan"], "references_without_prediction": ["extra"]}
    assert json.loads((tmp_path / "out" / "classification_metrics.json").read_text())["cases"] == 5


def test_evaluate_mismatched_inputs(tmp_path):
    pred, ref = binary_files(tmp_path)
    other = tmp_path / "other.csv"
    other.write_text("image,class\nzz.nii.gz,0\n")
    with pytest.raises(Med3DError, match="no case of .*pred.csv.* is in .*other.csv"):
        evaluate_classification(pred, other, tmp_path / "out", n_boot=0)
    other.write_text("image,class\na.nii.gz,2\n")
    with pytest.raises(Med3DError, match="case a has class 2 but .*pred.csv has only prob_0..prob_1"):
        evaluate_classification(pred, other, tmp_path / "out", n_boot=0)
    ref.write_text(json.dumps({"classes": {"0": "x", "1": "y", "2": "z"}, "training": [{"image": "a", "class": 0}]}))
    with pytest.raises(Med3DError, match="names 3 classes but .*pred.csv has 2"):
        evaluate_classification(pred, ref, tmp_path / "out", n_boot=0)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    pred, ref = binary_files(tmp_path)
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "med3d.cli", "evaluate", str(pred), str(ref), "--out", str(out),
                        "--bootstrap", "200", "--seed", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("roc_curve.png", "confusion_matrix.png", "reliability_diagram.png"):
        assert (out / name).stat().st_size > 1000
    report = json.loads((out / "classification_metrics.json").read_text())
    assert report["auc"]["value"] == pytest.approx(5 / 6)
    assert report["auc"]["ci95"] == pytest.approx(numpy_bootstrap(Y2, P2, 200, seed=3)[0])
    assert "accuracy           0.600" in r.stdout and "AUC                0.833  95% CI" in r.stdout
    assert "ECE                0.250" in r.stdout and str(out / "classification_metrics.json") in r.stdout


@pytest.mark.slow
def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    pred, ref = binary_files(tmp_path)
    pred.write_text("case,predicted,prob_0,prob_1\na,0,0.9,0.3\n")
    r = subprocess.run([sys.executable, "-m", "med3d.cli", "evaluate", str(pred), str(ref)],
                       capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"med3d evaluate: error: {pred}, line 2")


def test_cli_in_process_bad_reference_and_unmatched_predictions(tmp_path, capsys):
    pred, ref = binary_files(tmp_path)
    assert main(["evaluate", str(pred), str(tmp_path / "nope.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"med3d evaluate: error: {tmp_path / 'nope.csv'}: reference not found")
    with open(pred, "a") as f:
        f.write("orphan,0,0.8,0.2\n")
    assert main(["evaluate", str(pred), str(ref), "--bootstrap", "0", "--no-plot"]) == 1  # like segmentation
    out = capsys.readouterr().out
    assert f"error: {pred}: no reference for case orphan" in out
    assert (tmp_path / "classification_metrics.json").is_file()  # default --out: the CSV's folder
    assert not (tmp_path / "roc_curve.png").exists()


def test_a_reference_csv_naming_only_some_classes_is_refused(tmp_path):
    pred = tmp_path / "pred.csv"
    pred.write_text("case,predicted,prob_0,prob_1\na,1,0.2,0.8\nb,0,0.6,0.4\n")
    ref = tmp_path / "ref.csv"
    ref.write_text("image,class\na.nii.gz,malignant\nb.nii.gz,malignant\n")  # sorting would make it class 0
    with pytest.raises(Med3DError, match="names 1 of the 2 classes, so their ids cannot be known"):
        evaluate_classification(pred, ref, tmp_path / "out", n_boot=0, plots=False)
