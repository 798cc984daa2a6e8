"""Offline replay and simulation from the command line, on our own simulated cine, on real
Siemens raw data (../shared, skipped when absent) and on Shepp-Logan files written by
Debian's ismrmrd-tools (skipped when the tool is absent)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from gadgets.replay import open_dataset, replay

SIEMENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "siemens_grappa_r3.h5"
SHEPP = shutil.which("ismrmrd_generate_cartesian_shepp_logan")


def ddugm(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "gadgets.cli", *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def read_images(path, group="image_1"):
    ds = open_dataset(str(path))
    imgs = [ds.read_image(group, i) for i in range(ds.number_of_images(group))]
    ds.close()
    return imgs


def test_simulate_then_recon_from_the_command_line(tmp_path):
    raw, out, png = tmp_path / "cine.h5", tmp_path / "img.h5", tmp_path / "png"
    r = ddugm("simulate", raw, "--frames", 5, "--size", 32, "--coils", 3, "--accel", 3, "--acs", 8)
    assert '"acceleration"' in r.stdout
    hdr = ismrmrd.xsd.CreateFromDocument(open_dataset(raw).read_xml_header())
    enc = hdr.encoding[0]
    assert (enc.encodedSpace.matrixSize.x, enc.reconSpace.matrixSize.x) == (64, 32)  # 2x readout oversampling
    assert enc.encodingLimits.phase.maximum == 4 and hdr.acquisitionSystemInformation.receiverChannels == 3
    assert str(enc.trajectory.value) == "cartesian" and enc.parallelImaging.accelerationFactor.kspace_encoding_step_1 == 3
    ds = open_dataset(raw)
    first = ds.read_acquisition(0)
    assert first.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    assert any(ds.read_acquisition(i).is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
               for i in range(1, ds.number_of_acquisitions()))
    ds.close()
    r = ddugm("recon", raw, out, "--method", "low_rank", "--png", png, "--quiet")
    imgs = read_images(out)
    assert len(imgs) == 5 and imgs[0].data.shape == (1, 1, 32, 32)
    assert [i.getHead().image_index for i in imgs] == [1, 2, 3, 4, 5] and imgs[4].getHead().phase == 4
    assert ismrmrd.Meta.deserialize(imgs[0].attribute_string)["DDUGM_Method"] == "low_rank"
    assert len(list(png.glob("*.png"))) == 1


def test_recon_errors_are_clear(tmp_path):
    r = ddugm("recon", tmp_path / "missing.h5", tmp_path / "o.h5", check=False)
    assert r.returncode == 2 and "not found" in r.stderr
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    r = ddugm("recon", bad, tmp_path / "o.h5", check=False)
    assert r.returncode == 2 and "not an ISMRMRD raw file" in r.stderr
    r = ddugm("recon", bad, tmp_path / "o.h5", "--preset", "fast", check=False)
    assert r.returncode == 2 and "preset must be one of" in r.stderr


@pytest.mark.skipif(not SIEMENS.is_file(), reason="../shared/data/siemens_grappa_r3.h5 not present")
@pytest.mark.parametrize("calibration_lines, lines", [("auto", 68), ("reference", 36)])
def test_real_siemens_raw_file(tmp_path, calibration_lines, lines):
    """Its 32 calibration-only lines are data too where the header says the reference is embedded
    (calibration_lines auto: 68 lines), or coil-map reference only (36 lines: every 3rd plus the
    embedded ACS lines flagged calibration and imaging)."""
    out = tmp_path / "siemens.h5"
    summary = replay(str(SIEMENS), str(out), overrides={"device": "cpu", "debug_dir": str(tmp_path / "dbg"),
                                                         "calibration_lines": calibration_lines}, quiet=True)
    assert summary["images"] == 1 and not summary["errors"]
    (img,) = read_images(out)
    h = img.getHead()
    assert tuple(h.matrix_size) == (192, 144, 1)  # readout oversampling removed: 384 -> 192
    assert tuple(h.field_of_view)[:2] == (280.0, 210.0)
    x = np.abs(img.data[0, 0])
    assert np.isfinite(x).all() and x.max() > 0
    dbg = np.load(next((tmp_path / "dbg").glob("*.npz")))
    rows = dbg["mask"][0].any(axis=1)
    # centred: encoding line 54 sits at row 72
    assert rows.sum() == lines and rows[72] and dbg["kspace"].shape == (14, 1, 144, 192)
    # a reference: the root-sum-of-squares of the 48 fully sampled calibration lines. At that
    # resolution the reconstruction must agree with it (independent of it with the R = 3 lines alone).
    assert dbg["ref_mask"].any(axis=1).sum() == 48
    band = slice(48, 96)

    def centred_ifft2(k):
        return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1))), axes=(-2, -1))

    low = np.zeros_like(dbg["ref"])
    low[:, band] = dbg["ref"][:, band]
    ref = np.sqrt((np.abs(centred_ifft2(low)) ** 2).sum(0))
    kx = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(dbg["images"][0])))
    lowx = np.zeros_like(kx)
    lowx[band] = kx[band]
    assert np.corrcoef(np.abs(centred_ifft2(lowx)).ravel(), ref.ravel())[0, 1] > 0.99


@pytest.mark.skipif(not SIEMENS.is_file(), reason="../shared/data/siemens_grappa_r3.h5 not present")
def test_real_siemens_raw_file_with_coil_compression(tmp_path, caplog):
    """14 receive channels compressed to 8 virtual coils, to those that keep 95 % of the signal
    energy, and by default to those that keep 99.9 %: nearly the same image each time, and the
    log says how many coils were kept and how much of the energy."""
    images = {}
    for name, over in (("all", {"virtual_coils_energy": 0}), ("vc8", {"virtual_coils": 8, "virtual_coils_energy": 0}),
                       ("e95", {"virtual_coils_energy": 0.95}), ("default", {})):
        out = tmp_path / f"{name}.h5"
        caplog.clear()
        with caplog.at_level("INFO", logger="ddugm.gadget"):
            summary = replay(str(SIEMENS), str(out), overrides={"device": "cpu", **over}, quiet=True)
        assert summary["images"] == 1 and not summary["errors"]
        images[name] = np.abs(read_images(out)[0].data[0, 0]).astype(np.float64)
        logged = re.search(r"14 coils compressed to (\d+) virtual coils, ([\d.]+) %", caplog.text)
        assert (logged is None) == (name == "all")
        if name == "vc8":
            assert logged.group(1) == "8"
        elif name == "e95":  # the fewest coils that keep 95 % of this file's energy
            assert 3 <= int(logged.group(1)) < 14 and float(logged.group(2)) >= 95
        elif name == "default":  # keeps 99.9 % of it
            assert 8 <= int(logged.group(1)) < 14 and float(logged.group(2)) >= 99.9
    for name in ("vc8", "e95", "default"):
        assert np.corrcoef(images["all"].ravel(), images[name].ravel())[0, 1] > 0.99


def _shepp(tmp_path, name, *args):
    path = tmp_path / name
    subprocess.run([SHEPP, "-o", str(path), *map(str, args)], check=True, capture_output=True)
    with h5py.File(path, "r") as f:
        ph = np.array(f["dataset/phantom"])
        csm = np.array(f["dataset/csm"])
    ph = np.abs(ph["real"] + 1j * ph["imag"])[0]
    shade = np.sqrt((np.abs(csm["real"] + 1j * csm["imag"])[0] ** 2).sum(0))
    return path, ph * shade  # what a coil-combined reconstruction with normalised maps shows


def _nrmse(x, ref):
    scale = (x * ref).sum() / (x * x).sum()
    return np.linalg.norm(scale * x - ref) / np.linalg.norm(ref)


@pytest.mark.skipif(SHEPP is None, reason="Debian's ismrmrd-tools not installed")
def test_shepp_logan_fully_sampled_is_exact(tmp_path):
    raw, ref = _shepp(tmp_path, "full.h5", "-m", 64, "-c", 4, "-r", 1, "-a", 1, "-n", 0)
    replay(str(raw), str(tmp_path / "o.h5"), overrides={"method": "zero_filled", "device": "cpu"}, quiet=True)
    (img,) = read_images(tmp_path / "o.h5")
    assert _nrmse(np.abs(img.data[0, 0]), ref) < 0.01  # geometry, oversampling removal and coil combination exact


@pytest.mark.skipif(SHEPP is None, reason="Debian's ismrmrd-tools not installed")
def test_shepp_logan_undersampled_with_noise_calibration(tmp_path):
    raw, ref = _shepp(tmp_path, "acc.h5", "-m", 64, "-c", 8, "-r", 2, "-a", 2, "-w", 16, "-n", 0.01, "-C")
    errors = {}
    for axis in ("phase", "auto"):  # each repetition on its own / the repetitions as the frames of one series
        summary = replay(str(raw), str(tmp_path / f"{axis}.h5"), overrides={"device": "cpu", "frame_axis": axis},
                         quiet=True)
        imgs = read_images(tmp_path / f"{axis}.h5")
        assert len(imgs) == 4 and summary["slices"] == (4 if axis == "phase" else 1)
        assert [(i.getHead().repetition, i.getHead().phase) for i in imgs] == [(r, 0) for r in range(4)]
        errors[axis] = [_nrmse(np.abs(im.data[0, 0]), ref) for im in imgs]
        assert max(errors[axis]) < 0.2, (axis, errors[axis])
    # the header announces 1 phase and 4 repetitions, whose lines interleave: together they sample
    # all of k-space, so the series is reconstructed better than each repetition alone
    assert max(errors["auto"]) < min(errors["phase"]), errors


def test_block_reader_gives_what_ismrmrd_reads(tmp_path):
    """The replay reads the acquisition table a block at a time: the same headers, data and
    trajectories as ismrmrd's own one-at-a-time reader, for any block size."""
    from gadgets.replay import iter_acquisitions
    from gadgets.simulate import simulate

    raw = tmp_path / "cine.h5"
    simulate(str(raw), frames=3, size=16, coils=3, accel=2, acs=4, noise=0.002, slices=2, seed=2)
    traj = tmp_path / "traj.h5"  # acquisitions with a trajectory and different channel counts
    ds = ismrmrd.Dataset(str(traj), "dataset", create_if_needed=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        acq = ismrmrd.Acquisition.from_array(
            (rng.standard_normal((2 + i % 2, 8)) + 1j * rng.standard_normal((2 + i % 2, 8))).astype(np.complex64),
            rng.standard_normal((8, 2)).astype(np.float32))
        acq.idx.kspace_encode_step_1 = i
        ds.append_acquisition(acq)
    ds.close()
    for path in (raw, traj):
        ds = open_dataset(path)
        n = ds.number_of_acquisitions()
        ref = [ds.read_acquisition(i) for i in range(n)]
        for block in (1, 7, 1000):
            got = list(iter_acquisitions(ds, n, block))
            assert len(got) == n
            for a, b in zip(got, ref):
                assert bytes(a.getHead()) == bytes(b.getHead())
                assert np.array_equal(a.data, b.data) and np.array_equal(a.traj, b.traj)
        ds.close()
    assert ref[1].traj.shape == (8, 2) and ref[1].data.shape == (3, 8)


@pytest.mark.parametrize("kw, message", [({"noise": -1.0}, "noise must be >= 0"), ({"accel": 0.5}, "accel must be >= 1"),
                                         ({"partial_fourier": 0.2}, "partial_fourier and asymmetric_echo"),
                                         ({"size": 8}, "size >= 16"),
                                         ({"accel": 4, "acs": 4}, r"acs \(4\) takes all of the 4 lines a frame gets"),
                                         ({"acs": -3}, "acs must be 0 to the 16 phase-encoding lines, got -3")])
def test_simulate_refuses_bad_settings_by_name(tmp_path, kw, message):
    from gadgets.simulate import simulate

    args = dict(frames=2, size=16, coils=2, accel=2, acs=4, noise=0.002, slices=1, seed=1)
    with pytest.raises(ValueError, match=message):
        simulate(str(tmp_path / "x.h5"), **{**args, **kw})
    assert not (tmp_path / "x.h5").exists()


def test_simulate_default_acs_fits_small_matrices(tmp_path):
    """The command line's default ACS band (12 lines) is halved to what a frame gets at small
    matrices, where 12 would take every line (refused above)."""
    r = ddugm("simulate", tmp_path / "s.h5", "--size", 37, "--frames", 2, "--coils", 2)
    assert '"imaging_lines": 18' in r.stdout  # 9 lines a frame at R = 4
    ds = open_dataset(tmp_path / "s.h5")
    acs = {ds.read_acquisition(i).idx.kspace_encode_step_1 for i in range(1, ds.number_of_acquisitions())
           if ds.read_acquisition(i).is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)}
    ds.close()
    assert len(acs) == 4


