"""A simple intensity drift check: is a new scan's intensity range like the training scans'?

The plan's fingerprint keeps, per channel, the 1st, 50th and 99th intensity percentile of every
training scan (inside its non-zero box; ``med3d.data.plan.intensity_percentiles``). A new scan's
percentiles, taken the same way, are compared with the range those took over the training scans,
widened by ``TOLERANCE`` of the training scans' 1st-99th percentile span (a margin, because a
handful of training scans cannot show the whole spread). A percentile outside is reported with
the numbers: scans in other units (MR fed to a CT model, HU offset by a missing rescale) show up
this way before anyone trusts their label maps.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..data.image import Image
from ..data.plan import intensity_percentiles

TOLERANCE = 0.1  # of the training 1st-99th percentile span
_NAMES = {"p01": "1st percentile", "p50": "median", "p99": "99th percentile"}


def _channels(image: Image, plan: Dict[str, Any]) -> Optional[List[int]]:
    """The plan channels ``image``'s channels stand for (all, or the ones the model reads)."""
    n = len(plan.get("channel_names") or [])
    chosen = plan.get("channels")
    if image.channels == n:
        return list(range(n))
    if chosen is not None and image.channels == len(chosen):
        return list(chosen)
    return None


def drift_report(image: Image, plan: Dict[str, Any]) -> Dict[str, Any]:
    """Compare a scan's intensity percentiles with those of the scans ``plan`` was made from.

    Args:
        image: the scan as read (raw intensities).
        plan: the task's plan from the checkpoint.

    Returns:
        ``{"checked": bool, "outside": bool, "channels": [...], "reason": ...}``; each channel lists
        the scan's percentiles, the training range, the allowed range and the lines that fall outside.
    """
    ranges = (plan.get("fingerprint") or {}).get("scan_percentiles")
    which = _channels(image, plan)
    if not ranges or which is None:
        reason = ("the checkpoint's plan records no per-scan intensity percentiles (prepared before med3d "
                  "recorded them)" if not ranges else "the scan's channels do not match the plan's")
        return {"checked": False, "outside": False, "channels": [], "reason": reason}
    scan = intensity_percentiles(image.array)
    channels = []
    for i, ch in enumerate(which):
        train = ranges[ch]
        margin = TOLERANCE * max(train["p99"][1] - train["p01"][0], 1e-6)
        lines = []
        entry: Dict[str, Any] = {"channel": plan["channel_names"][ch], "scan": scan[i], "training": train,
                                 "allowed": {}, "outside": lines}
        for key, (lo, hi) in train.items():
            allowed = [lo - margin, hi + margin]
            entry["allowed"][key] = allowed
            value = scan[i][key]
            if not allowed[0] <= value <= allowed[1]:
                lines.append(f"{_NAMES.get(key, key)} {value:.4g} vs training {lo:.4g}..{hi:.4g} "
                             f"(allowed {allowed[0]:.4g}..{allowed[1]:.4g})")
        channels.append(entry)
    return {"checked": True, "outside": any(c["outside"] for c in channels), "channels": channels,
            "tolerance": TOLERANCE, "training_scans": (plan.get("fingerprint") or {}).get("num_cases")}


def drift_warning(report: Dict[str, Any], where: str) -> Optional[str]:
    """One warning line for a report whose scan lies outside the training range.

    Args:
        report: from ``drift_report``.
        where: how the line names the scan (its path).

    Returns:
        The line, or None when every percentile is inside the allowed range.
    """
    if not report["outside"]:
        return None
    parts = [f"channel {c['channel']}: " + "; ".join(c["outside"]) for c in report["channels"] if c["outside"]]
    return (f"warning: {where}: intensities unlike the {report.get('training_scans')} training scan(s): "
            f"{' | '.join(parts)}; check the scan's units and modality before trusting its label map")
