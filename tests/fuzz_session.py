"""Mutation fuzzing of the gadgets' acquisition path: ``python tests/fuzz_session.py [CASES] [SEED]
[METHOD] [buffers]``.

Five small simulated scans (a two-slice cine, a real-time series, partial Fourier with an
asymmetric echo, a GRAPPA-style cine whose reference lines off its lattice are calibration-only,
a free-running scan binned by its ECG trigger times with ``frame_axis: ecg``);
each case applies one to three random mutations (a header XML number set to 0, -1, 65535, nan,
inf, text or deleted; an acquisition's counter, flag bit, centre, discards, channel count, dwell
time, ECG trigger delay, sample count or data (NaN, inf, 1e30, zeros); a line deleted,
duplicated or moved) and replays the scan through a ``ReconSession`` in process. Every case must
end in images or an error of a clean type naming the problem, within 60 s, with finite images;
anything else is listed at the end as BAD (exit code 1). Not a test: it found the cases that
``test_corrupted_input.py`` now tests, and is here to run again after changes to the data path.

``buffers``: Gadgetron ReconData buffers instead (what AcquisitionAccumulateTrigger and
BucketToBuffer deliver, :func:`gadgetron_peer.recon_data_from_file`, of the same scans' first
slice), each case one to three mutations of a buffer: a sample NaN, inf, 1e30 or 0; a line or a
frame zeroed; a sampling limit or matrix size set to a random value; a line header's sample
count, centre or counter; the reference buffer left out, with a coil fewer, or of another shape;
the data's dimensions changed. Needs gadgetron. In both modes an error of a clean type whose
message is numpy's or Python's own (``UNCLEAN_PHRASES``: "zero-size array", "could not
broadcast", ...) counts as BAD too: it names no problem of the data.
"""
import copy
import re
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import ismrmrd
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gadgets.protocol import parse_header  # noqa: E402
from gadgets.replay import open_dataset  # noqa: E402
from gadgets.session import Engine, ReconSession  # noqa: E402
from gadgets.settings import Limits, load_settings  # noqa: E402
from gadgets.simulate import simulate  # noqa: E402

CLEAN = {"ValueError", "ProtocolError", "ScanErrors", "FloatingPointError", "UnlabelledCine", "TimeLimit"}
FIELDS_IDX = ["kspace_encode_step_1", "kspace_encode_step_2", "average", "slice", "contrast", "phase",
              "repetition", "set", "segment"]
FIELDS = ["flags", "center_sample", "discard_pre", "discard_post", "encoding_space_ref", "sample_time_us",
          "available_channels", "trajectory_dimensions", "measurement_uid", "scan_counter", "trigger"]
VALUES = [0, 1, 2, 3, 7, 15, 31, 63, 64, 100, 255, 1000, 32767, 65535]
UNCLEAN_PHRASES = ("zero-size array", "could not broadcast", "operands could not", "out of bounds",
                   "invalid index", "has no attribute", "unsupported operand", "object is not", "cannot reshape",
                   "must be real number", "not subscriptable", "too many indices", "unhashable")


def load(path):
    ds = open_dataset(str(path))
    xml = ds.read_xml_header()
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    return xml.decode() if isinstance(xml, bytes) else xml, acqs


def mutate_xml(xml, rng):
    nums = list(re.finditer(r">(-?[0-9.eE+]+)<", xml))
    if rng.random() < 0.15:  # delete an element
        tags = list(re.finditer(r"<(\w+)>[^<>]*</\1>", xml))
        m = tags[rng.integers(len(tags))]
        return xml[:m.start()] + xml[m.end():], f"xml del {m.group(1)}"
    m = nums[rng.integers(len(nums))]
    v = rng.choice(["0", "-1", "1", "2", "3", "65535", "1000000", "nan", "inf", "-inf", "0.5", "1e-30", "abc", ""])
    ctx = xml[max(0, m.start() - 40):m.start()].split("<")[-1]
    return xml[:m.start() + 1] + v + xml[m.end() - 1:], f"xml {ctx}={v}"


