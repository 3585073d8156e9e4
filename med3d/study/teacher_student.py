"""Noisy-student rounds: a teacher trained on the labelled cases labels unlabelled scans, a student learns
from both, and the student becomes the next round's teacher.

A fine-tuning config with a ``teacher_student:`` section runs ``rounds + 1`` trainings::

    RUN/round_0/      the first teacher: the labelled cases only
    RUN/pseudo_1/     its pseudo-labels of the unlabelled scans (``med3d pseudo-label``)
    RUN/round_1/      a student: the labelled cases plus pseudo_1 (data.datasets.<task>.pseudo)
    RUN/pseudo_2/ ... with round_1's best checkpoint as the teacher, and so on
    RUN/rounds.json, RUN/rounds.md   each round's validation score

Every student starts from the config's own initialisation (``finetune``), not from its teacher, as in
Xie et al.'s noisy student; the noise is the student augmentation of the pseudo-labelled patches. Each
step is resumable: a finished training is reused (``study.runs.run_once``), and pseudo-labels are
reused while the teacher checkpoint they name is unchanged.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..atomic import write_json_atomic, write_text_atomic
from ..config import Config, _absolute, _shipped, from_dict, load_runner_file
from ..errors import Med3DError

KEYS = ("unlabelled", "rounds", "threshold", "loss_weight", "mirror", "augment", "task")


@dataclass
class Rounds:
    """A teacher-student experiment: the base config and the ``teacher_student`` section, checked."""

    base: Dict[str, Any]  # the config mapping without the section
    out_dir: Path  # run.out_dir: the rounds' parent folder
    task: str
    unlabelled: List[str]  # inputs of pseudo-label (absolute)
    rounds: int
    threshold: float
    loss_weight: float
    mirror: bool
    augment: Optional[Dict[str, Any]]


def _section(raw: Any, path: Path) -> Dict[str, Any]:
    if not isinstance(raw, dict):
        raise Med3DError(f"{path}: a teacher-student config needs a 'teacher_student:' section (unlabelled, rounds)")
    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        raise Med3DError(f"{path}: unknown key 'teacher_student.{unknown[0]}'; valid keys: {', '.join(KEYS)}")
    scans = raw.get("unlabelled")
    scans = [scans] if isinstance(scans, str) else scans
    if not isinstance(scans, list) or not scans or not all(isinstance(s, str) for s in scans):
        raise Med3DError(f"{path}: 'teacher_student.unlabelled' must name the scans to pseudo-label (files or "
                         "folders, as for med3d pseudo-label)")
    rounds = raw.get("rounds", 1)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise Med3DError(f"{path}: 'teacher_student.rounds' must be a whole number of student rounds, at least 1")
    if not isinstance(raw.get("mirror", False), bool):
        raise Med3DError(f"{path}: 'teacher_student.mirror' must be true or false")
    return {**raw, "unlabelled": scans, "rounds": rounds}


def load_rounds(path: Union[str, Path], overrides: Sequence[str] = ()) -> Rounds:
    """Read a teacher-student config and check every round's config before any training.

    Args:
        path: a fine-tuning config with a ``teacher_student`` section (``_base_`` allowed).
        overrides: ``--set key=value`` for the config or the section.

    Returns:
        The experiment.

    Raises:
        Med3DError: a bad key or value, named in one line.
    """
    path, base, raw = load_runner_file(path, overrides, "teacher_student")
    raw = _section(raw, path)
    cfg = from_dict(base)
    segmentation = [t for t, h in cfg.model.heads.items() if h.type in ("med3d", "unet")]
    task = raw.get("task") or (segmentation[0] if len(segmentation) == 1 else None)
    if task is None or task not in segmentation:
        raise Med3DError(f"{path}: 'teacher_student.task' must name the segmentation task that learns from the "
                         f"pseudo-labels (this config's: {', '.join(segmentation) or 'none'})")
    if task not in cfg.data.datasets:
        raise Med3DError(f"{path}: task {task} has no entry in data.datasets; add its labelled dataset")
    if cfg.data.datasets[task].pseudo is not None:
        raise Med3DError(f"{path}: data.datasets.{task}.pseudo is set by each round; remove it from the config")
    folder = Path.cwd() if _shipped(path.resolve()) else path.resolve().parent
    scans = [str(Path(_absolute(s, folder)).resolve()) for s in raw["unlabelled"]]  # as the manifest records them
    rounds = Rounds(base, Path(cfg.run.out_dir), task, scans, raw["rounds"], raw.get("threshold", 0.9),
                    raw.get("loss_weight", 1.0), raw.get("mirror", False), raw.get("augment"))
    for k in range(rounds.rounds + 1):
        round_config(rounds, k)  # every round's keys and ranges now, not after the first training
    return rounds


def round_config(rounds: Rounds, k: int) -> Config:
    """Round ``k``'s training config: round 0 on the labelled cases, later rounds with ``pseudo_k`` beside them.

    Raises:
        Med3DError: the section's values make an invalid config (named by its key).
    """
    data = copy.deepcopy(rounds.base)
    data.setdefault("run", {})["out_dir"] = str(rounds.out_dir / f"round_{k}")
    if k > 0:
        pseudo = {"path": str((rounds.out_dir / f"pseudo_{k}").resolve()), "threshold": rounds.threshold,
                  "loss_weight": rounds.loss_weight}
        if rounds.augment is not None:
            pseudo["augment"] = rounds.augment
        data["data"]["datasets"][rounds.task]["pseudo"] = pseudo
    try:
        return from_dict(data)
    except Med3DError as err:
        raise Med3DError(f"teacher_student: {err}")


def teacher_checkpoint(run_dir: Path) -> Path:
    """A finished round's model for the next: its best checkpoint on validation, else its last."""
    best = run_dir / "checkpoints" / "best.pt"
    return best if best.is_file() else run_dir / "checkpoints" / "last.pt"