def test_simulate_never_overwrites_its_images(tmp_path):
    from gadgets.simulate import simulate

    imgs = tmp_path / "cine.npy"
    np.save(imgs, np.random.default_rng(0).random((3, 16, 16)).astype(np.float32))
    before = imgs.read_bytes()
    with pytest.raises(ValueError, match="would replace the --images file"):
        simulate(str(imgs), images=str(imgs), size=16, coils=2, accel=2, acs=4, noise=0.002, slices=1, seed=1)
    assert imgs.read_bytes() == before


@pytest.mark.parametrize("size", [32, 33])
def test_simulated_odd_matrix_lines_up_with_its_truth(tmp_path, size):
    """With readout oversampling an odd matrix (33) was placed one pixel off the grid centre by
    the simulator (the reconstruction keeps pixel n // 2 at the centre), so the truth and the
    image disagreed by a pixel (25 dB where an even matrix gave 36). Fully sampled, noise-free:
    the zero-filled image must match the truth."""
    from gadgets.simulate import simulate

    raw, truth, out = tmp_path / "r.h5", tmp_path / "t.npy", tmp_path / "o.h5"
    simulate(str(raw), frames=2, size=size, coils=2, accel=1, acs=0, noise=0.0, slices=1, seed=1, truth=str(truth))
    ddugm("recon", raw, out, "--method", "zero_filled", "--output-type", "complex", "--quiet")
    x = np.abs(np.stack([np.squeeze(i.data) for i in read_images(out)]))
    t = np.abs(np.load(truth)[0])
    assert x.shape == t.shape == (2, size, size)
    x *= (x * t).sum() / (x * x).sum()
    assert np.linalg.norm(x - t) < 0.05 * np.linalg.norm(t)


def test_simulated_noisy_cine_is_reconstructable_to_its_truth(tmp_path):
    """The simulated coils' coupling mixed the noise but not the signal, so the prewhitened
    image carried a smooth +-8 % shading against the truth (a fully sampled zero-filled image
    36 dB from its truth where the noise allows 55). Coupled alike and whitened with the noise
    scan, the image matches its truth within the noise."""
    from gadgets.simulate import simulate

    raw, truth, out = tmp_path / "r.h5", tmp_path / "t.npy", tmp_path / "o.h5"
    simulate(str(raw), frames=2, size=32, coils=6, accel=1, acs=0, noise=0.002, slices=1, seed=1, truth=str(truth))
    ddugm("recon", raw, out, "--method", "zero_filled", "--quiet")
    x = np.abs(np.stack([np.squeeze(i.data) for i in read_images(out)])).astype(np.float64)
    t = np.abs(np.load(truth)[0])
    x *= (x * t).sum() / (x * x).sum()
    assert np.linalg.norm(x - t) < 0.02 * np.linalg.norm(t)
