"""Fully sampled cine from ISMRMRD raw files, for ``ddugm evaluate --data RAW.h5`` (retrospective
undersampling of a user's own acquisitions, with their real coils, noise and phase) and for
``ddugm train --data RAW.h5`` (priors trained on their coil-combined complex images).

The acquisitions go through the same session as a scan (:class:`~gadgets.session.ReconSession`:
noise prewhitening from the noise scan, readout-oversampling removal, reversed lines, asymmetric
echoes and partial Fourier placed on the grid), but each slice's k-space is handed back instead of
reconstructed. A slice whose frames were not all sampled at the same k-space locations was
undersampled at acquisition and cannot serve as a reference: it is refused by name."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ddugm_core.evaluate import RAW_SUFFIXES
from ddugm_core.reconstruction import ReconConfig

from .kspace import IGNORED, NOISE, CineData, flag_set
from .replay import ReplayError, read_file
from .session import ReconSession, slice_name
from .settings import GadgetSettings

# what raw_training_stacks writes; change it whenever the conversion changes, so that stacks written
# by an earlier version are converted again rather than reused
STACKS_FORMAT = "ddugm-raw-stacks/1"

log = logging.getLogger("ddugm.gadget")


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
        if cine.notes:  # lines the collector left out (corrupted samples): the reason, not the acquisition
            raise ValueError(f"{where}: not fully sampled after leaving out corrupted lines ({detail}): "
                             + "; ".join(cine.notes) + "; a reference needs every line")
        raise ValueError(f"{where}: not fully sampled ({detail}); evaluate and train need fully sampled raw data "
                         "(evaluate undersamples it itself)")
    if not common[mask.shape[1] // 2].any():
        raise ValueError(f"{where}: the k-space centre line was not acquired")
    return common


def read_raw_cines(source, slices: str = "all", group: str = "dataset") -> list[tuple]:
    """``(name, kspace [coil, frame, ky, kx] complex64, sampled [ky, kx] bool, noise std or None)``
    (the noise std per real component where a noise scan prewhitened the data) for every slice
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
            out.append((f"{f.stem}_slice{c.key['slice']}{tail}", c.kspace, sampled, c.noise_std))
    return out


def raw_training_stacks(source, out_dir, group: str = "dataset") -> dict:
    """Fully sampled ISMRMRD raw cine as training data (``ddugm train --data RAW``): every raw
    file of ``source`` becomes ``out_dir/STEM.npz`` holding ``cine``, complex64 ``[T, Z, H, W]``,
    its slices (and contrasts, sets) along Z. Each is the coil combination of all the data, the
    reference ``evaluate`` uses (Walsh maps from the fully sampled k-space), divided by its robust
    scale and turned so that its sum is real and positive, as the default sampler turns a cine
    before its priors see it. The real phase is kept, so training adds no synthetic one; one file
    per scan keeps the training / validation split by patient. Slices of one file that differ in
    size are brought to the first one's matrix (centre crop or zero pad) and the fewest frames.
    ``out_dir/sources.json`` records the raw files (path, size, modification time) the stacks came
    from: when they are the same as last time (a resumed or repeated training), the stacks are
    reused, not converted again; otherwise earlier ``.npz`` files in ``out_dir`` are removed first.
    Two scans of one name (``scan.h5``, ``scan.mrd``) keep their suffix (``scan.h5.npz``). Returns
    what was written (``reused``: whether the stacks were kept)."""
    import torch

    from ddugm_core.data import center_fit
    from ddugm_core.evaluate import raw_series

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = raw_files(source)
    stems = [f.stem for f in files]
    names = [f"{f.stem if stems.count(f.stem) == 1 else f.name}.npz" for f in files]
    sources = {"format": STACKS_FORMAT, "group": group, "files": [
        {"source": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns, "stack": n}
        for f, n in zip(files, names)]}
    manifest = out_dir / "sources.json"
    try:
        before = json.loads(manifest.read_text())
    except (OSError, ValueError):
        before = None
    if (before is not None and before.get("sources") == sources
            and sorted(p.name for p in out_dir.glob("*.npz")) == sorted(names)):
        log.info("%s: the raw data are unchanged since their stacks were written; reusing them", out_dir)
        return {**before["info"], "reused": True}
    manifest.unlink(missing_ok=True)  # written again only once every stack is
    for old in out_dir.glob("*.npz"):
        old.unlink()
    info = {"files": 0, "series": 0, "frames": 0, "folder": str(out_dir)}
    for f, name in zip(files, names):
        series = raw_series(read_raw_cines(f, "all", group))
        if not series:
            raise ValueError(f"{f}: no image data (only noise, calibration or navigator acquisitions)")
        cines = []
        for rs in series:
            x = rs.truth
            total = x.sum()
            cines.append(x * (np.conj(total) / abs(total)) if abs(total) > 0 else x)
        t = min(c.shape[0] for c in cines)
        size = cines[0].shape[-2:]
        if any(c.shape != cines[0].shape for c in cines):
            log.info("%s: slices of %s; kept as %d frames of %d x %d", f.name,
                     ", ".join(sorted({"x".join(map(str, c.shape)) for c in cines})), t, *size)
        stack = np.stack([center_fit(torch.from_numpy(c[:t]), size).numpy() for c in cines], axis=1)
        np.savez(out_dir / name, cine=stack.astype(np.complex64))
        info["files"] += 1
        info["series"] += stack.shape[1]
        info["frames"] += stack.shape[0] * stack.shape[1]
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sources": sources, "info": info}, indent=1))
    tmp.replace(manifest)
    return {**info, "reused": False}