def _current_pseudo(folder: Path, teacher: Path, rounds: Rounds) -> bool:
    """Whether ``folder`` holds a complete set of pseudo-labels of these scans by this very teacher file, with
    these settings."""
    from ..inference.pseudo import MANIFEST, file_stamp

    try:
        record = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    t = record.get("teacher", {})
    return (t.get("checkpoint") == str(teacher.resolve()) and t.get("stamp") == file_stamp(str(teacher))
            and t.get("mirror") == rounds.mirror and record.get("inputs") == rounds.unlabelled
            and not record.get("failed"))


def pseudo_round(rounds: Rounds, k: int, progress: bool) -> Path:
    """``RUN/pseudo_k``: the unlabelled scans labelled by round ``k-1``'s model (reused while current).

    Raises:
        Med3DError: the teacher's checkpoint is missing, or no scan could be labelled.
    """
    from ..inference.pseudo import write_pseudo_labels

    teacher = teacher_checkpoint(rounds.out_dir / f"round_{k - 1}")
    if not teacher.is_file():
        raise Med3DError(f"round {k}: the teacher checkpoint {teacher} is missing; delete "
                         f"{teacher.parent.parent} to train round {k - 1} again")
    folder = rounds.out_dir / f"pseudo_{k}"
    if _current_pseudo(folder, teacher, rounds):
        return folder
    student = rounds.out_dir / f"round_{k}"
    if (student / "checkpoints").is_dir():  # it trained on pseudo-labels of an earlier teacher
        raise Med3DError(f"round {k}: {student} trained on pseudo-labels of an earlier teacher than {teacher}; "
                         f"delete {student} (and the later rounds) to train it on the new ones")
    _, failed = write_pseudo_labels(str(teacher), rounds.unlabelled, str(folder), rounds.task, rounds.mirror,
                                         overwrite=True, progress=progress)
    if failed:
        raise Med3DError(f"round {k}: {len(failed)} unlabelled scan(s) could not be pseudo-labelled; first: "
                         f"{failed[0]}")
    return folder


def _row(k: int, summary: Dict[str, Any], pseudo: Optional[Path]) -> Dict[str, Any]:
    nan = float("nan")
    final, best = summary.get("final") or {}, summary.get("best") or {}
    row = {"round": k, "role": "teacher (labelled cases only)" if k == 0 else f"student of round {k - 1}",
           "final": final.get("score", nan), "best": best.get("metric", nan) if best.get("metric") is not None
           else nan, "pseudo_cases": 0, "mean_confidence": nan}
    if pseudo is not None:
        from ..inference.pseudo import MANIFEST

        cases = json.loads((pseudo / MANIFEST).read_text())["cases"]
        row["pseudo_cases"] = len(cases)
        row["mean_confidence"] = sum(c["mean_confidence"] for c in cases) / max(1, len(cases))
    return row


def _report(rounds: Rounds, rows: List[Dict[str, Any]]) -> None:
    lines = [f"# Teacher-student rounds: task {rounds.task}", "",
             f"Unlabelled scans: {', '.join(rounds.unlabelled)}; confidence threshold {rounds.threshold}, "
             f"pseudo-label loss weight {rounds.loss_weight}, mirror {rounds.mirror}.", "",
             "| round | model | pseudo-labelled scans | mean confidence | final score | best score |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['round']} | {r['role']} | {r['pseudo_cases']} | {r['mean_confidence']:.3f} | {r['final']:.3f} "
              f"| {r['best']:.3f} |" for r in rows]
    write_text_atomic(rounds.out_dir / "rounds.md", "\n".join(lines) + "\n")
    write_json_atomic(rounds.out_dir / "rounds.json", rows)


def run_rounds(rounds: Rounds, progress: bool = True) -> List[Dict[str, Any]]:
    """Train the teacher, then each round's pseudo-labels and student; write ``rounds.json`` and ``rounds.md``.

    Args:
        rounds: the experiment (``load_rounds``).
        progress: show progress bars.

    Returns:
        One row per round: its score and its pseudo-labels' count and mean confidence.

    Raises:
        Med3DError: bad data or a step that fails (finished rounds stay finished).
    """
    from .runs import run_once

    rows: List[Dict[str, Any]] = []
    try:
        for k in range(rounds.rounds + 1):
            pseudo = pseudo_round(rounds, k, progress) if k > 0 else None
            print(f"[round {k}/{rounds.rounds}] " + ("teacher" if k == 0 else f"student with {pseudo}"))
            summary = run_once(round_config(rounds, k), "finetune", progress)
            rows.append(_row(k, summary, pseudo))
    finally:  # a failed round still leaves the report of those before it
        if rows:
            _report(rounds, rows)
    return rows
