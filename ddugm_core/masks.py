"""Cartesian undersampling masks ``[frame, ky]`` (True = line acquired)."""
from __future__ import annotations

import numpy as np


def variable_density_mask(frames: int, ny: int, accel: float, center_lines: int | None = None,
                          seed: int = 0, power: float = 2.0) -> np.ndarray:
    """A different random set of lines per frame, denser near the centre, with the
    ``center_lines`` around ky = ny // 2 always acquired. Each frame gets round(ny / accel) lines."""
    if accel < 1:
        raise ValueError("acceleration must be >= 1")
    n = max(1, int(round(ny / accel)))
    if center_lines is None:
        center_lines = max(2, min(n // 2, int(round(0.04 * ny))))
    center_lines = min(center_lines, n)
    rng = np.random.default_rng(seed)
    ky = np.arange(ny) - ny // 2
    centre = np.abs(ky + 0.5 * (center_lines % 2 == 0)) < center_lines / 2
    centre_idx = np.flatnonzero(centre)[:center_lines]
    density = (1.0 - np.abs(ky) / (ny / 2 + 1)) ** power
    mask = np.zeros((frames, ny), dtype=bool)
    for t in range(frames):
        mask[t, centre_idx] = True
        p = density * ~mask[t]
        extra = n - int(mask[t].sum())
        if extra > 0:
            mask[t, rng.choice(ny, size=extra, replace=False, p=p / p.sum())] = True
    return mask


def lattice_mask(frames: int, ny: int, accel: int, center_lines: int = 0) -> np.ndarray:
    """The shifted equispaced lattice of the paper: every ``accel``-th line, shifted by one
    line per frame (frame t acquires ky with (ky - t) mod accel == 0), plus optional centre lines."""
    accel = int(accel)
    if accel < 1:
        raise ValueError("acceleration must be >= 1")
    ky = np.arange(ny)
    return _with_centre(((ky[None, :] - np.arange(frames)[:, None]) % accel) == 0, center_lines)


def _with_centre(mask: np.ndarray, center_lines: int) -> np.ndarray:
    """``mask`` ``[frame, ky]`` with the ``center_lines`` lines around ky = ny // 2 acquired in every frame."""
    if center_lines:
        c = mask.shape[-1] // 2 - center_lines // 2
        mask[:, c:c + center_lines] = True
    return mask


def equispaced_mask(frames: int, ny: int, accel: int, center_lines: int = 0) -> np.ndarray:
    """What most clinical cine acquires with GRAPPA or SENSE: every ``accel``-th line, the same in
    every frame, through the centre line ky = ny // 2, plus ``center_lines`` calibration (ACS)
    lines around it in every frame (integrated reference)."""
    accel = int(accel)
    if accel < 1:
        raise ValueError("acceleration must be >= 1")
    if not 0 <= center_lines <= ny:
        raise ValueError(f"center_lines must be within 0 ... {ny}, got {center_lines}")
    lines = (np.arange(ny) - ny // 2) % accel == 0
    return _with_centre(np.repeat(lines[None], frames, axis=0), center_lines)
