"""A numerical cardiac cine phantom (no download needed) and simulated receive coils.

A short-axis-like slice: a textured body with lungs, liver-like tissue and a spine, a
left ventricle (bright blood pool in a myocardial ring) and a right-ventricular crescent
that contract over the cardiac cycle, breathing that shifts the heart and the diaphragm,
smooth edges, and a smooth background phase. Deterministic for a given seed.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Smooth inside-indicator from a signed 'distance' (negative inside)."""
    return 1.0 / (1.0 + np.exp(np.clip(d / width, -40, 40)))


def _ellipse(y, x, cy, cx, ry, rx, width=0.6):
    r = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    return _soft((r - 1.0) * min(ry, rx), width)


def cine_phantom(frames: int = 16, size: int | tuple = 96, seed: int = 0, breathing: bool = True,
                 phase: bool = True) -> np.ndarray:
    """Complex64 images ``[frames, ny, nx]``, magnitude roughly in [0, 1]."""
    ny, nx = (size, size) if np.isscalar(size) else size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    sy, sx = ny / 96.0, nx / 96.0  # geometry designed on a 96 x 96 grid
    texture = ndimage.gaussian_filter(rng.standard_normal((ny, nx)), 1.5 * min(sy, sx))
    texture /= texture.std() + 1e-12
    coarse = ndimage.gaussian_filter(rng.standard_normal((ny, nx)), 6 * min(sy, sx))
    coarse /= coarse.std() + 1e-12
    cphase = ndimage.zoom(rng.standard_normal((3, 3)), (ny / 3, nx / 3), order=3)[:ny, :nx]

    out = np.zeros((frames, ny, nx), np.complex64)
    for t in range(frames):
        c = np.sin(np.pi * t / frames) ** 2            # 0 = end-diastole, 1 = end-systole
        b = np.sin(2 * np.pi * t / frames * 0.5) if breathing else 0.0  # half a breath per cycle
        dy = 2.5 * sy * b
        body = _ellipse(y, x, 48 * sy, 48 * sx, 42 * sy, 45 * sx)
        img = body * (0.35 + 0.04 * texture + 0.05 * coarse)
        for lx in (24, 72):  # lungs
            lung = _ellipse(y, x, 42 * sy + dy * 0.6, lx * sx, 20 * sy, 13 * sx)
            img = img * (1 - 0.85 * lung)
        liver = _ellipse(y, x, 82 * sy + dy, 30 * sx, 14 * sy, 22 * sx)
        img = img * (1 - liver) + liver * (0.45 + 0.03 * texture)
        spine = _ellipse(y, x, 84 * sy, 50 * sx, 6 * sy, 6 * sx)
        img = img * (1 - spine) + spine * 0.6
        # heart: myocardium ring and LV pool contract; RV crescent follows
        cy, cx = 46 * sy + dy, 52 * sx
        r_out = (15.0 - 2.0 * c) * min(sy, sx)
        r_in = (10.5 - 4.0 * c) * min(sy, sx)
        myo = _ellipse(y, x, cy, cx, r_out, r_out * 1.05)
        pool = _ellipse(y, x, cy, cx, r_in, r_in * 1.05)
        rv = _ellipse(y, x, cy - 1 * sy, cx - (17 - 1.5 * c) * sx, (11 - 2.5 * c) * sy, (7 - 2.0 * c) * sx)
        rv = rv * (1 - myo)
        img = img * (1 - myo) + myo * (0.3 + 0.02 * texture)
        img = img * (1 - pool) + pool * (0.95 + 0.02 * texture)
        img = img * (1 - rv) + rv * (0.85 + 0.02 * texture)
        # papillary muscles: two small dark spots inside the pool
        for ang in (0.6, 2.2):
            pm = _ellipse(y, x, cy + 0.6 * r_in * np.sin(ang), cx + 0.6 * r_in * np.cos(ang),
                          1.8 * sy, 1.8 * sx)
            img = img * (1 - 0.6 * pm * pool)
        img = np.clip(img, 0, None)
        ph = 0.8 * cphase + 0.4 * (x / nx - 0.5) if phase else 0.0
        out[t] = (img * np.exp(1j * ph)).astype(np.complex64)
    return out


def coil_maps(coils: int, size: int | tuple = 96, seed: int = 0) -> np.ndarray:
    """Smooth complex receive sensitivities ``[coils, ny, nx]`` of coils placed on a ring
    around the body, normalised so that sum_c |S_c|^2 = 1 everywhere."""
    ny, nx = (size, size) if np.isscalar(size) else size
    rng = np.random.default_rng(seed + 1)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    yc, xc = (y - ny / 2) / (ny / 2), (x - nx / 2) / (nx / 2)
    maps = np.zeros((coils, ny, nx), np.complex128)
    for c in range(coils):
        a = 2 * np.pi * c / coils + 0.2 * rng.standard_normal()
        py, px = 1.3 * np.sin(a), 1.3 * np.cos(a)
        d2 = (yc - py) ** 2 + (xc - px) ** 2
        mag = np.exp(-d2 / (2 * 0.9**2))
        ph = 2.0 * (yc * np.cos(a) - xc * np.sin(a)) * 0.5 + rng.uniform(-np.pi, np.pi)
        maps[c] = mag * np.exp(1j * ph)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    return maps.astype(np.complex64)


def simulate_kspace(images: np.ndarray, maps: np.ndarray | None, mask: np.ndarray,
                    noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Undersampled centred k-space ``[coil, frame, ky, kx]`` (zeros where not acquired).

    ``mask`` is ``[frame, ky]`` or ``[frame, ky, kx]``; ``noise`` is the standard deviation
    of complex Gaussian noise per k-space sample (each real component), in image units of
    the orthonormal FFT.
    """
    from numpy.fft import fft2, fftshift, ifftshift

    coil_imgs = images[None] if maps is None else maps[:, None] * images[None]
    k = fftshift(fft2(ifftshift(coil_imgs, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    if noise:
        rng = np.random.default_rng(seed + 7)
        k = k + noise * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    m = mask if mask.ndim == 3 else np.broadcast_to(mask[:, :, None], images.shape)
    return (k * m[None]).astype(np.complex64)
