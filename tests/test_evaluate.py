"""``ddugm evaluate``: simulation, metrics, report; deterministic; clear errors."""
import json
from pathlib import Path

import numpy as np
import pytest

from ddugm_core.evaluate import frame_metrics, make_truth, select_series, simulate_case
from ddugm_core.phantom import cine_phantom
from gadgets.cli import main

ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc_cine"


@pytest.fixture
def series_dir(tmp_path):
    d = tmp_path / "cines"
    d.mkdir()
    for i in range(2):  # magnitude int16 [T, Z, H, W] like ACDC, and a complex [T, H, W] stack
        mag = (np.abs(cine_phantom(6, (24, 20), seed=i)) * 1000).astype(np.int16)
        np.savez(d / f"patient{i:03d}.npz", cine=np.stack([mag, mag], axis=1))
    np.save(d / "complex.npy", cine_phantom(5, (24, 20), seed=5))
    return d


@pytest.fixture
def fast_yaml(tmp_path, tiny_weights):
    p = tmp_path / "fast.yaml"
    p.write_text(f"recon:\n  steps: 2\n  lowrank_iters: 3\n  ls_iters: 5\n  image_weights: {tiny_weights['image']}\n"
                 f"  kspace_weights: {tiny_weights['kspace']}\n  xt_weights: {tiny_weights['xt']}\n")
    return p


def test_select_series_split_and_slices(series_dir):
    everything = select_series(series_dir, split="all", slices="all")
    assert [n for n, _ in everything] == ["complex", "patient000_z0", "patient000_z1", "patient001_z0", "patient001_z1"]
    mid = select_series(series_dir, split="all", max_frames=4)
    assert [n for n, _ in mid] == ["complex", "patient000_z1", "patient001_z1"] and all(s.shape[0] == 4 for _, s in mid)
    assert len(select_series(series_dir, split="val")) == 1  # too few files for every 10th: the last one
    with pytest.raises(ValueError, match="slices"):
        select_series(series_dir, slices="top")


def test_truth_and_case(series_dir):
    (_, frames), = select_series(series_dir, split="all", max_series=1)
    truth = make_truth(frames, seed=1)
    assert np.iscomplexobj(truth) and np.allclose(truth, make_truth(frames, seed=1))
    mag = np.abs(cine_phantom(5, (24, 20), seed=3))
    t = make_truth(mag, seed=2)
    assert np.allclose(np.abs(t) * np.percentile(mag.mean(0), 99), mag, rtol=1e-4, atol=1e-6)
    assert np.ptp(np.angle(t[0][np.abs(t[0]) > 0.1])) > 0.1  # a phase was added
    real = make_truth(mag, seed=2, phase="none")  # --phase none: a real-valued object, the same magnitude
    assert np.isrealobj(real) or not np.any(real.imag)
    assert np.allclose(np.abs(real), np.abs(t), atol=1e-6)
    with pytest.raises(ValueError, match="unknown phase 'flat'; choose from random, none"):
        make_truth(mag, seed=2, phase="flat")
    case = simulate_case("x", t, 4, 3, 0.01, seed=0)
    assert case.kspace.shape == (3, 5, 24, 20) and case.mask.shape == (5, 24)
    assert abs(case.mask.size / case.mask.sum() - 4) < 0.5
    assert np.all(case.kspace[:, ~case.mask] == 0)


def test_frame_metrics_use_the_series_peak():
    ref = np.ones((2, 8, 8))
    ref[1] *= 0.5
    x = ref + 0.01
    m = frame_metrics(ref, x)
    assert np.allclose(m["psnr"], [40.0, 40.0])  # same error, same peak (the series' 1.0)
    assert len(m["ssim"]) == 2 and m["hfen"][0] >= 0


