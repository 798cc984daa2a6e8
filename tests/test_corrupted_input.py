"""Corrupted input found by mutation fuzzing of the acquisition path (random header fields, byte
flips on the wire): each case used to end in an error that blamed the wrong thing, a lost
slice, or a silent wrong image. Each test fails on the code before."""
import copy
import re
from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from gadgets.geometry import geometry_from_header
from gadgets.kspace import NoiseWhitener
from gadgets.protocol import parse_header
from gadgets.replay import open_dataset
from gadgets.session import ReconSession
from gadgets.settings import load_settings
from gadgets.simulate import simulate

ZF = {"method": "zero_filled", "device": "cpu"}
SIEMENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "siemens_grappa_r3.h5"


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("corrupt") / "cine.h5"
    simulate(str(path), frames=4, size=32, coils=3, accel=2, acs=6, noise=0.002, slices=1, seed=3)
    ds = open_dataset(str(path))
    xml = ds.read_xml_header()
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    return (xml.decode() if isinstance(xml, bytes) else xml), acqs


def _run(xml, acqs, settings=ZF):
    s = ReconSession(parse_header(xml.encode()), *load_settings(dict(settings)))
    out = []
    for a in acqs:
        out += s.handle(a)
    out += s.finish()
    return out, s


def _imaging(acqs):
    return [i for i, a in enumerate(acqs) if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]


@pytest.mark.parametrize("old, new, message", [
    ("<x>64</x>", "<x>abc</x>", "encodedSpace matrixSize x is 'abc', not an integer"),
    ("<maximum>31</maximum>", "<maximum>nan</maximum>", "encodingLimits kspace_encoding_step_1 maximum is 'nan'"),
    ("<center>16</center>", "<center>1e-30</center>", "kspace_encoding_step_1 center is '1e-30', not an integer"),
    ("<maximum>3</maximum>", "<maximum>-inf</maximum>", "encodingLimits phase maximum is '-inf'"),
    ("<receiverChannels>3</receiverChannels>", "<receiverChannels>many</receiverChannels>",
     "receiverChannels is 'many'"),
])
def test_header_numbers_that_are_not_numbers_are_named(scan, old, new, message):
    """The schema parser keeps text it cannot convert; the geometry then failed with a bare
    "invalid literal for int() with base 10: 'abc'" that named no field."""
    xml, _ = scan
    assert old in xml
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        geometry_from_header(parse_header(xml.replace(old, new, 1).encode()))


def test_header_float_fields_that_are_not_numbers_count_as_not_given(scan, caplog):
    """A field of view of text is treated like a missing one (the matrices' ratio), and said; a
    whole float in an integer field is the integer."""
    xml, _ = scan
    g0 = geometry_from_header(parse_header(xml.encode()))
    odd = xml.replace("<x>640.0</x>", "<x>wide</x>", 1).replace("<x>64</x>", "<x>64.0</x>", 1)
    g = geometry_from_header(parse_header(odd.encode()))
    assert g.nx == g0.nx == 32 and g.enc_matrix == g0.enc_matrix
    assert "fieldOfView_mm x is 'wide', not a number" in caplog.text
    assert "Failed to convert value" in caplog.text  # the parser's warning goes to the log, one line


def test_center_sample_outside_the_line_is_an_error(scan):
    """It was moved silently to the middle of the line: with an asymmetric echo, a wrong image."""
    xml, acqs = scan
    acqs = [copy.deepcopy(a) for a in acqs]
    i = _imaging(acqs)[5]
    acqs[i].center_sample = acqs[i].number_of_samples + 7
    out, s = _run(xml, acqs)
    assert not out and len(s.errors) == 1
    assert f"center_sample {acqs[i].number_of_samples + 7} lies outside the line's" in s.errors[0]


