"""Inference: sliding windows, mirroring TTA and the way back to each scan's own grid.

Training's validation imports from here; nothing here imports the training engine.
"""
from .inputs import collect_inputs  # noqa: F401
from .predictor import Prediction, Predictor, predict  # noqa: F401
from .restore import restore_labels, restore_probabilities  # noqa: F401
from .window import evaluating, mirror_axes, sliding_window, softmax_tta  # noqa: F401