def test_evaluate_writes_a_deterministic_report(series_dir, fast_yaml, tmp_path):
    args = ["evaluate", "--data", str(series_dir), "--split", "all", "--max-series", "2", "--accels", "2,4",
            "--coils", "3", "--methods", "zero_filled,low_rank,l_plus_s,ddugm", "--config", str(fast_yaml),
            "--device", "cpu", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    ra = json.loads((tmp_path / "a" / "results.json").read_text())["results"]
    rb = json.loads((tmp_path / "b" / "results.json").read_text())["results"]
    assert len(ra) == 2 * 2 * 4
    for ea, eb in zip(ra, rb):
        assert (ea["series"], ea["accel"], ea["method"]) == (eb["series"], eb["accel"], eb["method"])
        assert np.allclose(ea["psnr"], eb["psnr"]) and np.allclose(ea["ssim"], eb["ssim"])
    by = {(e["series"], e["accel"], e["method"]): np.mean(e["psnr"]) for e in ra}
    for s in ("complex", "patient000_z1"):
        assert by[(s, 2.0, "l_plus_s")] > by[(s, 2.0, "zero_filled")]
    report = (tmp_path / "a" / "report.md").read_text()
    for text in ("| 4 | L+S | 2 |", "| 2 | DD-UGM (default) | 2 |", "figure.png", "smooth random phase", "noise std 0.005",
                 "low-rank solver subspace"):
        assert text in report
    assert (tmp_path / "a" / "figure.png").stat().st_size > 0


def test_evaluate_paper_preset_subset(series_dir, fast_yaml, tmp_path, monkeypatch):
    from ddugm_core import reconstruction

    # the paper preset's other settings, with 3 of its 1000 steps to stay fast
    monkeypatch.setitem(reconstruction.PRESETS, "paper", {**reconstruction.PRESETS["paper"], "steps": 3})
    d = tmp_path / "one"
    d.mkdir()
    np.save(d / "a.npy", np.abs(cine_phantom(2, 8, seed=1)))
    np.save(d / "b.npy", np.abs(cine_phantom(2, 8, seed=2)))
    out = tmp_path / "p"
    assert main(["evaluate", "--data", str(d), "--split", "all", "--accels", "2", "--coils", "1", "--paper-series", "1",
                 "--methods", "ddugm_paper", "--config", str(fast_yaml), "--device", "cpu", "--quiet",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [e["series"] for e in res["results"]] == ["a"]
    paper = res["settings"]["recon_paper"]
    assert paper["preset"] == "paper" and paper["steps"] is None and paper["init"] is None  # the preset's own schedule
    assert "first 1 series only" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra, message", [(["--methods", "magic"], "unknown method"),
                                            (["--accels", "x"], "--accels"),
                                            (["--data", "/nonexistent/folder"], "not found"),
                                            (["--coils", "0"], "--coils >= 1"),
                                            (["--accels", "4,nan"], "need finite accelerations >= 1 (got 4, nan)"),
                                            (["--accels", "inf"], "need finite accelerations >= 1 (got inf)"),
                                            (["--max-frames", "-1"], "got --max-frames -1"),
                                            (["--max-series", "-2"], "got --max-series -2"),
                                            (["--mask", "lattice", "--accels", "2.5"], "needs whole accelerations"),
                                            (["--mask", "equispaced", "--acs", "-1"], "--acs must be >= 0")])
def test_evaluate_errors_are_named(extra, message, tmp_path, capsys):
    assert main(["evaluate", "--out", str(tmp_path), "--quiet", "--split", "all"] + extra) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not ACDC.is_dir(), reason="ACDC data not available")
def test_acdc_validation_split_is_the_training_one():
    names = [n for n, _ in select_series(ACDC)]
    assert names[0].startswith("patient011") and len(names) == 9
    test = [n for n, _ in select_series(ACDC, split="test")]
    assert len(test) == 9 and not {n[:10] for n in test} & {n[:10] for n in names}


