"""Structured (SAKE-style) low-rank projection of multi-frame k-space.

The frames are channels of a block-Hankel matrix H = lift(k) of shape
``[window positions, frames * w * w]``. Its rank-r truncation is computed from the small
Gram matrix G = H^H H (``[frames*w*w]^2``, Hermitian), whose top-r eigenvectors V_r are
the right singular vectors of H: H_r = H V_r V_r^H. The published code rebuilt with V^T,
which is wrong for complex data; the Hermitian transpose is used here. The result is
averaged back onto the k-space grid (adjoint of the lifting divided by its multiplicity).
"""
from __future__ import annotations

import torch

from .operators import HankelLift
from .profiling import stage


def default_rank(window: int, factor: float = 1.5) -> int:
    """The published rank: floor(1.5 * window^2) (54 for a 6 x 6 window)."""
    return int(factor * window * window)


def lowrank_project(k: torch.Tensor, lift: HankelLift, rank: int) -> torch.Tensor:
    """Rank-``rank`` block-Hankel approximation of k-space ``[frame, ky, kx]``."""
    with stage("low-rank"):
        h = lift(k)
        if rank >= h.shape[1]:
            return k
        gram = h.mH @ h
        _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
        vr = vecs[:, -rank:]
        return lift.average((h @ vr) @ vr.mH)
