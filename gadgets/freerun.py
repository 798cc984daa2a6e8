"""``ddugm evaluate --free-running B``: free-running acquisitions, read the two ways a scanner's
reconstruction reads them, measured against the truth.

Each cine series (ACDC or your own image stacks, as for ``ddugm evaluate``) becomes a simulated
free-running raw file (``ddugm simulate --ecg-beats B``: B heartbeats of 800 ms +- 10 %, a line
every 2.5 ms, a new set of lines at acceleration R every real-time frame, each line of the heart as
it was at that moment and stamped with its trigger delay), which goes through the same session as
a scan (``ddugm recon``) with

- ``frame_axis: ecg``: every line binned into the cine's own number of cardiac phases; the truth
  is the cine itself (phase j at the centre (j + 0.5) / T of the cycle, where the simulation puts
  frame j);
- ``frame_axis: repetition``: every real-time frame reconstructed as one frame of a series; the
  truth of each is the cine interpolated at the mean cardiac phase of its lines (the circular mean
  of their trigger delays as fractions of their beats).

Magnitude images, each series scaled by least squares onto its truth (the reconstruction's
units are the scanner's); PSNR, SSIM and HFEN per frame as ``ddugm evaluate`` computes them."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import ismrmrd
import numpy as np

from ddugm_core import evaluate as ev

from .kspace import ecg_bins
from .replay import open_dataset, replay
from .simulate import simulate

FRAME_AXES = ("ecg", "repetition")


def repetition_truth(path: Path, cycle: np.ndarray) -> np.ndarray:
    """The truth of each real-time frame (repetition) of the free-running raw file ``path``: the
    cycle ``[T, y, x]`` linearly interpolated at the circular mean cardiac fraction of the frame's
    lines (their trigger delays binned finely by :func:`~gadgets.kspace.ecg_bins`)."""
    ds = open_dataset(str(path))
    try:
        acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    finally:
        ds.close()
    acqs = [a for a in acqs if not a.isFlagSet(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    reps = np.array([a.idx.repetition for a in acqs])
    fine = 3600
    bins, _ = ecg_bins(np.array([a.physiology_time_stamp[0] for a in acqs], float), fine)
    frac = (bins + 0.5) / fine
    t = cycle.shape[0]
    out = []
    for r in range(int(reps.max()) + 1):
        mean = np.angle(np.mean(np.exp(2j * np.pi * frac[reps == r]))) / (2 * np.pi) % 1.0
        pos = mean * t - 0.5
        j = int(np.floor(pos))
        w = pos - j
        out.append((1 - w) * cycle[j % t] + w * cycle[(j + 1) % t])
    return np.stack(out)


def _images(path: Path, axis: str) -> np.ndarray:
    """The magnitude frames of a reconstruction, in phase (ecg) or repetition order."""
    ds = open_dataset(str(path))
    try:
        imgs = [ds.read_image("image_1", i) for i in range(ds.number_of_images("image_1"))]
    finally:
        ds.close()
    imgs.sort(key=lambda im: im.phase if axis == "ecg" else im.repetition)
    return np.stack([np.abs(np.asarray(im.data)).squeeze() for im in imgs]).astype(np.float32)


def _overrides(method: str, axis: str, phases: int, device: str) -> dict:
    over = {"method": "ddugm", "preset": method[6:]} if method.startswith("ddugm_") else {"method": method}
    over["frame_axis"] = axis
    if axis == "ecg":
        over["cardiac_phases"] = str(phases)
    if device != "auto":
        over["device"] = device
    return over


def run(a) -> int:
    """``ddugm evaluate --free-running B``."""
    beats = a.free_running
    accels = ev._parse_list(a.accels, float, "accels")
    methods = ev._parse_list(a.methods, str, "methods")
    axes = ev._parse_list(a.frame_axes, str, "frame-axes")
    bad = [m for m in methods if m not in ev.ALL_METHODS] + [x for x in axes if x not in FRAME_AXES]
    if bad:
        raise ValueError(f"unknown method(s) or frame axes {bad}; methods: {', '.join(ev.ALL_METHODS)}; frame axes: "
                         f"{', '.join(FRAME_AXES)}")
    if ev.is_raw_source(a.data):
        raise ValueError("--free-running simulates acquisitions from image stacks; raw data are evaluated with "
                         "--data alone")
    if a.max_frames:
        raise ValueError("--max-frames cuts the cardiac cycle, which a free-running scan goes through again and again: "
                         "leave it out with --free-running")
    if a.maps == "true" or a.trace or a.tune_l_plus_s:
        raise ValueError("--free-running reconstructs through the gadgets, which estimate their own coil maps: leave "
                         "out --maps true, --trace and --tune-l-plus-s")
    if getattr(a, "mask", "random") != "random" or getattr(a, "acs", None) is not None:
        raise ValueError("--mask and --acs choose the lines of a cine's frames; a free-running scan samples a new "
                         "random set per real-time frame (ddugm simulate --ecg-beats): leave them out with "
                         "--free-running")
    if getattr(a, "phase", "random") != "random":
        raise ValueError("--phase sets the phase of the library's simulated cases; a free-running scan is simulated by "
                         "ddugm simulate, with its own phase: leave it out with --free-running")
    if getattr(a, "noise_known", "yes") == "no":
        raise ValueError("--noise-known no: a free-running scan is simulated with its noise scan, which tells the "
                         "gadgets the noise; leave it out with --free-running")
    coils = ev.SIM_COILS if a.coils is None else a.coils
    noise = ev.SIM_NOISE if a.noise is None else a.noise
    if beats < 1 or coils < 1 or noise < 0 or any(not 1 <= r <= 64 for r in accels) or a.max_series < 0:
        raise ValueError("need --free-running >= 1 heartbeats, accelerations 1 to 64, --coils >= 1, --noise >= 0 and "
                         "--max-series >= 0")
    series = ev.select_series(a.data, a.split or "validation", a.slices, a.max_series)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [f"{m}@{x}" for x in axes for m in methods]
    results, failures = [], []
    print(f"{len(series)} series, {beats} heartbeats free-running, R = {', '.join(f'{r:g}' for r in accels)} per "
          f"real-time frame, {coils} simulated coil(s), noise {noise}; read as {', '.join(axes)}")
    with tempfile.TemporaryDirectory(prefix="ddugm_freerun_") as tmp:
        tmp = Path(tmp)
        for i, (name, frames) in enumerate(series):
            np.save(tmp / "cycle.npy", np.abs(frames).astype(np.float32))
            for r in accels:
                scan, truth_file = tmp / "scan.h5", tmp / "truth.npy"
                try:
                    info = simulate(str(scan), str(tmp / "cycle.npy"), coils=coils, accel=r, acs=None, noise=noise,
                                    seed=a.seed * 1000 + i, truth=str(truth_file), ecg_beats=beats)
                    cycle = np.abs(np.load(truth_file)[0])
                    truths = {"ecg": cycle}
                    if "repetition" in axes:
                        truths["repetition"] = repetition_truth(scan, cycle)
                except ValueError as e:  # a series that cannot be simulated (too small, ...) loses no other
                    failures.append({"series": name, "accel": r, "method": None, "error": f"ValueError: {e}"})
                    print(f"evaluate: {name} R={r:g} cannot be simulated: {e}", file=sys.stderr)
                    continue
                for axis in axes:
                    for m in methods:
                        label = f"{m}@{axis}"
                        try:
                            t0 = time.perf_counter()
                            replay(str(scan), str(tmp / "images.h5"), a.config,
                                   overrides=_overrides(m, axis, cycle.shape[0], a.device), quiet=True)
                            dt = time.perf_counter() - t0
                            x = _images(tmp / "images.h5", axis)
                        except (ValueError, RuntimeError, OSError) as e:  # one bad case must not lose the others
                            failures.append({"series": name, "accel": r, "method": label,
                                             "error": f"{type(e).__name__}: {e}"})
                            print(f"evaluate: {name} R={r:g} {label} failed: {e}", file=sys.stderr)
                            continue
                        truth = truths[axis]
                        if x.shape != truth.shape:
                            failures.append({"series": name, "accel": r, "method": label,
                                             "error": f"{x.shape[0]} frames reconstructed, {truth.shape[0]} expected"})
                            continue
                        scale = float((x * truth).sum() / max(float((x * x).sum()), 1e-30))
                        # of the binned cine (every beat's lines in each phase), or of one real-time frame
                        measured = (info["acceleration"] if axis == "ecg" else
                                    round(info["repetitions"] * cycle.shape[1] / max(info["imaging_lines"], 1), 2))
                        results.append({"series": name, "frames": int(x.shape[0]), "accel": r,
                                        "measured_accel": measured, "method": label, "seconds": dt,
                                        **ev.frame_metrics(truth, scale * x)})
                        if not a.quiet:
                            print(f"{name} R={r:g} {label}: {np.mean(results[-1]['psnr']):.2f} dB, {dt:.1f} s",
                                  flush=True)
            (out / "results.json").write_text(json.dumps(
                {"settings": {k: v for k, v in vars(a).items() if k != "func"}, "results": results,
                 "failures": failures}, indent=2, default=str))
    table = ev.summary_table(results, labels, accels, failures)
    text = ev.render_table(table, names=lambda label: "{}, {}".format(ev.METHOD_NAMES[label.split("@")[0]],
                                                                   label.split("@")[1]))
    (out / "report.md").write_text(
        f"# Free-running acquisitions, {beats} heartbeats\n\n{__doc__.split(chr(10), 1)[1].strip()}\n\n"
        f"{len(series)} series ({a.split or 'validation'}), {coils} coils, noise {noise}, seed {a.seed}.\n\n{text}\n"
        + ("".join(f"\n- failed: {f['series']} R={f['accel']:g} {f['method'] or ''}: {f['error']}" for f in failures)))
    print(text)
    print(f"\nwrote {out / 'report.md'}, {out / 'results.json'}")
    if failures:
        print(f"evaluate: {len(failures)} reconstruction(s) failed; listed in the report", file=sys.stderr)
        return 1
    return 0