def test_tune_l_plus_s_prints_the_grid(series_dir, fast_yaml, capsys, monkeypatch):
    from ddugm_core import evaluate

    monkeypatch.setattr(evaluate, "LS_GRID", {"ls_lambda_l": (0.0, 0.05), "ls_lambda_s": (0.0, 0.05)})
    assert main(["evaluate", "--data", str(series_dir), "--split", "all", "--max-series", "1", "--accels", "3",
                 "--coils", "2", "--config", str(fast_yaml), "--device", "cpu", "--tune-l-plus-s", "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0] in ("0", "0.05")]
    assert len(rows) == 4
    best = max(rows, key=lambda r: float(r[2]))
    assert f"best: ls_lambda_l {best[0]}, ls_lambda_s {best[1]}" in out


def test_a_failing_case_loses_no_other(series_dir, fast_yaml, tmp_path, monkeypatch):
    from ddugm_core.reconstruction import Reconstructor

    np.save(series_dir / "empty.npy", np.zeros((4, 24, 20), np.float32))  # no signal: cannot be normalised
    real = Reconstructor.recon

    def flaky(self, kspace, *args, method=None, **kw):
        if method == "l_plus_s" and kspace.shape[1] == 5:  # the 5-frame series
            raise RuntimeError("simulated device failure")
        return real(self, kspace, *args, method=method, **kw)

    monkeypatch.setattr(Reconstructor, "recon", flaky)
    out = tmp_path / "f"
    rc = main(["evaluate", "--data", str(series_dir), "--split", "all", "--accels", "2", "--coils", "2",
               "--methods", "zero_filled,l_plus_s", "--config", str(fast_yaml), "--device", "cpu", "--quiet",
               "--out", str(out)])
    assert rc == 1
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is True
    assert {(f["series"], f["method"]) for f in res["failures"]} == {("empty", None), ("complex", "l_plus_s")}
    done = {(e["series"], e["method"]) for e in res["results"]}
    assert ("complex", "zero_filled") in done and ("patient000_z1", "l_plus_s") in done
    report = (out / "report.md").read_text()
    assert "simulated device failure" in report and "empty" in report
    # the failed case is left out for every method: both rows are over the same 2 series
    assert "| 2 | zero-filled | 2 |" in report and "| 2 | L+S | 2 |" in report


def test_trace_measures_the_noise_each_network_sees(series_dir, fast_yaml, tmp_path, capsys):
    dual = tmp_path / "dual.yaml"
    dual.write_text(fast_yaml.read_text() + "  preset: dual\n")
    args = ["evaluate", "--data", str(series_dir), "--split", "all", "--max-series", "1", "--accels", "3",
            "--coils", "2", "--config", str(dual), "--device", "cpu", "--trace", "--quiet", "--out", str(tmp_path)]
    assert main(args + ["--maps", "true"]) == 0
    rows = json.loads((tmp_path / "trace.json").read_text())["rows"]
    assert [r["step"] for r in rows] == [0, 1]  # the fast config's 2 steps
    assert rows[0]["sigma"] > rows[1]["sigma"] and all(r["image_rms"] > 0 and r["kspace_rms"] > 0 for r in rows)
    # the image input after the warm start: its error is that of the classical estimate, far below sigma_max 0.3
    assert rows[0]["image_rms"] < rows[0]["sigma"]
    assert "| 3 | 0 |" in capsys.readouterr().out and all(r["anchor_rms"] is None for r in rows)
    assert main(args) == 2  # estimated maps: another phase convention than the truth
    # the pnp sampler: image inputs only (no k-space network)
    args[args.index(str(dual))] = str(fast_yaml)
    assert main(args + ["--maps", "true"]) == 0
    rows = json.loads((tmp_path / "trace.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["kspace_rms"] is None and r["image_rms"] > 0 for r in rows)
    # and the error of the denoised frames that anchor the ADMM (the dual sampler has none)
    assert all(r["anchor_rms"] > 0 for r in rows) and rows[0]["anchor_rms"] != rows[0]["image_rms"]


# ---------------------------------------------------------------------- the user's own fully sampled raw data
def _raw(tmp_path, name="cine.h5", truth=True, **kw):
    from gadgets.simulate import simulate

    args = dict(frames=6, size=32, slices=1, coils=4, accel=1.0, acs=0, noise=0.002, seed=3)
    args.update(kw)
    path = tmp_path / name
    simulate(str(path), truth=str(tmp_path / (name + ".truth.npy")) if truth else None, **args)
    return path


def test_evaluate_on_fully_sampled_raw_data(tmp_path, fast_yaml):
    from ddugm_core.evaluate import raw_series
    from gadgets.rawcine import read_raw_cines

    raw = _raw(tmp_path, slices=2)
    items = read_raw_cines(raw)
    assert [n for n, *_ in items] == ["cine_slice0", "cine_slice1"]
    assert [n for n, *_ in read_raw_cines(raw, slices="mid")] == ["cine_slice1"]
    k, sampled = items[0][1], items[0][2]
    assert k.shape == (4, 6, 32, 32) and sampled.all()  # oversampling removed, every line of every frame
    # the truth: the coil combination of all the data, as the simulation's own ground truth (up to scale)
    series = raw_series(items)
    truth = np.abs(np.load(tmp_path / "cine.h5.truth.npy")[0])
    ours = np.abs(series[0].truth)
    assert np.corrcoef(truth.ravel(), ours.ravel())[0, 1] > 0.99

    out = tmp_path / "raw_eval"
    assert main(["evaluate", "--data", str(raw), "--slices", "all", "--accels", "3", "--methods", "zero_filled,llr_ttv",
                 "--config", str(fast_yaml), "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["source"] == "raw" and res["settings"]["evaluate"]["split"] == "all"
    assert res["settings"]["evaluate"]["noise"] == 0.0 and res["settings"]["evaluate"]["coils"] is None
    by = {(e["series"], e["method"]): e for e in res["results"]}
    assert len(by) == 4
    for s in ("cine_slice0", "cine_slice1"):
        assert np.mean(by[(s, "llr_ttv")]["psnr"]) > np.mean(by[(s, "zero_filled")]["psnr"]) + 3
        assert 2.5 < by[(s, "llr_ttv")]["measured_accel"] < 3.5
    report = (out / "report.md").read_text()
    assert "fully sampled raw data" in report and "simulated coil" not in report


def test_raw_real_time_series_is_read_as_frames(tmp_path):
    """A real-time series (frames as repetitions) is one cine of all its repetitions, the same
    k-space as the same data labelled as cardiac phases."""
    from gadgets.rawcine import read_raw_cines

    (n1, k1, s1, _), = read_raw_cines(_raw(tmp_path, "rt.h5", real_time=True, noise=0))
    (n2, k2, s2, _), = read_raw_cines(_raw(tmp_path, "cine.h5", noise=0))
    assert (n1, n2) == ("rt_slice0", "cine_slice0") and k1.shape == (4, 6, 32, 32) and s1.all() and s2.all()
    np.testing.assert_array_equal(k1, k2)


def test_raw_partial_fourier_stays_as_acquired(tmp_path):
    from ddugm_core.evaluate import raw_case, raw_series
    from gadgets.rawcine import read_raw_cines

    raw = _raw(tmp_path, partial_fourier=0.75, asymmetric_echo=0.8)
    (name, k, sampled, _), = read_raw_cines(raw)
    lines = sampled.any(axis=1)
    assert 0.7 < lines.mean() < 0.8 and not sampled.all(axis=0).all()  # lines and readout points missing
    case = raw_case(raw_series([(name, k, sampled)])[0], 2.0, 0.0, seed=0)
    assert not case.mask[:, ~lines].any() and not (case.mask & ~sampled[None]).any()
    assert (case.mask[:, 16] == sampled[16]).all()  # the centre line (as acquired) in every frame
    assert not np.abs(case.kspace[:, ~case.mask]).any()
    assert 1.3 < case.measured_accel < 3.0  # against what the scan acquired


def test_raw_reference_with_a_corrupted_line_names_it(tmp_path):
    """A fully sampled file with a corrupted sample: the session leaves its line out, and the
    reference was then refused as "not fully sampled", as if the scan had been accelerated."""
    import ismrmrd

    from gadgets.rawcine import read_raw_cines

    src = ismrmrd.Dataset(str(_raw(tmp_path, truth=False)), "dataset", create_if_needed=False)
    dst = ismrmrd.Dataset(str(tmp_path / "bad.h5"), "dataset", create_if_needed=True)
    dst.write_xml_header(src.read_xml_header())
    for j in range(src.number_of_acquisitions()):
        acq = src.read_acquisition(j)
        if j == 40:
            acq.data[1, 7] = np.nan
        dst.append_acquisition(acq)
    src.close()
    dst.close()
    with pytest.raises(ValueError, match=r"not fully sampled after leaving out corrupted lines \(frame \d+ lacks 1 of "
                                         r"the 32 .*1 k-space line\(s\) left out, 1 with NaN or inf"):
        read_raw_cines(tmp_path / "bad.h5")


@pytest.mark.parametrize("kind, extra, message", [
    ("undersampled", [], "not fully sampled"),
    ("full", ["--coils", "8"], "bring their own"),
    ("full", ["--split", "test"], "evaluated whole"),
    ("full", ["--maps", "true"], "no true coil maps"),
    ("full", ["--phase", "none"], "raw data bring their own"),
])
def test_raw_evaluate_errors_are_named(tmp_path, capsys, kind, extra, message):
    raw = _raw(tmp_path, accel=3.0, acs=8) if kind == "undersampled" else _raw(tmp_path)
    assert main(["evaluate", "--data", str(raw), "--accels", "4", "--methods", "zero_filled", "--quiet",
                 "--out", str(tmp_path / "o")] + extra) == 2
    assert message in capsys.readouterr().err


def test_the_library_alone_points_raw_data_to_the_ddugm_command(tmp_path, capsys):
    from ddugm_core.cli import main as core_main

    raw = _raw(tmp_path)
    assert core_main(["evaluate", "--data", str(raw), "--methods", "zero_filled", "--quiet",
                      "--out", str(tmp_path / "o")]) == 2
    assert "`ddugm` command" in capsys.readouterr().err


def test_a_folder_of_raw_files(tmp_path):
    from ddugm_core.evaluate import is_raw_source
    from gadgets.rawcine import read_raw_cines

    d = tmp_path / "scans"
    d.mkdir()
    _raw(d, "b.h5", truth=False, frames=3, size=16, coils=2)
    _raw(d, "a.mrd", truth=False, frames=3, size=16, coils=2)
    (d / "notes.txt").write_text("not a scan")
    assert is_raw_source(d) and is_raw_source(d / "a.mrd") and not is_raw_source(d / "notes.txt")
    assert [n for n, *_ in read_raw_cines(d)] == ["a_slice0", "b_slice0"]
    with pytest.raises(FileNotFoundError, match="no ISMRMRD raw files"):
        read_raw_cines(tmp_path)
    np.save(d / "stack.npy", np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="both ISMRMRD raw files"):
        is_raw_source(d)


def test_train_on_fully_sampled_raw_data(tmp_path, capsys):
    """`ddugm train --data RAW` trains the priors on the scans' own coil-combined complex images:
    one stack per scan (so the split keeps scans whole), kept in OUT/raw_images, the real phase
    kept (turned so each slice sums to a real number) and matching the simulation's truth. Raw
    data the library alone cannot read, and undersampled scans, are named."""
    from ddugm_core.cli import main as core_main

    d = tmp_path / "scans"
    d.mkdir()
    for i in range(3):
        _raw(d, f"scan{i}.h5", truth=False, frames=4, slices=2, coils=3, seed=i)
    _raw(tmp_path, "truth0.h5", frames=4, slices=2, coils=3, seed=0)  # the same scan as scan0, with its truth
    out = tmp_path / "prior"
    tiny = ["--steps", "2", "--batch", "2", "--size", "16", "--nf", "8", "--ch-mult", "1,2", "--attn", "",
            "--log-every", "1", "--quiet", "--threads", "1"]
    (out / "raw_images" / "data").mkdir(parents=True)
    np.savez(out / "raw_images" / "data" / "stale.npz", cine=np.zeros((2, 8, 8), np.float32))
    assert main(["train", "--domain", "image", "--data", str(d), "--out", str(out), *tiny]) == 0
    folder = out / "raw_images" / "data"
    assert sorted(p.name for p in folder.iterdir()) == ["scan0.npz", "scan1.npz", "scan2.npz", "sources.json"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["data"] == str(folder) and settings["val_files"] == ["scan2.npz"]
    assert settings["train_files"] == ["scan0.npz", "scan1.npz"] and settings["train_frames"] == 16
    assert (out / "image.safetensors").is_file()
    x = np.load(folder / "scan0.npz")["cine"]
    truth = np.load(tmp_path / "truth0.h5.truth.npy")  # [slice, T, ny, nx], complex
    assert x.shape == (4, 2, 32, 32) and x.dtype == np.complex64
    for z in range(2):
        ours = x[:, z]
        assert abs(np.angle(ours.sum())) < 1e-4 and np.abs(ours.imag).mean() > 0.1 * np.abs(ours).mean()
        match = abs(np.vdot(ours, truth[z])) / np.linalg.norm(ours) / np.linalg.norm(truth[z])
        assert match > 0.99  # magnitude and phase, up to one complex number
    capsys.readouterr()
    assert core_main(["train", "--domain", "image", "--data", str(d), "--out", str(tmp_path / "o"), *tiny]) == 2
    assert "`ddugm` command" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "pack"), "--data", str(d)]) == 2
    assert "pack that folder" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    _raw(bad, "under.h5", truth=False, accel=3.0, acs=8)
    assert main(["train", "--domain", "image", "--data", str(bad), "--out", str(tmp_path / "o2"), *tiny]) == 2
    assert "not fully sampled" in capsys.readouterr().err


def test_raw_training_stacks_are_reused_until_the_scans_change(tmp_path, monkeypatch):
    """A resumed or repeated `train --data RAW` reuses the stacks of unchanged scans (it converted
    every scan again); a changed, added or removed scan converts them all again; two scans of one
    name keep apart."""
    import os

    from gadgets import rawcine

    d = tmp_path / "scans"
    d.mkdir()
    for i in range(2):
        _raw(d, f"scan{i}.h5", truth=False, frames=3, size=16, coils=2, seed=i)
    out = tmp_path / "stacks"
    first = rawcine.raw_training_stacks(d, out)
    assert not first["reused"] and first["files"] == 2 and (out / "sources.json").is_file()
    before = np.load(out / "scan0.npz")["cine"]
    calls = []
    real = rawcine.read_raw_cines
    monkeypatch.setattr(rawcine, "read_raw_cines", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    again = rawcine.raw_training_stacks(d, out)
    assert again["reused"] and again["files"] == 2 and calls == []
    st = (d / "scan1.h5").stat()
    os.utime(d / "scan1.h5", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the scan was written again
    assert not rawcine.raw_training_stacks(d, out)["reused"] and len(calls) == 2
    np.testing.assert_array_equal(np.load(out / "scan0.npz")["cine"], before)  # deterministic
    (d / "scan0.h5").rename(d / "scan1.mrd")  # scan1.h5 and scan1.mrd: both kept
    info = rawcine.raw_training_stacks(d, out)
    assert not info["reused"] and sorted(p.name for p in out.glob("*.npz")) == ["scan1.h5.npz", "scan1.mrd.npz"]
    (out / "scan1.mrd.npz").unlink()  # a stack gone: converted again
    assert not rawcine.raw_training_stacks(d, out)["reused"] and (out / "scan1.mrd.npz").is_file()


def test_raw_mid_slice_buffers_only_that_slice(tmp_path, monkeypatch):
    """``--slices mid`` keeps the k-space of the middle slice only (a many-slice scan costs the
    memory of one), and gives the same data as reading every slice and picking it."""
    from gadgets import rawcine

    raw = _raw(tmp_path, truth=False, frames=3, size=16, coils=2, slices=4)
    everything = rawcine.read_raw_cines(raw)
    assert [n for n, *_ in everything] == [f"cine_slice{z}" for z in range(4)]
    kept = []
    real = rawcine._Collecting._reconstruct
    monkeypatch.setattr(rawcine._Collecting, "_reconstruct", lambda self, cine, natural: kept.append(cine.key["slice"])
                        or real(self, cine, natural))
    (name, k, sampled, _), = rawcine.read_raw_cines(raw, slices="mid")
    assert name == "cine_slice2" and kept == [2]  # the middle of slices 0..3, as before: the upper one
    assert np.array_equal(k, everything[2][1]) and np.array_equal(sampled, everything[2][2])


def test_free_running_acquisitions_read_both_ways(tmp_path, capsys):
    """`ddugm evaluate --free-running B`: each cine simulated as a free-running scan and
    reconstructed through the gadgets, binned by its ECG trigger times and as real-time frames,
    each against its own truth. Fully sampled frames without noise match it closely, which only
    an aligned truth allows (a phase off costs some 20 dB); wrong uses are named."""
    from ddugm_core.cli import main as core_main
    from ddugm_core.phantom import cine_phantom

    d = tmp_path / "stacks"
    d.mkdir()
    np.save(d / "heart.npy", np.abs(cine_phantom(8, 32, seed=1, breathing=False, phase=False)).astype(np.float32))
    out = tmp_path / "fr"
    args = ["evaluate", "--free-running", "2", "--data", str(d), "--split", "all", "--accels", "1",
            "--methods", "zero_filled", "--coils", "4", "--noise", "0", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    by = {e["method"]: e for e in res["results"]}
    assert set(by) == {"zero_filled@ecg", "zero_filled@repetition"} and not res["failures"]
    assert by["zero_filled@ecg"]["frames"] == 8 and by["zero_filled@repetition"]["frames"] == 20
    assert min(by["zero_filled@ecg"]["psnr"]) > 45 and min(by["zero_filled@repetition"]["psnr"]) > 50
    report = (out / "report.md").read_text()
    assert "zero-filled, ecg" in report and "zero-filled, repetition" in report
    capsys.readouterr()
    for extra, message in ((["--frame-axes", "phase"], "unknown method(s) or frame axes"),
                           (["--maps", "true"], "estimate their own coil maps"),
                           (["--max-frames", "4"], "cuts the cardiac cycle"),
                           (["--noise-known", "no"], "simulated with its noise scan")):
        assert main(args + extra) == 2
        assert message in capsys.readouterr().err
    raw = _raw(tmp_path, truth=False)
    assert main(args[:3] + ["--data", str(raw), "--out", str(tmp_path / "o")]) == 2
    assert "image stacks" in capsys.readouterr().err
    assert core_main(args) == 2
    assert "`ddugm` command" in capsys.readouterr().err


def test_the_noise_can_be_withheld_from_the_methods(series_dir, tmp_path, monkeypatch):
    """`--noise-known no`: the methods are not told the simulated noise (as behind a Gadgetron
    chain that whitens upstream), so noise_estimate estimates it (8 coils); the report says so.
    With the default they are told it."""
    from ddugm_core import reconstruction

    seen = []
    real = reconstruction.Reconstructor.recon

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        seen.append((kwargs.get("noise_std"), self.noise_source))
        return out

    monkeypatch.setattr(reconstruction.Reconstructor, "recon", spy)
    args = ["evaluate", "--data", str(series_dir), "--split", "all", "--max-series", "1", "--accels", "4",
            "--coils", "8", "--noise", "0.05", "--methods", "llr_ttv", "--device", "cpu", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "told")]) == 0
    assert seen == [(0.05, "told")]
    seen.clear()
    assert main(args + ["--noise-known", "no", "--out", str(tmp_path / "withheld")]) == 0
    assert seen == [(None, "estimated")]
    assert "not told to the methods" in (tmp_path / "withheld" / "report.md").read_text()
    assert "not told to the methods" not in (tmp_path / "told" / "report.md").read_text()


def test_evaluate_masks_of_clinical_and_k_t_acquisitions(series_dir, fast_yaml, tmp_path):
    """`--mask equispaced`: every R-th line the same in every frame, with --acs calibration lines
    (clinical cine with GRAPPA); `--mask lattice`: shifted by one line per frame. The table gives
    the net acceleration where it differs from R."""
    from ddugm_core.evaluate import case_mask

    eq = case_mask("equispaced", 4, 24, 3, seed=0, acs=4)
    assert (eq == eq[0]).all() and eq[0, 12] and eq[0, 10:14].all() and eq[0].sum() == 8 + 3
    assert case_mask("equispaced", 2, 32, 4, seed=0)[0, 14:18].all()  # default: an eighth of the lines
    lat = case_mask("lattice", 3, 24, 3, seed=0)
    assert (lat.sum(axis=0) == 1).all() and not (lat[0] & lat[1]).any()
    out = tmp_path / "eq"
    assert main(["evaluate", "--data", str(series_dir), "--split", "all", "--max-series", "1", "--accels", "3",
                 "--coils", "3", "--methods", "zero_filled,llr_ttv", "--mask", "equispaced", "--acs", "4",
                 "--config", str(fast_yaml), "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert all(abs(e["measured_accel"] - 24 / 11) < 1e-6 for e in res)  # 24 lines over 11
    report = (out / "report.md").read_text()
    assert "| 3 (net 2.18) | LLR + temporal TV | 1 |" in report and "the same in every frame" in report
    by = {e["method"]: np.mean(e["psnr"]) for e in res}
    assert by["llr_ttv"] > by["zero_filled"] + 1
    assert main(["evaluate", "--data", str(series_dir), "--split", "all", "--max-series", "1", "--accels", "3",
                 "--coils", "3", "--methods", "zero_filled", "--mask", "equispaced", "--phase", "none",
                 "--device", "cpu", "--quiet", "--out", str(tmp_path / "none")]) == 0
    assert "stay real-valued (`--phase none`)" in (tmp_path / "none" / "report.md").read_text()


def test_free_running_refuses_a_mask(tmp_path, capsys):
    assert main(["evaluate", "--free-running", "2", "--mask", "lattice", "--split", "all", "--out", str(tmp_path),
                 "--quiet"]) == 2
    assert "--mask and --acs choose the lines" in capsys.readouterr().err
    assert main(["evaluate", "--free-running", "2", "--phase", "none", "--split", "all", "--out", str(tmp_path),
                 "--quiet"]) == 2
    assert "a free-running scan is simulated by ddugm simulate, with its own phase" in capsys.readouterr().err
