"""The data path of the gadgets, in process: header geometry, prewhitening, readout
oversampling, asymmetric echo, partial Fourier, settings, the scan session."""
import logging
import time

import ismrmrd
import numpy as np
import pytest

from ddugm_core.metrics import psnr
from gadgets.geometry import Geometry
from gadgets.kspace import NoiseWhitener, finalize_images, fourier_resize, ky_to_grid, readout_to_grid
from gadgets.replay import open_dataset
from gadgets.session import Engine, ReconSession
from gadgets.settings import Limits, load_settings, parse_scalar, properties_from_xml
from gadgets.simulate import simulate


def geo(enc_x=128, nx=64, ny=64, enc_fov_y=300.0, recon_matrix=None):
    return Geometry(enc_matrix=(enc_x, ny, 1), enc_fov=(300.0 * enc_x / nx, enc_fov_y, 8.0),
                    recon_matrix=recon_matrix or (nx, ny, 1), recon_fov=(300.0, 300.0, 8.0), ky_center=ny // 2,
                    ky_max=ny - 1, phases=1, noise_bandwidth=0.793, trajectory="cartesian", coils=1)


def centred_fft(x):
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x)))


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    path, truth = d / "cine.h5", d / "truth.npy"
    simulate(str(path), frames=6, size=48, coils=4, accel=3, acs=10, noise=0.001, slices=2, seed=1, truth=str(truth))
    return path, np.load(truth)


def read_file(path):
    ds = open_dataset(str(path))
    hdr = ismrmrd.xsd.CreateFromDocument(ds.read_xml_header())
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    return hdr, acqs


def run_session(path, settings=None, edit=None, header=None, limits=None, operator=None):
    """Replay a file through a ReconSession (``edit(acq)`` changes each imaging acquisition
    first; ``operator``: trusted settings); the images and the session, whose ``errors`` name the
    slices that failed."""
    from gadgets.session import ScanErrors

    hdr, acqs = read_file(path)
    s = ReconSession(header or hdr, *load_settings(settings or {"method": "zero_filled", "device": "cpu"},
                                                   operator=operator), limits=limits)
    out = []
    for a in acqs:
        if edit is not None and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            edit(a)
        out += s.handle(a)
    try:
        out += s.finish()
    except ScanErrors:  # the session reports the failed slices at the end (the gadget sends them as errors)
        pass
    return out, s


# ---------------------------------------------------------------- readout and grid
def test_oversampled_readout_matches_the_cropped_object():
    rng = np.random.default_rng(0)
    obj = np.zeros(128, np.complex64)
    obj[32:96] = rng.standard_normal(64) + 1j * rng.standard_normal(64)  # object inside the central half
    line = centred_fft(obj)  # encoded readout, 2x oversampled, echo at 64
    grid, sampled = readout_to_grid(line[None], 64, geo())
    expect = centred_fft(obj[32:96])
    assert sampled.all()
    np.testing.assert_allclose(grid[0], expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())


def test_asymmetric_echo_keeps_its_extent_and_marks_the_rest_unsampled():
    line = np.ones(128, np.complex64)
    grid, sampled = readout_to_grid(line[None, 32:], 64 - 32, geo())  # first quarter of the readout missing
    assert sampled.sum() == 48 and not sampled[:16].any() and sampled[16:].all()
    assert np.all(grid[0, :16] == 0)


def test_readout_already_at_recon_sampling_is_placed_not_decimated():
    line = np.arange(64).astype(np.complex64)
    grid, sampled = readout_to_grid(line[None], 32, geo())
    np.testing.assert_array_equal(grid[0], line)
    assert sampled.all()


def test_lines_outside_the_matrix_are_a_clear_error():
    assert ky_to_grid(10, 10, 64) == 32
    with pytest.raises(ValueError, match="outside the encoded matrix"):
        ky_to_grid(70, 10, 64)


def test_prewhitening_makes_noise_white():
    rng = np.random.default_rng(0)
    mix = np.eye(4) + 0.5 * rng.standard_normal((4, 4))
    noise = lambda n: mix @ (rng.standard_normal((4, n)) + 1j * rng.standard_normal((4, n)))  # noqa: E731
    w = NoiseWhitener()
    w.add(noise(20000), 5.0)
    white = w.apply(noise(20000), 5.0)
    cov = white @ white.conj().T / white.shape[1]
    np.testing.assert_allclose(cov, np.eye(4), atol=0.05)
    # data at half the dwell time carry sqrt(2) more noise; the whitener accounts for it
    assert w.apply(noise(20000) * np.sqrt(2), 2.5).std() == pytest.approx(1.0, rel=0.05)


def test_dead_channel_in_noise_scan_is_reported():
    w = NoiseWhitener()
    d = np.random.default_rng(0).standard_normal((3, 100)).astype(np.complex64)
    d[1] = 0
    w.add(d, 5.0)
    with pytest.raises(ValueError, match=r"channel\(s\) \[1\]"):
        w.apply(d, 5.0)


def test_non_finite_noise_scan_or_dwell_times():
    """A NaN / inf sample in the noise scan is reported as such (the session then reconstructs
    without prewhitening), not as the data's "kspace contains NaN"; a dwell time of 0, NaN or inf
    in a header scales nothing."""
    rng = np.random.default_rng(0)
    d = (rng.standard_normal((3, 100)) + 1j * rng.standard_normal((3, 100))).astype(np.complex64)
    bad = d.copy()
    bad[2, 7] = np.nan
    w = NoiseWhitener()
    w.add(bad, 5.0)
    with pytest.raises(ValueError, match="noise scan: it holds non-finite samples"):
        w.apply(d, 5.0)
    plain = NoiseWhitener()
    plain.add(d, 5.0)
    for dwell in (0.0, float("nan"), float("inf"), -1.0):
        odd = NoiseWhitener()
        odd.add(d, dwell)
        assert odd.dwell_us is None
        np.testing.assert_allclose(odd.apply(d, 2.5), plain.apply(d, 5.0), rtol=1e-5)  # no scaling: 5 / 5
        out = plain.apply(d, dwell)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, plain.apply(d, 5.0), rtol=1e-5)


def test_finalize_crops_phase_oversampling_and_resizes_to_recon_matrix():
    g = geo(ny=80, enc_fov_y=375.0, recon_matrix=(32, 32, 1))  # 80 lines over 375 mm -> 64 over 300 mm
    x = np.ones((2, 80, 64), np.complex64)
    assert finalize_images(x, g).shape == (2, 32, 32)
    yy, xx = np.mgrid[-8:8, -8:8]
    img = np.exp(-(yy ** 2 + xx ** 2) / 8.0).astype(np.complex64)[None]  # smooth: no Gibbs ringing
    up = fourier_resize(img, (32, 32))
    assert up.shape == (1, 32, 32) and abs(np.abs(up).max() - 1) < 0.02  # intensity kept
    np.testing.assert_allclose(np.abs(fourier_resize(up, (16, 16))), np.abs(img), atol=1e-4)


# ---------------------------------------------------------------- settings
def test_properties_and_yaml_merge_and_validate(tmp_path):
    xml = b'<?xml version="1.0"?><configuration><property name="preset" value="paper"/>' \
          b'<property><name>steps</name><value>7</value></property><property name="output" value="complex"/>' \
          b'<property name="fallback" value="false"/></configuration>'
    props = properties_from_xml(xml)
    assert props == {"preset": "paper", "steps": "7", "output": "complex", "fallback": "false"}
    y = tmp_path / "s.yaml"
    y.write_text("recon:\n  method: low_rank\n  lowrank_iters: 9\ngadget:\n  series_index: 5\n")
    cfg, gs = load_settings(props, y)
    assert (cfg.preset, cfg.steps, cfg.method, cfg.lowrank_iters) == ("paper", 7, "low_rank", 9)
    assert (gs.output, gs.fallback, gs.series_index) == ("complex", False, 5)
    assert properties_from_xml(b'<?xml version="1.0"?>\n') == {}


@pytest.mark.parametrize("props, message", [
    ({"preset": "bogus"}, "preset must be one of"),
    ({"steps": "many"}, "steps must be an integer"),
    ({"output": "rgb"}, "output must be one of"),
    ({"fallback": "maybe"}, "fallback must be true or false"),
    ({"colour": "red"}, "unknown setting 'colour'"),
    ({"config": "/nonexistent.yaml"}, "a client may not set"),
    ({"pnp_gamma": "nan"}, "finite numbers: pnp_gamma = nan"),  # NaN passes every range check
    ({"llr_continue_scale": "inf"}, "finite numbers: llr_continue_scale = inf"),
])
def test_invalid_settings_are_named(props, message):
    with pytest.raises(ValueError, match=message):
        load_settings(props)


