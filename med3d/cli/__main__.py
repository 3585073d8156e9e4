"""``python -m med3d.cli``: the ``med3d`` command (torchrun launches it this way)."""
import sys

from . import main

sys.exit(main())
