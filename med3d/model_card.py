"""Model cards: what an exported model expects, what it was trained on, how well it did, and under which licence.

The card travels inside the export (safetensors metadata, ONNX ``metadata_props``) under the key
``model_card`` as JSON, so it cannot get separated from the weights it describes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from . import __version__

PathLike = Union[str, Path]
CARD_VERSION = 1
# Plan keys worth stating in a card (the full plan of an ONNX export is in its own ``plan`` key).
_PLAN_KEYS = ("dataset", "kind", "channel_names", "target_spacing", "crop_nonzero", "normalization", "labels",
              "classes", "plan_hash")


def run_metrics(checkpoint: Optional[PathLike]) -> Dict[str, Any]:
    """Validation figures of the training run that wrote ``checkpoint``.

    Reads the checkpoint's own record of its best validation score (``train_state.best``) and,
    when the run folder is still beside it (``RUN/checkpoints/x.pt``), ``RUN/summary.json``'s final
    validation. Missing pieces are simply left out: a card states what is known.

    Args:
        checkpoint: a med3d training checkpoint, or None / another file (then nothing is known).

    Returns:
        ``{"best": ..., "final": ...}`` with whatever was found (possibly empty).
    """
    out: Dict[str, Any] = {}
    if checkpoint is None or Path(checkpoint).suffix.lower() not in (".pt", ".pth", ".ckpt"):
        return out
    from .errors import Med3DError
    from .transfer.formats import torch_load_bounded

    try:  # the bounded, weights-only reader: reading a card never runs code from the file nor stalls on it
        raw = torch_load_bounded(Path(checkpoint))
    except Med3DError:  # not a med3d training checkpoint: no run record
        return out
    best = (raw.get("train_state") or {}).get("best") if isinstance(raw, dict) else None
    if best and best.get("metric") is not None:
        out["best"] = {"score": best["metric"], "iteration": best.get("iteration")}
    summary = Path(checkpoint).resolve().parent.parent / "summary.json"
    if summary.is_file():
        final = json.loads(summary.read_text()).get("final")
        if final:
            out["final"] = {"score": final.get("score"), "mean_dice": final.get("mean_dice"),
                            "tasks": {t: {k: v for k, v in e.items() if isinstance(v, (int, float))}
                                      for t, e in (final.get("tasks") or {}).items()}}
    return out


def model_card(contract: Mapping[str, Any], meta: Mapping[str, Any], licence: Optional[str] = None,
               metrics: Optional[Mapping[str, Any]] = None, task: Optional[str] = None) -> Dict[str, Any]:
    """The model card of an export.

    Args:
        contract: the export's input contract (``export.input_contract``: channels, spacing, normalisation, datasets).
        meta: the source's metadata (a training checkpoint's ``job``, ``plans``, ``patch_size``).
        licence: the licence the weights are published under (None: stated as unspecified).
        metrics: ``run_metrics`` of the source checkpoint.
        task: the head an ONNX export carries (None for an encoder).

    Returns:
        A JSON-serialisable mapping.
    """
    plans = meta.get("plans") or {}
    if task is not None:
        plans = {task: plans[task]} if task in plans else {}
    return {
        "card_version": CARD_VERSION,
        "med3d_version": __version__,
        "licence": licence or "unspecified (ask the author; the training datasets' own licences also apply)",
        "task": task,
        "input_contract": {k: contract.get(k) for k in ("input_channels", "spacing_zyx", "normalisation")},
        "training": {"job": meta.get("job"), "datasets": list(contract.get("datasets") or []),
                     "patch_size_zyx": meta.get("patch_size"),
                     "plans": {t: {k: p.get(k) for k in _PLAN_KEYS if k in p} for t, p in plans.items()}},
        "metrics": dict(metrics or {}),
    }