def test_shipped_yaml_matches_the_library_defaults():
    from ddugm_core.reconstruction import ReconConfig
    from gadgets.settings import GadgetSettings, Limits, default_yaml, load_limits

    cfg, gs = load_settings({}, default_yaml())
    assert cfg == ReconConfig() and gs == GadgetSettings()
    assert load_limits(default_yaml()) == Limits()
    assert parse_scalar("steps", "null", "Optional[int]") is None


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e7, 0, -1])
def test_server_timeouts_must_be_finite_and_positive(tmp_path, value):
    """An infinite timeout would overflow the socket layer at the first connection; NaN was
    never > 0. The operator's YAML (``.inf``) and overrides alike are refused at start, by name."""
    from gadgets.settings import load_limits

    y = tmp_path / "op.yaml"
    y.write_text("server:\n  idle_timeout: .inf\n")
    with pytest.raises(ValueError, match="idle_timeout must be a positive number of seconds, at most"):
        load_limits(y)
    with pytest.raises(ValueError, match="handshake_timeout must be a positive number"):
        load_limits(None, {"handshake_timeout": value})
    assert load_limits(None, {"handshake_timeout": 1e6}).handshake_timeout == 1e6


# ---------------------------------------------------------------- the session
def test_session_reconstructs_each_slice_with_header_fields(sim):
    path, truth = sim
    hdr, acqs = read_file(path)
    cfg, gs = load_settings({"method": "low_rank", "lowrank_iters": "30", "device": "cpu", "series_index": "3"})
    s = ReconSession(hdr, cfg, gs)
    out = []
    for a in acqs:
        out += s.handle(a)
    n_before_close = len(out)
    out += s.finish()
    assert n_before_close == 12  # both slices sent when their LAST_IN_SLICE arrived, not at close
    assert len(out) == 12 and not s.errors
    assert [im.image_index for im in out] == list(range(1, 13))
    for i, im in enumerate(out):
        h = im.getHead()
        sl, ph = divmod(i, 6)
        assert (h.slice, h.phase, h.image_series_index, h.image_type) == (sl, ph, 3, ismrmrd.IMTYPE_MAGNITUDE)
        assert tuple(h.matrix_size) == (48, 48, 1) and tuple(h.field_of_view)[:2] == (320.0, 320.0)
        assert tuple(h.position) == (0.0, 0.0, 8.0 * sl) and tuple(h.read_dir) == (1.0, 0.0, 0.0)
        assert tuple(h.slice_dir) == (0.0, 0.0, 1.0) and h.measurement_uid == 4242
        assert h.physiology_time_stamp[0] == int(ph * 40 / 2.5) and h.acquisition_time_stamp > 0
        assert im.meta["DDUGM_Method"] == "low_rank" and "DDUGM_Warning" not in im.meta
    for sl in range(2):
        rec = np.stack([np.asarray(im.data[0, 0]) for im in out[6 * sl:6 * sl + 6]])
        ref = np.abs(truth[sl])
        scale = (rec * ref).sum() / (rec * rec).sum()  # the coil-combined image keeps a smooth coil shading
        assert psnr(scale * rec, ref) > 27, sl


def test_real_time_series_takes_its_repetitions_as_frames(tmp_path):
    """A real-time series (frames as repetitions, each ending LAST_IN_SLICE) is one slice of 6
    frames, sent when its last repetition arrives: the same images as the same data labelled as a
    segmented cine, with the repetition, not the phase, numbering them."""
    images = {}
    for real_time in (False, True):
        path = tmp_path / f"rt{real_time}.h5"
        simulate(str(path), frames=6, size=32, coils=3, accel=3, acs=8, noise=0, slices=2, seed=3,
                 real_time=real_time)
        hdr, acqs = read_file(path)
        cfg, gs = load_settings({"method": "low_rank", "lowrank_iters": "10", "device": "cpu"})
        s = ReconSession(hdr, cfg, gs)
        out, sent_at = [], []
        for i, a in enumerate(acqs):
            new = s.handle(a)
            sent_at += [i] * len(new)
            out += new
        assert len(out) == 12 and not s.errors and s.frame_axis == ("repetition" if real_time else "phase")
        assert not s.ecg_hinted  # one trigger delay per frame, rising: no heartbeats to bin
        last_of_slice0 = max(i for i, a in enumerate(acqs) if a.idx.slice == 0)
        assert sent_at[:6] == [last_of_slice0] * 6  # not after its first repetition, not at the close
        images[real_time] = out
    for cine, rt in zip(images[False], images[True]):
        h, g = cine.getHead(), rt.getHead()
        assert (g.slice, g.phase, g.repetition) == (h.slice, 0, h.phase)
        np.testing.assert_allclose(np.asarray(rt.data), np.asarray(cine.data), rtol=1e-4, atol=1e-6)
        assert rt.meta["DDUGM_Frame"] == cine.meta["DDUGM_Frame"]
    hdr, _ = read_file(tmp_path / "rtTrue.h5")  # frame_axis: phase keeps each repetition an image of its own
    cfg, gs = load_settings({"method": "zero_filled", "device": "cpu", "frame_axis": "phase"})
    assert ReconSession(hdr, cfg, gs).frame_axis == "phase"
    with pytest.raises(ValueError, match="frame_axis must be one of"):
        load_settings({"frame_axis": "time"})


def test_real_time_series_without_a_repetition_count_waits_for_the_end(tmp_path, caplog):
    """A real-time header without a repetition limit does not say how many repetitions come, so a
    line flagged LAST_IN_SLICE ends no slice: each slice is one reconstruction of all its frames at
    the end of the stream (the same images as with the count), not one per repetition."""
    path = tmp_path / "rt.h5"
    simulate(str(path), frames=6, size=32, coils=3, accel=3, acs=8, noise=0, slices=2, seed=3, real_time=True)
    hdr, acqs = read_file(path)
    images = {}
    for announced in (True, False):
        if not announced:
            hdr.encoding[0].encodingLimits.repetition = None
        cfg, gs = load_settings({"method": "low_rank", "lowrank_iters": "10", "device": "cpu",
                                 "frame_axis": "repetition"})
        s = ReconSession(hdr, cfg, gs)
        assert s.geometry.repetitions_announced == announced
        out, sent_at = [], []
        with caplog.at_level(logging.INFO, logger="ddugm.gadget"):
            for i, a in enumerate(acqs):
                new = s.handle(a)
                sent_at += [i] * len(new)
                out += new
            new = s.finish()
        sent_at += [len(acqs)] * len(new)
        out += new
        assert len(out) == 12 and not s.errors
        if not announced:
            assert sent_at == [len(acqs) - 1] * 12 or sent_at == [len(acqs)] * 12
            assert "announces no repetition count" in caplog.text
        images[announced] = out
    for a, b in zip(images[True], images[False]):
        assert (a.getHead().slice, a.getHead().repetition) == (b.getHead().slice, b.getHead().repetition)
        np.testing.assert_allclose(np.asarray(b.data), np.asarray(a.data), rtol=1e-4, atol=1e-6)


