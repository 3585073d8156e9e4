"""matplotlib, an optional extra, for the PNG figures med3d writes (headless: the Agg backend)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Union

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


def save_png(fig: Any, path: Union[str, Path], dpi: int = 90) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG atomically, and close it (figures hold memory until closed).

    Args:
        fig: a matplotlib figure.
        path: the PNG to write.
        dpi: resolution.

    Returns:
        ``path``.
    """
    import matplotlib.pyplot as plt

    from .atomic import write_atomic

    fig.tight_layout()
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
    return Path(path)
