"""How well the gadgets' RF-spike check works: ``python tests/spike_check.py [SPLIT] [PART ...]``.

Not a test (it takes minutes and needs ../shared/data): it measured what README's "Corrupted data"
reports, and is here to run again when the check or the data path changes. SPLIT is a split of the
ACDC patients (``validation``, the default, where the threshold was chosen, or ``test``); PARTs
(default all three):

- ``clean``: every slice of every patient of the split, simulated as raw scans (8 coils, noise
  0.005, variable-density lines; readout oversampling 2 at R = 8, none at R = 8, and oversampling 2
  at R = 4 with partial Fourier 0.75 and an asymmetric echo 0.75), replayed through a
  ``ReconSession`` (zero-filled, to be quick): the largest local ratio the check computed
  (:func:`gadgets.kspace.local_spike_ratio`), the largest echo sample of a line ``ECHO_ROWS`` or
  more from the centre against the k-space peak, and the lines left out, which must be none. Then
  the built-in phantom (sharp edges) at several sizes, and the real Siemens raw file.
- ``detect``: the middle slice of each patient, R = 8, oversampling 2: spikes of ``a`` times the
  coil's raw k-space peak (one sample, one coil, random line, sample and phase; one line in 20
  of the scan) for several ``a``: the share left out.
- ``damage``: the middle slice of the first 3 patients, one spike of ``a`` times the peak in one
  line, reconstructed by LLR + TV (``llr_ttv``) with the check and without it: PSNR of the spiked
  frame and of the series against the simulation's truth (magnitudes, least-squares scaled).
- ``buffers``: the same check on Gadgetron ReconData buffers (what AcquisitionAccumulateTrigger and
  BucketToBuffer deliver, :func:`gadgetron_peer.recon_data_from_file`; not part of the default):
  every slice of every patient, R = 8, readout oversampling 2 and none, clean: the lines left out,
  which must be none; then the middle slices with one spike of ``a`` times the coil's raw peak in
  one line in 20 (random line, coil, sample and phase): the share left out. Needs gadgetron.
"""
import copy
import sys
import tempfile
from pathlib import Path

import ismrmrd
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # (buffers: gadgetron_peer)
import gadgets.kspace as kspace  # noqa: E402
from ddugm_core.data import ACDC_TEST, ACDC_VALIDATION  # noqa: E402
from ddugm_core.metrics import psnr  # noqa: E402
from gadgets.protocol import parse_header  # noqa: E402
from gadgets.replay import open_dataset  # noqa: E402
from gadgets.session import ReconSession  # noqa: E402
from gadgets.settings import load_settings  # noqa: E402
from gadgets.simulate import simulate  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RATIOS = []  # every local ratio the check computed (one per coil and line)
_ratio = kspace.local_spike_ratio


def _recording(lines, center):
    r = _ratio(lines, center)
    RATIOS.append(np.asarray(r).reshape(-1, r.shape[-1]).max(axis=-1) if r.ndim else r)
    return r


kspace.local_spike_ratio = _recording
ECHOES = []  # per slice: the largest echo sample of the lines ECHO_ROWS or more from the centre / the peak
_drop = kspace.AcquisitionCollector._drop_corrupted


