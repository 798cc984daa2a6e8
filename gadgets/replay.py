"""``ddugm recon IN.h5 OUT.h5``: offline replay of an ISMRMRD raw file through the same
session the gadget and the server use; writes ISMRMRD images (``/dataset/image_<series>``)
and optionally one PNG per slice (frames side by side)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import ismrmrd
import numpy as np

from .protocol import parse_header
from .session import ReconSession, ScanErrors
from .settings import CALIBRATION_LINES, load_limits, load_settings

log = logging.getLogger("ddugm.replay")


def open_dataset(path, group: str = "dataset"):
    """An ISMRMRD file opened read-only. ismrmrd 1.14 (what Gadgetron 4.7's image carries) has
    no ``mode`` and opens files for writing ('r+': it fails on read-only files, and HDF5 may spend
    minutes on a corrupted one), so there the file is opened read-only under its Dataset."""
    try:
        return ismrmrd.Dataset(str(path), group, create_if_needed=False, mode="r")
    except TypeError:
        import h5py

        ds = ismrmrd.Dataset.__new__(ismrmrd.Dataset)
        ds._file = h5py.File(str(path), "r")  # the two attributes ismrmrd 1.14's Dataset keeps
        ds._dataset_name = group
        return ds


class ReplayError(ValueError):
    """The raw file cannot be replayed (missing, not ISMRMRD, corrupted, no acquisitions)."""


class UnreadableAcquisition(ReplayError):
    """Acquisition ``index`` of the file cannot be read (the file is corrupted there)."""

    def __init__(self, index: int, error: Exception):
        super().__init__(f"acquisition {index} cannot be read, the file is corrupted ({type(error).__name__}: {error})")
        self.index, self.error = index, error


#: acquisitions read from the file in one HDF5 access: ismrmrd's ``read_acquisition`` reads its
#: record two or three times per acquisition (2.5 ms each, 26 s for a 10-slice cine of 10,501
#: acquisitions), a block of records at once costs a fraction of that
READ_BLOCK = 256


def _read_block(ds, start: int, stop: int) -> np.ndarray:
    """Records ``start:stop`` of the file's acquisition table (head, traj, data) in one access."""
    return ds._file[ds._dataset_name]["data"][start:stop]


def _acquisition_of(rec) -> ismrmrd.Acquisition:
    """An acquisition from one record of the table, as ``Dataset.read_acquisition`` builds it."""
    acq = ismrmrd.Acquisition(rec["head"])
    acq.data[:] = rec["data"].view(np.complex64).reshape((acq.active_channels, acq.number_of_samples))
    if acq.traj.size:
        acq.traj[:] = rec["traj"].reshape((acq.number_of_samples, acq.trajectory_dimensions))
    return acq


def iter_acquisitions(ds, n: int, block: int | None = None):
    """The file's acquisitions 0 .. n-1 in order, read ``block`` at a time. A block that cannot
    be read or decoded is read again one acquisition at a time (ismrmrd's own reader), so the
    acquisitions before a corrupted one still come, and then :class:`UnreadableAcquisition`
    names the first one that cannot be read. ``block``: default :data:`READ_BLOCK`."""
    block = block or READ_BLOCK
    for start in range(0, n, block):
        stop = min(n, start + block)
        try:
            acqs = [_acquisition_of(rec) for rec in _read_block(ds, start, stop)]
        except Exception:  # noqa: BLE001 - h5py / numpy errors of a corrupted file: find the exact one
            acqs = None
        if acqs is not None and len(acqs) == stop - start:
            yield from acqs
            continue
        for i in range(start, stop):
            try:
                acq = ds.read_acquisition(i)
            except Exception as e:  # noqa: BLE001
                raise UnreadableAcquisition(i, e) from None
            yield acq


def open_raw(src, group: str = "dataset") -> tuple:
    """The raw file ``src`` opened and checked: ``(dataset, header_xml, header, acquisitions)``; the
    caller closes the dataset. A file that cannot be read (missing, not ISMRMRD, no header, no
    acquisitions) raises FileNotFoundError or :class:`ReplayError` with one line naming the problem."""
    src = Path(src)
    inp = str(src)
    if not src.is_file():
        raise FileNotFoundError(f"input file {inp!r} not found")
    try:
        ds = open_dataset(src, group)
    except Exception as e:  # noqa: BLE001 - h5py raises several types for a broken file
        raise ReplayError(f"{inp}: not an ISMRMRD raw file with a '{group}' group ({type(e).__name__}: {e})") from None
    try:
        try:
            header_xml = ds.read_xml_header()
        except Exception as e:  # noqa: BLE001
            raise ReplayError(f"{inp}: no readable ISMRMRD header in group '{group}' ({type(e).__name__}: {e})") from None
        header = parse_header(header_xml)
        try:
            n = ds.number_of_acquisitions()
        except Exception:  # noqa: BLE001 - no data set at all
            n = 0
        if n == 0:
            raise ReplayError(f"{inp}: the file has no acquisitions (group '{group}')")
    except BaseException:
        ds.close()
        raise
    return ds, header_xml, header, n


def read_file(src: Path, make_session, group: str = "dataset", quiet: bool = True) -> tuple:
    """Feed every acquisition of the raw file ``src`` to ``make_session(header)``; returns
    ``(header_xml, session, images, broken)`` (:func:`_read_all`); a file that cannot be read
    raises as :func:`open_raw` says."""
    ds, header_xml, header, n = open_raw(src, group)
    try:
        session = make_session(header)
        images, broken = _read_all(ds, n, session, str(src), quiet)
    finally:
        ds.close()
    return header_xml, session, images, broken


def replay(inp: str, out: str, config: str | None = None, png: str | None = None, overrides: dict | None = None,
           group: str = "dataset", quiet: bool = False) -> dict:
    """Reconstruct an ISMRMRD raw file; ``overrides`` are the user's (operator) settings.

    A file that cannot be read (not ISMRMRD, no acquisitions, or corrupted part-way) raises
    :class:`ReplayError` with one line naming the problem. Slices completed before a corrupted
    acquisition are still written (and the error raised after); the slice being read when the
    file broke is not reconstructed from its partial data. Nothing is written when no image
    was reconstructed."""
    limits = load_limits(config)
    cfg, gs = load_settings(None, config, operator=overrides, limits=limits)  # bad settings fail before reading
    src = Path(inp)
    if Path(out).exists() and src.exists() and Path(out).samefile(src):  # (links too)
        raise ReplayError(f"{out}: the output would replace the raw input file; name another output file")
    if Path(out).is_dir():
        raise ReplayError(f"{out} is a folder: name the output file (e.g. {Path(out) / 'images.h5'})")
    if png and Path(png).exists() and not Path(png).is_dir():
        raise ReplayError(f"--png {png} is a file: it names the folder the PNGs are written to")
    gs.send = "images"
    header_xml, session, images, broken = read_file(src, lambda h: ReconSession(h, cfg, gs, limits=limits), group, quiet)
    summary = {"input": str(src), "output": str(out), "images": len(images), "slices": len(session.timings),
               "seconds_per_slice": [round(t, 2) for t in session.timings], "method": cfg.method, "preset": cfg.preset,
               "errors": session.errors + ([broken] if broken else [])}
    if not images:
        if broken:
            raise ReplayError(f"{broken}; no image was reconstructed, nothing written")
        raise ScanErrors("no image was reconstructed, nothing written: " + "; ".join(session.errors))
    dst = Path(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    od = ismrmrd.Dataset(str(dst), "dataset", create_if_needed=True)  # no context manager in ismrmrd 1.14
    try:
        od.write_xml_header(header_xml if isinstance(header_xml, (str, bytes)) else session.header.toXML())
        for img in images:
            od.append_image(f"image_{img.image_series_index}", img)
    finally:
        od.close()
    if png:
        save_pngs(images, Path(png), "phase" if session.frame_axis == "ecg" else session.frame_axis)
    if broken:
        raise ScanErrors(f"{broken}; the {len(images)} images of the slices completed before it were written")
    if session.errors:
        raise ScanErrors("some slices failed (the others were written): " + "; ".join(session.errors))
    return summary


def _read_all(ds, n: int, session: ReconSession, inp: str, quiet: bool) -> tuple:
    """Feed every acquisition; returns (images, None) or, when an acquisition cannot be read,
    (the images of the slices completed before it, a one-line description)."""
    images, broken = [], None
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="acquisitions", unit="acq", dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    try:
        try:
            for acq in iter_acquisitions(ds, n):
                images += session.handle(acq)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(images=len(images), refresh=False)
        except UnreadableAcquisition as e:
            err = e.error
            broken = (f"{inp}: acquisition {e.index} of {n} cannot be read, the file is corrupted "
                      f"({type(err).__name__}: {err})")
            session.collectors.clear()  # partial slices are not reconstructed as if complete
        if broken is None:
            images += session.finish()
    finally:
        if bar is not None:
            bar.close()
    return images, broken


def save_pngs(images: list, folder: Path, frame_axis: str = "phase") -> list:
    """One PNG per (slice, contrast, repetition, set, average): the frames (along ``frame_axis``:
    phase, or repetition for a real-time series) in a row."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    groups = {}
    for img in images:
        key = (img.slice, img.contrast, img.phase if frame_axis == "repetition" else img.repetition, img.set,
               img.average)
        groups.setdefault(key, []).append(img)
    paths = []
    for key, imgs in sorted(groups.items()):
        imgs = sorted(imgs, key=lambda i: getattr(i, frame_axis))
        frames = np.stack([np.abs(np.asarray(i.data[0, 0])) for i in imgs])
        vmax = max(float(np.percentile(frames, 99.5)), 1e-12)
        row = np.concatenate(list(np.clip(frames / vmax, 0, 1)), axis=1)
        name = folder / ("slice{}_contrast{}_" + ("phase" if frame_axis == "repetition" else "rep") +
                         "{}_set{}_avg{}.png").format(*key)
        Image.fromarray((row * 255).astype(np.uint8)).save(name)
        paths.append(name)
    return paths


def add_parser(sub):
    p = sub.add_parser("recon", help="reconstruct an ISMRMRD raw file offline, writing ISMRMRD images")
    p.add_argument("input", help="ISMRMRD raw .h5")
    p.add_argument("output", help="ISMRMRD .h5 for the images")
    p.add_argument("--config", default=None, help="YAML settings (default: config/recon.yaml)")
    p.add_argument("--png", default=None, help="also write one PNG per slice into this folder")
    p.add_argument("--method", default=None, help="ddugm | low_rank | l_plus_s | llr_ttv | zero_filled")
    p.add_argument("--preset", default=None, help="default | pnp | dual | paper")
    p.add_argument("--steps", default=None, help="sampler iterations")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--output-type", default=None, help="magnitude | complex")
    p.add_argument("--frame-axis", default=None,
                   help="phase (a cine) | repetition (a real-time series) | auto (repetition where the header has 1 "
                        "phase, several repetitions; ecg where unset phase counters run through heartbeats) | ecg "
                        "(bin every line by its ECG trigger time)")
    p.add_argument("--cardiac-phases", default=None, help="frame axis ecg: cardiac phases to bin into (default: the header's "
                                                          "phase count where above 1, else 20)")
    p.add_argument("--arrhythmia-rejection", default=None,
                   help="frame axis ecg: leave out heartbeats whose RR is more than this fraction off the median (0: none)")
    p.add_argument("--realtime-block", default=None,
                   help="a real-time series: repetitions per reconstruction, each block sent when it is complete (0: "
                        "the whole series, split into even blocks only where the server's limits require)")
    p.add_argument("--calibration-lines", default=None, choices=CALIBRATION_LINES,
                   help="calibration-only lines: data of their frame too, coil-map reference only, or auto (data "
                        "where the header says the reference is embedded; the default)")
    p.add_argument("--seed", default=None)
    p.add_argument("--group", default="dataset", help="HDF5 group of the raw data (default: %(default)s)")
    p.add_argument("--quiet", action="store_true")


def run(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(levelname)s %(message)s")
    overrides = {k: v for k, v in (("method", a.method), ("preset", a.preset), ("steps", a.steps), ("device", a.device),
                                   ("output", a.output_type), ("seed", a.seed), ("frame_axis", a.frame_axis),
                                   ("realtime_block", a.realtime_block), ("cardiac_phases", a.cardiac_phases),
                                   ("arrhythmia_rejection", a.arrhythmia_rejection),
                                   ("calibration_lines", a.calibration_lines))
                 if v is not None}
    try:
        summary = replay(a.input, a.output, a.config, a.png, overrides, a.group, a.quiet)
    except ScanErrors as e:
        print(f"ddugm recon: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
