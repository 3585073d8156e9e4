"""Small table writers shared by the fold summary and the study report: CSV and Markdown, atomically."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..atomic import write_text_atomic


def columns(rows: Sequence[Dict[str, Any]], first: Sequence[str] = ()) -> List[str]:
    """``first``, then every other key in the order rows first show it."""
    seen = list(first)
    for row in rows:
        seen += [k for k in row if k not in seen]
    return seen


def fmt(value: Any) -> str:
    """A cell: floats to 3 decimals, NaN and None as empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_csv(path: Path, rows: Sequence[Dict[str, Any]], first: Sequence[str] = ()) -> Path:
    """Rows as CSV with a header (every key any row has)."""
    cols = columns(rows, first)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in rows:
        w.writerow(["" if row.get(c) is None else row.get(c) for c in cols])
    return write_text_atomic(path, buf.getvalue())


def markdown(rows: Sequence[Dict[str, Any]], cols: Sequence[str]) -> str:
    """Rows as a Markdown table over ``cols``."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