def test_ecg_bins_finds_the_beats_and_phases_in_any_unit_and_order():
    """Lines every 3 ms over 5 beats of 700 to 900 ms, the scan starting mid-beat and stopping
    mid-beat, stamped in ms or in 2.5 ms ticks: each line lands in the phase its true cardiac
    fraction says, but for the rounding of the stamps."""
    from gadgets.kspace import ecg_bins

    rr = np.array([800, 700, 900, 760, 840, 820], float)
    triggers = np.concatenate([[0], np.cumsum(rr)])
    t = np.arange(350.0, 4200.0, 3.0)  # the last beat (4020 -> 4840) is cut short at 4200
    beat = np.searchsorted(triggers, t, side="right") - 1
    frac = (t - triggers[beat]) / rr[beat]
    for unit in (1.0, 2.5):
        delay = np.round((t - triggers[beat]) / unit)
        bins, info = ecg_bins(delay, 16)
        expect = np.minimum(np.floor(frac * 16), 15).astype(int)
        assert info["beats"] == 6 and abs(info["rr"] * unit - 800) < 10
        core = beat < 5  # the complete beats: within one phase of the truth, nearly all exact
        assert np.all(np.abs(bins - expect)[core] <= 1) and np.mean(bins[core] == expect[core]) > 0.97
        last = ~core  # the cut-short beat takes the median RR (800 against its true 820)
        assert np.all(np.abs(bins - expect)[last] <= 1)
    with pytest.raises(ValueError, match="physiology_time_stamp"):
        ecg_bins(np.zeros(10), 8)
    with pytest.raises(ValueError, match="never rises"):  # a constant stamp is no timing either
        ecg_bins(np.full(10, 7.0), 8)
    # an ectopic beat (1,300 ms among 800s) shifts nothing else; arrhythmia rejection leaves it out
    rr = np.array([800, 800, 1300, 800, 800, 800], float)
    triggers = np.concatenate([[0], np.cumsum(rr)])
    t = np.arange(100.0, 5000.0, 3.0)
    beat = np.searchsorted(triggers, t, side="right") - 1
    delay = np.round(t - triggers[beat])
    kept, info = ecg_bins(delay, 16)
    bins, info = ecg_bins(delay, 16, rr_tolerance=0.2)
    assert info["rejected_beats"] == 1 and np.all(bins[beat == 2] == -1)
    assert np.array_equal(bins[beat != 2], kept[beat != 2]) and info["rejected_lines"] == np.sum(beat == 2)
    # every line a beat of its own (a hostile stream): linear time, not lines x beats
    t0 = time.perf_counter()
    bins, info = ecg_bins(np.tile([2.0, 1.0], 200_000), 16)
    assert info["beats"] == 200_001 and time.perf_counter() - t0 < 5
    t = np.arange(0.0, 2600.0, 2.0)  # beats of 600, 1000 and (the last) 1000 ms around a median of 800
    triggers = np.array([0.0, 600.0, 1600.0, 2600.0])
    beat = np.searchsorted(triggers, t, side="right") - 1
    with pytest.raises(ValueError, match="leaves out every one of the 3 heartbeats"):
        ecg_bins(t - triggers[beat], 16, rr_tolerance=0.1)


def test_retrospective_ecg_binning_of_a_free_running_acquisition(tmp_path):
    """A free-running real-time acquisition over 3 heartbeats of varying length (simulated: each
    line of the heart as it was at that moment, stamped with its trigger delay), binned with
    frame_axis ecg into the cycle's 8 phases: one cine of 8 images, numbered by phase, close to the
    truth and in step with it (a phase off would be far worse). Mistakes are named."""
    from gadgets.settings import Limits

    path, truth = tmp_path / "ecg.h5", tmp_path / "truth.npy"
    info = simulate(str(path), frames=8, size=32, coils=4, accel=4, acs=4, noise=0.002, slices=1, seed=2,
                    ecg_beats=3, truth=str(truth))
    assert info["acceleration"] < 2.5
    t = np.load(truth)[0]
    settings = {"method": "low_rank", "lowrank_iters": "30", "device": "cpu", "frame_axis": "ecg",
                "cardiac_phases": "8"}
    out, s = run_session(path, settings)
    assert not s.errors and len(out) == 8
    heads = [im.getHead() for im in out]
    assert [(h.phase, h.repetition) for h in heads] == [(p, 0) for p in range(8)]
    trig = [int(h.physiology_time_stamp[0]) for h in heads]
    assert trig == sorted(trig) and 0 < trig[0] < trig[-1] < 340
    x0 = np.stack([np.asarray(im.data).squeeze() for im in out])
    x = x0 * (np.abs(x0) * np.abs(t)).sum() / (np.abs(x0) ** 2).sum()
    good, shifted = psnr(t, x), psnr(np.roll(t, 1, axis=0), x)
    assert good > 40 and good > shifted + 8, (good, shifted)  # measured: 47.7 against 32.9
    # as a real-time series (the default for 1 phase, many repetitions) it is 60-odd frames, not a
    # cycle; the log says that frame_axis ecg would bin it
    out, s = run_session(path, {"method": "zero_filled", "device": "cpu"})
    assert s.frame_axis == "repetition" and len(out) > 8 and s.ecg_hinted
    # mistakes, by name
    out, s = run_session(path, {**settings, "cardiac_phases": "500"})
    assert not out and "have no acquired lines after binning into cardiac_phases = 500" in s.errors[0]
    out, s = run_session(path, settings, limits=Limits(max_frames=6))
    assert not out and "cardiac_phases = 8 exceeds the server's limit max_frames = 6" in s.errors[0]

    def no_trigger(a):
        a.physiology_time_stamp[0] = 0

    out, s = run_session(path, settings, edit=no_trigger)
    assert not out and "carry no trigger times" in s.errors[0]
    out, s = run_session(path, {**settings, "arrhythmia_rejection": "0.3"})  # beats within 10 %: all kept
    assert not s.errors and np.array_equal(np.stack([np.asarray(im.data).squeeze() for im in out]), x0)
    # no cardiac_phases: the header's phase count where it announces more than one, else 20
    hdr, _ = read_file(path)
    ecg_only = {"method": "zero_filled", "device": "cpu", "frame_axis": "ecg"}
    assert ReconSession(hdr, *load_settings(ecg_only)).cardiac_phases == 20
    hdr.encoding[0].encodingLimits.phase.maximum = 7
    out, s = run_session(path, ecg_only, header=hdr)
    assert s.cardiac_phases == 8 and len(out) == 8 and not s.errors
    with pytest.raises(ValueError, match="arrhythmia_rejection must be 0"):
        load_settings({"frame_axis": "ecg", "arrhythmia_rejection": "1.5"})
    with pytest.raises(ValueError, match="cardiac_phases must be 0"):
        load_settings({"frame_axis": "ecg", "cardiac_phases": "1"})


def test_a_real_time_series_over_the_limits_is_reconstructed_in_even_blocks(tmp_path):
    """6 repetitions where the server holds 4 frames: two blocks of 3 (not 4 + 2, not repetition by
    repetition), each sent when its last repetition arrives, numbered by repetition; the same as
    asking for blocks of 3 (``realtime_block``); what cannot be done is refused by name."""
    from gadgets.settings import Limits

    path = tmp_path / "rt.h5"
    simulate(str(path), frames=6, size=32, coils=3, accel=3, acs=8, noise=0, slices=2, seed=3, real_time=True)
    hdr, acqs = read_file(path)
    base = {"method": "low_rank", "lowrank_iters": "10", "device": "cpu"}
    runs = {}
    for name, extra, limits in (("limits", {}, Limits(max_frames=4)), ("setting", {"realtime_block": "3"}, None),
                                ("elements", {}, Limits(max_slice_elements=3 * 5 * 32 * 32)),
                                ("pixels", {}, Limits(max_slice_pixels=5 * 32 * 32)), ("whole", {}, None)):
        s = ReconSession(hdr, *load_settings({**base, **extra}), limits=limits)
        assert s.frame_axis == "repetition" and s.block == (0 if name == "whole" else 3), name
        out, sent_at = [], []
        for i, a in enumerate(acqs):
            new = s.handle(a)
            sent_at += [i] * len(new)
            out += new
        out += s.finish()
        assert len(out) == 12 and not s.errors, name
        runs[name] = out
        if name == "limits":
            ends = [max(i for i, a in enumerate(acqs) if a.idx.slice == sl and a.idx.repetition == r)
                    for sl in range(2) for r in (2, 5)]
            assert sent_at == [e for e in ends for _ in range(3)]  # each block as soon as it is complete
            heads = [im.getHead() for im in out]
            assert [(h.slice, h.repetition, h.phase) for h in heads] == [(sl, r, 0) for sl in range(2) for r in range(6)]
            assert [im.image_index for im in out] == list(range(1, 13))
    for a, b in zip(runs["limits"], runs["setting"]):
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    # a line of the next block that arrives before the block's last one stays for the next block
    end = max(i for i, a in enumerate(acqs) if a.idx.slice == 0 and a.idx.repetition == 2)
    early = min(i for i, a in enumerate(acqs) if a.idx.slice == 0 and a.idx.repetition == 3)
    moved = acqs[:end] + [acqs[early]] + acqs[end:early] + acqs[early + 1:]
    s = ReconSession(hdr, *load_settings(base), limits=Limits(max_frames=4))
    out = [im for a in moved for im in s.handle(a)] + s.finish()
    assert not s.errors and len(out) == 12
    for a, b in zip(out, runs["limits"]):
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    for other in ("elements", "pixels"):
        for a, b in zip(runs["limits"], runs[other]):
            np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    # a block is its own reconstruction: not the whole series' images
    assert any(not np.allclose(np.asarray(a.data), np.asarray(b.data)) for a, b in zip(runs["limits"], runs["whole"]))
    # the limits hold fewer than 2 repetitions: auto takes each repetition on its own; asked for, it is refused
    assert ReconSession(hdr, *load_settings(base), limits=Limits(max_frames=1)).frame_axis == "phase"
    with pytest.raises(ValueError, match=r"announces 6 repetitions \(the frames\), more than the server's limit max_frames = 1"):
        ReconSession(hdr, *load_settings({**base, "frame_axis": "repetition"}), limits=Limits(max_frames=1))
    with pytest.raises(ValueError, match=r"5 repetitions per block \(realtime_block\), more than the server's limit "
                                         r"max_frames = 4"):
        ReconSession(hdr, *load_settings({**base, "realtime_block": "5"}), limits=Limits(max_frames=4))
    with pytest.raises(ValueError, match="realtime_block must be 0"):
        load_settings({"realtime_block": "1"})
    cine = tmp_path / "cine.h5"  # a cine (phases) is never split
    simulate(str(cine), frames=6, size=32, coils=3, accel=3, acs=8, noise=0, seed=3)
    assert ReconSession(read_file(cine)[0], *load_settings({**base, "realtime_block": "3"})).block == 0


