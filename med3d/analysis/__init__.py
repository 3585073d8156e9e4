"""Representation analysis: how two weights of one encoder differ, stage by stage (CKA, SVCCA, weight change)."""
from .compare import StageComparison, compare, markdown_table, random_like, weight_change
from .patches import draw_patches
from .report import Analysis, analyze, load_encoder
from .similarity import linear_cka, svcca

__all__ = ["Analysis", "StageComparison", "analyze", "compare", "draw_patches", "linear_cka", "load_encoder",
           "markdown_table", "random_like", "svcca", "weight_change"]
