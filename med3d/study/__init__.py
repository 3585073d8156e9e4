"""Experiments built from many training runs: cross-validation folds and study grids."""
