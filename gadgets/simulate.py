"""``ddugm simulate``: cine images (the built-in phantom, or .npy/.npz) -> an ISMRMRD raw file.

What a scanner would write for a segmented Cartesian cine: a complete header (encoded and
recon spaces with readout oversampling, encoding limits, Cartesian trajectory, receiver
channels, parallel-imaging description), a noise scan first (coil-correlated noise, its own
dwell time), then per slice every cardiac phase's lines of a per-phase variable-density
mask with a fully sampled centre flagged as embedded calibration (ACS), with position,
orientation, time stamps and trigger times, and optional partial Fourier and asymmetric echo.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import ismrmrd
import ismrmrd.xsd as x
import numpy as np
import torch

from ddugm_core.cli import finite_float
from ddugm_core.data import read_named_array
from ddugm_core.masks import equispaced_mask, lattice_mask, variable_density_mask
from ddugm_core.operators import fft2c
from ddugm_core.phantom import cine_phantom, coil_maps

from .kspace import CALIBRATION, CALIBRATION_AND_IMAGING, LAST_IN_MEASUREMENT, LAST_IN_SLICE, NOISE

FIRST_IN_SLICE = 7
LAST_IN_REPETITION = 14
DWELL_US = 2.5
NOISE_DWELL_US = 5.0
NOISE_SAMPLES = 2048  # one noise readout; its covariance estimate errs by about 1 / sqrt(samples)


def load_images(path: str | None, frames: int, size: int, slices: int, seed: int) -> np.ndarray:
    """``[slice, frame, y, x]`` complex64. Real input gets a smooth synthetic phase."""
    if path is None:
        return np.stack([cine_phantom(frames, size, seed=seed + s) for s in range(slices)]).astype(np.complex64)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"images file {path!r} not found")
    if p.suffix not in (".npz", ".npy"):
        raise ValueError(f"{path}: expected a .npy or .npz file")
    key, arr = read_named_array(p, ("images", "cine"))
    acdc = key == "cine"
    arr = np.asarray(arr)
    if arr.ndim == 4 and acdc:
        arr = np.moveaxis(arr, 1, 0)  # ACDC layout [T, Z, y, x] -> [Z, T, y, x]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"{path}: images must be [frame, y, x] or [slice, frame, y, x], got shape {arr.shape}")
    if not np.iscomplexobj(arr):
        arr = arr.astype(np.float32)
        arr = arr / max(float(np.percentile(arr, 99)), 1e-12)
        yy, xx = np.meshgrid(np.linspace(-1, 1, arr.shape[2]), np.linspace(-1, 1, arr.shape[3]), indexing="ij")
        arr = arr * np.exp(1j * (0.8 * xx + 0.5 * yy * yy))[None, None]
    return arr.astype(np.complex64)


def build_header(ny: int, nx: int, os: int, frames: int, slices: int, coils: int, fov_mm: float, accel: float,
                 ky_max: int, thickness: float = 8.0, real_time: bool = False) -> x.ismrmrdHeader:
    phases, repetitions = (1, frames) if real_time else (frames, 1)
    enc = x.encodingType(
        encodedSpace=x.encodingSpaceType(matrixSize=x.matrixSizeType(x=nx * os, y=ny, z=1),
                                         fieldOfView_mm=x.fieldOfViewMm(x=fov_mm * os, y=fov_mm * ny / nx, z=thickness)),
        reconSpace=x.encodingSpaceType(matrixSize=x.matrixSizeType(x=nx, y=ny, z=1),
                                       fieldOfView_mm=x.fieldOfViewMm(x=fov_mm, y=fov_mm * ny / nx, z=thickness)),
        encodingLimits=x.encodingLimitsType(
            kspace_encoding_step_0=x.limitType(minimum=0, maximum=nx * os - 1, center=nx * os // 2),
            kspace_encoding_step_1=x.limitType(minimum=0, maximum=ky_max, center=ny // 2),
            kspace_encoding_step_2=x.limitType(minimum=0, maximum=0, center=0),
            slice=x.limitType(minimum=0, maximum=slices - 1, center=0),
            phase=x.limitType(minimum=0, maximum=phases - 1, center=0),
            average=x.limitType(minimum=0, maximum=0, center=0),
            contrast=x.limitType(minimum=0, maximum=0, center=0),
            repetition=x.limitType(minimum=0, maximum=repetitions - 1, center=0),
            set=x.limitType(minimum=0, maximum=0, center=0),
            segment=x.limitType(minimum=0, maximum=0, center=0)),
        trajectory=x.trajectoryType.CARTESIAN,
        parallelImaging=x.parallelImagingType(
            accelerationFactor=x.accelerationFactorType(kspace_encoding_step_1=max(1, int(round(accel))),
                                                        kspace_encoding_step_2=1),
            calibrationMode=x.calibrationModeType.EMBEDDED))
    return x.ismrmrdHeader(
        version=1,
        subjectInformation=x.subjectInformationType(patientName="DDUGM^PHANTOM"),
        measurementInformation=x.measurementInformationType(protocolName="ddugm_simulated_cine",
                                                            patientPosition=x.patientPositionType.HFS),
        acquisitionSystemInformation=x.acquisitionSystemInformationType(
            systemVendor="ddugm-simulate", systemModel="numerical", systemFieldStrength_T=1.5,
            relativeReceiverNoiseBandwidth=0.793, receiverChannels=coils),
        experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=63_870_000),
        encoding=[enc],
        sequenceParameters=x.sequenceParametersType(TR=[40.0], TE=[1.5], flipAngle_deg=[60.0]))


def simulate(out: str, images: str | None = None, frames: int = 12, size: int = 64, slices: int = 1, coils: int = 8,
             accel: float = 4.0, acs: int | None = 12, noise: float = 0.002, oversampling: int = 2,
             partial_fourier: float = 1.0, asymmetric_echo: float = 1.0, noise_scan: bool = True, fov_mm: float = 320.0,
             seed: int = 0, truth: str | None = None, real_time: bool = False, ecg_beats: int = 0,
             mask: str = "random") -> dict:
    """Write the raw file; return a summary. ``truth``: also save the coil-combined ground truth
    ``[slice, frame, y, x]`` (recon matrix) as .npy for tests and comparisons. ``real_time``: the
    frames are repetitions acquired one after another (a real-time series: each slice's repetitions
    in turn, each ending ``LAST_IN_SLICE`` and ``LAST_IN_REPETITION``), not cardiac phases of a
    segmented cine (each line through all phases). ``ecg_beats`` > 0: a free-running real-time
    acquisition over that many heartbeats of varying length (RR 800 ms +- 10 %, lines every 2.5 ms,
    the scan starting at a random point of the first beat), each line of the heart as it is at
    that moment (the frames are the cardiac cycle, frame ``j`` at ``(j + 0.5) / frames`` of it,
    linearly interpolated between them) and stamped with its time after the last ECG trigger:
    what retrospective binning (``frame_axis: ecg``) is for. The truth is then the frames, the
    binned phases' centres when ``cardiac_phases`` equals ``frames``. ``mask``: ``random`` (a
    variable-density random set of lines per frame, the ``acs`` centre lines among them, flagged
    calibration and imaging), ``equispaced`` (every ``accel``-th line through the centre, the same in
    every frame, as clinical cine with GRAPPA: of the ``acs`` centre lines, those off the lattice are
    calibration-only, ``ACQ_IS_PARALLEL_CALIBRATION``, as a Siemens scan with embedded reference
    lines flags them) or ``lattice`` (every ``accel``-th line shifted by one line per frame)."""
    if coils < 1 or frames < 1 or slices < 1 or size < 16:
        raise ValueError("need coils >= 1, frames >= 1, slices >= 1 and size >= 16")
    if accel < 1:
        raise ValueError(f"accel must be >= 1, got {accel}")
    if mask not in ("random", "equispaced", "lattice"):
        raise ValueError(f"mask must be random, equispaced or lattice, got {mask!r}")
    if mask != "random" and accel != int(accel):
        raise ValueError(f"mask {mask} samples every accel-th line: accel must be a whole number, got {accel:g}")
    if ecg_beats < 0:
        raise ValueError(f"ecg_beats must be >= 0, got {ecg_beats}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0 (a standard deviation), got {noise}")
    if oversampling not in (1, 2):
        raise ValueError(f"oversampling must be 1 or 2, got {oversampling}")
    if not 0.5 < partial_fourier <= 1 or not 0.5 < asymmetric_echo <= 1:
        raise ValueError("partial_fourier and asymmetric_echo must be in (0.5, 1]")
    imgs = load_images(images, frames, size, slices, seed)
    ns, nt, ny, nx = imgs.shape
    per_frame = max(1, int(round(ny / accel)))
    if acs is None:  # 12 lines, or half of what a frame gets where that is fewer
        acs = min(12, per_frame // 2) if accel > 1 else 12
    if not 0 <= acs <= ny:
        raise ValueError(f"acs must be 0 to the {ny} phase-encoding lines, got {acs}")
    if mask == "random" and accel > 1 and acs >= per_frame:  # the mask would be the centre band alone in every frame
        raise ValueError(f"acs ({acs}) takes all of the {per_frame} lines a frame gets at accel {accel:g} "
                         f"({ny} lines): no line outside the centre would be sampled; lower acs or accel")
    rng = np.random.default_rng(seed)
    nxo = nx * oversampling
    maps = coil_maps(coils, (ny, nxo), seed=seed).astype(np.complex64) if coils > 1 else np.ones((1, ny, nxo), np.complex64)
    mixing = np.eye(coils) + 0.15 * (rng.standard_normal((coils, coils)) + 1j * rng.standard_normal((coils, coils)))
    mixing = (mixing / np.sqrt(np.mean(np.sum(np.abs(mixing) ** 2, axis=1)))).astype(np.complex64)
    if noise > 0:
        # the coils' coupling (noisy data only) mixes signal and noise alike: prewhitening with the
        # noise scan then recovers coils whose sensitivities are unitarily equivalent to the
        # normalised maps, so the reconstruction's intensity is that of the truth (mixing the noise
        # alone left a smooth +-8 % shading that no reconstruction could remove). Without the noise
        # scan the coupling stays, as on a scanner.
        maps = np.tensordot(mixing, maps, axes=(1, 0)).astype(np.complex64)
    ky_max = int(math.ceil(partial_fourier * ny)) - 1
    drop = int(round((1 - asymmetric_echo) * nxo))  # readout samples not acquired before the echo
    rr_ticks, n_reps = 320, 0  # ecg: 800 ms beats in 2.5 ms ticks, one line per tick
    if ecg_beats:
        real_time = True
        n_reps = max(2, ecg_beats * rr_ticks // per_frame)
    header = build_header(ny, nx, oversampling, n_reps or nt, ns, coils, fov_mm, accel, ky_max, real_time=real_time)

    def noise_of(shape, std):
        n = (rng.standard_normal((coils,) + shape) + 1j * rng.standard_normal((coils,) + shape)) * (std / np.sqrt(2))
        return np.tensordot(mixing, n, axes=(1, 0)).astype(np.complex64)

    p = Path(out)
    if p.exists() and images and Path(images).exists() and p.samefile(images):
        raise ValueError(f"{out}: the output would replace the --images file; name another output file")
    if p.exists():
        p.unlink()
    p.parent.mkdir(parents=True, exist_ok=True)
    ds = ismrmrd.Dataset(str(p), "dataset", create_if_needed=True)
    ds.write_xml_header(header.toXML())
    counter = 0
    stamp = 1000

    def acquisition(data, flags, ky=0, phase=0, slice_=0, dwell=DWELL_US, center=nxo // 2, delay=None):
        nonlocal counter, stamp
        acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64))
        acq.version = 1
        acq.flags = flags
        acq.measurement_uid = 4242
        acq.scan_counter = counter
        acq.acquisition_time_stamp = stamp
        acq.physiology_time_stamp[0] = int(phase * 40 / 2.5) if delay is None else delay  # after the trigger, 2.5 ms ticks
        acq.available_channels = coils
        acq.center_sample = center
        acq.sample_time_us = dwell
        acq.position[:] = (0.0, 0.0, 8.0 * slice_)
        acq.read_dir[:] = (1.0, 0.0, 0.0)
        acq.phase_dir[:] = (0.0, 1.0, 0.0)
        acq.slice_dir[:] = (0.0, 0.0, 1.0)
        acq.patient_table_position[:] = (0.0, 0.0, -1200.0)
        acq.idx.kspace_encode_step_1 = ky
        if real_time:
            acq.idx.repetition = phase
        else:
            acq.idx.phase = phase
        acq.idx.slice = slice_
        ds.append_acquisition(acq)
        counter += 1
        stamp += 16 if delay is None else 1  # 40 ms per cardiac phase frame ~ 16 ticks per line at 2.5 ms
        return acq

    if noise_scan and noise > 0:  # a noise scan of zeros could not whiten anything
        acquisition(noise_of((NOISE_SAMPLES,), noise * math.sqrt(DWELL_US / NOISE_DWELL_US)), 1 << (NOISE - 1),
                    dwell=NOISE_DWELL_US, center=0)
    truth_out = np.zeros((ns, nt, ny, nx), np.complex64)
    lines_total = 0
    for s in range(ns):
        img = np.zeros((nt, ny, nxo), np.complex64)
        img[:, :, nxo // 2 - nx // 2:nxo // 2 - nx // 2 + nx] = imgs[s]  # centre pixel nx // 2 at nxo // 2 (odd nx too)
        truth_out[s] = imgs[s]
        k = fft2c(torch.from_numpy(maps[:, None] * img[None])).numpy()  # [C, T, ny, nxo]
        c0 = ny // 2 - acs // 2
        acs_rows = set(range(c0, c0 + acs))
        if mask == "random":
            lines = variable_density_mask(n_reps or nt, ny, accel, center_lines=acs, seed=seed + 100 * s)
            imaging = lines
        else:  # the lattice's lines are imaging lines; the centre lines off it are calibration-only
            make = equispaced_mask if mask == "equispaced" else lattice_mask
            imaging = make(n_reps or nt, ny, int(accel), 0)
            lines = make(n_reps or nt, ny, int(accel), acs)
        lines[:, ky_max + 1:] = False
        delays = {}
        if ecg_beats:  # free-running: line i at tick i after a random point of the first beat
            order = [(row, r) for r in range(n_reps) for row in range(ny) if lines[r, row]]
            rr = rr_ticks * (1 + 0.1 * rng.uniform(-1, 1, ecg_beats + 2))
            triggers = np.concatenate([[0.0], np.cumsum(rr)])
            times = rng.uniform(0, rr[0]) + np.arange(len(order))
            beat = np.searchsorted(triggers, times, side="right") - 1
            delay = times - triggers[beat]
            pos = delay / rr[beat] * nt - 0.5  # frame j at (j + 0.5) / nt of the beat
            j0 = np.floor(pos).astype(int)
            w = (pos - j0).astype(np.float32)
            delays = {i: (int(round(delay[i])), j0[i] % nt, (j0[i] + 1) % nt, w[i]) for i in range(len(order))}
        elif real_time:  # frame by frame
            order = [(row, t) for t in range(nt) for row in range(ny) if lines[t, row]]
        else:  # segmented: each line through all phases
            order = [(row, t) for row in range(ny) for t in range(nt) if lines[t, row]]
        for i, (row, t) in enumerate(order):
            flags = 0
            first = i == 0 or (real_time and order[i - 1][1] != t)
            last = i == len(order) - 1 or (real_time and order[i + 1][1] != t)
            if first:
                flags |= 1 << (FIRST_IN_SLICE - 1)
            if row in acs_rows:
                flags |= 1 << ((CALIBRATION_AND_IMAGING if imaging[t, row] else CALIBRATION) - 1)
            if last:
                flags |= 1 << (LAST_IN_SLICE - 1)
                if real_time:
                    flags |= 1 << (LAST_IN_REPETITION - 1)
            if i == len(order) - 1 and s == ns - 1:
                flags |= 1 << (LAST_IN_MEASUREMENT - 1)
            if ecg_beats:
                d, a, b, wb = delays[i]
                line = (1 - wb) * k[:, a, row, drop:] + wb * k[:, b, row, drop:] + noise_of((nxo - drop,), noise)
                acquisition(line, flags, ky=row, phase=t, slice_=s, center=nxo // 2 - drop, delay=d)
                continue
            line = k[:, t, row, drop:] + noise_of((nxo - drop,), noise)
            acquisition(line, flags, ky=row, phase=t, slice_=s, center=nxo // 2 - drop)
        lines_total += len(order)
    ds.close()
    if truth:
        np.save(truth, truth_out)
    return {"file": str(p), "slices": ns, "frames": nt, "matrix": [ny, nx], "coils": coils, "readout": nxo - drop,
            "acquisitions": counter, "imaging_lines": lines_total,
            "acceleration": round(ns * nt * (ky_max + 1) / max(lines_total, 1), 2),
            **({"ecg_beats": ecg_beats, "repetitions": n_reps} if ecg_beats else {})}


def add_parser(sub):
    p = sub.add_parser("simulate", help="write a simulated undersampled multi-coil cine as an ISMRMRD raw file")
    p.add_argument("out", help="output .h5 (ISMRMRD raw)")
    p.add_argument("--images", default=None, help=".npy/.npz images [frame, y, x] or [slice, frame, y, x] "
                                                 "(ACDC .npz too); default: the built-in phantom")
    p.add_argument("--frames", type=int, default=12, help="phantom cardiac phases (default: %(default)s)")
    p.add_argument("--real-time", action="store_true", help="write the frames as repetitions acquired one after "
                                                            "another (a real-time series), not as cardiac phases")
    p.add_argument("--ecg-beats", type=int, default=0,
                   help="write a free-running real-time acquisition over this many heartbeats, each line stamped with "
                        "its time after the ECG trigger (for frame_axis ecg; the frames are one cardiac cycle)")
    p.add_argument("--size", type=int, default=64, help="phantom matrix (default: %(default)s)")
    p.add_argument("--slices", type=int, default=1)
    p.add_argument("--coils", type=int, default=8)
    p.add_argument("--accel", type=finite_float, default=4.0, help="undersampling factor R per phase (default: %(default)s)")
    p.add_argument("--acs", type=int, default=None,
                   help="fully sampled centre lines, flagged as embedded ACS (default: 12, or half the lines a "
                        "frame gets where that is fewer)")
    p.add_argument("--mask", default="random", choices=["random", "equispaced", "lattice"],
                   help="random: variable-density random lines, a new set per frame (default); equispaced: every "
                        "accel-th line, the same in every frame, the --acs lines off it calibration-only (GRAPPA "
                        "cine with embedded reference lines); lattice: every accel-th line, shifted by one per frame")
    p.add_argument("--noise", type=finite_float, default=0.002, help="complex noise std per sample, image max ~1")
    p.add_argument("--oversampling", type=int, default=2, choices=[1, 2], help="readout oversampling (default: 2)")
    p.add_argument("--partial-fourier", type=finite_float, default=1.0, help="fraction of phase-encoding lines (0.5-1]")
    p.add_argument("--asymmetric-echo", type=finite_float, default=1.0, help="fraction of the readout acquired (0.5-1]")
    p.add_argument("--no-noise-scan", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truth", default=None, help="also save the ground-truth images (.npy)")


def run(a: argparse.Namespace) -> int:
    import json

    summary = simulate(a.out, a.images, a.frames, a.size, a.slices, a.coils, a.accel, a.acs, a.noise, a.oversampling,
                       a.partial_fourier, a.asymmetric_echo, not a.no_noise_scan, seed=a.seed, truth=a.truth,
                       real_time=a.real_time, ecg_beats=a.ecg_beats, mask=a.mask)
    print(json.dumps(summary))
    return 0
