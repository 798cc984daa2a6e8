"""Image quality metrics on magnitude images ``[frame, y, x]`` against a reference.

Normalisation: both images are compared in magnitude and in the same (absolute) scale;
the peak/data range is max |reference| over the whole series. Nothing is rescaled to fit.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def _mag(x) -> np.ndarray:
    return np.abs(np.asarray(x)).astype(np.float64)


def psnr(ref, x, data_range: float | None = None) -> float:
    """10 log10(max|ref|^2 / mean((|x| - |ref|)^2)) over all frames and pixels, in dB.
    ``data_range`` replaces max|ref| (e.g. the series' peak when scoring single frames)."""
    r, v = _mag(ref), _mag(x)
    mse = np.mean((v - r) ** 2)
    peak = r.max() if data_range is None else float(data_range)
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def ssim(ref, x, sigma: float = 1.5, data_range: float | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004; Gaussian window sigma 1.5, K1=0.01,
    K2=0.03, L = max|ref| of the series or ``data_range``), computed per 2D frame and
    averaged over frames."""
    r, v = _mag(ref), _mag(x)
    if r.ndim == 2:
        r, v = r[None], v[None]
    L = r.max() if data_range is None else float(data_range)
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    f = lambda a: ndimage.gaussian_filter(a, sigma=(0, sigma, sigma), truncate=3.5)  # noqa: E731
    mr, mv = f(r), f(v)
    vr, vv, cov = f(r * r) - mr**2, f(v * v) - mv**2, f(r * v) - mr * mv
    s = ((2 * mr * mv + c1) * (2 * cov + c2)) / ((mr**2 + mv**2 + c1) * (vr + vv + c2))
    return float(s.mean())


def hfen(ref, x, sigma: float = 1.5) -> float:
    """High-frequency error norm: ||LoG(|x|) - LoG(|ref|)||_2 / ||LoG(|ref|)||_2, with a
    Laplacian-of-Gaussian (sigma 1.5 pixels) applied per frame. Lower is better."""
    r, v = _mag(ref), _mag(x)
    if r.ndim == 2:
        r, v = r[None], v[None]
    log = lambda a: np.stack([ndimage.gaussian_laplace(f, sigma) for f in a])  # noqa: E731
    lr = log(r)
    return float(np.linalg.norm(log(v) - lr) / max(np.linalg.norm(lr), 1e-30))


def all_metrics(ref, x) -> dict:
    return {"psnr": psnr(ref, x), "ssim": ssim(ref, x), "hfen": hfen(ref, x)}
