"""Fully sampled cine from ISMRMRD raw files, for ``ddugm evaluate --data RAW.h5``: retrospective
undersampling of a user's own acquisitions, with their real coils, noise and phase.

The acquisitions go through the same session as a scan (:class:`~gadgets.session.ReconSession`:
noise prewhitening from the noise scan, readout-oversampling removal, reversed lines, asymmetric
echoes and partial Fourier placed on the grid), but each slice's k-space is handed back instead of
reconstructed. A slice whose frames were not all sampled at the same k-space locations was
undersampled at acquisition and cannot serve as a reference: it is refused by name."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ddugm_core.evaluate import RAW_SUFFIXES
from ddugm_core.reconstruction import ReconConfig

from .kspace import IGNORED, NOISE, CineData, flag_set
from .replay import ReplayError, read_file
from .session import ReconSession, slice_name
from .settings import GadgetSettings


def _imaging(acq) -> bool:
    """An acquisition of the first encoding space's image data (not noise, calibration, navigator...)."""
    flags = int(acq.flags)
    return not flag_set(flags, NOISE) and not any(flag_set(flags, b) for b in IGNORED) and acq.encoding_space_ref == 0


class _Collecting(ReconSession):
    """A session that keeps each slice's k-space instead of reconstructing it; with ``only_slice``
    the image data of every other slice is dropped as it comes (the noise scan still whitens)."""

    def __init__(self, header, only_slice: int | None = None):
        super().__init__(header, ReconConfig(), GadgetSettings())
        self.cines: list[CineData] = []
        self.only_slice = only_slice

    def _acquisition(self, acq) -> list:
        if self.only_slice is not None and acq.idx.slice != self.only_slice and _imaging(acq):
            return []
        return super()._acquisition(acq)

    def _reconstruct(self, cine: CineData, natural: str) -> list:
        self.cines.append(cine)
        return []


class _SliceIndex:
    """A first pass over a file that only notes which slices hold image data (nothing is buffered)."""

    def __init__(self, header):
        self.slices: set[int] = set()
        self.collectors: dict = {}

    def handle(self, acq) -> list:
        if _imaging(acq):
            self.slices.add(int(acq.idx.slice))
        return []

    def finish(self) -> list:
        return []


def raw_files(source) -> list[Path]:
    """The raw files of ``source``: one file, or every file with a raw suffix in a folder (sorted)."""
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in RAW_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no ISMRMRD raw files ({', '.join(RAW_SUFFIXES)}) in {source}")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"raw data {source!r} not found")
    return [p]


def full_mask(cine: CineData, where: str) -> np.ndarray:
    """The k-space locations ``[ky, kx]`` every frame sampled; ValueError if the frames differ
    (data undersampled at acquisition: there is no fully sampled reference)."""
    mask = cine.mask  # [frame, ky, kx]
    common = mask.all(axis=0)
    if not (mask == common).all():
        lines = mask.any(axis=-1)  # [frame, ky]
        every = lines.any(axis=0)
        short = [t for t in range(len(lines)) if (lines[t] != every).any()]
        detail = (f"frame {short[0]} lacks {int(every.sum() - lines[short[0]].sum())} of the {int(every.sum())} "
                  "phase-encoding lines the other frames have" if short else "the frames sampled different readout points")
        raise ValueError(f"{where}: not fully sampled ({detail}); evaluate needs fully sampled raw data, which it "
                         "undersamples itself")
    if not common[mask.shape[1] // 2].any():
        raise ValueError(f"{where}: the k-space centre line was not acquired")
    return common


def read_raw_cines(source, slices: str = "all", group: str = "dataset") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, kspace [coil, frame, ky, kx] complex64, sampled [ky, kx] bool)`` for every slice
    (``slices`` ``mid``: the middle slice of each file) of the fully sampled raw ``source``
    (a file or a folder of them). Errors (ValueError / FileNotFoundError) name the file and slice.

    ``mid`` reads a file twice: a first pass notes which slices hold image data, the second
    buffers only the middle one of them, so a many-slice scan costs the memory and time of one."""
    if slices not in ("mid", "all"):
        raise ValueError(f"slices must be mid or all, got {slices!r}")
    out = []
    for f in raw_files(source):
        only = None
        if slices == "mid":
            _, index, _, broken = read_file(f, _SliceIndex, group)
            if broken:
                raise ReplayError(broken)
            present = sorted(index.slices)
            only = present[len(present) // 2] if present else None
        _, session, _, broken = read_file(f, lambda h, only=only: _Collecting(h, only), group)
        if broken:
            raise ReplayError(broken)
        if session.errors:
            raise ValueError(f"{f}: " + "; ".join(session.errors))
        cines = sorted(session.cines, key=lambda c: tuple(c.key.values()))
        if slices == "mid":
            cines = cines[:1]  # only the middle slice was kept; of its contrasts / sets, the first
        for c in cines:
            where = f"{f.name} {slice_name(c.key)}"
            if c.kspace.shape[1] < 2:
                raise ValueError(f"{where}: a cine needs at least 2 frames (cardiac phases, or repetitions of a "
                                 f"real-time series), got {c.kspace.shape[1]}")
            sampled = full_mask(c, where)
            tail = "".join(f"_{k}{v}" for k, v in c.key.items() if v and k != "slice")
            out.append((f"{f.stem}_slice{c.key['slice']}{tail}", c.kspace, sampled))
    return out
