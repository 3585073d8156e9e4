"""matplotlib, an optional extra, for the PNG figures med3d writes (headless: the Agg backend)."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("med3d")


def pyplot(warn: bool = False) -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None when matplotlib is not installed.

    Args:
        warn: log that no PNG is written when matplotlib is missing (for figures the user asked for).

    Returns:
        The pyplot module, or None (callers then skip their figure).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and in CI; figures only go to files
        import matplotlib.pyplot as plt
    except ImportError:
        if warn:
            log.warning("matplotlib is not installed (pip install med3d[plot]); no PNG written")
        return None
    return plt
