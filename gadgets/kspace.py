"""From what the scanner sends to what ``ddugm_core`` reconstructs.

Two inputs end in the same :class:`CineData` (k-space ``[coil, frame, ky, kx]`` centred at
``n // 2``, the mask of what was actually acquired ``[frame, ky, kx]``, optional calibration
k-space, and one acquisition header per frame for the image headers):

* plain acquisitions, collected by :class:`AcquisitionCollector` (one per slice, contrast,
  repetition, set and average; cardiac phase is the frame axis, or repetition for a real-time
  series: one collector per slice, contrast, phase, set and average then; or, retrospectively
  gated, phases binned from each line's ECG trigger time: one per slice, contrast, set, average);
* Gadgetron ReconData buffers (``[E0, E1, E2, CHA, N, S, LOC]``, phases along N), one
  :class:`CineData` per S and LOC, by :func:`cine_from_recon_bit`.

Both apply noise prewhitening (from a noise scan, :class:`NoiseWhitener`), remove readout
oversampling (:func:`readout_to_grid`), and place asymmetric echoes and partial-Fourier
lines where they belong, leaving the rest zero and unmarked in the mask.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from ddugm_core import MAX_SAMPLE

from .geometry import Geometry

log = logging.getLogger("ddugm.gadget")

# acquisition flags (ISMRMRD bit numbers, 1-based)
NOISE = 19
CALIBRATION = 20
CALIBRATION_AND_IMAGING = 21
REVERSE = 22
LAST_IN_SLICE = 8
LAST_IN_MEASUREMENT = 25
# auxiliary data that is not image k-space: navigators, phase correction, feedback, dummy
# scans, surface-coil correction, phase stabilisation
IGNORED = (23, 24, 26, 27, 28, 29, 30, 31)

GROUP_KEYS = ("slice", "contrast", "repetition", "set", "average")


def flag_set(flags: int, bit: int) -> bool:
    return bool(int(flags) & (1 << (bit - 1)))


@dataclass
class CineData:
    key: dict  # slice, contrast, repetition, set, average
    kspace: np.ndarray  # [coil, frame, ky, kx] complex64
    mask: np.ndarray  # [frame, ky, kx] bool
    headers: list  # one ismrmrd.AcquisitionHeader per frame (the line nearest the k-space centre)
    ref: np.ndarray | None = None  # [coil, ky, kx] calibration k-space, or None
    ref_mask: np.ndarray | None = None  # [ky, kx] bool
    notes: list = field(default_factory=list)
    frame_axis: str = "phase"  # the image header index that numbers the frames (phase | repetition)
    frame_offset: int = 0  # the first frame's index (a block of a real-time series: its first repetition)
    noise_std: float | None = None  # k-space noise std per real component where prewhitened (a noise scan), else None


# ------------------------------------------------------------------ noise prewhitening
def _usable_dwell(dwell_us) -> bool:
    """A dwell time that can scale the noise (a header's 0, NaN or inf is ignored: no scaling)."""
    return bool(dwell_us) and math.isfinite(dwell_us) and dwell_us > 0


class NoiseWhitener:
    """Prewhitening from noise-only readouts: ``y' = L^-1 y * sqrt(dwell_data / dwell_noise)``
    with ``C = L L^H`` the coil noise covariance, so the data's noise is white with unit
    variance per channel (Pruessmann et al., MRM 2001)."""

    def __init__(self):
        self._sum = None
        self._n = 0
        self.dwell_us = None
        self._matrix = None
        self._medians = []  # per readout, each channel's median |sample|^2 (a robust noise power)

    def add(self, data: np.ndarray, dwell_us: float):
        with np.errstate(all="ignore"):  # non-finite samples are reported by matrix()
            d = np.asarray(data, dtype=np.complex128)  # [coil, samples]
        if self._sum is not None and d.shape[0] != self._sum.shape[0]:
            raise ValueError(f"noise readouts have {d.shape[0]} channels, earlier ones had {self._sum.shape[0]}")
        with np.errstate(all="ignore"):  # non-finite samples are reported by matrix()
            self._medians.append(np.median(np.abs(d) ** 2, axis=1))
            s = d @ d.conj().T
        self._sum = s if self._sum is None else self._sum + s
        self._n += d.shape[1]
        self.dwell_us = float(dwell_us) if _usable_dwell(dwell_us) else self.dwell_us
        self._matrix = None

    @property
    def ready(self) -> bool:
        return self._n > 1

    @property
    def covariance(self) -> np.ndarray:
        return self._sum / max(self._n - 1, 1)

    def matrix(self) -> np.ndarray:
        if self._matrix is None:
            cov = self.covariance
            c = cov.shape[0]
            if not np.isfinite(cov).all():
                raise ValueError("noise scan: it holds non-finite samples (NaN or inf); cannot prewhiten")
            power = np.real(np.diag(cov))
            dead = np.nonzero(power <= 0)[0].tolist()
            if dead:
                raise ValueError(f"noise scan: channel(s) {dead} carry no noise; cannot prewhiten")
            # Gaussian noise: |x|^2 is exponential, its median ln 2 times its mean. A channel whose
            # mean power is 100 times that holds samples far outside its noise (a corrupted sample,
            # a spike of some 450 sigma in 2048 samples): its covariance would whiten the data by a
            # wrong scale (a corrupted float gave "the data have no signal")
            robust = np.median(np.stack(self._medians), axis=0) / math.log(2)
            wild = np.nonzero(power > 100 * robust)[0].tolist()
            if wild:
                with np.errstate(divide="ignore"):
                    ratio = float(power[wild[0]] / robust[wild[0]])
                raise ValueError(f"noise scan: channel(s) {wild} hold samples far outside their noise (mean power "
                                 f"{ratio:.3g} times what the median sample says; corrupted?); cannot prewhiten")
            cov = cov + np.eye(c) * 1e-9 * np.real(np.trace(cov)) / c
            try:
                chol = np.linalg.cholesky(cov)
            except np.linalg.LinAlgError:
                raise ValueError("noise scan: the coil noise covariance is not positive definite") from None
            self._matrix = np.linalg.inv(chol)
        return self._matrix

    def apply(self, data: np.ndarray, dwell_us: float | None = None) -> np.ndarray:
        """Whiten ``[coil, ...]`` data."""
        w = self.matrix()
        if data.shape[0] != w.shape[0]:
            raise ValueError(f"data have {data.shape[0]} channels but the noise scan had {w.shape[0]}")
        scale = np.sqrt(dwell_us / self.dwell_us) if (_usable_dwell(dwell_us) and self.dwell_us) else 1.0
        with np.errstate(all="ignore"):  # corrupted samples: left out by the collector, named in the warning
            out = np.tensordot(w * scale, data, axes=(1, 0))
            return out.astype(np.complex64)


SPIKE_RATIO = 10.0  # a sample this many times the k-space peak of a typical frame is no MR signal (cine: <= 1.1)
CORRUPT_SHARE = 0.1  # beyond this share of the acquired samples corrupted, the slice is an error
LOCAL_RATIO = 30.0  # a sample this many times its readout neighbours is an RF spike (clean data: <= 14, README)
ECHO_ZONE = 2  # samples either side of the echo, where k-space peaks sharply: the local test skips them
ECHO_ROWS, ECHO_PEAK = 4, 2.0  # there, on lines this many rows or more from the centre, a sample over this
#                               many times the k-space peak is a spike (clean data: <= 0.43 of it, README)
ECHO_SHIFT = 0.1  # the centre lines' echo this fraction of the readout from its stated centre: a warning
#                   (clean data: within 0.011 of it, the real Siemens file 1 sample of 384; README)


_SORT6 = ((1, 2), (4, 5), (0, 2), (3, 5), (0, 1), (3, 4), (1, 4), (0, 3), (2, 5), (1, 3), (2, 4), (2, 3))  # 6 inputs


def local_spike_ratio(lines: np.ndarray, center: int) -> np.ndarray:
    """The largest ratio ``[..., coil]`` of a sample's magnitude in each readout line
    ``[..., coil, samples]`` (complex, or its magnitudes) to the median of its 6 nearest readout neighbours, or to the line's
    lower quartile (of its non-zero samples) where that is larger (noise; zero-padded readouts),
    outside ``ECHO_ZONE`` samples either side of the echo ``center``. MR signal is smooth along the
    readout (band-limited by the field of view): on clean data, simulated and the real Siemens
    file, with and without readout oversampling, the ratio stays within 14 there, while an RF
    spike (one or two samples) stands out far above its neighbours. At the echo the k-space peaks
    sharply, on the outer lines too where anatomy fills the field of view (up to 25 without
    readout oversampling), so the test skips it. Non-finite samples count as 0 here."""
    with np.errstate(all="ignore"):
        m = np.abs(lines).astype(np.float32, copy=False)
        m[~np.isfinite(m)] = 0
    n = m.shape[-1]
    if n < 8:
        return np.zeros(m.shape[:-1], np.float32)
    pad = np.pad(m, [(0, 0)] * (m.ndim - 1) + [(3, 3)], mode="reflect")
    v = [pad[..., 3 + d:3 + d + n] for d in (-3, -2, -1, 1, 2, 3)]
    for i, j in _SORT6:  # the neighbours sorted elementwise: a fraction of np.sort's time
        v[i], v[j] = np.minimum(v[i], v[j]), np.maximum(v[i], v[j])
    med = 0.5 * (v[2] + v[3])
    zeros = (m == 0).sum(axis=-1, keepdims=True)
    if zeros.any():  # the lower quartile of the non-zero samples
        floor = np.take_along_axis(np.sort(m, axis=-1), np.minimum(zeros + (n - zeros) // 4, n - 1), axis=-1)
    else:
        floor = np.partition(m, n // 4, axis=-1)[..., n // 4:n // 4 + 1]
    with np.errstate(all="ignore"):
        r = m / np.maximum(med, np.where(floor > 0, floor, np.inf))  # a coil of zeros only: ratio 0
    r[..., max(0, center - ECHO_ZONE):center + ECHO_ZONE + 1] = 0
    return np.nan_to_num(r.max(axis=-1), nan=0.0, posinf=0.0)


def _peak_reference(peaks: np.ndarray, frames: np.ndarray, rows: np.ndarray, ny: int):
    """Each coil's k-space peak ``[coil]`` from the lines' largest samples ``peaks [line, coil]``
    (finite), their frames and grid rows: the median over frames of each frame's largest line.
    Only frames that hold a line within 2 rows of the grid's centre count (each frame's largest
    line is its centre's), and at least 3 frames and half of them must: else None (no robust
    reference; an ECG bin or a real-time frame may lack the centre)."""
    if not len(peaks):
        return None
    central = np.abs(rows - ny // 2) <= 2
    kept = sorted(set(frames[central].tolist()))
    if len(kept) < 3 or 2 * len(kept) < len(set(frames.tolist())):
        return None
    return np.median(np.stack([peaks[frames == f].max(axis=0) for f in kept]), axis=0)


def _echo_offset(mag: np.ndarray, center: int) -> float:
    """Where a readout's echo peaks ``[coil, samples]`` magnitudes, from ``center``, as a fraction of its length."""
    total = np.where(np.isfinite(mag), mag, 0).sum(axis=0)
    return (int(np.argmax(total)) - center) / max(total.shape[-1], 1)


def _echo_note(offsets: list) -> str | None:
    """A warning where the k-space centre lines' echoes (their :func:`_echo_offset`, the median)
    lie more than ``ECHO_SHIFT`` of the readout from the stated centre (``center_sample``, a
    buffer's sampling limits): the k-space is then misplaced along the readout, a wrong image
    (relative error 0.67 on a simulated buffer with its centre at sample 0) that no other check sees."""
    if not offsets:
        return None
    med = float(np.median(offsets))
    if abs(med) <= ECHO_SHIFT:
        return None
    return (f"on the k-space centre lines the echo peaks {100 * abs(med):.0f} % of the readout "
            f"{'after' if med > 0 else 'before'} the stated echo centre (center_sample; median of {len(offsets)} "
            "line(s)): a wrong echo centre misplaces the k-space along the readout, and the images may be wrong; "
            "check the sequence's headers")


def _kept_note(n: int) -> str:
    """Too many lines over the spike tests measured on clean data (local, echo) to leave out: more
    likely data unlike any they were measured on than spikes, so they are kept, and said."""
    return (f"{n} k-space lines hold a sample like an RF spike (more than {LOCAL_RATIO:g} times its readout "
            f"neighbours, or at the echo of an outer line more than {ECHO_PEAK:g} times the k-space peak): more "
            f"than {100 * CORRUPT_SHARE:g} % of the lines, kept (RF interference, or data unlike any this check "
            "was measured on?): the images may show stripes")


def _unusable(x: np.ndarray) -> np.ndarray:
    """Samples no reconstruction can take, whatever the data around them: NaN, inf, or beyond
    ``MAX_SAMPLE`` (which single precision cannot square and sum)."""
    with np.errstate(all="ignore"):
        return ~np.isfinite(x) | (np.abs(x) > MAX_SAMPLE)


def _unusable_words(x: np.ndarray, finite: str = "NaN or inf") -> str:
    """How to name the unusable samples among ``x``: ``finite`` where all are NaN or inf."""
    with np.errstate(all="ignore"):
        beyond = (np.isfinite(x) & (np.abs(x) > MAX_SAMPLE)).any()
    return f"NaN, inf or beyond {MAX_SAMPLE:.0e}" if beyond else finite


def _corrupted(k: np.ndarray, mask: np.ndarray, peak) -> np.ndarray:
    """The acquired positions ``[..., ky, kx]`` of every line (all of its readout) where any
    coil's sample is unusable (:func:`_unusable`) or more than ``SPIKE_RATIO`` times that coil's
    ``peak`` (None: unusable samples only): a corrupted raw sample spreads over its whole line when
    the readout oversampling is removed."""
    with np.errstate(all="ignore"):
        bad = _unusable(k)
        if peak is not None:
            shape = (-1,) + (1,) * (k.ndim - 1)
            bad |= np.abs(k) > SPIKE_RATIO * np.asarray(peak).reshape(shape)
    return (bad & mask).any(axis=(0, -1))[..., None] & mask


def drop_spikes(cine: CineData, spiky: np.ndarray | None = None, spiky_ref: int = 0) -> str | None:
    """Corrupted samples (a flipped bit in transfer, an RF spike): a sample that is NaN or inf, or
    more than ``SPIKE_RATIO`` times its coil's k-space peak (the median over frames of each frame's
    largest finite sample, :func:`_peak_reference`; real cine stays within 1.1 times it),
    cannot be MR signal. Left in, one such sample failed the whole slice ("kspace contains NaN"),
    striped the image, or, past 1e19 or so, overflowed single precision in the coil maps ("the
    data have no signal"). Its position is taken out of the mask (the reconstruction fills it like
    any sample not acquired), in the calibration lines too, and zeroed; returns a warning saying
    how many, or None. More than ``CORRUPT_SHARE`` of the acquired samples corrupted is a
    ValueError: such data are not to be repaired. Without a robust reference (fewer than 3 frames
    with their centre): unusable samples only (NaN, inf, beyond ``MAX_SAMPLE``). ``spiky [frame, ky]``: the lines over the local
    RF-spike test on the buffer's own readouts (:func:`_buffer_lines`), left out likewise (kept
    and said where more than ``CORRUPT_SHARE`` of the lines); ``spiky_ref``: how many calibration
    lines that test already left out. For Gadgetron's ReconData buffers, already on the grid;
    plain acquisitions are checked on their raw lines (:meth:`AcquisitionCollector._drop_corrupted`)."""
    k, mask = cine.kspace, cine.mask
    if not mask.any():
        return None
    with np.errstate(all="ignore"):
        mag = np.where(np.isfinite(k), np.abs(k), 0).max(axis=-1)  # [coil, frame, ky]
    f, y = np.nonzero(mask.any(axis=-1))
    peak = _peak_reference(mag[:, f, y].T, f, y, mask.shape[1])
    where = _corrupted(k, mask, peak)  # [frame, ky, kx]
    ref_where = None
    if cine.ref is not None and cine.ref_mask is not None and cine.ref.shape[0] == k.shape[0]:
        ref_where = _corrupted(cine.ref[:, None], cine.ref_mask[None], peak)[0]
    n, acquired = int(where.sum()), int(mask.sum())
    if n > CORRUPT_SHARE * acquired:
        what = _unusable_words(k[:, where], "not finite (NaN or inf)") if _unusable(k[:, where]).any() else \
            f"more than {SPIKE_RATIO:g} times the k-space peak"
        raise ValueError(f"kspace: {n} of the {acquired} acquired samples are corrupted ({what}): more than "
                         f"{100 * CORRUPT_SHARE:g} %, not repaired")
    notes, kept = [], None
    if spiky is not None:
        spiky = spiky & mask.any(axis=-1) & ~where.any(axis=-1)
        if spiky.sum() > CORRUPT_SHARE * mask.any(axis=-1).sum():
            kept = _kept_note(int(spiky.sum()))
        elif spiky.any():
            where |= spiky[..., None] & mask
            n = int(where.sum())
    if ref_where is not None and ref_where.any():  # calibration lines: the same, for the coil maps
        cine.ref[:, ref_where] = 0
        cine.ref_mask[ref_where] = False
    ref_lines = (int(ref_where.any(axis=-1).sum()) if ref_where is not None else 0) + spiky_ref
    if ref_lines:
        notes.append(f"{ref_lines} calibration line(s) with corrupted samples")
    if n:
        lines = where.any(axis=-1)  # [frame, ky]
        f, y = (int(v[0]) for v in np.nonzero(lines))
        nonfinite = int(_unusable(k[:, where]).any(axis=0).sum())
        words = _unusable_words(k[:, where], "not finite")
        k[:, where] = 0
        mask[where] = False
        notes.insert(0, f"{int(lines.sum())} k-space line(s) with corrupted samples ({nonfinite} of their {n} "
                        f"samples {words}; the first: frame {f}, line {y})")
    if notes:
        notes = [" and ".join(notes) + f" left out: a sample NaN, inf, more than {SPIKE_RATIO:g} times the k-space "
                 f"peak or {LOCAL_RATIO:g} times its readout neighbours is no MR signal (an RF spike or a corrupted "
                 "transfer?)"]
    return "; ".join(notes + ([kept] if kept else [])) or None


# ------------------------------------------------------------------ readout handling
def readout_to_grid(lines: np.ndarray, center: int, geometry: Geometry):
    """:func:`_readout_to_grid`, quietly for a corrupted (non-finite) line: the collector leaves
    it out and names it."""
    with np.errstate(all="ignore"):
        return _readout_to_grid(lines, center, geometry)


def _readout_to_grid(lines: np.ndarray, center: int, geometry: Geometry):
    """Put readouts ``[..., samples]`` whose echo centre is at sample ``center`` on the
    reconstruction's readout grid (``geometry.nx`` samples, centre at ``nx // 2``).

    Oversampled readouts (the encoded FOV is ``r`` times the reconstructed one and the line
    is at the encoded sampling) are decimated: the line is zero-padded symmetric about its
    echo, Fourier transformed, cropped to the central ``1/r`` of the readout FOV and
    transformed back. An asymmetric echo keeps its true k-space extent; samples outside it
    stay zero and are returned as not sampled. Returns ``(grid [..., nx], sampled [nx] bool)``.
    """
    lines = np.asarray(lines)
    n = lines.shape[-1]
    center = int(center)
    if not 0 <= center < max(n, 1):
        center = n // 2
    half = max(center, n - center)
    full = 2 * half  # the readout length if the echo were symmetric
    os = geometry.readout_oversampling
    nx = geometry.nx
    lo, hi = -center, n - center  # sampled k range in units of the line's own spacing
    m = _decimated_length(n, center, geometry)
    if m:  # still at the encoded (oversampled) sampling
        pad = np.zeros(lines.shape[:-1] + (full,), dtype=np.complex64)
        pad[..., half - center:half - center + n] = lines
        img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(pad, axes=-1), axis=-1), axes=-1)
        start = full // 2 - m // 2
        img = img[..., start:start + m]
        line = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img, axes=-1), axis=-1), axes=-1)
        lo, hi = int(np.ceil(lo / os)), int(np.floor((hi - 1) / os)) + 1
        c = m // 2
    else:
        line, m, c = lines, n, center
    grid = np.zeros(lines.shape[:-1] + (nx,), dtype=np.complex64)
    sampled = np.zeros(nx, dtype=bool)
    # k index j of `line` (relative to its centre c) goes to nx // 2 + j, kept where sampled
    j = np.arange(m) - c
    keep = (j >= lo) & (j < hi) & (nx // 2 + j >= 0) & (nx // 2 + j < nx)
    grid[..., nx // 2 + j[keep]] = line[..., keep]
    sampled[nx // 2 + j[keep]] = True
    return grid, sampled


def _decimated_length(n: int, center: int, geometry: Geometry) -> int:
    """The length a readout of ``n`` samples (echo at ``center``) keeps when
    :func:`readout_to_grid` removes its oversampling, or 0 where it is already at the
    reconstruction's sampling."""
    full = 2 * max(center, n - center)
    os = geometry.readout_oversampling
    return max(2, int(round(full / os))) if os > 1.01 and full > 1.25 * geometry.nx else 0


def whitened_noise_std(n: int, center: int, geometry: Geometry) -> float:
    """The noise std per real component that prewhitened readouts of ``n`` samples (echo at
    ``center``; unit variance per complex sample) have on the grid after :func:`readout_to_grid`:
    its oversampling removal (an inverse FFT of the padded line, a crop to ``m`` of its ``full``
    samples, a forward FFT) scales the noise variance by ``m / full``."""
    m = _decimated_length(n, center, geometry)
    return math.sqrt(0.5 * (m / (2 * max(center, n - center)) if m else 1.0))


def ky_to_grid(ky, ky_center: int, ny: int):
    """Encoding line index -> row of the centred grid; ValueError if it falls outside."""
    row = np.asarray(ky) - int(ky_center) + ny // 2
    bad = np.asarray((row < 0) | (row >= ny))
    if bad.any():
        first = int(np.asarray(ky).reshape(-1)[bad.reshape(-1)][0])
        raise ValueError(f"phase-encoding line {first} (centre {ky_center}) lies outside the encoded matrix of {ny} lines")
    return row


def finalize_images(x: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Crop ``[frame, y, x]`` images from the encoded field of view to the reconstructed one
    (phase oversampling), then resample to the header's recon matrix if it differs."""
    t, ny, nx = x.shape
    if geometry.recon_fov[1] > 0 and geometry.enc_fov[1] > geometry.recon_fov[1] * 1.01:
        keep = max(1, int(round(ny * geometry.recon_fov[1] / geometry.enc_fov[1])))
        s = ny // 2 - keep // 2
        x = x[:, s:s + keep]
    ry, rx = int(geometry.recon_matrix[1]), int(geometry.recon_matrix[0])
    if ry > 0 and rx > 0 and (ry, rx) != x.shape[1:]:
        x = fourier_resize(x, (ry, rx))
    return np.ascontiguousarray(x)


def fourier_resize(x: np.ndarray, shape) -> np.ndarray:
    """Resize the last two axes by cropping or zero-padding centred k-space (keeps intensity)."""
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    out = np.zeros(x.shape[:-2] + tuple(shape), dtype=np.complex64)
    sy = [min(a, b) for a, b in zip(k.shape[-2:], shape)]
    src = tuple(slice(n // 2 - s // 2, n // 2 - s // 2 + s) for n, s in zip(k.shape[-2:], sy))
    dst = tuple(slice(n // 2 - s // 2, n // 2 - s // 2 + s) for n, s in zip(shape, sy))
    out[(...,) + dst] = k[(...,) + src]
    factor = np.sqrt(np.prod(shape) / np.prod(x.shape[-2:]))
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(out, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    return (img * factor).astype(np.complex64)


# ------------------------------------------------------------------ plain acquisitions
def group_names(axis: str = "phase") -> tuple:
    """The indices that name a group: slice, contrast, repetition, set and average; with the
    repetitions as the frames (``axis`` ``repetition``), the phase in the repetition's place; with
    the lines binned by their ECG trigger time (``axis`` ``ecg``), neither: every repetition of a
    slice is one group."""
    if axis == "ecg":
        return tuple(k for k in GROUP_KEYS if k != "repetition")
    return tuple("phase" if (k == "repetition" and axis == "repetition") else k for k in GROUP_KEYS)


def group_key(acq, axis: str = "phase", block: int = 0) -> tuple:
    """The group an acquisition belongs to (:func:`group_names`); a real-time series split into
    blocks of ``block`` repetitions adds the block's number (repetition // block)."""
    key = tuple(int(getattr(acq.idx, k)) for k in group_names(axis))
    return key + (int(acq.idx.repetition) // block,) if block and axis == "repetition" else key


def ecg_bins(delay, phases: int = 20, rr_tolerance: float = 0.0) -> tuple[np.ndarray, dict]:
    """Retrospective ECG binning: the cardiac phase (``0 .. phases - 1``) of each line from its
    time after the last ECG trigger (``physiology_time_stamp[0]``), as retrospectively gated and
    real-time cine are binned (Xue et al., JCMR 2013, for one).

    ``delay``: the lines' trigger delays in the order they were acquired (the stream's order; their
    acquisition time stamps are not used: they wrap at midnight). A heartbeat starts where the
    delay falls. Each beat's RR
    interval is its largest delay plus the typical step between consecutive lines (the lines run on
    through the whole beat), so no unit is assumed: 2.5 ms ticks or ms alike. The last beat, cut
    short by the end of the scan, takes the median RR of the others (or its own, if longer). A line
    at delay d of a beat of length RR falls in phase ``floor(d / RR * phases)``. Arrhythmia
    rejection: with ``rr_tolerance`` > 0 a beat whose RR differs from the median by more than that
    fraction (the cut-short last beat: only if it is already too long) is left out, its lines'
    phase -1. Returns the phases and a summary (beats, median RR and its spread in the stamps'
    unit, beats and lines rejected)."""
    delay = np.asarray(delay, np.float64)
    n = delay.size
    if n == 0:
        raise ValueError("no lines to bin")
    if phases < 1:
        raise ValueError(f"cardiac_phases must be at least 1, got {phases}")
    if not np.any(delay > 0):
        raise ValueError("frame_axis ecg bins the lines by their ECG trigger time, but every line's "
                         "physiology_time_stamp[0] is 0: the acquisitions carry no trigger times")
    step = np.diff(delay)
    beat = np.concatenate([[0], np.cumsum(step < 0)])  # a new beat where the delay falls
    rising = step[step > 0]
    if not rising.size:
        raise ValueError("frame_axis ecg bins the lines by their ECG trigger time, but physiology_time_stamp[0] never "
                         "rises from one line to the next: the acquisitions carry no trigger timing")
    spacing = float(np.median(rising))
    nb = int(beat[-1]) + 1
    starts = np.flatnonzero(np.concatenate([[True], step < 0]))  # each beat's first line
    rr = np.maximum.reduceat(delay, starts) + spacing  # linear in the lines, whatever the number of beats
    if nb > 1:
        typical = float(np.median(rr[:-1]))
        rr[-1] = max(rr[-1], typical)
    else:
        typical = float(rr[0])
    frac = delay / np.maximum(rr[beat], 1e-12)
    phase = np.minimum(np.floor(frac * phases), phases - 1).astype(np.int64)
    rejected = np.zeros(nb, bool)
    if rr_tolerance > 0 and nb > 1:
        off = (rr - typical) / typical
        rejected = np.abs(off) > rr_tolerance
        rejected[-1] = off[-1] > rr_tolerance  # the last beat's length is a lower bound
        if rejected.all():
            raise ValueError(f"arrhythmia_rejection {rr_tolerance:g} leaves out every one of the {nb} heartbeats")
        phase[rejected[beat]] = -1
    full = rr[:-1] if nb > 2 else rr
    info = {"beats": nb, "rr": typical, "rr_min": float(full.min()), "rr_max": float(full.max()),
            "rejected_beats": int(rejected.sum()), "rejected_lines": int(rejected[beat].sum())}
    return phase, info


class UnlabelledCine(ValueError):
    """A cine's lines ran through heartbeats at varying trigger delays while their phase counters
    stayed unset: binning them by their ECG trigger time (frame_axis ecg) reads them as they were
    acquired; the session does so under frame_axis auto."""


def calibration_as_data(setting: str, mode: str) -> bool:
    """Whether calibration-only lines (``ACQ_IS_PARALLEL_CALIBRATION``) are also measured data of
    their frame: with the setting ``data``, or ``auto`` where the header's calibrationMode is
    ``embedded`` (the reference lines acquired within the frames, as a GRAPPA cine's integrated
    reference is). Gadgetron's own recons keep them for calibration only: GRAPPA needs a uniform
    lattice. A data-consistent reconstruction throws away measured centre lines that way; on a
    simulated GRAPPA cine (R = 3, 12 reference lines) with them as reference only, the coil maps
    of the reference could not unfold the lattice's aliasing (README "Calibration lines")."""
    return setting == "data" or (setting == "auto" and mode == "embedded")


class AcquisitionCollector:
    """Collects the acquisitions of one group (slice, contrast, repetition, set, average; with
    ``axis`` ``repetition`` the repetitions are the frames, and the key's repetition is the phase;
    with ``block`` > 0 the group holds repetitions ``k * block`` to ``(k + 1) * block - 1``, ``k``
    the key's last element). ``calibration_data``: calibration-only lines are also image data of
    their frame (:func:`calibration_as_data`)."""

    def __init__(self, key: tuple, geometry: Geometry, axis: str = "phase", block: int = 0, phases: int = 0,
                 rr_tolerance: float = 0.0, calibration_data: bool = False):
        self.key = key
        self.calibration_data = calibration_data
        self.geometry = geometry
        self.axis = axis
        self.phases = phases if axis == "ecg" else 0  # ecg: the cardiac phases the lines are binned into
        self.delays = []  # each line's trigger delay, in arrival order (binned where the axis is ecg)
        self.last_delay, self.heartbeats = 0, 0  # other axes: trigger delays that fall (new beats), for a hint
        self.rr_tolerance = rr_tolerance  # ecg: arrhythmia rejection (0: every beat)
        self.block = block if axis == "repetition" else 0
        self.offset = key[-1] * self.block if self.block else 0  # the first frame's index
        # (frame, row, grid [coil, nx], sampled [nx], header, is_image, is_ref, stats [3, coil]: the raw
        #  line's largest sample, its largest within ECHO_ZONE of the echo, local_spike_ratio)
        self.lines = []
        self.channels = None
        self.frames = 0  # largest frame index + 1 so far
        self.samples = 0  # grid samples buffered (coils x nx per line)
        self.center_noted = False  # an unset center_sample was said once
        self.echo_offsets = []  # the k-space centre lines' echo offsets (_echo_offset), for _echo_note
        self.noise_stds = []  # prewhitened image lines: their noise std on the grid (None: a line not whitened)

    def add(self, acq, whitener: NoiseWhitener | None):
        g = self.geometry
        if acq.trajectory_dimensions:
            raise ValueError("acquisitions carry a k-space trajectory: only Cartesian data are supported")
        if acq.idx.kspace_encode_step_2:
            raise ValueError(f"kspace_encode_step_2 = {acq.idx.kspace_encode_step_2}: 3D data are not supported")
        data = np.asarray(acq.data)  # [coil, samples]
        if self.channels is None:
            self.channels = data.shape[0]
        elif data.shape[0] != self.channels:
            raise ValueError(f"acquisition has {data.shape[0]} channels, earlier ones of the same slice had {self.channels}")
        pre, post = int(acq.discard_pre), int(acq.discard_post)
        center = int(acq.center_sample)
        if center == 0 and data.shape[1] > 1:
            # 0 is the field's default: writers that leave it unset mean a symmetric echo. Taken
            # literally, the echo at the first sample, it put half the readout off the grid
            # (a fully sampled image 14 dB from its truth). MRD v2 reads a missing one the same way.
            center = data.shape[1] // 2
            if not self.center_noted:
                self.center_noted = True
                log.info("%s: center_sample is 0 (not set): the echo is taken at the middle of the readout, "
                         "sample %d", self.describe(), center)
        if not 0 <= center < data.shape[1]:  # it used to be moved silently to the middle: a wrong image
            raise ValueError(f"center_sample {center} lies outside the line's {data.shape[1]} readout samples "
                             "(number_of_samples): the echo centre is not on the line")
        if pre or post:
            if pre < 0 or post < 0 or pre + post >= data.shape[1]:
                raise ValueError(f"discard_pre {pre} and discard_post {post} leave none of the line's {data.shape[1]} "
                                 "readout samples")
            if not pre <= center < data.shape[1] - post:
                raise ValueError(f"discard_pre {pre} and discard_post {post} remove the echo centre (center_sample "
                                 f"{center}) from the line's {data.shape[1]} readout samples: the k-space centre "
                                 "would be missing")
            data = data[:, pre:data.shape[1] - post]
            center -= pre
        if flag_set(acq.flags, REVERSE):
            data = data[:, ::-1]
            center = data.shape[1] - 1 - center
        whitened = whitener is not None and whitener.ready
        if whitened:
            data = whitener.apply(data, acq.sample_time_us)
        with np.errstate(all="ignore"):  # [3, coil]: for the spike checks at build (_drop_corrupted)
            mag = np.abs(data)
            stats = np.stack([mag.max(axis=1), mag[:, max(0, center - ECHO_ZONE):center + ECHO_ZONE + 1].max(axis=1),
                              local_spike_ratio(mag, center)]).astype(np.float32)
        grid, sampled = readout_to_grid(data, center, g)
        row = int(ky_to_grid(int(acq.idx.kspace_encode_step_1), g.ky_center, g.ny))
        is_ref = flag_set(acq.flags, CALIBRATION) or flag_set(acq.flags, CALIBRATION_AND_IMAGING)
        is_image = self.calibration_data or not flag_set(acq.flags, CALIBRATION)
        if is_image and abs(row - g.ny // 2) <= 1:
            with np.errstate(all="ignore"):
                self.echo_offsets.append(_echo_offset(mag, center))
        if is_image:
            self.noise_stds.append(whitened_noise_std(data.shape[1], center, g) if whitened else None)
        frame = self.frame_of(acq)
        delay = int(acq.physiology_time_stamp[0])
        self.delays.append(delay)  # ecg: binned at build(), once every beat is known (others: see bin_by_ecg)
        if self.axis != "ecg" and delay < self.last_delay:
            self.heartbeats += 1
        self.last_delay = delay
        self.lines.append((frame, row, grid, sampled, acq.getHead(), is_image, is_ref, stats))
        self.frames = max(self.frames, frame + 1)
        self.samples += grid.shape[0] * grid.shape[1]

    def build(self) -> CineData:
        g = self.geometry
        if self.axis == "ecg":
            self._bin()
        notes = self._drop_corrupted()
        echo = _echo_note(self.echo_offsets)
        if echo:
            log.warning("%s: %s", self.describe(), echo)
            notes.append(echo)
        images = [ln for ln in self.lines if ln[5]]
        if not images:
            raise ValueError(f"group {self.describe()}: no imaging lines (only calibration or no data)")
        t = self.phases if self.axis == "ecg" else max(ln[0] for ln in images) + 1
        if self.axis != "ecg":
            self._check_counters(images, t)
        c, ny, nx = self.channels, g.ny, g.nx
        k = np.zeros((c, t, ny, nx), np.complex64)
        count = np.zeros((t, ny, nx), np.float32)
        best = {}
        for phase, row, grid, sampled, head, *_ in images:
            k[:, phase, row, sampled] += grid[:, sampled]
            count[phase, row, sampled] += 1
            dist = abs(row - ny // 2)
            if phase not in best or dist < best[phase][0]:
                best[phase] = (dist, head)
        mask = count > 0
        k[:, mask] /= count[mask]
        missing = [p for p in range(t) if p not in best]
        if missing:
            what = "repetition(s)" if self.axis == "repetition" else "cardiac phase(s)"
            hint = (f" after binning into cardiac_phases = {self.phases} ({self.ecg['beats']} heartbeats); fewer "
                    "phases, or a longer acquisition, fill them") if self.axis == "ecg" else ""
            listed = f"{missing}" if len(missing) <= 12 else f"{missing[:12]}".rstrip("]") + f", ...] ({len(missing)} of {t})"
            raise ValueError(f"group {self.describe()}: {what} {listed} have no acquired lines{hint}")
        ref = ref_mask = None
        refs = [ln for ln in self.lines if ln[6]]
        if refs:
            ref = np.zeros((c, ny, nx), np.complex64)
            rc = np.zeros((ny, nx), np.float32)
            for _, row, grid, sampled, *_ in refs:
                ref[:, row, sampled] += grid[:, sampled]
                rc[row, sampled] += 1
            ref_mask = rc > 0
            ref[:, ref_mask] /= rc[ref_mask]
        headers = [best[p][1] for p in range(t)]
        if self.axis == "ecg":
            for p, h in enumerate(headers):  # a binned phase's images: repetition 0, its mid-phase trigger time
                h.idx.repetition = 0
                h.physiology_time_stamp[0] = int(round((p + 0.5) / t * self.ecg["rr"]))
        known = self.noise_stds and None not in self.noise_stds  # every image line prewhitened
        return CineData(self.key_dict(), k, mask, headers, ref, ref_mask, notes=notes,
                        frame_axis="phase" if self.axis == "ecg" else self.axis, frame_offset=self.offset,
                        noise_std=float(np.mean(self.noise_stds)) if known else None)

    def _drop_corrupted(self) -> list:
        """Raw lines with a corrupted sample (a flipped bit in transfer, an RF spike) are left out:
        a sample that is NaN or inf, or more than ``SPIKE_RATIO`` times its coil's raw k-space peak
        (the median over frames of each frame's largest sample, :func:`_peak_reference`),
        cannot be MR signal; nor can one more than ``LOCAL_RATIO`` times its readout neighbours
        (:func:`local_spike_ratio`: an RF spike of a tenth of the peak in the outer k-space, which
        the first test cannot see, striped its frame and, through the temporal regularisation, the
        others), nor, at the echo that test skips, one more than ``ECHO_PEAK`` times the peak on a
        line ``ECHO_ROWS`` or more rows from the centre. Checked on the raw readouts, where a spike
        is one sample; removing the readout oversampling spreads it over the whole line, below any
        threshold on the grid. Without a robust peak reference (fewer than 3 frames with their
        centre): the peak and echo tests are skipped; samples beyond ``MAX_SAMPLE``, which single
        precision cannot square and sum, are left out like NaN either way. More than ``CORRUPT_SHARE`` of the imaging
        lines NaN, inf or over the peak test is a ValueError (not repaired); more than that share
        only over the local or echo tests are kept (data unlike any measured, rather than spikes),
        and the note says so. Returns the notes for the slice's warning."""
        if not self.lines:
            return []
        stats = np.stack([ln[7] for ln in self.lines])  # [line, 3, coil]
        peaks, echo = stats[:, 0], stats[:, 1]
        local = stats[:, 2].max(axis=1) > LOCAL_RATIO  # [line]
        with np.errstate(all="ignore"):
            nonfinite = _unusable(peaks).any(axis=1)
            frames = np.array([ln[0] for ln in self.lines])
            image = np.array([ln[5] for ln in self.lines])
            rows = np.array([ln[1] for ln in self.lines])
            ny = self.geometry.ny
            ref = _peak_reference(np.where(_unusable(peaks), 0, peaks)[image], frames[image], rows[image], ny)
            huge = np.zeros_like(nonfinite)
            if ref is not None:
                huge = (peaks > SPIKE_RATIO * ref[None]).any(axis=1) & ~nonfinite
                # the echo, which the local test skips: far from the centre the k-space holds no peak
                local |= (np.abs(rows - ny // 2) >= ECHO_ROWS) & (echo > ECHO_PEAK * ref[None]).any(axis=1)
        local &= ~(nonfinite | huge)
        n_image = int(image.sum())
        bad = nonfinite | huge
        if (bad & image).sum() > CORRUPT_SHARE * max(n_image, 1):
            what = _unusable_words(peaks[nonfinite & image]) if (nonfinite & image).any() else \
                f"more than {SPIKE_RATIO:g} times the k-space peak"
            raise ValueError(f"group {self.describe()}: {int((bad & image).sum())} of the {n_image} imaging lines hold "
                             f"corrupted samples ({what}): more than {100 * CORRUPT_SHARE:g} %, not repaired")
        notes = []
        if (local & image).sum() > CORRUPT_SHARE * max(n_image, 1):
            notes.append(_kept_note(int(local.sum())))
            local[:] = False
        bad |= local
        if bad.any():
            first = int(np.nonzero(bad)[0][0])
            f0, h0 = self.lines[first][0], self.lines[first][4]
            self.lines = [ln for ln, b in zip(self.lines, bad) if not b]
            kinds = [f"{int(n.sum())} {what}" for n, what in (
                (nonfinite, f"with {_unusable_words(peaks[nonfinite])}"),
                (huge, f"with a sample more than {SPIKE_RATIO:g} times the k-space peak"),
                (local, f"with a sample like an RF spike (more than {LOCAL_RATIO:g} times its readout neighbours, "
                        f"or at the echo of an outer line more than {ECHO_PEAK:g} times the k-space peak)")) if n.any()]
            notes.insert(0, f"{int(bad.sum())} k-space line(s) left out, {' and '.join(kinds)} (the first: frame {f0}, "
                            f"kspace_encode_step_1 {int(h0.idx.kspace_encode_step_1)}, scan_counter "
                            f"{int(h0.scan_counter)}): no MR signal, an RF spike or a corrupted transfer?")
        for note in notes:
            log.warning("%s: %s", self.describe(), note)
        return notes

    def _check_counters(self, images: list, t: int) -> None:
        """Lines that repeat a position already acquired in their frame are averaged with it. Where
        they betray counters a sequence never set (research sequences that do not label their lines,
        a retrospectively gated scan read as a cine), averaging would blur the frames or lines
        together into a plausible, wrong image, so those cases are refused by name: every line at
        one phase-encoding position, the announced frames mostly empty while lines repeat, or one
        frame of lines repeated through several heartbeats at varying trigger delays."""
        positions = {(ln[0], ln[1]) for ln in images}
        repeated = len(images) - len(positions)
        if not repeated:
            return
        where = self.describe()
        if len({row for _, row in positions}) == 1:
            step = int(images[0][4].idx.kspace_encode_step_1)
            raise ValueError(f"group {where}: all {len(images)} imaging lines carry one phase-encoding position "
                             f"(kspace_encode_step_1 = {step}): the acquisitions' line counters look unset (a "
                             "sequence that does not label its lines?); each line's position in k-space is needed")
        g = self.geometry
        if self.axis == "phase":
            announced, counter, what = g.phases, "phase", "cardiac phases"
        else:
            announced = g.repetitions if g.repetitions_announced and not self.block else 0
            counter, what = "repetition", "repetitions"
        beats = (f"; the lines' trigger delays run through {self.heartbeats + 1} heartbeats: frame_axis ecg bins "
                 "them into cardiac phases by their ECG trigger time") if self.heartbeats else ""
        # a cine's phases interleave within every heartbeat, so even a stopped scan fills them all; a
        # real-time series stopped early fills its first repetitions, so there only "all in one" counts
        if announced >= 2 * t and (self.axis == "phase" or t == 1):
            kind = UnlabelledCine if self.axis == "phase" and self.heartbeats else ValueError
            raise kind(f"group {where}: the header announces {announced} {what}, but the acquisitions' "
                       f"{counter} counters fill only {t}, and {repeated} of the {len(images)} imaging lines "
                       f"repeat a line already acquired in their frame: the {counter} counter looks unset "
                       f"(averaging the repeats would blur the frames together){beats}")
        if t == 1 and self.heartbeats and repeated >= len(positions):
            kind = UnlabelledCine if self.axis == "phase" else ValueError
            raise kind(f"group {where}: {len(images)} imaging lines acquired through {self.heartbeats + 1} "
                       f"heartbeats, at varying trigger delays, fill one frame, each line "
                       f"{len(images) / len(positions):.1f} times on average: a retrospectively gated or "
                       "free-running cine whose cardiac phases are not labelled? Averaging would blur the "
                       "cardiac cycle into one image; frame_axis ecg bins the lines into cardiac phases by "
                       "their ECG trigger time")
        log.info("%s: %d of %d imaging lines repeat a line already acquired in their frame and are averaged with "
                 "it%s", where, repeated, len(images), beats)

    def bin_by_ecg(self, phases: int) -> None:
        """Read this group as a retrospectively gated cine (after :class:`UnlabelledCine`): its lines
        binned into ``phases`` cardiac phases by their trigger delays at :meth:`build`, as with
        frame_axis ecg; the repetition leaves the group's key, as there."""
        self.key = tuple(v for n, v in zip(group_names(self.axis), self.key) if n != "repetition")
        self.axis, self.phases, self.frames = "ecg", int(phases), int(phases)

    def _bin(self) -> None:
        """ecg: each line's frame, its cardiac phase from its trigger delay (:func:`ecg_bins`)."""
        try:
            bins, self.ecg = ecg_bins(np.array(self.delays, np.float64), self.phases, self.rr_tolerance)
        except ValueError as e:
            raise ValueError(f"group {self.describe()}: {e}") from None
        self.lines = [(int(b),) + ln[1:] for b, ln in zip(bins, self.lines) if b >= 0]
        self.frames = self.phases
        if self.ecg["rejected_beats"]:
            log.info("%s: arrhythmia rejection: %d of %d heartbeats (%d lines) left out, RR more than %g %% from "
                     "the median", self.describe(), self.ecg["rejected_beats"], self.ecg["beats"],
                     self.ecg["rejected_lines"], 100 * self.rr_tolerance)
        bins = bins[bins >= 0]
        counts = np.bincount(bins, minlength=self.phases)
        log.info("%s: %d lines of %d heartbeats binned into %d cardiac phases by their ECG trigger time (RR %.0f, "
                 "%.0f to %.0f in the trigger stamps' unit; %d to %d lines per phase)", self.describe(), len(bins),
                 self.ecg["beats"], self.phases, self.ecg["rr"], self.ecg["rr_min"], self.ecg["rr_max"],
                 counts.min(), counts.max())

    def frame_of(self, acq) -> int:
        """The line's frame in this group (its phase, or its repetition within the block); ecg: the
        last phase (a placeholder until :meth:`build` bins the lines; the frame count is known)."""
        if self.axis == "ecg":
            return self.phases - 1
        return int(getattr(acq.idx, self.axis)) - self.offset

    def key_dict(self) -> dict:
        """The group's indices by name (:func:`group_names`; ``block`` where a real-time series is split)."""
        return dict(zip(group_names(self.axis) + (("block",) if self.block else ()), self.key))

    def describe(self) -> str:
        return ", ".join(f"{n}={v}" for n, v in self.key_dict().items())


# ------------------------------------------------------------------ Gadgetron ReconData buffers
def _buffer_lines(buf, s: int, loc: int, geometry: Geometry, whitener: NoiseWhitener | None):
    """One ReconBuffer's (S, LOC) slab -> (grid k-space [coil, N, ny, nx], mask [N, ny, nx],
    frame headers, spiky [N, ny]: the lines over the local RF-spike test, :func:`local_spike_ratio`,
    on the buffer's readouts before the grid's, whose oversampling removal would spread a spike;
    the centre lines' echo offsets, :func:`_buffer_spikes`; calibration_only [N, ny]: the lines whose
    header flags them ``ACQ_IS_PARALLEL_CALIBRATION``).
    Lines are acquired where the header says so (number_of_samples > 0) and the data are not zero."""
    data = np.asarray(buf.data)
    if data.ndim != 7:
        raise ValueError(f"ReconData buffer has {data.ndim} dimensions, expected 7 [E0, E1, E2, CHA, N, S, LOC]")
    e0, e1, e2, cha, n, ns, nloc = data.shape
    if e2 > 1:
        raise ValueError(f"ReconData buffer has E2 = {e2}: 3D data are not supported")
    d = np.transpose(data[:, :, 0, :, :, s, loc], (2, 3, 1, 0))  # [CHA, N, E1, E0]
    heads = np.asarray(buf.headers)
    if heads.ndim == 5 and heads.shape != (e1, e2, n, ns, nloc):
        raise ValueError(f"ReconData headers have shape {heads.shape}, but its data [E0, E1, E2, CHA, N, S, LOC] "
                         f"{data.shape} need [E1, E2, N, S, LOC] = {(e1, e2, n, ns, nloc)}")
    with np.errstate(all="ignore"):  # a line with a NaN counts as acquired: drop_spikes leaves it out, and says so
        acquired = (np.abs(d).sum(axis=(0, 3)) > 0) | ~np.isfinite(d).all(axis=(0, 3))  # [N, E1]
    if heads.ndim == 5:
        hs = heads[:, 0, :, s, loc]  # [E1, N]
        ns_arr = np.array([[int(h.number_of_samples) for h in row] for row in hs]).T  # [N, E1]
        if (ns_arr == 0).any():
            acquired &= ns_arr > 0
    else:
        hs = None
    if not acquired.any():
        raise ValueError(f"ReconData S={s} LOC={loc}: no acquired lines")
    rows_acquired = np.nonzero(acquired.any(axis=0))[0]
    if len(rows_acquired) == 1 and e1 > 1:  # what a chain's buffer holds of lines whose counters were never set
        raise ValueError(f"ReconData S={s} LOC={loc}: every frame's data lie on one phase-encoding line (E1 = "
                         f"{rows_acquired[0]} of {e1}): the acquisitions' line counters look unset (a sequence that "
                         "does not label its lines?); each line's position in k-space is needed")
    with np.errstate(all="ignore"):
        cols = np.nonzero((np.abs(d).sum(axis=(0, 1, 2)) > 0) | ~np.isfinite(d).all(axis=(0, 1, 2)))[0]
    a, b = int(cols[0]), int(cols[-1]) + 1
    lim = buf.sampling.sampling_limits
    center_e0 = int(lim[0].center) if lim[0].max else e0 // 2
    center_e1 = int(lim[1].center) if lim[1].max else e1 // 2
    seg = d[..., a:b]
    if whitener is not None and whitener.ready:
        dwell = None
        if hs is not None:
            first = next(h for row in hs for h in row if h.number_of_samples)
            dwell = first.sample_time_us
        seg = whitener.apply(seg, dwell)
    grid, sampled = readout_to_grid(seg, center_e0 - a, geometry)
    ny = max(geometry.ny, e1)
    k = np.zeros((cha, n, ny, geometry.nx), np.complex64)
    ky_to_grid(rows_acquired, center_e1, ny)  # the acquired lines must fall on the grid (an error naming one)
    rows = np.arange(e1) - center_e1 + ny // 2  # (of E1's lines never acquired, some may fall off it: unused)
    # RF spikes, on the buffer's readouts as they came (with their oversampling, if the chain kept it):
    # the local test and the echo test, as the collector's (AcquisitionCollector._drop_corrupted)
    spiky_lines, offsets = _buffer_spikes(seg, center_e0 - a, acquired, rows, ny)
    mask = np.zeros((n, ny, geometry.nx), bool)
    spiky = np.zeros((n, ny), bool)
    calibration_only = np.zeros((n, ny), bool)
    for f in range(n):
        for ky in np.nonzero(acquired[f])[0]:
            r = int(rows[ky])
            k[:, f, r] = grid[:, f, ky]
            mask[f, r] = sampled
            spiky[f, r] = spiky_lines[f, ky]
            calibration_only[f, r] = hs is not None and flag_set(int(hs[ky, f].flags), CALIBRATION)
    headers = []
    for f in range(n):
        lines = np.nonzero(acquired[f])[0]
        if hs is not None and len(lines):
            ky = lines[np.argmin(np.abs(lines - center_e1))]
            headers.append(hs[ky, f].__class__.from_buffer_copy(hs[ky, f]))
        else:
            headers.append(None)
    return k, mask, headers, spiky, offsets, calibration_only


def _buffer_spikes(seg: np.ndarray, center: int, acquired: np.ndarray, rows: np.ndarray, ny: int) -> np.ndarray:
    """The lines ``[N, E1]`` of a buffer's readouts ``seg [CHA, N, E1, samples]`` (echo at sample
    ``center``; ``acquired [N, E1]``, their grid ``rows`` of ``ny``) over the local RF-spike test
    (:func:`local_spike_ratio`) or the echo test: a sample within ``ECHO_ZONE`` of the echo more than
    ``ECHO_PEAK`` times its coil's k-space peak (:func:`_peak_reference` of the lines' largest
    samples) on a line ``ECHO_ROWS`` or more rows from the centre. One frame at a time, to bound
    the memory; each line's magnitudes taken once. Also the echo offsets (:func:`_echo_offset`) of
    the lines within a row of the centre, for :func:`_echo_note`."""
    cha, n, e1, samples = seg.shape
    if not 0 <= center < samples:  # an echo outside the acquired samples: the middle, as readout_to_grid takes
        center = samples // 2
    ratio = np.zeros((n, e1), np.float32)
    peaks = np.zeros((n, e1, cha), np.float32)
    echo = np.zeros((n, e1, cha), np.float32)
    zone = slice(max(0, center - ECHO_ZONE), center + ECHO_ZONE + 1)  # (never empty)
    central = acquired & (np.abs(np.asarray(rows) - ny // 2) <= 1)[None]  # [N, E1]
    offsets = []
    for f in range(n):
        with np.errstate(all="ignore"):
            mag = np.abs(seg[:, f].transpose(1, 0, 2)).astype(np.float32, copy=False)  # [E1, CHA, samples]
            mag[~np.isfinite(mag)] = 0  # (a line with NaN or inf: drop_spikes names it)
        ratio[f] = local_spike_ratio(mag, center).max(axis=-1)
        peaks[f] = mag.max(axis=-1)
        echo[f] = mag[..., zone].max(axis=-1)
        offsets += [_echo_offset(mag[ky], center) for ky in np.nonzero(central[f])[0]]
    spiky = ratio > LOCAL_RATIO
    f, ky = np.nonzero(acquired)
    grid_rows = np.asarray(rows)[ky]
    ref = _peak_reference(peaks[f, ky], f, grid_rows, ny)
    if ref is not None:
        outer = np.abs(grid_rows - ny // 2) >= ECHO_ROWS
        spiky[f, ky] |= outer & (echo[f, ky] > ECHO_PEAK * ref[None]).any(axis=1)
    return spiky, offsets


def _merge_reference(k, mask, spiky, rk, rm, ref_spiky, calibration_only) -> None:
    """Into a buffer's grid k-space ``k`` [coil, N, ny, nx] (``mask`` [N, ny, nx], ``spiky`` [N, ny]),
    in place: the reference buffer's calibration-only lines (``rk``, ``rm``, ``ref_spiky``,
    ``calibration_only`` [N, ny]; the same frames), which the data lack, on rows the data lack in
    that frame (a calibration-and-imaging line missing from the data stays missing)."""
    new = calibration_only & rm.any(axis=-1) & ~mask.any(axis=-1)  # [N, ny]
    f, r = np.nonzero(new)
    k[:, f, r] = rk[:, f, r]
    mask[f, r] = rm[f, r]
    spiky[f, r] = ref_spiky[f, r]


def _buffer_axis(headers: list) -> str:
    """The counter the chain's BucketToBufferGadget put along N (``N_dimension``): repetition where
    the frames' headers all differ in repetition and share one phase (a real-time series), else phase."""
    heads = [h for h in headers if h is not None]
    reps = [int(h.idx.repetition) for h in heads]
    phases = {int(h.idx.phase) for h in heads}
    return "repetition" if len(heads) > 1 and len(set(reps)) == len(heads) and len(phases) == 1 else "phase"


def cine_from_recon_bit(bit, geometry: Geometry, whitener: NoiseWhitener | None = None,
                        calibration_data: bool = False) -> list:
    """All (S, LOC) slabs of one ReconBit as :class:`CineData` (frames along N). With
    ``calibration_data`` (:func:`calibration_as_data`) the reference buffer's lines that the data
    buffer lacks (AcquisitionAccumulateTrigger puts calibration-only lines there alone) are also
    data of their frame, where the reference has the data's frames along N."""
    data = np.asarray(bit.data.data)
    if data.ndim != 7:
        raise ValueError(f"ReconData buffer has {data.ndim} dimensions, expected 7 [E0, E1, E2, CHA, N, S, LOC]")
    out = []
    for loc in range(data.shape[6]):
        for s in range(data.shape[5]):
            k, mask, headers, spiky, offsets, _ = _buffer_lines(bit.data, s, loc, geometry, whitener)
            empty = [f for f in range(mask.shape[0]) if not mask[f].any()]
            if empty:
                raise ValueError(f"ReconData S={s} LOC={loc}: frame(s) {empty} have no acquired lines")
            ref = ref_mask = None
            spiky_ref = 0
            if bit.ref is not None:
                rdata = np.asarray(bit.ref.data)
                if rdata.ndim == 7 and rdata.shape[3] == data.shape[3]:
                    rk, rm, _, ref_spiky, _, cal_only = _buffer_lines(bit.ref, min(s, rdata.shape[5] - 1),
                                                         min(loc, rdata.shape[6] - 1), geometry, whitener)
                    if calibration_data and rm.shape[0] == mask.shape[0]:
                        _merge_reference(k, mask, spiky, rk, rm, ref_spiky, cal_only)
                    if (rm.any(axis=-1) & ~ref_spiky).any():  # calibration lines with an RF spike: left out of
                        rm &= ~ref_spiky[..., None]  # the maps, as the collector does, while any line is left
                        spiky_ref = int(ref_spiky.sum())
                    cnt = rm.sum(0)
                    ref_mask = cnt > 0
                    ref = (rk * rm).sum(1) / np.maximum(cnt, 1)
                    ref = ref.astype(np.complex64)
            first = next((h for h in headers if h is not None), None)
            axis = _buffer_axis(headers)
            key = {name: (int(getattr(first.idx, name)) if first is not None else 0) for name in group_names(axis)}
            if first is None:
                key["slice"] = loc
            cine = CineData(key, k, mask, headers, ref, ref_mask, frame_axis=axis)
            note = drop_spikes(cine, spiky, spiky_ref)  # a buffer is on the grid: the collector's check cannot run
            empty = [f for f in range(mask.shape[0]) if not cine.mask[f].any()]
            if empty:
                raise ValueError(f"ReconData S={s} LOC={loc}: frame(s) {empty} have no acquired lines left after "
                                 f"leaving out the corrupted ones ({note})")
            for said in (note, _echo_note(offsets)):
                if said:
                    log.warning("ReconData S=%d LOC=%d: %s", s, loc, said)
                    cine.notes.append(said)
            out.append(cine)
    return out