def mutate_acq(acqs, rng):
    i = int(rng.integers(len(acqs)))
    a = acqs[i]
    r = rng.random()
    if r < 0.35:
        f = FIELDS_IDX[rng.integers(len(FIELDS_IDX))]
        v = int(rng.choice(VALUES))
        setattr(a.idx, f, v)
        return f"acq{i} idx.{f}={v}"
    if r < 0.65:
        f = FIELDS[rng.integers(len(FIELDS))]
        if f == "flags":
            v = int(a.flags) ^ (1 << int(rng.integers(64)))
        elif f == "sample_time_us":
            v = float(rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30]))
        elif f == "trigger":  # the ECG trigger delay, physiology_time_stamp[0]
            v = int(rng.choice([0, 1, 100, 65535, 2**31 - 1, 2**32 - 1]))
            a.physiology_time_stamp[0] = v
            return f"acq{i} trigger={v}"
        else:
            v = int(rng.choice(VALUES))
        try:
            setattr(a, f, v)
        except Exception as e:  # noqa: BLE001 - ismrmrd refuses some fields (read-only)
            return f"acq{i} {f}={v} (refused by ismrmrd: {e})"
        return f"acq{i} {f}={v}"
    if r < 0.75:
        d = np.array(a.data)
        kind = rng.choice(["nan", "inf", "huge", "zero", "tiny"])
        j = int(rng.integers(d.shape[1]))
        d[:, j] = {"nan": np.nan, "inf": np.inf, "huge": 1e30, "zero": 0, "tiny": 1e-38}[kind]
        if kind == "zero":
            d[:] = 0
        a.data[:] = d
        return f"acq{i} data {kind}"
    if r < 0.85:  # shape change
        c, n = a.data.shape
        nc = int(rng.choice([1, max(1, c - 1), c + 1, c]))
        ns = int(rng.choice([1, 2, n // 2, n - 1, n + 1, 2 * n, n]))
        b = ismrmrd.Acquisition.from_array(np.zeros((nc, ns), np.complex64))
        b.setHead(a.getHead())
        b.resize(ns, nc)
        b.data[:] = 0
        b.data[:min(c, nc), :min(n, ns)] = a.data[:min(c, nc), :min(n, ns)]
        acqs[i] = b
        return f"acq{i} shape {c}x{n} -> {nc}x{ns}"
    if r < 0.9:
        del acqs[i]
        return f"del acq{i}"
    if r < 0.95:
        acqs.insert(i, copy.deepcopy(a))
        return f"dup acq{i}"
    j = int(rng.integers(len(acqs)))
    acqs[i], acqs[j] = acqs[j], acqs[i]
    return f"swap {i},{j}"


def mutate_buffer(rd, rng):
    """One mutation of a ReconData (one bit, data [E0, E1, E2, CHA, N, S, LOC]) in place; its description."""
    bit = rd.bits[0]
    buf = bit.data
    d = buf.data
    r = rng.random()
    if d.ndim != 7 and (r < 0.25 or r >= 0.8):
        return "(data not 7D: left as it is)"
    if r < 0.25:
        idx = tuple(int(rng.integers(n)) for n in d.shape)
        kind = str(rng.choice(["nan", "inf", "huge", "zero line", "zero frame", "tiny"]))
        if kind == "zero line":
            d[:, idx[1], :, :, idx[4]] = 0
        elif kind == "zero frame":
            d[..., idx[4], :, :] = 0
        else:
            d[idx] = {"nan": np.nan, "inf": np.inf, "huge": 1e30, "tiny": 1e-38}[kind]
        return f"data {kind} at {idx}"
    if r < 0.45:
        sd = buf.sampling
        which = str(rng.choice(["limit", "encoded", "recon"]))
        axis, v = int(rng.integers(3)), int(rng.choice(VALUES))
        if which == "limit":
            field = str(rng.choice(["min", "center", "max"]))
            setattr(sd.sampling_limits[axis], field, v)
            return f"sampling_limits[{axis}].{field}={v}"
        getattr(sd, f"{which}_matrix")[axis] = v
        return f"{which}_matrix[{axis}]={v}"
    if r < 0.65:
        heads = buf.headers
        idx = tuple(int(rng.integers(n)) for n in heads.shape)
        h = heads[idx]
        field = str(rng.choice(["number_of_samples", "center_sample", "active_channels", "kspace_encode_step_1",
                                "phase", "repetition", "slice", "sample_time_us"]))
        v = float(rng.choice([0.0, -1.0, float("nan"), 1e30])) if field == "sample_time_us" else int(rng.choice(VALUES))
        if field in ("kspace_encode_step_1", "phase", "repetition", "slice"):
            setattr(h.idx, field, v)
        else:
            setattr(h, field, v)
        return f"header {idx} {field}={v}"
    if r < 0.8:
        kind = str(rng.choice(["none", "coil fewer", "6D", "one frame"]))
        if bit.ref is None:
            return "ref already none"
        if kind == "none":
            bit.ref = None
        elif kind == "coil fewer":
            bit.ref.data = np.ascontiguousarray(bit.ref.data[:, :, :, :-1])
        elif kind == "6D":
            bit.ref.data = bit.ref.data[..., 0]
        else:
            bit.ref.data = np.ascontiguousarray(bit.ref.data[:, :, :, :, :1])
        return f"ref {kind}"
    kind = str(rng.choice(["6D", "E2=2", "N=1", "swap E0 E1", "S=2", "E1 halved"]))
    heads = buf.headers
    if kind == "6D":
        buf.data = d[..., 0]
    elif kind == "E2=2":
        buf.data = np.ascontiguousarray(np.concatenate([d, d], axis=2))
        heads = np.concatenate([heads, heads], axis=1)
    elif kind == "N=1":
        buf.data = np.ascontiguousarray(d[:, :, :, :, :1])
        heads = heads[:, :, :1]
    elif kind == "swap E0 E1":
        buf.data = np.ascontiguousarray(np.swapaxes(d, 0, 1))
    elif kind == "S=2":
        buf.data = np.ascontiguousarray(np.concatenate([d, d], axis=5))
        heads = np.concatenate([heads, heads], axis=3)
    else:
        buf.data = np.ascontiguousarray(d[:, : d.shape[1] // 2])
        heads = heads[: d.shape[1] // 2]
    if heads is not buf.headers and rng.random() < 0.7:  # mostly the headers to match (else: a mismatch)
        buf.headers = heads
        kind += ", headers too"
    return f"data {kind}"


class Timeout(Exception):
    pass


def alarm(*_):
    raise Timeout()


def run_case(xml, acqs, props, engine):
    header = parse_header(xml.encode())
    lim = Limits()
    cfg, gs = load_settings(props, None, limits=lim)
    s = ReconSession(header, cfg, gs, engine, lim)
    out = []
    for a in acqs:
        out += s.handle(a)
    out += s.finish()
    for item in out:
        d = np.asarray(item.data) if hasattr(item, "data") else None
        if d is not None and d.dtype.kind in "fc" and not np.all(np.isfinite(d)):
            raise AssertionError("non-finite image")
    return s, out


def run_buffer_case(path, mutate, props, engine):
    from gadgetron_peer import recon_data_from_file

    header, rd = recon_data_from_file(path)
    muts = mutate(rd)
    lim = Limits()
    cfg, gs = load_settings(props, None, limits=lim)
    s = ReconSession(header, cfg, gs, engine, lim)
    out = s.handle(rd) + s.finish()
    for item in out:
        d = np.asarray(item.data) if hasattr(item, "data") else None
        if d is not None and d.dtype.kind in "fc" and not np.all(np.isfinite(d)):
            raise AssertionError("non-finite image")
    return s, out, muts


def unclean(message: str) -> bool:
    return any(p in message for p in UNCLEAN_PHRASES)


def main(n=200, seed=0, method="zero_filled", buffers=False) -> int:
    with tempfile.TemporaryDirectory(prefix="ddugm_fuzz_") as d:
        return _main(d, n, seed, method, buffers)


def _main(d, n, seed, method, buffers) -> int:
    files = []
    scans = [dict(frames=3, size=16, coils=2, accel=2, acs=4, noise=0.002, slices=2),
             dict(frames=3, size=16, coils=3, accel=2, acs=4, noise=0.002, real_time=True),
             dict(frames=3, size=16, coils=2, accel=2, acs=4, noise=0.002, partial_fourier=0.75, asymmetric_echo=0.8),
             # GRAPPA-style: the same lattice every frame, reference lines off it calibration-only (data: embedded)
             dict(frames=3, size=16, coils=2, accel=2, acs=5, noise=0.002, mask="equispaced")]
    if not buffers:  # a free-running scan binned by its ECG trigger times (plain acquisitions only)
        scans.append(dict(frames=4, size=16, coils=2, accel=2, acs=None, noise=0.002, ecg_beats=3))
    for k, kw in enumerate(scans):
        p = f"{d}/f{k}.h5"
        simulate(p, seed=k, **kw)
        files.append(load(p))
    props = {"method": method, "device": "cpu", "llr_iters": "3", "llr_cg_iters": "2", "coil_refine": "0"}
    ecg = {**props, "frame_axis": "ecg", "cardiac_phases": "4"}
    engine = Engine()
    bad = []
    signal.signal(signal.SIGALRM, alarm)
    if buffers:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # gadgetron_peer
    for case in range(n):
        rng = np.random.default_rng(seed * 100000 + case)
        xml, acqs = files[case % len(files)]
        muts = []
        if not buffers:
            acqs = [copy.deepcopy(a) for a in acqs]
            for _ in range(int(rng.integers(1, 4))):
                if rng.random() < 0.3:
                    xml, m = mutate_xml(xml, rng)
                else:
                    m = mutate_acq(acqs, rng)
                muts.append(m)
        t0 = time.time()
        signal.alarm(60)
        try:
            if buffers:
                def mutate(rd, rng=rng):
                    return [mutate_buffer(rd, rng) for _ in range(int(rng.integers(1, 4)))]
                s, out, muts = run_buffer_case(f"{d}/f{case % len(files)}.h5", mutate, props, engine)
            else:
                s, out = run_case(xml, acqs, ecg if "ecg_beats" in scans[case % len(files)] else props, engine)
            errs = s.errors
            res = f"{len(out)} out, {len(errs)} errors"
            for e in errs:
                tname = e.split(": ")[1] if ": " in e else "?"
                if tname not in CLEAN or unclean(e):
                    bad.append((case, muts, e))
                    res += " UNCLEAN " + e[:300]
        except Timeout:
            bad.append((case, muts, "TIMEOUT"))
            res = "TIMEOUT"
        except Exception as e:  # noqa: BLE001 - every other type is what the fuzzer looks for
            tname = type(e).__name__
            res = f"raised {tname}: {str(e)[:200]}"
            if tname not in CLEAN or unclean(str(e)):
                bad.append((case, muts, traceback.format_exc()[-1500:]))
        finally:
            signal.alarm(0)
        print(case, f"{time.time() - t0:.1f}s", muts, "->", res, flush=True)
    print("\nBAD:", len(bad))
    for b in bad:
        print(b[0], b[1])
        print(b[2])
        print("----")
    return 1 if bad else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(int(args[0]) if args else 200, int(args[1]) if len(args) > 1 else 0,
                  args[2] if len(args) > 2 else "zero_filled", len(args) > 3 and args[3] == "buffers"))