def test_recon_data_with_repetitions_along_n(tmp_path):
    """A chain whose BucketToBuffer puts the repetitions along N (N_dimension repetition, for a
    real-time series): the images are numbered by repetition, as the same data as a cine by phase."""
    from gadgetron_peer import recon_data_from_file

    arrays = {}
    for real_time, n_dim in ((False, "phase"), (True, "repetition")):
        path = tmp_path / f"rt{real_time}.h5"
        simulate(str(path), frames=5, size=32, coils=3, accel=3, acs=8, noise=0, seed=3, real_time=real_time)
        hdr, rd = recon_data_from_file(str(path), n_dimension=n_dim)
        s = ReconSession(hdr, *load_settings({"method": "zero_filled", "device": "cpu"}))
        (arr,) = s.handle(rd)
        assert not s.errors
        arrays[real_time] = arr
    np.testing.assert_allclose(np.asarray(arrays[True].data), np.asarray(arrays[False].data), rtol=1e-4, atol=1e-6)
    heads = np.asarray(arrays[True].headers).ravel()
    assert [(int(h.repetition), int(h.phase)) for h in heads] == [(r, 0) for r in range(5)]
    assert [int(h.phase) for h in np.asarray(arrays[False].headers).ravel()] == list(range(5))
    # ECG binning needs the acquisitions: ReconData arrives already arranged by the chain
    s = ReconSession(hdr, *load_settings({"method": "zero_filled", "device": "cpu", "frame_axis": "ecg"}))
    assert s.handle(rd) == [] and "frame_axis ecg bins plain acquisitions" in s.errors[0]


def test_other_encoding_spaces_and_auxiliary_data_are_ignored(sim):
    path, _ = sim
    hdr, acqs = read_file(path)
    cfg, gs = load_settings({"method": "zero_filled", "device": "cpu"})
    s = ReconSession(hdr, cfg, gs)
    out = []
    for a in acqs:
        if a.idx.slice == 0 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            nav = ismrmrd.Acquisition(a.getHead(), np.full_like(a.data, np.nan))
            nav.set_flag(ismrmrd.ACQ_IS_NAVIGATION_DATA)
            nav.clear_flag(ismrmrd.ACQ_LAST_IN_SLICE)
            other = ismrmrd.Acquisition(a.getHead(), np.full_like(a.data, np.nan))
            other.encoding_space_ref = 1
            other.clear_flag(ismrmrd.ACQ_LAST_IN_SLICE)
            out += s.handle(nav) + s.handle(other)
        out += s.handle(a)
    out += s.finish()
    assert len(out) == 12 and not s.errors and s.ignored_spaces > 0 and s.ignored > 0


def test_one_bad_slice_does_not_lose_the_others(sim):
    path, _ = sim
    hdr, acqs = read_file(path)
    cfg, gs = load_settings({"method": "low_rank", "lowrank_iters": "5", "device": "cpu"})
    s = ReconSession(hdr, cfg, gs)
    out = []
    for a in acqs:
        if a.idx.slice == 0 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            a.data[:] = np.nan  # a corrupted slice
        out += s.handle(a)
    out += s.finish()
    assert len(out) == 6 and all(im.slice == 1 for im in out)
    assert len(s.errors) == 1 and "slice=0" in s.errors[0] and "NaN" in s.errors[0]
    with pytest.raises(RuntimeError, match="NaN"):
        s.raise_errors()


def test_unset_line_or_phase_counters_are_named_not_averaged(sim):
    """A sequence that never sets its counters (research sequences without labels) put every line
    of a frame, or every frame, at one position, and the collector averaged the repeats: all lines
    at one phase-encoding position failed only later, as "the k-space centre line is not sampled";
    all phases labelled 0 under a header announcing 6 gave one plausible, wrong image, the cycle
    averaged. Both are now named in that slice's error (the other slice is reconstructed)."""
    phase = {"method": "zero_filled", "device": "cpu", "frame_axis": "phase"}  # auto bins them instead (below)
    for edit, message in ((lambda a: setattr(a.idx, "kspace_encode_step_1", 3),
                           "carry one phase-encoding position (kspace_encode_step_1 = 3): the acquisitions' line "
                           "counters look unset"),
                          (lambda a: setattr(a.idx, "phase", 0),
                           "the header announces 6 cardiac phases, but the acquisitions' phase counters fill only 1")):
        out, s = run_session(sim[0], settings=phase, edit=lambda a, e=edit: e(a) if a.idx.slice == 0 else None)
        assert len(out) == 6 and all(im.slice == 1 for im in out)
        assert len(s.errors) == 1 and "slice=0" in s.errors[0] and message in s.errors[0], s.errors


def test_an_unlabelled_gated_cine_under_a_one_phase_header_is_named(sim):
    """Every phase labelled 0 and a header that announces 1 phase (as a retrospectively gated scan
    may come): the lines of the whole cardiac cycle, through many heartbeats, used to be averaged
    into one image. Now an error suggesting frame_axis ecg; a static scan (one trigger delay, no
    repeats) is untouched (the other tests' files)."""
    import re

    hdr, _ = read_file(sim[0])
    xml = hdr.toXML()
    xml = xml.decode() if isinstance(xml, bytes) else xml
    one = re.sub(r"(<phase>\s*<minimum>0</minimum>\s*<maximum>)\d+", r"\g<1>0", xml, count=1)
    assert one != xml
    out, s = run_session(sim[0], header=ismrmrd.xsd.CreateFromDocument(one), settings={
        "method": "zero_filled", "device": "cpu", "frame_axis": "phase"},
        edit=lambda a: setattr(a.idx, "phase", 0) if a.idx.slice == 0 else None)
    assert len(out) == 6 and len(s.errors) == 1 and "slice=0" in s.errors[0], s.errors
    assert "fill one frame" in s.errors[0] and "frame_axis ecg bins the lines" in s.errors[0]


@pytest.mark.parametrize("one_phase_header", [False, True])
def test_frame_axis_auto_bins_an_unlabelled_gated_cine_by_its_trigger_times(sim, caplog, one_phase_header):
    """Under frame_axis auto (the default) such a slice is read as what it is, a retrospectively
    gated cine: its lines binned by their ECG trigger times into the header's phases (6) or
    cardiac_phases, as frame_axis ecg does, said in the log. Its images match the labelled cine's."""
    import re

    hdr, _ = read_file(sim[0])
    labelled, _ = run_session(sim[0])
    if one_phase_header:
        xml = hdr.toXML()
        xml = xml.decode() if isinstance(xml, bytes) else xml
        hdr = ismrmrd.xsd.CreateFromDocument(re.sub(r"(<phase>\s*<minimum>0</minimum>\s*<maximum>)\d+", r"\g<1>0",
                                                    xml, count=1))
    settings = {"method": "zero_filled", "device": "cpu", **({"cardiac_phases": "6"} if one_phase_header else {})}
    with caplog.at_level(logging.INFO, logger="ddugm.gadget"):
        out, s = run_session(sim[0], header=hdr, settings=settings, edit=lambda a: setattr(a.idx, "phase", 0))
    assert len(out) == 12 and not s.errors, s.errors
    assert sum("frame_axis auto bins them by their ECG trigger time into 6 cardiac phases" in r.getMessage()
               for r in caplog.records) == 2
    ref = {(im.slice, im.phase): np.abs(np.asarray(im.data)) for im in labelled}
    for im in out:
        a, b = np.abs(np.asarray(im.data)), ref[(im.slice, im.phase)]
        assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(b), (im.slice, im.phase, np.linalg.norm(a - b) / np.linalg.norm(b))


