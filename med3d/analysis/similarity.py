"""Similarity of two sets of activations: linear CKA and SVCCA, on ``(examples, features)`` matrices.

Both compare representations, not neurons: they are blind to a rotation of the feature axes (and
CKA to an isotropic scaling), so two networks that compute the same thing in permuted or mixed
channels still score 1. Rows must be the same examples in the same order in both matrices.

Linear CKA (Kornblith et al., 2019) is the normalised Hilbert-Schmidt independence criterion with
linear kernels. SVCCA (Raghu et al., 2017; used on medical transfer in "Transfusion", 2019) first
keeps the top singular directions of each matrix that explain 99% of its variance, then takes the
canonical correlations between the two reduced subspaces and averages them.
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]
SVCCA_KEEP = 0.99  # share of variance the SVD step keeps, as in Raghu et al.


def _centred(x: Array, name: str) -> torch.Tensor:
    """``x`` as float64 with every column's mean removed (both methods assume centred features).

    The algebra runs in torch: on a busy CPU its thread pool handles small matrices far better than
    numpy's OpenBLAS, whose threads spin while they wait.
    """
    a = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    a = a.to(dtype=torch.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2D (examples, features) matrix, got shape {tuple(a.shape)}")
    return a - a.mean(dim=0, keepdim=True)


def _pair(x: Array, y: Array) -> Tuple[torch.Tensor, torch.Tensor]:
    a, b = _centred(x, "x"), _centred(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x has {a.shape[0]} examples but y has {b.shape[0]}; both must hold the same examples")
    return a, b


def linear_cka(x: Array, y: Array) -> float:
    """Linear centred kernel alignment of two activation matrices.

    Args:
        x: ``(n, p)`` activations of n examples.
        y: ``(n, q)`` activations of the same n examples (q may differ from p).

    Returns:
        CKA in [0, 1]; NaN when either matrix has no variance (a constant layer has no representation).

    Raises:
        ValueError: not 2D, or different numbers of examples.
    """
    a, b = _pair(x, y)
    n, p, q = a.shape[0], a.shape[1], b.shape[1]
    # <K, L>_F for the Gram matrices K = a a^T, L = b b^T equals ||b^T a||_F^2, so work in whichever space is
    # smaller: the features' (p x q) when examples outnumber them, the examples' (n x n) otherwise.
    if n * n * (p + q) < n * (p * q + p * p + q * q):
        k, l_ = a @ a.T, b @ b.T
        cross, self_a, self_b = float((k * l_).sum()), float(k.norm()), float(l_.norm())
    else:
        cross = float((b.T @ a).norm()) ** 2
        self_a, self_b = float((a.T @ a).norm()), float((b.T @ b).norm())
    denom = self_a * self_b
    if denom <= 0 or not np.isfinite(denom):
        return float("nan")
    return float(np.clip(cross / denom, 0.0, 1.0))


def _top_directions(a: torch.Tensor, keep: float) -> torch.Tensor:
    """Orthonormal ``(n, k)`` basis of the fewest left singular directions explaining ``keep`` of the variance."""
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    var = (s ** 2).cpu().numpy()
    total = var.sum()
    if total <= 0:
        return u[:, :0]
    k = int(np.searchsorted(np.cumsum(var) / total, keep - 1e-12) + 1)
    return u[:, :min(k, len(var))]


def svcca(x: Array, y: Array, keep: float = SVCCA_KEEP) -> Tuple[float, int, int]:
    """SVCCA: mean canonical correlation after reducing each matrix to the directions holding ``keep`` of its variance.

    The reduced data ``U_k S_k`` spans the same subspace as ``U_k``, and the canonical correlations of two
    centred data sets are the cosines of the principal angles between their column spaces, i.e. the
    singular values of ``U_x^T U_y``; so no covariance matrix has to be inverted.

    With few examples per kept direction CCA overfits and correlations drift towards 1; keep the number of
    examples well above the kept dimensions (``svcca`` returns them so callers can check).

    Args:
        x: ``(n, p)`` activations.
        y: ``(n, q)`` activations of the same examples.
        keep: share of variance each SVD step keeps (0 < keep <= 1).

    Returns:
        (mean canonical correlation in [0, 1], kept dimensions of x, kept dimensions of y); the mean is NaN
        when either matrix has no variance.

    Raises:
        ValueError: not 2D, different numbers of examples, or ``keep`` out of range.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    a, b = _pair(x, y)
    ua, ub = _top_directions(a, keep), _top_directions(b, keep)
    if ua.shape[1] == 0 or ub.shape[1] == 0:
        return float("nan"), ua.shape[1], ub.shape[1]
    rho = torch.linalg.svdvals(ua.T @ ub)  # min(kx, ky) canonical correlations
    return float(rho.clamp(0.0, 1.0).mean()), ua.shape[1], ub.shape[1]