@pytest.mark.parametrize("value", [1e3, 1e20, np.nan, np.inf])
def test_a_corrupted_sample_leaves_out_its_line_only(scan, value):
    """One corrupted sample (a flipped bit, an RF spike) used to lose the slice ("kspace contains
    NaN"), give a striped image (1e3: 30 times the image's error) or, from 1e19 or so, "the data
    have no signal". Its line is now left out, exactly as if it had not been acquired, and the
    images say so."""
    xml, acqs = scan
    imaging = _imaging(acqs)
    i = imaging[len(imaging) // 3]
    clean, _ = _run(xml, acqs)
    without, _ = _run(xml, [a for j, a in enumerate(acqs) if j != i])
    bad = [copy.deepcopy(a) for a in acqs]
    bad[i].data[1, 11] = value
    out, s = _run(xml, bad)
    assert not s.errors and len(out) == len(clean) == 4
    for a, b in zip(out, without):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-5 * np.abs(b.data).max())
    warning = out[0].meta["DDUGM_Warning"]
    assert "1 k-space line(s) left out" in warning and f"scan_counter {int(acqs[i].scan_counter)}" in warning
    assert "FALLBACK" not in out[0].meta["GADGETRON_ImageComment"]  # a warning, not a fallback
    assert "DDUGM_Warning" not in clean[0].meta


def _outer_line(acqs):
    """An imaging line more than 4 rows from the k-space centre, and its coils' raw peaks."""
    imaging = _imaging(acqs)
    centre = int(np.median([acqs[i].idx.kspace_encode_step_1 for i in imaging]))
    i = next(i for i in imaging[len(imaging) // 3:] if abs(acqs[i].idx.kspace_encode_step_1 - centre) > 4)
    return i, np.abs(np.stack([acqs[j].data for j in imaging])).max(axis=(0, 2))


@pytest.mark.parametrize("amplitude, sample", [(0.3, 5), (3.0, 40), (3.0, 60), (2.5, "echo"), (2.5, "echo + 2")])
def test_an_rf_spike_below_the_peak_leaves_out_its_line(scan, amplitude, sample):
    """An RF spike of a fraction of the k-space peak to a few times it passed the check on the
    peak (10 times it) and striped the image; on simulated ACDC cine one of 3 times the peak took
    LLR + TV's frame from 33 to 8 dB (README). It stands far above its readout neighbours, and its
    line is now left out, exactly as if it had not been acquired."""
    xml, acqs = scan
    i, peak = _outer_line(acqs)
    without, _ = _run(xml, [a for j, a in enumerate(acqs) if j != i])
    bad = [copy.deepcopy(a) for a in acqs]
    if isinstance(sample, str):  # at the echo, which the local test skips: the echo test, far from the centre
        sample = int(acqs[i].center_sample) + (2 if sample.endswith("2") else 0)
    bad[i].data[2, sample] += amplitude * peak[2] * np.exp(0.7j)
    out, s = _run(xml, bad)
    assert not s.errors and len(out) == 4
    for a, b in zip(out, without):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-5 * np.abs(b.data).max())
    assert "1 with a sample like an RF spike (more than 30 times its readout neighbours" in out[0].meta["DDUGM_Warning"]


@pytest.mark.parametrize("kw, settings", [
    (dict(ecg_beats=3, frames=8), {**ZF, "frame_axis": "ecg", "cardiac_phases": "8"}),
    (dict(real_time=True), ZF),
])
def test_an_rf_spike_in_binned_and_real_time_scans(tmp_path, kw, settings):
    """The same through ECG binning (lines regrouped before the check) and a real-time series."""
    path = tmp_path / "s.h5"
    simulate(str(path), **{**dict(frames=6, size=32, coils=4, accel=3, acs=8, noise=0.002, seed=5), **kw})
    ds = open_dataset(str(path))
    xml = ds.read_xml_header()
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    xml = xml.decode() if isinstance(xml, bytes) else xml
    i, peak = _outer_line(acqs)
    without, _ = _run(xml, [a for j, a in enumerate(acqs) if j != i], settings)
    acqs[i] = copy.deepcopy(acqs[i])
    acqs[i].data[0, 9] += 3 * peak[0]
    out, s = _run(xml, acqs, settings)
    assert not s.errors and len(out) == len(without)
    for a, b in zip(out, without):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-5 * np.abs(b.data).max())
    assert "1 k-space line(s) left out, 1 with a sample like an RF spike" in out[0].meta["DDUGM_Warning"]