def test_a_line_acquired_twice_in_its_frame_is_averaged(sim, caplog):
    """Repeats under counters that fill every announced frame are kept: averaged with the line
    they repeat, said in the log. The same line twice gives the images of the line once."""
    hdr, acqs = read_file(sim[0])
    images = []
    for twice in (False, True):
        s = ReconSession(hdr, *load_settings({"method": "zero_filled", "device": "cpu"}))
        out = []
        with caplog.at_level(logging.INFO, logger="ddugm.gadget"):
            for a in acqs:
                if twice and a.idx.slice == 0 and a.idx.phase == 2 and not a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE) \
                        and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                    out += s.handle(ismrmrd.Acquisition(a.getHead(), a.data))
                out += s.handle(a)
            out += s.finish()
        assert len(out) == 12 and not s.errors
        images.append(np.stack([np.asarray(i.data) for i in out]))
    np.testing.assert_allclose(images[1], images[0], rtol=1e-5, atol=1e-7)
    assert any("imaging lines repeat a line already acquired in their frame and are averaged" in r.getMessage()
               for r in caplog.records)


def test_unset_repetition_counters_of_a_real_time_series_are_named(tmp_path):
    path = tmp_path / "rt.h5"
    simulate(str(path), frames=6, size=32, coils=3, accel=3, acs=8, noise=0, seed=3, real_time=True)
    out, s = run_session(path, edit=lambda a: setattr(a.idx, "repetition", 0))
    assert not out and len(s.errors) == 1
    assert "the header announces 6 repetitions, but the acquisitions' repetition counters fill only 1" in s.errors[0]


def test_a_real_time_series_stopped_early_with_a_repeated_line_is_reconstructed(tmp_path):
    """A real-time series fills its first repetitions when the scan stops early: 2 of 6 announced,
    one line acquired twice, is no sign of unset counters (only all lines in one repetition is)."""
    path = tmp_path / "rt.h5"
    simulate(str(path), frames=6, size=32, coils=3, accel=3, acs=8, noise=0, seed=3, real_time=True)
    hdr, acqs = read_file(path)
    s = ReconSession(hdr, *load_settings({"method": "zero_filled", "device": "cpu"}))
    kept = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) or a.idx.repetition < 2]
    twice = next(a for a in kept if a.idx.repetition == 1 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT))
    out = [im for a in kept + [ismrmrd.Acquisition(twice.getHead(), twice.data)] for im in s.handle(a)]
    out += s.finish()
    assert len(out) == 2 and not s.errors, s.errors


def test_recon_data_whose_lines_share_one_row_is_named(tmp_path):
    """What a chain's BucketToBuffer makes of lines without counters: every frame's data on one
    row of E1. Named, instead of failing later at the coil maps."""
    from gadgetron_peer import recon_data_from_file

    path = tmp_path / "c.h5"
    simulate(str(path), frames=4, size=32, coils=3, accel=3, acs=8, noise=0, seed=3)
    hdr, rd = recon_data_from_file(str(path))
    data = rd.bits[0].data.data
    data[:, :16] = 0  # only the centre row (an ACS line, in every frame) keeps data
    data[:, 17:] = 0
    s = ReconSession(hdr, *load_settings({"method": "zero_filled", "device": "cpu"}))
    assert s.handle(rd) == [] and "every frame's data lie on one phase-encoding line (E1 = 16 of 32)" in s.errors[0]


