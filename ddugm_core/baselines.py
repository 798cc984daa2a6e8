"""Classical reconstructions that need no network: zero-filled, low-rank-only and L+S.

All take the same :class:`~ddugm_core.consistency.DataConsistency` as the sampler, so
single- and multi-coil data go through one code path. They are the demo's references and
the fallback when a score-based reconstruction cannot run. L+S is the compressed-sensing
reference users compare with (Otazo, Candes, Sodickson, MRM 2015).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .consistency import DataConsistency
from .lowrank import LowRankProjector
from .operators import HankelLift, fft2c, ifft2c
from .profiling import stage


def zero_filled(dc: DataConsistency) -> torch.Tensor:
    """Coil-combined inverse FFT of the zero-filled k-space ``[frame, y, x]``."""
    return dc.adjoint_image()


def low_rank(dc: DataConsistency, iters: int = 50, rank: int = 54, window: int = 6,
             callback: Optional[Callable[[int, int], None]] = None, solver: str = "exact") -> torch.Tensor:
    """Structured low-rank reconstruction: alternate the block-Hankel rank-r projection
    of all frames' k-space with data consistency, from the zero-filled start."""
    k = fft2c(dc.image(zero_filled(dc)))
    project = LowRankProjector(HankelLift(tuple(k.shape), window, device=k.device), rank, solver)
    for i in range(iters):
        k = dc.kspace(project(k))
        if callback is not None:
            callback(i + 1, iters)
    return ifft2c(k)


def soft_threshold(x: torch.Tensor, lam) -> torch.Tensor:
    """Complex soft thresholding: shrink |x| by ``lam``, keep the phase."""
    mag = x.abs()
    return x * (torch.clamp(mag - lam, min=0) / torch.where(mag > 0, mag, torch.ones_like(mag)))


def singular_value_threshold(x: torch.Tensor, lam_rel: float) -> torch.Tensor:
    """SVT of the Casorati matrix of ``x`` ``[frame, y, x]`` (pixels x frames): singular
    values shrink by ``lam_rel`` times the largest one. Computed from the small Gram matrix
    C^H C (frames x frames, eigendecomposed in double precision on the host: a solver for
    such a tiny matrix is faster there than launched on a GPU), so no pixel-sized SVD."""
    t = x.shape[0]
    c = x.reshape(t, -1).T  # [pixels, frames]
    gram = (c.mH @ c).to(device="cpu", dtype=torch.complex128)
    evals, v = torch.linalg.eigh(gram)
    sv = evals.clamp(min=0).sqrt()
    smax = sv[-1]
    if not smax > 0:
        return torch.zeros_like(x)
    keep = torch.where(sv > 1e-10 * smax, torch.clamp(sv - lam_rel * smax, min=0) / sv.clamp(min=1e-300), 0.0)
    proj = ((v * keep) @ v.mH).to(device=x.device, dtype=x.dtype)  # V diag(max(s - lam, 0) / s) V^H
    return (c @ proj).T.reshape(x.shape)


def temporal_ft(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Fourier transform along the frame axis (the sparsifying transform of L+S)."""
    return torch.fft.fft(x, dim=0, norm="ortho")


def temporal_ift(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft(x, dim=0, norm="ortho")


def l_plus_s(dc: DataConsistency, iters: int = 50, lambda_l: float = 0.01, lambda_s: float = 0.02,
             tol: float = 0.0025, callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Low-rank plus sparse reconstruction (Otazo et al., MRM 2015, their Algorithm 1).

    x = L + S with L low rank (SVT of the Casorati matrix, threshold ``lambda_l`` relative
    to the largest singular value) and S sparse in temporal Fourier (soft threshold
    ``lambda_s``, absolute, in the normalised units the reconstructor works in), with a
    SENSE data-consistency step M = L + S - E^H (E (L + S) - d). Stops after ``iters``
    iterations or when the relative update falls below ``tol``.
    """
    m = zero_filled(dc)
    s = torch.zeros_like(m)
    l_prev = m
    for i in range(iters):
        m0 = m
        with stage("low-rank"):
            low = singular_value_threshold(m - s, lambda_l)
        s = temporal_ift(soft_threshold(temporal_ft(m - l_prev), lambda_s))
        m = dc.image(low + s)
        l_prev = low
        if callback is not None:
            callback(i + 1, iters)
        change = torch.linalg.vector_norm(m - m0) / torch.linalg.vector_norm(m0).clamp(min=1e-30)
        if tol > 0 and change < tol:
            if callback is not None:
                callback(iters, iters)
            break
    return m