def test_local_spike_ratio_measures_against_the_readout_neighbours():
    from gadgets.kspace import local_spike_ratio

    rng = np.random.default_rng(0)
    lines = (rng.standard_normal((3, 2, 64)) + 1j * rng.standard_normal((3, 2, 64))).astype(np.complex64)
    lines[:, :, 20:28] *= 0  # zero-padded samples: the floor is the non-zero samples' lower quartile
    assert (local_spike_ratio(lines, 40) < 8).all()
    lines[1, 0, 10] = 50
    lines[2, 1, 42] = 50  # within 2 samples of the echo: skipped (the k-space peaks there)
    lines[0, 0, 5] = np.nan  # counts as 0 (the NaN check names it)
    r = local_spike_ratio(lines, 40)
    assert r[1, 0] > 30 and r[2, 1] < 8 and r[0, 0] < 8
    assert local_spike_ratio(lines, 10)[2, 1] > 30
    assert (local_spike_ratio(np.zeros((2, 64), np.complex64), 32) == 0).all()
    m = np.abs(lines[1:]).astype(np.float64)  # against a plain computation: medians of 6, quartiles
    pad = np.pad(m, ((0, 0), (0, 0), (3, 3)), mode="reflect")
    med = np.median(np.stack([pad[..., 3 + d:67 + d] for d in (-3, -2, -1, 1, 2, 3)]), axis=0)
    floor = np.array([[np.sort(c[c > 0])[(c > 0).sum() // 4] for c in line] for line in m])[..., None]
    plain = m / np.maximum(med, floor)
    plain[..., 38:43] = 0
    np.testing.assert_allclose(local_spike_ratio(lines[1:], 40), plain.max(axis=-1), rtol=1e-5)


def test_too_many_spike_like_lines_are_kept_and_said(scan, monkeypatch):
    """Data on which the local test fires for more than 10 % of the lines are more likely unlike
    any it was measured on than full of spikes: every line is kept (never a lost slice for it),
    and the images say so."""
    import gadgets.kspace as kspace

    xml, acqs = scan
    clean, _ = _run(xml, acqs)
    monkeypatch.setattr(kspace, "LOCAL_RATIO", 1.0)
    out, s = _run(xml, acqs)
    assert not s.errors and len(out) == 4
    for a, b in zip(out, clean):
        np.testing.assert_array_equal(a.data, b.data)
    assert "more than 10 % of the lines, kept" in out[0].meta["DDUGM_Warning"]
    assert "left out" not in out[0].meta["DDUGM_Warning"]


@pytest.mark.skipif(not SIEMENS.is_file(), reason="../shared/data/siemens_grappa_r3.h5 not present")
def test_real_scanner_data_lose_no_line(caplog):
    """The real Siemens raw file (14 coils, readout oversampling 2): no sample stands out like a
    spike (its largest local ratio is about 6)."""
    ds = open_dataset(str(SIEMENS))
    xml = ds.read_xml_header()
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    out, s = _run(xml.decode() if isinstance(xml, bytes) else xml, acqs)
    assert out and not s.errors
    assert "left out" not in caplog.text and all("DDUGM_Warning" not in im.meta for im in out)


def test_many_corrupted_lines_are_an_error_not_a_repair(scan):
    xml, acqs = scan
    acqs = [copy.deepcopy(a) for a in acqs]
    for i in _imaging(acqs)[::4]:  # a quarter of the lines
        acqs[i].data[0, 3] = np.nan
    out, s = _run(xml, acqs)
    assert not out and len(s.errors) == 1
    assert "imaging lines hold corrupted samples (NaN or inf): more than 10 %, not repaired" in s.errors[0]


def test_noise_scan_with_a_corrupted_sample_is_not_used():
    """One huge sample in the noise scan whitened the data by a wrong scale (down to "the data
    have no signal"); it is now reported like a dead channel, and the scan is reconstructed
    without prewhitening."""
    rng = np.random.default_rng(0)
    d = (rng.standard_normal((3, 2048)) + 1j * rng.standard_normal((3, 2048))).astype(np.complex64)
    w = NoiseWhitener()
    w.add(d, 5.0)
    w.matrix()  # Gaussian noise passes
    d[2, 100] = 1e4
    w = NoiseWhitener()
    w.add(d[:, :1024], 5.0)
    w.add(d[:, 1024:], 5.0)
    with pytest.raises(ValueError, match=r"noise scan: channel\(s\) \[2\] hold samples far outside their noise"):
        w.matrix()


def test_corrupted_noise_scan_sample_in_a_session(scan, caplog):
    xml, acqs = scan
    acqs = [copy.deepcopy(a) for a in acqs]
    noise = next(a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT))
    noise.data[1, 5] = 1e30
    out, s = _run(xml, acqs)
    assert len(out) == 4 and not s.errors
    assert "hold samples far outside their noise" in caplog.text and "without prewhitening" in caplog.text


@pytest.mark.parametrize("kw, settings", [
    (dict(), ZF),
    (dict(partial_fourier=0.75, asymmetric_echo=0.8), ZF),
    (dict(real_time=True), ZF),
    (dict(ecg_beats=3, frames=8), {**ZF, "frame_axis": "ecg", "cardiac_phases": "8"}),
])
def test_clean_scans_lose_no_line(tmp_path, kw, settings):
    """No false alarm: real cine stays within 1.1 times the reference peak, far below 10."""
    path = tmp_path / "s.h5"
    args = dict(frames=6, size=32, coils=4, accel=3, acs=8, noise=0.002, seed=5)
    simulate(str(path), **{**args, **kw})
    ds = open_dataset(str(path))
    xml = ds.read_xml_header()
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    out, s = _run(xml.decode() if isinstance(xml, bytes) else xml, acqs, settings)
    assert out and not s.errors
    assert all("DDUGM_Warning" not in im.meta for im in out)


def test_grid_safety_net_for_buffers():
    """Gadgetron's ReconData buffers arrive on the grid, past the collector's check on raw lines:
    a non-finite or absurd sample there leaves out its line too."""
    from gadgets.kspace import CineData, drop_spikes

    rng = np.random.default_rng(1)
    t, ny, nx = 5, 16, 16
    img = np.zeros((t, ny, nx), np.complex64)
    img[:, 4:12, 4:12] = 1 + 0.1 * rng.standard_normal((t, 8, 8))
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img, axes=(-2, -1))), axes=(-2, -1))[None].astype(np.complex64)
    mask = np.zeros((t, ny, nx), bool)
    mask[:, ::2] = True
    mask[:, ny // 2 - 1:ny // 2 + 2] = True
    k *= mask[None]
    assert drop_spikes(CineData({}, k.copy(), mask.copy(), [None] * t)) is None  # clean: untouched
    k[0, 2, 4, 3] = np.nan
    k[0, 3, 10, 9] = 1e6 * np.abs(k).max()
    cine = CineData({}, k, mask.copy(), [None] * t)
    warning = drop_spikes(cine)
    assert "2 k-space line(s) with corrupted samples" in warning
    assert not cine.mask[2, 4].any() and not cine.mask[3, 10].any() and cine.mask.sum() == mask.sum() - 2 * nx
    assert np.isfinite(cine.kspace).all()


def test_grid_spike_flags_beyond_the_share_are_kept():
    """The buffers' local test flags too many lines: kept and said, never a lost slice."""
    from gadgets.kspace import CineData, drop_spikes

    t, ny, nx = 4, 16, 16
    k = (np.random.default_rng(2).standard_normal((2, t, ny, nx)) + 0j).astype(np.complex64)
    mask = np.ones((t, ny, nx), bool)
    spiky = np.zeros((t, ny), bool)
    spiky[:, ::3] = True  # a third of the lines
    cine = CineData({}, k.copy(), mask.copy(), [None] * t)
    warning = drop_spikes(cine, spiky)
    assert warning.startswith(f"{int(spiky.sum())} k-space lines hold a sample like an RF spike (more than 30 times")
    assert "kept" in warning and "left out" not in warning
    assert cine.mask.all() and np.array_equal(cine.kspace, k)
    spiky[:] = False
    spiky[1, 5] = True
    cine = CineData({}, k.copy(), mask.copy(), [None] * t)
    assert drop_spikes(cine, spiky, spiky_ref=2).startswith("1 k-space line(s) with corrupted samples (0 of their 16 "
                                                            "samples not finite; the first: frame 1, line 5) and 2 "
                                                            "calibration line(s) with corrupted samples left out")
    assert not cine.mask[1, 5].any() and cine.mask.sum() == mask.sum() - nx


def test_recon_data_reference_line_with_a_spike(tmp_path):
    """A spike in a ReconData reference (ACS) line: left out of the coil maps, and said."""
    from gadgetron_peer import recon_data_from_file

    path = tmp_path / "rd.h5"
    simulate(str(path), frames=4, size=32, coils=3, accel=2, acs=6, noise=0.002, seed=3)
    hdr, rd = recon_data_from_file(str(path))
    ref = rd.bits[0].ref.data
    rows = np.nonzero(np.abs(ref).sum(axis=(0, 2, 3, 4, 5, 6)))[0]
    ref[5, rows[0], 0, 1, 0, 0, 0] += 3 * np.abs(ref).max()
    s = ReconSession(hdr, *load_settings(dict(ZF)))
    arrays = s.handle(rd) + s.finish()
    assert not s.errors and len(arrays) == 1
    assert "1 calibration line(s) with corrupted samples" in ismrmrd.Meta.deserialize(arrays[0].meta[0])["DDUGM_Warning"]


def test_byte_flipped_streams_end_cleanly(tmp_path):
    """A valid MRD stream with random byte flips, insertions, deletions and truncations (40
    seeded cases, most in acquisition headers): every connection is answered and closed within
    seconds, and the server then serves a valid client as before."""
    import socket
    import struct
    import threading

    from gadgetron.external.writers import write_acquisition

    from gadgets.server import Server
    from gadgets.settings import Limits

    path = tmp_path / "s.h5"
    simulate(str(path), frames=3, size=16, coils=2, accel=2, acs=4, noise=0.002, seed=1)
    ds = open_dataset(str(path))
    xml = ds.read_xml_header()
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    xml = xml if isinstance(xml, bytes) else xml.encode()

    class Buf(bytearray):
        def write(self, b):
            self.extend(bytes(b))

    cfg = b'<configuration><property name="method" value="zero_filled"/></configuration>'
    good = Buf(struct.pack("<HI", 2, len(cfg)) + cfg + struct.pack("<HI", 3, len(xml)) + xml)
    start = len(good)
    for a in acqs:
        write_acquisition(good, a)
    good.write(struct.pack("<H", 4))
    good = bytes(good)
    lim = Limits()
    lim.idle_timeout = lim.handshake_timeout = 3.0
    srv = Server("127.0.0.1", 0, overrides=ZF, limits=lim)
    port = srv.bind()
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def talk(data):
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        got = b""
        try:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            while chunk := s.recv(1 << 16):
                got += chunk
        except ConnectionResetError:
            pass
        finally:
            s.close()
        return got

    try:
        valid = talk(good)
        assert len(valid) > 1000
        rng = np.random.default_rng(7)
        for _ in range(40):
            b = bytearray(good)
            for _ in range(int(rng.integers(1, 4))):
                i = int(rng.integers(start, len(b))) if rng.random() < 0.8 else int(rng.integers(len(b)))
                r = rng.random()
                if r < 0.6:
                    b[i] = int(rng.integers(256))
                elif r < 0.75:
                    del b[i:i + int(rng.integers(1, 9))]
                elif r < 0.9:
                    b[i:i] = bytes(rng.integers(0, 256, 4, dtype=np.uint8))
                else:
                    del b[i:]
            talk(bytes(b))  # a socket timeout here (a hang) fails the test
        assert talk(good) == valid
    finally:
        srv.shutdown()
        srv.wait_for_clients(10)


@pytest.mark.parametrize("value", [np.nan, 1e20, "3 x peak", "2.5 x peak at the echo"])
def test_recon_data_buffer_with_a_corrupted_sample(tmp_path, value):
    """The same for a chain's ReconData buffer: the line is left out and the images say so (a
    line with a NaN was taken as not acquired, without a word)."""
    from gadgetron_peer import recon_data_from_file

    path = tmp_path / "rd.h5"
    simulate(str(path), frames=4, size=32, coils=3, accel=2, acs=6, noise=0.002, seed=3)
    hdr, rd = recon_data_from_file(str(path))
    data = rd.bits[0].data.data
    if value == "3 x peak":  # an RF spike below the peak test, on the grid's outer rows
        data[5, 25, 0, 1, 2, 0, 0] += 3 * np.abs(data[:, :, 0, 1]).max()  # row 25: acquired, 9 from the centre
    elif isinstance(value, str):  # at the echo, which the local test skips: the echo test
        echo = int(rd.bits[0].data.sampling.sampling_limits[0].center)
        data[echo, 25, 0, 1, 2, 0, 0] += 2.5 * np.abs(data[:, :, 0, 1]).max() * np.exp(0.7j)
    else:
        data[5, 16, 0, 1, 2, 0, 0] = value
    s = ReconSession(hdr, *load_settings(dict(ZF)))
    arrays = s.handle(rd) + s.finish()
    assert not s.errors and len(arrays) == 1
    meta = ismrmrd.Meta.deserialize(arrays[0].meta[0])
    assert "1 k-space line(s) with corrupted samples" in meta["DDUGM_Warning"]
    assert "FALLBACK" not in meta["GADGETRON_ImageComment"]


def test_recon_data_echo_outside_the_acquired_samples(tmp_path):
    """A buffer whose sampling limits put the echo outside its acquired samples: the readout's
    middle is taken, as the grid takes it, and the spike check with it (its echo test failed the
    slice with numpy's "zero-size array to reduction operation maximum" in a first version)."""
    from gadgetron_peer import recon_data_from_file

    path = tmp_path / "rd.h5"
    simulate(str(path), frames=4, size=32, coils=3, accel=2, acs=6, noise=0.002, seed=3)
    images = []
    for center in (None, 200):
        hdr, rd = recon_data_from_file(str(path))
        if center is not None:
            rd.bits[0].data.sampling.sampling_limits[0].center = center
        s = ReconSession(hdr, *load_settings(dict(ZF)))
        arrays = s.handle(rd) + s.finish()
        assert not s.errors and len(arrays) == 1, s.errors
        images.append(np.abs(np.asarray(arrays[0].data)))
    np.testing.assert_allclose(images[1], images[0], rtol=1e-5, atol=1e-6 * images[0].max())


@pytest.mark.parametrize("frames", [1, 2])
def test_a_huge_sample_without_a_peak_reference_leaves_out_its_line(tmp_path, frames):
    """With fewer than 3 frames there is no robust k-space peak to compare with, so only NaN and
    inf were left out: a sample of 1e30 went on and broke the coil compression ("the zero_filled
    reconstruction broke down numerically ...: settings far outside their usual range"). A sample
    beyond 1e15, which single precision cannot square and sum, is now left out like NaN."""
    path = tmp_path / "s.h5"
    simulate(str(path), frames=frames, size=32, coils=3, accel=2, acs=6, noise=0.002, seed=3)
    ds = open_dataset(str(path))
    xml = ds.read_xml_header()
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    xml = xml.decode() if isinstance(xml, bytes) else xml
    i = _imaging(acqs)[len(_imaging(acqs)) // 3]
    without, _ = _run(xml, [a for j, a in enumerate(acqs) if j != i])
    acqs[i] = copy.deepcopy(acqs[i])
    acqs[i].data[1, 11] = 1e30
    out, s = _run(xml, acqs)
    assert not s.errors, s.errors
    for a, b in zip(out, without):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-5 * np.abs(b.data).max())
    assert "1 k-space line(s) left out, 1 with NaN, inf or beyond 1e+15" in out[0].meta["DDUGM_Warning"]


def test_a_huge_sample_is_named_by_the_library():
    """The library's own check, for callers of Reconstructor.recon."""
    from ddugm_core.reconstruction import prepare_inputs

    k = np.ones((2, 1, 8, 8), np.complex64)
    k[1, 0, 3, 3] = 1e30
    with pytest.raises(ValueError, match="kspace holds a sample of 1e[+]30, beyond 1e[+]15"):
        prepare_inputs(k)
    k[1, 0, 3, 3] = 1e14
    prepare_inputs(k)


def test_recon_data_headers_of_another_shape_are_named(tmp_path):
    """Data of 2 slices (S) with headers of 1 ended the stream with an IndexError, which Gadgetron's
    handler takes as a close; data of 1 frame with headers of 3 failed with numpy's "non-broadcastable
    output operand". Both are now an error for the buffer naming the two shapes."""
    from gadgetron_peer import recon_data_from_file

    path = tmp_path / "rd.h5"
    simulate(str(path), frames=3, size=16, coils=2, accel=2, acs=4, noise=0.002, seed=0)
    for cut in ("S=2", "N=1"):
        hdr, rd = recon_data_from_file(str(path))
        d = rd.bits[0].data.data
        rd.bits[0].data.data = np.concatenate([d, d], axis=5) if cut == "S=2" else np.ascontiguousarray(d[:, :, :, :, :1])
        s = ReconSession(hdr, *load_settings(dict(ZF)))
        assert s.handle(rd) + s.finish() == [] and len(s.errors) == 1
        assert "ValueError: ReconData headers have shape" in s.errors[0] and "need [E1, E2, N, S, LOC]" in s.errors[0]


def test_an_unforeseen_failure_reading_a_buffer_fails_its_bit_not_the_stream(tmp_path, monkeypatch):
    """Any exception while reading a ReconData buffer is that buffer's error: the session goes on."""
    from gadgetron_peer import recon_data_from_file

    import gadgets.session as session

    path = tmp_path / "rd.h5"
    simulate(str(path), frames=3, size=16, coils=2, accel=2, acs=4, noise=0.002, seed=0)
    hdr, rd = recon_data_from_file(str(path))
    s = ReconSession(hdr, *load_settings(dict(ZF)))

    def broken(*_):
        raise IndexError("index 1 is out of bounds for axis 3 with size 1")
    monkeypatch.setattr(session, "cine_from_recon_bit", broken)
    assert s.handle(rd) == [] and s.errors == ["ReconData: IndexError: index 1 is out of bounds for axis 3 with size 1"]
    monkeypatch.undo()
    hdr, rd = recon_data_from_file(str(path))
    assert len(s.handle(rd) + s.finish()) == 1  # the next buffer is reconstructed


def test_recon_data_frame_left_empty_by_corrupted_lines_is_named(tmp_path):
    """A buffer frame whose only line is corrupted: named as such (it failed with the library's
    "frame(s) [1] have no acquired samples", which did not say why)."""
    from gadgetron_peer import recon_data_from_file

    path = tmp_path / "rd.h5"
    simulate(str(path), frames=3, size=16, coils=2, accel=2, acs=4, noise=0.002, seed=0)
    hdr, rd = recon_data_from_file(str(path))
    d = rd.bits[0].data.data
    rows = np.nonzero(np.abs(d[:, :, 0, :, 1]).sum(axis=(0, 2)))[0]
    d[:, rows[1:], :, :, 1] = 0  # frame 1: one line left
    d[3, rows[0], 0, 0, 1, 0, 0] = np.nan
    s = ReconSession(hdr, *load_settings(dict(ZF)))
    assert s.handle(rd) + s.finish() == [] and len(s.errors) == 1
    assert "frame(s) [1] have no acquired lines left after leaving out the corrupted ones (1 k-space line(s)" \
        in s.errors[0]


@pytest.mark.parametrize("buffers", [False, True])
def test_the_session_fuzzer_runs_clean(buffers, capsys):
    """A few seeded cases of ``tests/fuzz_session.py`` (acquisitions, and ReconData buffers), so that
    the fuzzer cannot rot between runs: every case ends in images or an error of a clean type."""
    import fuzz_session

    assert fuzz_session.main(24, 5, "zero_filled", buffers) == 0
    assert "BAD: 0" in capsys.readouterr().out


def test_a_wrong_echo_centre_inside_the_line_is_said(scan):
    """A center_sample that is wrong but still on the line (a research sequence's header) misplaced
    the k-space along the readout without a word; the centre lines' echo says so now. A clean scan
    says nothing (the other tests' clean images carry no warning)."""
    xml, acqs = scan
    bad = [copy.deepcopy(a) for a in acqs]
    n = int(acqs[_imaging(acqs)[0]].number_of_samples)
    for i in _imaging(acqs):
        bad[i].center_sample = int(acqs[i].center_sample) + n // 5
    out, s = _run(xml, bad)
    assert not s.errors and len(out) == 4
    assert re.search(r"the echo peaks (19|20) % of the readout before the stated echo centre", out[0].meta["DDUGM_Warning"])
    clean, _ = _run(xml, acqs)
    assert "DDUGM_Warning" not in clean[0].meta


def test_a_wrong_echo_centre_of_a_recon_data_buffer_is_said(tmp_path):
    from gadgetron_peer import recon_data_from_file

    path = tmp_path / "rd.h5"
    simulate(str(path), frames=4, size=32, coils=3, accel=2, acs=6, noise=0.002, seed=3)
    for center, said in ((None, False), (0, True)):
        hdr, rd = recon_data_from_file(str(path))
        if center is not None:
            rd.bits[0].data.sampling.sampling_limits[0].center = center
        s = ReconSession(hdr, *load_settings(dict(ZF)))
        arrays = s.handle(rd) + s.finish()
        assert not s.errors and len(arrays) == 1
        meta = ismrmrd.Meta.deserialize(arrays[0].meta[0])
        assert ("after the stated echo centre" in meta.get("DDUGM_Warning", "")) == said


@pytest.mark.skipif(not SIEMENS.exists(), reason="needs ../shared/data/siemens_grappa_r3.h5")
def test_recon_data_lines_never_acquired_may_fall_off_the_grid():
    """The real Siemens file as a buffer of E1 = 144 lines (its encoded matrix) with the centre at
    line 54 and lines 0 to 105 acquired: E1's lines 126 to 143, never acquired, fall beyond the
    grid, and the buffer was refused ("phase-encoding line 126 (centre 54) lies outside the encoded
    matrix of 144 lines"). Only the acquired lines must fall on the grid."""
    from gadgetron_peer import recon_data_from_file

    hdr, rd = recon_data_from_file(str(SIEMENS))
    s = ReconSession(hdr, *load_settings(dict(ZF)))
    assert len(s.handle(rd) + s.finish()) == 1 and not s.errors, s.errors


@pytest.mark.skipif(not SIEMENS.exists(), reason="needs ../shared/data/siemens_grappa_r3.h5")
def test_recon_data_and_acquisitions_give_the_same_image_of_the_real_siemens_file(tmp_path):
    """The real Siemens file (14 coils, readout oversampling, partial Fourier, R = 3 with 32
    calibration-only and 16 calibration-and-imaging lines) through the two Gadgetron inputs:
    acquisitions one by one, and the ReconData buffer that AcquisitionAccumulateTrigger and
    BucketToBuffer make of them (calibration-only lines in the reference buffer only). Without the
    noise scan, so that neither path whitens, the images agree to float precision. (The test peer
    once put calibration-only lines into the image data as well: 0.31 apart, relative norm.)"""
    from gadgetron_peer import recon_data_from_file

    ds = open_dataset(str(SIEMENS))
    xml = ds.read_xml_header()
    xml = xml.decode() if isinstance(xml, bytes) else xml
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    acqs = [acqs[i] for i in _imaging(acqs)]
    plain, s = _run(xml, acqs)
    assert not s.errors and len(plain) == 1
    path = tmp_path / "no_noise_scan.h5"
    out = ismrmrd.Dataset(str(path), "dataset", True)
    out.write_xml_header(xml)
    for a in acqs:
        out.append_acquisition(a)
    out.close()
    hdr, rd = recon_data_from_file(str(path))
    s = ReconSession(hdr, *load_settings(dict(ZF)))
    arrays = s.handle(rd) + s.finish()
    assert not s.errors and len(arrays) == 1
    a = np.asarray(plain[0].data)[0, 0]  # [y, x]
    b = np.asarray(arrays[0].data)[:, :, 0, 0, 0, 0, 0].T  # [x, y] -> [y, x]
    assert a.shape == b.shape == (144, 192)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)
