"""Coil sensitivities from the time-averaged, fully sampled k-space centre.

Across a cine series each frame samples different lines; averaging the frames where each
sample was acquired gives the k-space of the time-averaged image, usually fully sampled
near the centre. Maps come from the Hann-windowed low-resolution coil images of that
band by Walsh's local covariance method. The band used may have a few unsampled lines (at
most 20 %); the smooth window keeps their effect small. They are normalised (sum_c |S_c|^2 = 1 inside the
support), so the SENSE normal operator is the identity where everything is sampled, and
zero where the signal is below ``threshold`` times its maximum (no image is defined there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .operators import ifft2c


def time_averaged_kspace(kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the frames that sampled each location: ``[coil, frame, ky, kx] -> [coil, ky, kx]``."""
    count = mask.sum(0)
    return (kspace * mask).sum(1) / count.clamp(min=1)


def calibration_width(mask: torch.Tensor, max_width: int = 24, min_fill: float = 0.8) -> int:
    """Width (odd, <= ``max_width``) of the ky band around the centre in which at least
    ``min_fill`` of the lines are sampled by some frame (the centre line itself must be)."""
    ny = mask.shape[-2]
    lines = mask.any(dim=-1).any(dim=0).float()  # [ky]: line sampled by any frame
    c = ny // 2
    if not lines[c]:
        return 0
    best = 1
    for half in range(1, min(max_width // 2, c, ny - 1 - c) + 1):
        if float(lines[c - half:c + half + 1].mean()) >= min_fill:
            best = 2 * half + 1
    return best


def estimate_coil_maps(kspace: torch.Tensor, mask: torch.Tensor, calib: int = 24, threshold: float = 0.05,
                       kernel: int = 7, power_iters: int = 12) -> torch.Tensor:
    """Normalised coil maps ``[coil, y, x]`` from k-space ``[coil, frame, ky, kx]`` and mask ``[frame, ky, kx]``.

    Walsh's method (Walsh et al., MRM 2000) on the time-averaged calibration band: at each
    pixel the dominant eigenvector of the coil covariance over a ``kernel`` x ``kernel``
    neighbourhood, by batched power iteration. The phase is referred to the first coil.
    """
    c, _, ny, nx = kspace.shape
    width = calibration_width(mask, calib)
    if width < 3:
        raise ValueError("cannot estimate coil maps: the k-space centre line is not sampled by any frame; "
                         "pass coil_maps or sample the centre")
    avg = time_averaged_kspace(kspace, mask)
    wy = _hann(ny, width, kspace.device)
    wx = _hann(nx, max(3, round(width * nx / ny)), kspace.device)
    low = ifft2c(avg * (wy[:, None] * wx[None, :]))  # [coil, y, x]
    # local coil covariance R[y, x] = sum over the neighbourhood of low low^H
    outer = (low[:, None] * low[None].conj()).reshape(c * c, ny, nx)
    ri = torch.view_as_real(outer).permute(3, 0, 1, 2)  # [2, c*c, y, x]
    ri = F.avg_pool2d(ri, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    cov = torch.complex(ri[0], ri[1]).reshape(c, c, ny, nx).permute(2, 3, 0, 1)  # [y, x, c, c]
    v = low.permute(1, 2, 0)[..., None]  # start from the pixel's own coil vector
    v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp(min=1e-30)
    for _ in range(power_iters):
        v = cov @ v
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp(min=1e-30)
    power = torch.linalg.vector_norm(cov @ v, dim=-2)[..., 0]  # dominant eigenvalue
    v = v[..., 0] * torch.exp(-1j * torch.angle(v[..., :1, 0]))  # phase relative to coil 0
    support = power.sqrt() > threshold * power.max().sqrt()
    return torch.where(support, v.permute(2, 0, 1), torch.zeros_like(low))


def _hann(n: int, width: int, device) -> torch.Tensor:
    """A Hann window of ``width`` samples centred at n // 2, zero elsewhere."""
    i = torch.arange(n, device=device, dtype=torch.float32) - n // 2
    half = width / 2.0
    return torch.where(i.abs() < half, 0.5 + 0.5 * torch.cos(torch.pi * i / half), torch.zeros_like(i))


def compress_coils(kspace: torch.Tensor, mask: torch.Tensor, virtual: int,
                   maps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """SVD coil compression to ``virtual`` coils (the principal components of the coil
    signals over all acquired samples; Huang et al., MRI 2008).

    ``kspace`` ``[coil, frame, ky, kx]`` (noise-whitened, as the gadgets deliver it), mask
    ``[frame, ky, kx]``. Returns the compressed k-space ``[virtual, ...]``, the maps taken
    through the same matrix (or None) and the fraction of the signal energy kept. Each
    data-consistency step then costs ``virtual / coil`` of before. With ``virtual`` 0 or
    at least the number of coils the input comes back unchanged (fraction 1).
    """
    coils = kspace.shape[0]
    if virtual <= 0 or virtual >= coils:
        return kspace, maps, 1.0
    samples = kspace[:, mask > 0]                      # [coil, acquired samples]
    evals, evecs = torch.linalg.eigh(samples @ samples.mH)  # ascending
    a = evecs[:, -virtual:].flip(-1).mH                 # [virtual, coil], strongest first
    kept = float(evals[-virtual:].sum() / evals.sum().clamp(min=1e-30))
    squeeze = lambda x: torch.tensordot(a, x, dims=([1], [0]))  # noqa: E731
    return squeeze(kspace), (squeeze(maps) if maps is not None else None), kept