def test_a_stray_line_fails_its_own_group_once(sim, tmp_path, caplog):
    """One line with a wrong set counter forms a group of its own, without the k-space centre:
    an error for it (the other slice's images are sent), and no fallback tried first, which
    failed alike and logged the same failure twice."""
    path, _ = sim
    hdr, acqs = read_file(path)
    cfg, gs = load_settings(operator={"image_weights": str(tmp_path / "missing.safetensors"), "device": "cpu"})
    s = ReconSession(hdr, cfg, gs, Engine())
    lines = [a for a in acqs if a.idx.slice == 0 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    stray = next(a for a in lines if abs(a.idx.kspace_encode_step_1 - 24) > 8 and a.idx.phase == 0)
    stray.idx.set = 1
    out = []
    for a in acqs:
        if a.idx.slice == 0:
            out += s.handle(a)
    out += s.finish()
    assert len(out) == 6 and len(s.errors) == 1
    assert "set=1" in s.errors[0] and "the k-space centre line is not sampled" in s.errors[0]
    assert not [r for r in caplog.records if "set=1" in r.getMessage() and "DD-UGM failed" in r.getMessage()]
    assert len([r for r in caplog.records if "set=1" in r.getMessage()]) == 1  # said once


def test_failed_score_model_falls_back_with_a_warning(sim, tmp_path):
    path, _ = sim
    hdr, acqs = read_file(path)
    cfg, gs = load_settings(operator={"image_weights": str(tmp_path / "missing.safetensors"), "llr_iters": "5",
                                      "device": "cpu"})
    s = ReconSession(hdr, cfg, gs, Engine())
    out = []
    for a in acqs:
        if a.idx.slice == 0:
            out += s.handle(a)
    out += s.finish()
    assert len(out) == 6 and not s.errors
    assert out[0].meta["DDUGM_Method"] == "llr_ttv" and "DD-UGM failed" in out[0].meta["DDUGM_Warning"]
    assert "FALLBACK" in out[0].meta["GADGETRON_ImageComment"]
    cfg, gs = load_settings(operator={"image_weights": str(tmp_path / "missing.safetensors"), "fallback": "false",
                                      "device": "cpu"})
    s = ReconSession(hdr, cfg, gs, Engine())
    for a in acqs:
        if a.idx.slice == 0:
            s.handle(a)
    assert s.finish() == [] and len(s.errors) == 1


def test_gpu_memory_cap_out_of_memory_falls_back_and_the_cache_is_handed_back(sim, monkeypatch):
    """Server setting gpu_memory_gb: on a GPU the process may allocate at most that much (torch's
    per-process fraction, set once); a job that needs more fails as out of memory and falls back
    to LLR + TV on the CPU, with the warning; after every GPU job the cached memory goes back to
    the card (the scanner's other GPU software shares it). Played here with torch.cuda's calls
    recorded and a reconstructor that reports a CUDA device and runs out of memory."""
    import torch

    from ddugm_core import reconstruction
    from ddugm_core.reconstruction import ReconConfig
    from gadgets import session as session_mod

    calls = []
    monkeypatch.setattr(reconstruction, "_GPU_CAPS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append(("cap", f, d)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty",)))

    class OnGpu:
        device = torch.device("cuda")
        config = ReconConfig(device="cpu")

        def recon(self, *a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine = Engine()
    monkeypatch.setattr(engine, "reconstructor", lambda cfg: OnGpu())
    monkeypatch.setattr(engine, "load_models", lambda rec: None)
    path, _ = sim
    hdr, acqs = read_file(path)
    cfg, gs = load_settings(operator={"llr_iters": "5", "device": "cpu"})
    s = ReconSession(hdr, cfg, gs, engine, Limits(gpu_memory_gb=20))
    out = []
    for a in acqs:
        out += s.handle(a)
    out += s.finish()
    assert len(out) == 12 and not s.errors
    assert out[0].meta["DDUGM_Method"] == "llr_ttv" and "OutOfMemoryError" in out[0].meta["DDUGM_Warning"]
    assert calls[0] == ("cap", 0.25, torch.device("cuda", 0))  # 20 of 80 GiB, set once for both slices
    assert [c[0] for c in calls] == ["cap", "empty", "empty"]
    assert reconstruction.cap_gpu_memory("cuda:0", 20) is None  # unchanged: nothing set again
    assert "lifted" in reconstruction.cap_gpu_memory("cuda:0", 0) and calls[-1] == ("cap", 1.0, torch.device("cuda", 0))
    with pytest.raises(ValueError, match="gpu_memory_gb must be 0"):
        Limits(gpu_memory_gb=-1).validate()
    from gadgets.cli import main
    from gadgets.settings import load_limits

    assert load_limits(None, {"gpu_memory_gb": 8.0}).gpu_memory_gb == 8.0  # ddugm serve --gpu-memory-gb 8
    assert main(["serve", "--port", "0", "--gpu-memory-gb", "-1"]) == 2  # refused before binding
    assert session_mod.cap_gpu_memory is reconstruction.cap_gpu_memory


def test_ddugm_with_score_models_and_complex_output(sim, tiny_weights):
    path, _ = sim
    hdr, acqs = read_file(path)
    cfg, gs = load_settings(operator={"image_weights": str(tiny_weights["image"]),
                                      "kspace_weights": str(tiny_weights["kspace"]),
                                      "xt_weights": str(tiny_weights["xt"]),
                                      "steps": "2", "lowrank_iters": "3", "device": "cpu", "output": "complex"})
    s = ReconSession(hdr, cfg, gs)
    out = []
    for a in acqs:
        if a.idx.slice == 1:
            out += s.handle(a)
    out += s.finish()
    assert len(out) == 6 and out[0].meta["DDUGM_Method"] == "ddugm"
    assert out[0].data.dtype == np.complex64 and out[0].getHead().image_type == ismrmrd.IMTYPE_COMPLEX
    assert np.isfinite(np.stack([im.data for im in out])).all()


def test_partial_fourier_and_asymmetric_echo_are_zero_filled_in_place(tmp_path):
    path, truth = tmp_path / "pf.h5", tmp_path / "t.npy"
    simulate(str(path), frames=4, size=48, coils=4, accel=2, acs=12, noise=0.0, partial_fourier=0.75,
             asymmetric_echo=0.8, seed=3, truth=str(truth))
    hdr, acqs = read_file(path)
    assert acqs[1].number_of_samples == 77  # 96 oversampled samples, 20 % before the echo missing
    cfg, gs = load_settings(operator={"method": "zero_filled", "device": "cpu", "debug_dir": str(tmp_path / "dbg")})
    s = ReconSession(hdr, cfg, gs)
    out = []
    for a in acqs:
        out += s.handle(a)
    out += s.finish()
    dbg = np.load(next((tmp_path / "dbg").glob("*.npz")))
    mask = dbg["mask"]  # [frame, ky, kx]
    assert not mask[:, 36:].any() and mask[:, :36].any()  # lines beyond 75 % of 48 never acquired
    # 19 of 96 oversampled samples missing before the echo = 9.5 samples of the 48-sample grid
    assert not mask[..., :10].any() and mask[..., 10:].any(axis=(0, 1)).all()
    rec = np.stack([np.abs(im.data[0, 0]) for im in out])
    ref = np.abs(np.load(truth)[0])
    scale = (rec * ref).sum() / (rec * rec).sum()
    assert psnr(scale * rec, ref) > 18  # a zero-filled partial-Fourier image, placed correctly


def test_maps_from_reference_lines_are_refined_and_only_where_the_data_give_less(sim, monkeypatch):
    """The gadgets' maps from reference (ACS) lines are ours, not the user's: the reconstructor
    refines them (``refine_maps=True``) as it does the maps it estimates. They are used only
    where the frames' lines together do not sample a wider band almost fully: a cine's lines
    add up to one (the maps then come from its time-averaged data: on simulated 12-frame cines
    with 2 ACS lines that was 43.5 dB against 33.7 with the reference's maps), a regular lattice
    (here every fourth line outside the ACS block) does not: its maps come from the reference
    unless they will be refined (then from the data's wider band, partly aliased, which measured
    better on GRAPPA-style cines: README "Calibration lines")."""
    import ddugm_core.reconstruction as rc
    import gadgets.session as gsess
    from gadgets.kspace import flag_set

    rounds, from_ref = [], []
    real_ref = gsess.coil_maps_from_ref
    for name in ("fit_coil_maps", "refine_coil_maps"):  # (the fit, the default, or the average)
        real = getattr(rc, name)
        monkeypatch.setattr(rc, name, lambda *a, real=real, **kw: (rounds.append(1), real(*a, **kw))[1])
    monkeypatch.setattr(gsess, "coil_maps_from_ref", lambda *a, **kw: (lambda m: (from_ref.append(m is not None), m)[1])(
        real_ref(*a, **kw)))
    path, truth = sim
    hdr, acqs = read_file(path)
    lattice = [a for a in acqs if flag_set(a.flags, 20) or flag_set(a.flags, 21) or a.idx.kspace_encode_step_1 % 4 == 0]
    assert len(lattice) < len(acqs)
    # (the lattice is the same in every frame: coil_refine_static's rounds, 10 a slice, not coil_refine's)
    for lines, refine, expected, ref_used in ((acqs, "2", 4, False), (lattice, "2", 20, False), (lattice, "0", 0, True)):
        rounds.clear(), from_ref.clear()
        cfg, gs = load_settings({"method": "llr_ttv", "llr_iters": "5", "coil_refine": refine, "coil_refine_iters": "2",
                                 "coil_refine_min_frames": "6", "device": "cpu"})  # (these series have 6 frames)
        s = ReconSession(hdr, cfg, gs)
        out = []
        for a in lines:
            out += s.handle(a)
        out += s.finish()
        assert len(out) == 12 and not s.errors
        assert from_ref == [ref_used, ref_used] and len(rounds) == expected  # 2 slices x the rounds


@pytest.mark.parametrize("fov, ok", [("1e6", False), ("1e300", False), ("INF", True), ("NaN", True), ("-5", True)])
def test_header_fields_of_view_that_would_crop_the_readout_are_refused(sim, fov, ok):
    """An absurd (or infinite) encoded field of view used to crop the readout to one pixel (a
    silent one-column image): an error now; values that are no field of view (inf, NaN,
    negative) fall back to the matrices' ratio."""
    import re

    from gadgets.geometry import geometry_from_header

    ds = open_dataset(str(sim[0]))
    xml = ds.read_xml_header()
    ds.close()
    xml = xml.decode() if isinstance(xml, bytes) else xml
    bad = re.sub(r"(<encodedSpace>.*?<fieldOfView_mm>\s*<x>)[^<]*", lambda m: m.group(1) + fov, xml, count=1, flags=re.S)
    hdr = ismrmrd.xsd.CreateFromDocument(bad)
    if ok:
        assert geometry_from_header(hdr).nx == 48
    else:
        with pytest.raises(ValueError, match=r"readout fields of view \(encoded .* mm.*leaves 1 of the 96 readout"):
            geometry_from_header(hdr)


def test_header_recon_space_oddities(sim):
    """An infinite recon field of view used to switch the oversampling removal off (a squeezed
    image); it now falls back to the matrices like a missing one. A recon matrix of 1 is refused
    (0 still means: not given, the encoded grid is kept)."""
    import re

    from gadgets.geometry import geometry_from_header

    ds = open_dataset(str(sim[0]))
    xml = ds.read_xml_header()
    ds.close()
    xml = xml.decode() if isinstance(xml, bytes) else xml

    def recon_space(tag, value):
        out = re.sub(rf"(<reconSpace>.*?<{tag}>\s*<x>)[^<]*", lambda m: m.group(1) + value, xml, count=1, flags=re.S)
        assert out != xml
        return geometry_from_header(ismrmrd.xsd.CreateFromDocument(out))

    assert recon_space("fieldOfView_mm", "INF").nx == 48 == recon_space("matrixSize", "0").nx
    with pytest.raises(ValueError, match=r"recon matrix \(1, 48\) is too small"):
        recon_space("matrixSize", "1")


def test_discarding_the_whole_readout_is_named(sim):
    """discard_pre + discard_post covering the whole line used to end as "the mask samples
    nothing"; the error now names the two fields (that slice only: the other is reconstructed)."""
    def edit(a):
        if a.idx.slice == 0:
            a.discard_pre = a.number_of_samples

    out, s = run_session(sim[0], edit=edit)
    assert len(out) == 6 and len(s.errors) == 1
    assert "slice=0" in s.errors[0] and "discard_pre 96 and discard_post 0 leave none of the line's 96" in s.errors[0]


@pytest.mark.parametrize("pre_post", [(0, 95), (60, 0)])
def test_discarding_the_echo_centre_is_named(sim, pre_post):
    """Discards that keep samples but not the echo centre (one sample left at the line's start,
    or the first 60 of 96 removed) used to move the centre silently to the kept samples' middle:
    a near-empty or misplaced image. Now an error naming the fields (that slice only)."""
    def edit(a):
        if a.idx.slice == 0:
            a.discard_pre, a.discard_post = pre_post

    out, s = run_session(sim[0], edit=edit)
    assert len(out) == 6 and len(s.errors) == 1
    assert "slice=0" in s.errors[0]
    assert f"discard_pre {pre_post[0]} and discard_post {pre_post[1]} remove the echo centre" in s.errors[0]


def test_partial_echo_discard_keeps_the_image(sim):
    """A partial echo cut by the discards (the first 20 of 96 samples, centre kept) still
    reconstructs, close to the full readout's image."""
    full, _ = run_session(sim[0])
    cut, s = run_session(sim[0], edit=lambda a: setattr(a, "discard_pre", 20))
    assert len(cut) == len(full) and not s.errors
    a, b = np.abs(np.asarray(full[0].data)), np.abs(np.asarray(cut[0].data))
    assert np.linalg.norm(a - b) < 0.2 * np.linalg.norm(a)


def test_unset_center_sample_means_a_symmetric_echo(sim, caplog):
    """center_sample 0 is the field's default, left so by writers that do not set it. Taken as
    an echo at the first sample it put half of every readout off the grid: a silent garbage
    image. It now means the middle of the readout (as a missing one does in MRD v2), said once
    per slice in the log; the images equal those of the file's own centre (the simulator's
    readouts are symmetric)."""
    import logging

    images = []
    for edit in (None, lambda a: setattr(a, "center_sample", 0)):
        with caplog.at_level(logging.INFO, logger="ddugm.gadget"):
            out, s = run_session(sim[0], edit=edit)
        assert not s.errors
        images.append(np.stack([np.asarray(i.data) for i in out]))
    assert np.allclose(images[0], images[1])
    assert sum("center_sample is 0 (not set)" in r.getMessage() for r in caplog.records) == 2  # once per slice


def test_unset_ky_centre_means_the_encoded_matrix_middle(sim):
    """encodingLimits with a phase-encoding centre of 0 (the field's default, limits written but
    the centre not set) refused every line beyond the matrix's half ("line 24 (centre 0) lies
    outside"): the scan was lost. It now means the encoded matrix's middle, as missing limits do,
    and reconstructs the same images as the file's own centre."""
    import re

    from gadgets.geometry import geometry_from_header

    hdr, _ = read_file(sim[0])
    xml = hdr.toXML()
    xml = xml.decode() if isinstance(xml, bytes) else xml
    unset = re.sub(r"(<kspace_encoding_step_1>.*?<center>)\d+", r"\g<1>0", xml, count=1, flags=re.S)
    assert unset != xml
    g0, g1 = geometry_from_header(hdr), geometry_from_header(ismrmrd.xsd.CreateFromDocument(unset))
    assert g1.ky_center == g1.ny // 2 == g0.ky_center
    images = []
    for h in (hdr, ismrmrd.xsd.CreateFromDocument(unset)):
        out, s = run_session(sim[0], header=h)
        assert not s.errors and len(out) == 12
        images.append(np.stack([np.asarray(i.data) for i in out]))
    assert np.allclose(images[0], images[1])


def test_a_cine_beyond_max_slice_pixels_is_refused_by_name(sim):
    """The reconstruction's memory follows the image pixels (frames x ny x nx; about 1 kB each on
    a CPU), not the k-space samples: with max_slice_elements alone a single-coil slice of 128
    frames of 1024 x 1024 was allowed (some 130 GB). max_slice_pixels (default 2^23) now bounds
    it, by name."""
    from gadgets.settings import Limits

    assert Limits().max_slice_pixels == 1 << 23
    out, s = run_session(sim[0], limits=Limits(max_slice_pixels=5 * 48 * 48))
    assert not out and len(s.errors) == 2  # both slices have 6 frames
    assert "6 frames x 48 x 48 = 13824 image pixels exceed the server's limit max_slice_pixels = 11520" in s.errors[0]
    out, s = run_session(sim[0], limits=Limits(max_slice_pixels=6 * 48 * 48))
    assert len(out) == 12 and not s.errors
    with pytest.raises(ValueError, match="max_slice_pixels must be a positive integer"):
        Limits(max_slice_pixels=0).validate()


def test_every_server_limit_is_documented_at_its_default():
    """config/recon.yaml's server section and README's table list every operator limit at its
    default (max_slice_pixels was new; the YAML's max_iterations comment had fallen behind)."""
    import dataclasses
    from pathlib import Path

    import yaml

    from gadgets.settings import Limits

    root = Path(__file__).resolve().parents[1]
    listed = yaml.safe_load((root / "config" / "recon.yaml").read_text())["server"]
    readme = (root / "README.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(Limits):
        assert f.name in listed, f"config/recon.yaml does not list server: {f.name}"
        assert listed[f.name] == getattr(Limits(), f.name), f.name
        assert f"| `{f.name}` |" in readme, f"README's limits table lacks {f.name}"


@pytest.mark.parametrize("oversampling", [1, 2])
def test_prewhitened_cines_carry_their_noise_level(tmp_path, oversampling):
    """With a noise scan the session knows the k-space noise of each cine after prewhitening and
    readout-oversampling removal (README "Noise": the reconstruction's weights follow it); it is
    the std the samples really have. Without a noise scan it is unknown (None)."""
    from gadgets.rawcine import read_raw_cines

    np.save(tmp_path / "zero.npy", np.zeros((3, 24, 20), np.complex64))  # noise only
    for noise_scan in (True, False):
        path = tmp_path / f"n{noise_scan}.h5"
        simulate(str(path), images=str(tmp_path / "zero.npy"), coils=3, accel=1, acs=0, noise=0.02,
                 oversampling=oversampling, noise_scan=noise_scan, seed=2)
        (_, k, sampled, noise_std), = read_raw_cines(path)
        if not noise_scan:
            assert noise_std is None
            continue
        v = k[:, :, sampled]
        measured = float(np.sqrt((np.mean(v.real ** 2) + np.mean(v.imag ** 2)) / 2))
        assert noise_std == pytest.approx(measured, rel=0.05)
        assert noise_std == pytest.approx(np.sqrt(0.5 / oversampling), rel=0.02)  # unit variance, oversampling removed


def test_a_noisy_scan_strengthens_the_weights_and_says_so(tmp_path, caplog):
    """A scan far noisier than noise_reference, prewhitened with its noise scan: the session passes
    its noise to the reconstruction, which raises the LLR + TV weights, and the log says by how
    much; the same scan without a noise scan (noise unknown) keeps the weights as set."""
    for noise_scan in (True, False):
        path = tmp_path / f"noisy{noise_scan}.h5"
        simulate(str(path), frames=6, size=32, coils=4, accel=2, acs=8, noise=0.05, noise_scan=noise_scan, seed=4)
        hdr, acqs = read_file(path)
        cfg, gs = load_settings(operator={"method": "llr_ttv", "llr_iters": "3", "llr_continue_iters": "2",
                                          "device": "cpu"})
        s = ReconSession(hdr, cfg, gs, Engine())
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ddugm"):
            out = [im for a in acqs for im in s.handle(a)] + s.finish()
        assert len(out) == 6 and not s.errors
        said = [r.getMessage() for r in caplog.records if "times noise_reference" in r.getMessage()]
        if noise_scan:
            assert len(said) == 1 and "LLR and temporal-TV weights x" in said[0] and "sampler" not in said[0], said
        else:
            assert said == []
            assert out[0].meta["DDUGM_NoiseSource"] == "unknown" and out[0].meta["DDUGM_NoiseRatio"] == "1.00"


def test_data_whitened_upstream_get_their_noise_estimated(tmp_path, caplog):
    """What the shipped Gadgetron chains deliver: data prewhitened by NoiseAdjustGadget, which
    keeps the noise scan, so the noise used to be unknown and the weights stayed as set however
    noisy the scan. With 8 coils the reconstruction now estimates it from the data and the log
    says so, close to what the noise scan itself tells the session."""
    from gadgets.kspace import NoiseWhitener

    path = tmp_path / "noisy8.h5"
    simulate(str(path), frames=6, size=32, coils=8, accel=2, acs=8, noise=0.05, seed=4)
    hdr, acqs = read_file(path)
    w = NoiseWhitener()
    for a in acqs:
        if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            w.add(np.asarray(a.data), a.sample_time_us)
    ratios = {}
    for upstream in (False, True):
        cfg, gs = load_settings(operator={"method": "llr_ttv", "llr_iters": "3", "llr_continue_iters": "2",
                                          "device": "cpu"})
        engine = Engine()
        s = ReconSession(hdr, cfg, gs, engine)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ddugm"):
            out = []
            for a in acqs:
                if upstream:  # the chain whitens every readout and keeps the noise scan to itself
                    if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                        continue
                    a = ismrmrd.Acquisition(a.getHead(), w.apply(np.asarray(a.data), a.sample_time_us)
                                            .astype(np.complex64))
                out += s.handle(a)
            out += s.finish()
        assert len(out) == 6 and not s.errors
        said = [r.getMessage() for r in caplog.records if "times noise_reference" in r.getMessage()]
        assert len(said) == 1, said
        assert ("estimated from the coil covariance" in said[0]) == upstream
        ratios[upstream] = float(said[0].split("noise ")[1].split(" times")[0])
        meta = out[0].meta  # each image says what its weights followed
        assert meta["DDUGM_NoiseSource"] == ("estimated" if upstream else "noise scan")
        assert float(meta["DDUGM_NoiseRatio"]) == pytest.approx(ratios[upstream], abs=0.01)
    assert ratios[True] == pytest.approx(ratios[False], rel=0.15), ratios


# ---------------------------------------------------------------- calibration lines
@pytest.fixture(scope="module")
def grappa_cine(tmp_path_factory):
    """A GRAPPA-style cine: every 3rd line in every frame and 12 reference lines, those off the
    lattice flagged calibration-only (as a Siemens scan with embedded reference lines)."""
    d = tmp_path_factory.mktemp("grappa")
    path, truth = d / "grappa.h5", d / "truth.npy"
    simulate(str(path), frames=12, size=48, coils=8, accel=3, acs=12, noise=0.002, seed=2, truth=str(truth),
             mask="equispaced", noise_scan=False)  # (no noise scan: the ReconData peer has none, NoiseAdjust upstream)
    return path, np.abs(np.load(truth)[0])


def _cine_psnr(out, truth):
    rec = np.stack([np.abs(np.asarray(im.data[0, 0])) for im in out]).astype(np.float64)
    scale = (rec * truth).sum() / (rec * rec).sum()
    return psnr(scale * rec, truth)


def test_simulated_grappa_cine_flags_its_reference_lines_as_a_scanner_does(grappa_cine):
    _, acqs = read_file(grappa_cine[0])
    rows = {}
    for a in acqs:
        if a.idx.phase == 3 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            cal = a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            both = a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
            rows[a.idx.kspace_encode_step_1] = "C" if cal else "CI" if both else "I"
    lattice = [r for r in range(48) if (r - 24) % 3 == 0]
    assert sorted(r for r, f in rows.items() if f != "C") == lattice
    assert sorted(r for r, f in rows.items() if f != "I") == list(range(18, 30))
    assert [r for r, f in rows.items() if f == "CI"] == [18, 21, 24, 27]


def test_embedded_calibration_lines_are_data_of_their_frame(grappa_cine, tmp_path):
    """The reference lines of an embedded-calibration scan were acquired within the frames: as
    data of their frame they add to the lattice's lines (auto, data); as coil-map reference only
    (Gadgetron's convention, and ours before) the lattice's aliasing was left to maps from 12
    lines, far worse. A header whose reference is separate keeps them as reference (auto)."""
    path, truth = grappa_cine
    fast = {"method": "llr_ttv", "device": "cpu", "coil_refine": "0"}
    got = {}
    for setting in ("auto", "data", "reference"):
        out, s = run_session(path, {**fast, "calibration_lines": setting}, operator={"debug_dir": str(tmp_path / setting)})
        assert not s.errors and len(out) == 12
        got[setting] = _cine_psnr(out, truth)
        rows = np.load(next((tmp_path / setting).glob("*.npz")))["mask"].any(axis=-1)  # [frame, ky]
        assert (rows.sum(axis=1) == (16 + 8 if setting != "reference" else 16)).all(), setting
    assert got["auto"] == got["data"] and got["auto"] > got["reference"] + 3, got
    hdr, _ = read_file(path)
    hdr.encoding[0].parallelImaging.calibrationMode = ismrmrd.xsd.calibrationModeType.SEPARATE
    out, s = run_session(path, {**fast, "calibration_lines": "auto"}, header=hdr)
    assert not s.errors and _cine_psnr(out, truth) == got["reference"]
    with pytest.raises(ValueError, match="calibration_lines must be one of"):
        load_settings({"calibration_lines": "sometimes"})


def test_embedded_calibration_lines_from_a_recon_data_reference_buffer(grappa_cine, tmp_path):
    """Gadgetron's AcquisitionAccumulateTrigger puts calibration-only lines into the reference
    buffer alone: they are taken back as data of their frame there, and the image is the
    acquisitions' own."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from gadgetron_peer import recon_data_from_file

    path, truth = grappa_cine
    fast = {"method": "zero_filled", "device": "cpu"}
    plain, s = run_session(path, fast)
    assert not s.errors
    hdr, rd = recon_data_from_file(str(path))
    assert rd.bits[0].ref.data.shape[4] == 12  # the reference buffer holds the frames too
    s = ReconSession(hdr, *load_settings(fast, operator={"debug_dir": str(tmp_path)}))
    arrays = s.handle(rd) + s.finish()
    assert not s.errors and len(arrays) == 1
    rows = np.load(next(tmp_path.glob("*.npz")))["mask"].any(axis=-1)  # [frame, ky]
    assert (rows.sum(axis=1) == 16 + 8).all()  # the lattice's 16 lines and the 8 calibration-only ones
    a = np.stack([np.asarray(im.data[0, 0]) for im in plain])  # [frame, y, x]
    b = np.moveaxis(np.asarray(arrays[0].data)[:, :, 0, 0, :, 0, 0], -1, 0).transpose(0, 2, 1)
    assert a.shape == b.shape and np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)


def test_a_grappa_cine_whose_maps_are_refined_takes_them_from_its_data(grappa_cine):
    """The same lattice in every frame and the reference lines among the data: the data's band at
    90 % is the reference's. With the maps refined (12 frames) they come from the data's wider
    band, as for any cine; without refinement, from the reference as before."""
    from ddugm_core.reconstruction import ReconConfig
    from gadgets.rawcine import _Collecting
    from gadgets.session import coil_maps_from_ref

    hdr, acqs = read_file(grappa_cine[0])
    s = _Collecting(hdr)
    for a in acqs:
        s.handle(a)
    s.finish()
    (cine,) = s.cines
    assert cine.ref is not None and cine.kspace.shape[1] == 12
    assert coil_maps_from_ref(cine, ReconConfig(device="cpu"), "cpu") is None
    assert coil_maps_from_ref(cine, ReconConfig(device="cpu", coil_refine=0), "cpu") is not None
    assert coil_maps_from_ref(cine, ReconConfig(device="cpu", coil_refine_min_frames=13), "cpu") is not None


def test_recon_command_takes_calibration_lines(grappa_cine, tmp_path):
    """`ddugm recon --calibration-lines reference` gives Gadgetron's convention, the default the data."""
    from gadgets.cli import main

    images = {}
    for setting in ("auto", "reference"):
        out = tmp_path / f"{setting}.h5"
        assert main(["recon", str(grappa_cine[0]), str(out), "--method", "zero_filled", "--device", "cpu",
                     "--calibration-lines", setting, "--quiet"]) == 0
        ds = ismrmrd.Dataset(str(out), "dataset", False)
        group = next(k for k in ds._dataset.keys() if k.startswith("image"))
        images[setting] = np.stack([np.asarray(ds.read_image(group, i).data) for i in range(ds.number_of_images(group))])
        ds.close()
    assert images["auto"].shape == images["reference"].shape and not np.allclose(images["auto"], images["reference"])
