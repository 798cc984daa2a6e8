"""Classical reconstructions that need no network: zero-filled and low-rank-only.

Both take the same :class:`~ddugm_core.consistency.DataConsistency` as the sampler, so
single- and multi-coil data go through one code path. They are the demo's references and
the fallback when a score-based reconstruction cannot run.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .consistency import DataConsistency
from .lowrank import lowrank_project
from .operators import HankelLift, fft2c, ifft2c


def zero_filled(dc: DataConsistency) -> torch.Tensor:
    """Coil-combined inverse FFT of the zero-filled k-space ``[frame, y, x]``."""
    return dc.adjoint_image()


def low_rank(dc: DataConsistency, iters: int = 50, rank: int = 54, window: int = 6,
             callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Structured low-rank reconstruction: alternate the block-Hankel rank-r projection
    of all frames' k-space with data consistency, from the zero-filled start."""
    k = fft2c(dc.image(zero_filled(dc)))
    lift = HankelLift(tuple(k.shape), window, device=k.device)
    for i in range(iters):
        k = dc.kspace(lowrank_project(k, lift, rank))
        if callback is not None:
            callback(i + 1, iters)
    return ifft2c(k)
