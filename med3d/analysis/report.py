"""``med3d analyze``: two weight files in, a per-stage table (CSV, Markdown) and a plot out."""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..device import resolve_device
from ..errors import Med3DError
from ..models.resnet3d import ResNet3D
from ..plotting import pyplot, save_png
from .compare import (DEFAULT_MAX_EXAMPLES, StageComparison, check_same_architecture, compare, encoder_of,
                      random_like)
from .patches import DEFAULT_PATCH, DEFAULT_PATCHES, draw_patches

PathLike = Union[str, Path]
CSV_NAME, PNG_NAME = "analysis.csv", "analysis.png"
log = logging.getLogger(__name__)


@dataclass
class Analysis:
    """What ``analyze`` compared and wrote."""

    stages: List[StageComparison]
    data: str  # where the patches came from
    csv_path: Path
    png_path: Optional[Path]  # None without matplotlib
    baseline: Optional[List[StageComparison]] = None  # A vs a fresh random initialisation, when asked for


def load_encoder(path: PathLike, arch: Optional[str] = None, **encoder_args: Any) -> Tuple[ResNet3D, Dict[str, Any]]:
    """The encoder a weights file holds (only tensors are read), and the file's metadata.

    Args:
        path: a med3d checkpoint, a med3d export, or other encoder weights (MedicalNet, MONAI, plain).
        arch: the encoder for weights that carry no architecture, e.g. ``resnet50``.
        **encoder_args: its other arguments (``in_channels``, ``layout``, ``conv``, ``shortcut``).

    Returns:
        (encoder, metadata); a training checkpoint's metadata holds its preprocessing ``plans``.

    Raises:
        Med3DError: the file is missing or unreadable, carries no architecture and none was given, or its
            weights do not fit the encoder.
    """
    from ..convert import model_from_file

    model, meta = model_from_file(path, arch=arch, **encoder_args)
    return encoder_of(model), meta


def _plans(*metas: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The checkpoints' preprocessing plans, the first file's first."""
    return [plan for meta in metas for plan in (meta.get("plans") or {}).values() if isinstance(plan, dict)]


def _csv_text(rows: Sequence[StageComparison], baseline: Optional[Sequence[StageComparison]] = None) -> str:
    names = [f.name for f in fields(StageComparison)] + (["cka_vs_random", "svcca_vs_random"] if baseline else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for i, r in enumerate(rows):
        row = r.row()
        if baseline:
            row.update(cka_vs_random=baseline[i].cka, svcca_vs_random=baseline[i].svcca)
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def save_plot(rows: Sequence[StageComparison], path: PathLike, title: str = "",
              baseline: Optional[Sequence[StageComparison]] = None) -> Optional[Path]:
    """Per-stage CKA and SVCCA (left, 0..1) and relative weight change (right), as a PNG.

    Args:
        rows: the comparison, one per stage.
        path: the PNG to write (atomically).
        title: figure title.
        baseline: A vs a random initialisation per stage, drawn faintly for reference.

    Returns:
        ``path``, or None when matplotlib is not installed.
    """
    plt = pyplot(warn=True)
    if plt is None:
        return None

    names = [r.stage for r in rows]
    fig, (sim, wc) = plt.subplots(1, 2, figsize=(10, 4))
    sim.plot(names, [r.cka for r in rows], "o-", label="linear CKA")
    sim.plot(names, [r.svcca for r in rows], "s--", label="SVCCA (mean CCA)")
    if baseline:
        sim.plot(names, [r.cka for r in baseline], "o:", color="tab:blue", alpha=0.4, label="CKA, A vs random")
        sim.plot(names, [r.svcca for r in baseline], "s:", color="tab:orange", alpha=0.4, label="SVCCA, A vs random")
    sim.set_ylim(0, 1.05)
    sim.set_ylabel("similarity of A's and B's activations")
    sim.legend(loc="lower left")
    sim.grid(alpha=0.3)
    wc.bar(names, [r.weight_change for r in rows], color="tab:orange")
    wc.set_ylabel("||w_B - w_A|| / ||w_A||")
    wc.set_title("relative weight change")
    wc.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    return save_png(fig, path, dpi=80)


def _outputs(out_dir: PathLike, overwrite: bool) -> Tuple[Path, Path]:
    paths = Path(out_dir) / CSV_NAME, Path(out_dir) / PNG_NAME
    for path in paths:
        if path.exists() and not overwrite:  # checked before the work rather than after it
            raise Med3DError(f"{path}: already exists; pass --overwrite to replace it")
    return paths


def analyze(a: PathLike, b: PathLike, data: PathLike, out_dir: PathLike, patches: int = DEFAULT_PATCHES,
            patch: Sequence[int] = DEFAULT_PATCH, max_examples: int = DEFAULT_MAX_EXAMPLES, seed: int = 0,
            device: Optional[str] = None, overwrite: bool = False, baseline: bool = False,
            **encoder_args: Any) -> Analysis:
    """Compare the encoders of two weight files stage by stage; write ``analysis.csv`` and ``analysis.png``.

    Args:
        a: the reference file (e.g. pretrained, or before fine-tuning).
        b: the other file (e.g. after fine-tuning, or trained from scratch).
        data: where patches come from (see ``draw_patches``); scans are prepared by a checkpoint's plan for
            their dataset when ``a`` (or else ``b``) has one.
        out_dir: where the two files go.
        patches: how many patches.
        patch: patch size (z, y, x).
        max_examples: spatial positions kept per stage (see ``compare``).
        seed: draws the patches and the positions; the same seed gives the same numbers.
        device: ``cpu`` or ``cuda`` (None: CUDA when available).
        overwrite: replace existing outputs.
        baseline: also compare A with a fresh random initialisation of its architecture (seeded by ``seed``),
            the reference that says how much a CKA or SVCCA below 1 means.
        **encoder_args: ``arch`` etc. for weight files that carry no architecture (see ``load_encoder``).

    Returns:
        The comparison and the files written.

    Raises:
        Med3DError: a missing or unreadable file, different architectures, data that yield no patches or have
            other channels than the encoders, an unavailable device, ``max_examples`` < 1, or existing outputs
            without ``overwrite``.
    """
    if max_examples < 1:
        raise Med3DError(f"--examples {max_examples}: keep at least 1 position per stage")
    dev = resolve_device(device)
    csv_path, png_path = _outputs(out_dir, overwrite)
    enc_a, meta_a = load_encoder(a, **encoder_args)
    enc_b, meta_b = load_encoder(b, **encoder_args)
    check_same_architecture(enc_a, enc_b, (str(a), str(b)))
    drawn = draw_patches(data, patches, patch, seed, _plans(meta_a, meta_b))
    log.debug(f"patches: {drawn.patches.shape[0]} of {list(drawn.patches.shape[2:])} from {drawn.source}")
    rows = compare(enc_a, enc_b, drawn.patches, max_examples=max_examples, seed=seed, device=dev)
    base = compare(enc_a, random_like(enc_a, seed), drawn.patches, max_examples=max_examples, seed=seed,
                   device=dev) if baseline else None
    from ..atomic import write_text_atomic

    write_text_atomic(csv_path, _csv_text(rows, base))
    title = f"A: {Path(a).name}  vs  B: {Path(b).name}  ({enc_a.config['arch']}, {drawn.patches.shape[0]} patches)"
    return Analysis(rows, drawn.source, csv_path, save_plot(rows, png_path, title, base), base)