def _echo_recording(self):
    if self.lines:
        stats = np.stack([ln[7] for ln in self.lines])
        rows, frames = np.array([ln[1] for ln in self.lines]), np.array([ln[0] for ln in self.lines])
        ref = kspace._peak_reference(stats[:, 0], frames, rows, self.geometry.ny)
        outer = np.abs(rows - self.geometry.ny // 2) >= kspace.ECHO_ROWS
        if ref is not None and outer.any():
            ECHOES.append(float((stats[outer, 1] / ref).max()))
    return _drop(self)


kspace.AcquisitionCollector._drop_corrupted = _echo_recording


def load(path):
    ds = open_dataset(str(path))
    xml = ds.read_xml_header()
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    return (xml.decode() if isinstance(xml, bytes) else xml), acqs


def replay(xml, acqs, method="zero_filled"):
    s = ReconSession(parse_header(xml.encode()), *load_settings({"method": method, "device": "cpu"}))
    out = []
    for a in acqs:
        out += s.handle(a)
    out += s.finish()
    if s.errors:
        raise RuntimeError(s.errors)
    warnings = {o.meta["DDUGM_Warning"] for o in out if "DDUGM_Warning" in o.meta.keys()}
    left = sum(int(w.split(" k-space line(s) left out")[0].split()[-1]) for w in warnings
               if " k-space line(s) left out" in w)
    return out, left, warnings


def imaging(acqs):
    return [i for i, a in enumerate(acqs) if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]


def spiked(acqs, n, a, rng):
    """``n`` image lines, each with one sample of ``a`` times its coil's raw peak added."""
    img = imaging(acqs)
    peak = np.abs(np.stack([acqs[i].data for i in img])).max(axis=(0, 2))  # [coil]
    out = list(acqs)
    for i in rng.choice(img, n, replace=False):
        b = copy.deepcopy(acqs[i])
        c, s = int(rng.integers(b.data.shape[0])), int(rng.integers(b.data.shape[1]))
        b.data[c, s] += a * peak[c] * np.exp(2j * np.pi * rng.random())
        out[i] = b
    return out


def series(patient, tmp, middle=True, seed=0, **kw):
    cine = np.load(DATA / "acdc_cine" / f"{patient}.npz")["cine"].astype(np.float32)
    cine = cine[:, cine.shape[1] // 2] if middle else np.moveaxis(cine, 1, 0)
    np.save(tmp / "images.npy", cine)
    simulate(str(tmp / "scan.h5"), images=str(tmp / "images.npy"), coils=8, noise=0.005, acs=None, seed=seed,
             truth=str(tmp / "truth.npy"), **kw)
    return load(tmp / "scan.h5")


def clean(patients, tmp):
    configs = {"R 8, oversampling 2": dict(accel=8), "R 8, no oversampling": dict(accel=8, oversampling=1),
               "R 4, partial Fourier 0.75, asymmetric echo 0.75": dict(accel=4, partial_fourier=0.75,
                                                                       asymmetric_echo=0.75)}
    for name, kw in configs.items():
        RATIOS.clear()
        ECHOES.clear()
        left = lines = 0
        for j, p in enumerate(patients):
            xml, acqs = series(p, tmp, middle=False, seed=j, **kw)
            _, n, _ = replay(xml, acqs)
            left, lines = left + n, lines + len(imaging(acqs))
        r = np.concatenate(RATIOS)
        print(f"clean, {name}: {lines} lines of {len(patients)} patients (all slices): largest local ratio "
              f"{r.max():.1f} (99.9th percentile {np.quantile(r, 0.999):.1f}), largest echo of an outer line "
              f"{max(ECHOES):.2f} x the peak, lines left out {left}", flush=True)
    for size, os_, noise, coils in ((64, 2, 0.002, 8), (128, 1, 0.0, 4), (192, 2, 0.002, 16), (96, 1, 0.002, 8)):
        RATIOS.clear()
        simulate(str(tmp / "ph.h5"), size=size, oversampling=os_, noise=noise, coils=coils, accel=4, seed=size)
        _, n, _ = replay(*load(tmp / "ph.h5"))
        print(f"clean, phantom {size}, oversampling {os_}, noise {noise}, {coils} coils: largest local ratio "
              f"{np.concatenate(RATIOS).max():.1f}, lines left out {n}", flush=True)
    raw = DATA / "siemens_grappa_r3.h5"
    if raw.exists():
        RATIOS.clear()
        xml, acqs = load(raw)
        _, n, _ = replay(xml, acqs)
        r = np.concatenate(RATIOS)
        print(f"clean, the real Siemens file ({len(imaging(acqs))} lines, 14 coils, oversampling 2): largest local "
              f"ratio {r.max():.1f}, lines left out {n}", flush=True)


def detect(patients, tmp, amplitudes=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)):
    rng = np.random.default_rng(1)
    found, total = {a: 0 for a in amplitudes}, {a: 0 for a in amplitudes}
    for j, p in enumerate(patients):
        xml, acqs = series(p, tmp, seed=j, accel=8)
        n = max(1, len(imaging(acqs)) // 20)
        for a in amplitudes:
            _, left, _ = replay(xml, spiked(acqs, n, a, rng))
            found[a] += left
            total[a] += n
    for a in amplitudes:
        print(f"detect, spikes of {a:g} x the coil's peak: {found[a]} of {total[a]} lines left out "
              f"({100 * found[a] / total[a]:.0f} %)", flush=True)


def damage(patients, tmp, amplitudes=(0.1, 0.3, 1.0, 3.0)):
    rng = np.random.default_rng(2)
    rows = []
    for j, p in enumerate(patients[:3]):
        xml, acqs = series(p, tmp, seed=j, accel=8)
        truth = np.abs(np.load(tmp / "truth.npy")[0])
        peak = truth.max()

        def images(out, truth=truth):
            x = np.stack([np.abs(np.asarray(o.data)).squeeze() for o in out])
            return x * (x * truth).sum() / (x * x).sum()
        base = images(replay(xml, acqs, "llr_ttv")[0])
        for a in amplitudes:
            bad = spiked(acqs, 1, a, rng)
            f = next(int(b.idx.phase) for b, c in zip(bad, acqs) if b is not c)
            with_check = images(replay(xml, bad, "llr_ttv")[0])
            kspace.LOCAL_RATIO, kspace.SPIKE_RATIO = np.inf, np.inf
            try:
                without = images(replay(xml, bad, "llr_ttv")[0])
            finally:
                kspace.LOCAL_RATIO, kspace.SPIKE_RATIO = 30.0, 10.0
            rows.append((p, a, *(psnr(truth[f], x[f], peak) for x in (base, without, with_check)),
                         *(psnr(truth, x) for x in (base, without, with_check))))
            print("damage, %s, spike %g x peak: spiked frame %.2f dB clean, %.2f without the check, %.2f with it; "
                  "series %.2f / %.2f / %.2f" % rows[-1], flush=True)
    r = np.array([row[2:] for row in rows])
    for a in amplitudes:
        m = r[[row[1] == a for row in rows]].mean(axis=0)
        print("damage, mean over %d series, spike %g x peak: frame %.2f / %.2f / %.2f dB, series %.2f / %.2f / %.2f "
              "(clean / without the check / with it)" % (len(patients[:3]), a, *m))


def buffers(patients, tmp, amplitudes=(0.3, 1.0, 3.0)):
    from gadgetron_peer import recon_data_from_file

    def run(hdr, rd):
        rd.bits[0].ref = None  # (no calibration lines: the buffer alone)
        s = ReconSession(hdr, *load_settings({"method": "zero_filled", "device": "cpu"}))
        out = s.handle(rd) + s.finish()
        if s.errors:
            raise RuntimeError(s.errors)
        warnings = {ismrmrd.Meta.deserialize(o.meta[0]).get("DDUGM_Warning", "") for o in out}
        return sum(int(w.split(" k-space line(s) with corrupted")[0].split()[-1]) for w in warnings
                   if " k-space line(s) with corrupted" in w)

    for name, kw in {"oversampling 2": dict(accel=8), "no oversampling": dict(accel=8, oversampling=1)}.items():
        left = lines = 0
        for j, p in enumerate(patients):
            series(p, tmp, middle=False, seed=j, **kw)
            ds = open_dataset(str(tmp / "scan.h5"))
            slices = {ds.read_acquisition(i).idx.slice for i in range(ds.number_of_acquisitions())}
            ds.close()
            for z in sorted(slices):
                hdr, rd = recon_data_from_file(str(tmp / "scan.h5"), z)
                lines += int((np.abs(rd.bits[0].data.data).sum(axis=(0, 2, 3, 5, 6)) > 0).sum())
                left += run(hdr, rd)
        print(f"buffers, clean, R 8, {name}: {lines} lines of {len(patients)} patients (all slices), lines left out "
              f"{left}", flush=True)
    rng = np.random.default_rng(3)
    found, total = {a: 0 for a in amplitudes}, {a: 0 for a in amplitudes}
    for j, p in enumerate(patients):
        series(p, tmp, seed=j, accel=8)
        for a in amplitudes:
            hdr, rd = recon_data_from_file(str(tmp / "scan.h5"))
            data = rd.bits[0].data.data  # [E0, E1, 1, CHA, N, 1, 1]
            peak = np.abs(data).max(axis=(0, 1, 2, 4, 5, 6))  # [coil]
            acquired = np.argwhere(np.abs(data).sum(axis=(0, 2, 3, 5, 6)) > 0)  # [(E1, N)]
            n = max(1, len(acquired) // 20)
            for ky, f in acquired[rng.choice(len(acquired), n, replace=False)]:
                c = int(rng.integers(data.shape[3]))
                e = int(rng.choice(np.nonzero(np.abs(data[:, ky, 0, c, f, 0, 0]) > 0)[0]))
                data[e, ky, 0, c, f, 0, 0] += a * peak[c] * np.exp(2j * np.pi * rng.random())
            found[a] += run(hdr, rd)
            total[a] += n
    for a in amplitudes:
        print(f"buffers, spikes of {a:g} x the coil's peak: {found[a]} of {total[a]} lines left out "
              f"({100 * found[a] / total[a]:.0f} %)", flush=True)


if __name__ == "__main__":
    split = sys.argv[1] if len(sys.argv) > 1 else "validation"
    parts = sys.argv[2:] or ["clean", "detect", "damage"]
    patients = {"validation": ACDC_VALIDATION, "test": ACDC_TEST}[split]
    if not (DATA / "acdc_cine").exists():
        sys.exit(f"needs the ACDC cine in {DATA / 'acdc_cine'}")
    with tempfile.TemporaryDirectory() as d:
        for part in parts:
            {"clean": clean, "detect": detect, "damage": damage, "buffers": buffers}[part](list(patients), Path(d))
