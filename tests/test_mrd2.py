"""MRD v2 (Gadgetron's successor, Pingvin): ``ddugm stream`` with mrd-python's own readers,
writers and tools (its phantom generator and its reference stream reconstruction)."""
import subprocess
import sys

import ismrmrd
import numpy as np
import pytest

mrd = pytest.importorskip("mrd")

from gadgets.mrd2 import acquisition_to_v1, acquisition_to_v2, header_to_v1, header_to_v2  # noqa: E402
from gadgets.replay import open_dataset, replay  # noqa: E402
from gadgets.simulate import simulate  # noqa: E402


def _ddugm(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gadgets.cli", "stream", *map(str, args)], input=stdin,
                          capture_output=True, timeout=180)


def _images(data: bytes):
    import io

    r = mrd.BinaryMrdReader(io.BytesIO(data))
    header = r.read_header()
    return header, list(r.read_data())


def test_stream_of_mrd_pythons_phantom_matches_its_own_reconstruction(tmp_path):
    raw = tmp_path / "phantom.bin"
    subprocess.run([sys.executable, "-m", "mrd.tools.phantom", "-m", "32", "-c", "4", "-r", "2", "-o", str(raw)],
                   check=True, timeout=120)
    ref = subprocess.run([sys.executable, "-m", "mrd.tools.stream_recon", "-i", str(raw)], capture_output=True,
                         check=True, timeout=120).stdout
    ours = _ddugm("--method", "zero_filled", "--device", "cpu", stdin=raw.read_bytes())  # stdin -> stdout
    assert ours.returncode == 0, ours.stderr.decode()[-2000:]
    header, items = _images(ours.stdout)
    _, ref_items = _images(ref)
    assert header.encoding[0].encoded_space.matrix_size.x == 64  # the input's header, passed on
    assert len(items) == 2 and all(isinstance(i, mrd.StreamItem.ImageFloat) for i in items)
    assert [i.value.head.repetition for i in items] == [0, 1]
    for a, b in zip(items, ref_items):  # fully sampled: the coil-combined image, as mrd-python's own recon gives
        x, y = np.abs(a.value.data).ravel(), np.abs(b.value.data).ravel()
        assert np.corrcoef(x, y)[0, 1] > 0.98
    assert items[0].value.meta["DDUGM_Method"] == [mrd.ImageMetaValue.String("zero_filled")]


def test_converted_ismrmrd_file_streams_to_the_same_images_as_recon(tmp_path):
    raw = tmp_path / "cine.h5"
    simulate(str(raw), frames=4, size=32, coils=3, accel=2, acs=8, noise=0.002, slices=2, seed=4)
    v2 = tmp_path / "cine.mrd"
    r = _ddugm("--from-ismrmrd", raw, "--output", v2)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    out = tmp_path / "images.mrd"
    r = _ddugm("--input", v2, "--output", out, "--method", "low_rank", "--steps", "3", "--device", "cpu",
               "--output-type", "complex")
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    _, items = _images(out.read_bytes())
    assert len(items) == 8 and all(isinstance(i, mrd.StreamItem.ImageComplexFloat) for i in items)
    replay(str(raw), str(tmp_path / "v1.h5"), overrides={"method": "low_rank", "steps": "3", "device": "cpu",
                                                          "output": "complex"}, quiet=True)
    ds = open_dataset(str(tmp_path / "v1.h5"))
    ref = [ds.read_image("image_1", i) for i in range(ds.number_of_images("image_1"))]
    ds.close()
    for a, b in zip(items, ref):
        h = a.value.head
        assert (h.slice, h.phase, h.image_index) == (b.slice, b.phase, b.image_index)
        assert np.allclose(h.position, b.position) and np.allclose(h.line_dir, b.phase_dir)
        np.testing.assert_allclose(a.value.data, b.data, atol=1e-5 * np.abs(b.data).max())


def test_conversion_keeps_every_field_the_reconstruction_reads(tmp_path):
    raw = tmp_path / "c.h5"
    simulate(str(raw), frames=2, size=16, coils=2, accel=2, acs=4, noise=0.002, seed=1)
    ds = open_dataset(str(raw))
    hdr = ismrmrd.xsd.CreateFromDocument(ds.read_xml_header())
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    back = header_to_v1(header_to_v2(hdr))
    for a, b in ((back.encoding[0].encodedSpace, hdr.encoding[0].encodedSpace),
                 (back.encoding[0].reconSpace, hdr.encoding[0].reconSpace)):
        assert (a.matrixSize.x, a.matrixSize.y, a.fieldOfView_mm.x) == (b.matrixSize.x, b.matrixSize.y,
                                                                          b.fieldOfView_mm.x)
    assert back.encoding[0].encodingLimits.kspace_encoding_step_1.center == \
        hdr.encoding[0].encodingLimits.kspace_encoding_step_1.center
    # the calibration mode (calibration_lines: auto reads it) and the acceleration
    pi, pi0 = back.encoding[0].parallelImaging, hdr.encoding[0].parallelImaging
    assert pi.calibrationMode.value == pi0.calibrationMode.value == "embedded"
    assert pi.accelerationFactor.kspace_encoding_step_1 == pi0.accelerationFactor.kspace_encoding_step_1 == 2
    for a in acqs[:5]:
        b = acquisition_to_v1(acquisition_to_v2(a))
        assert bytes(b.getHead()) == bytes(a.getHead())
        np.testing.assert_array_equal(b.data, a.data)


def test_bad_streams_get_one_line_errors(tmp_path):
    r = _ddugm("--method", "low_rank", stdin=b"this is not MRD" * 10)
    err = r.stderr.decode()
    assert r.returncode == 2 and "not an MRD v2 binary stream" in err and "Traceback" not in err
    raw = tmp_path / "p.bin"
    subprocess.run([sys.executable, "-m", "mrd.tools.phantom", "-m", "32", "-c", "2", "-o", str(raw)], check=True)
    r = _ddugm("--method", "low_rank", stdin=raw.read_bytes()[:-3000])  # cut mid-stream
    err = r.stderr.decode()
    assert r.returncode == 2 and "ended early or is corrupted" in err and "Traceback" not in err


def test_truncated_stream_still_gives_a_readable_output_of_the_completed_slices(tmp_path):
    raw = tmp_path / "p.bin"
    subprocess.run([sys.executable, "-m", "mrd.tools.phantom", "-m", "32", "-c", "2", "-r", "2", "-o", str(raw)],
                   check=True, timeout=120)
    opts = ("--method", "zero_filled", "--device", "cpu", "--frame-axis", "phase")  # each repetition a slice of its own
    full = _ddugm(*opts, stdin=raw.read_bytes())
    assert full.returncode == 0 and len(_images(full.stdout)[1]) == 2
    cut = tmp_path / "cut.bin"
    cut.write_bytes(raw.read_bytes()[:-3000])  # inside the second repetition
    out = tmp_path / "o.mrd"
    r = _ddugm("--input", cut, "--output", out, *opts)
    err = r.stderr.decode()
    assert r.returncode == 2 and "ended early or is corrupted" in err and "Traceback" not in err
    _, items = _images(out.read_bytes())  # a complete stream (end marker): mrd-python reads it without error
    assert [i.value.head.repetition for i in items] == [0]  # the first repetition; not the broken one
    np.testing.assert_array_equal(items[0].value.data, _images(full.stdout)[1][0].value.data)


def test_a_real_time_stream_in_blocks_sends_each_block_when_it_is_complete(tmp_path):
    """``--realtime-block 2`` on 4 repetitions: two series of 2, numbered by repetition; a stream cut
    inside the last repetition still gives the first block, whole."""
    raw = tmp_path / "p.bin"
    subprocess.run([sys.executable, "-m", "mrd.tools.phantom", "-m", "32", "-c", "2", "-r", "4", "-o", str(raw)],
                   check=True, timeout=120)
    opts = ("--method", "low_rank", "--device", "cpu", "--realtime-block", "2")
    full = _ddugm(*opts, stdin=raw.read_bytes())
    assert full.returncode == 0, full.stderr.decode()[-2000:]
    items = _images(full.stdout)[1]
    assert [(i.value.head.repetition, i.value.head.phase) for i in items] == [(r, 0) for r in range(4)]
    assert "2 blocks" not in full.stderr.decode() and "block=1" in full.stderr.decode()  # asked for, not forced
    cut = tmp_path / "cut.bin"
    cut.write_bytes(raw.read_bytes()[:-3000])
    r = _ddugm("--input", cut, "--output", tmp_path / "o.mrd", *opts)
    assert r.returncode == 2
    got = _images((tmp_path / "o.mrd").read_bytes())[1]
    assert [i.value.head.repetition for i in got] == [0, 1]
    for a, b in zip(got, items):
        np.testing.assert_array_equal(a.value.data, b.value.data)


def test_bad_input_creates_no_output_file(tmp_path):
    bad = tmp_path / "bad.mrd"
    bad.write_bytes(b"this is not MRD" * 10)
    out = tmp_path / "o.mrd"
    for args in (("--input", bad), ("--input", tmp_path / "missing.mrd"), ("--from-ismrmrd", tmp_path / "missing.h5"),
                 ("--from-ismrmrd", bad)):
        r = _ddugm(*args, "--output", out, "--method", "zero_filled")
        err = r.stderr.decode()
        assert r.returncode == 2 and err.strip().splitlines()[-1].startswith("ddugm stream: error:"), (args, err)
        assert "Traceback" not in err and list(tmp_path.iterdir()) == [bad], (args, list(tmp_path.iterdir()))


def test_conversion_of_a_raw_file_that_breaks_part_way_leaves_no_output(tmp_path, monkeypatch):
    from gadgets import mrd2
    from gadgets import replay as replay_module

    raw = tmp_path / "c.h5"
    simulate(str(raw), frames=2, size=16, coils=2, accel=2, acs=4, noise=0.002, seed=1)
    real = replay_module._read_block

    def block(ds, start, stop):
        if stop > 10:
            raise OSError("Can't synchronously read data (bad global heap collection signature)")
        return real(ds, start, stop)

    monkeypatch.setattr(replay_module, "READ_BLOCK", 4)
    monkeypatch.setattr(replay_module, "_read_block", block)
    one = ismrmrd.Dataset.read_acquisition

    def read(self, i):  # the one-at-a-time fallback fails there too
        if i >= 10:
            raise OSError("Can't synchronously read data (bad global heap collection signature)")
        return one(self, i)

    monkeypatch.setattr(ismrmrd.Dataset, "read_acquisition", read)
    out = tmp_path / "c.mrd"
    out.write_bytes(b"an earlier conversion")
    with pytest.raises(replay_module.UnreadableAcquisition, match="acquisition 10 cannot be read"):
        mrd2._convert(str(raw), str(out))
    assert out.read_bytes() == b"an earlier conversion" and sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "c.mrd"]
    monkeypatch.undo()
    assert mrd2._convert(str(raw), str(out)) > 10 and _images(out.read_bytes())[0] is not None


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path):
    """``--output`` naming the input (or a link to it) used to truncate the data being read, and
    ``ddugm recon in.h5 in.h5`` replaced a raw file by its images: both are refused, untouched."""
    raw = tmp_path / "raw.h5"
    simulate(str(raw), frames=3, size=16, coils=2, accel=2, acs=4, noise=0.002, slices=1, seed=1)
    before = raw.read_bytes()
    link = tmp_path / "link.h5"
    link.symlink_to(raw)
    r = _ddugm("--from-ismrmrd", raw, "--output", link, "--method", "zero_filled")
    assert r.returncode == 2 and "the output would replace the input file" in r.stderr.decode()
    v2 = tmp_path / "in.mrd"
    assert _ddugm("--from-ismrmrd", raw, "--output", v2).returncode == 0
    v2_bytes = v2.read_bytes()
    r = _ddugm("--input", v2, "--output", v2, "--method", "zero_filled")
    assert r.returncode == 2 and "the output would replace the input file" in r.stderr.decode()
    with pytest.raises(Exception, match="the output would replace the raw input file"):
        replay(str(raw), str(link), overrides={"method": "zero_filled"}, quiet=True)
    assert raw.read_bytes() == before and v2.read_bytes() == v2_bytes


def test_ecg_binning_through_mrd_v2_gives_the_images_recon_gives(tmp_path):
    """A free-running acquisition converted to MRD v2 keeps its trigger delays: `ddugm stream
    --frame-axis ecg` bins it into the same cine (by phase, repetition 0) as `ddugm recon`."""
    raw = tmp_path / "ecg.h5"
    simulate(str(raw), frames=6, size=32, coils=2, accel=4, acs=4, noise=0.002, seed=5, ecg_beats=2)
    v2 = tmp_path / "ecg.mrd"
    assert _ddugm("--from-ismrmrd", raw, "--output", v2).returncode == 0
    out = tmp_path / "images.mrd"
    args = ("--method", "zero_filled", "--device", "cpu", "--output-type", "complex", "--frame-axis", "ecg",
            "--cardiac-phases", "6")
    r = _ddugm("--input", v2, "--output", out, *args)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert b"binned into 6 cardiac phases" in r.stderr
    _, items = _images(out.read_bytes())
    replay(str(raw), str(tmp_path / "v1.h5"), overrides={"method": "zero_filled", "device": "cpu", "output": "complex",
                                                          "frame_axis": "ecg", "cardiac_phases": "6"}, quiet=True)
    ds = open_dataset(str(tmp_path / "v1.h5"))
    ref = [ds.read_image("image_1", i) for i in range(ds.number_of_images("image_1"))]
    ds.close()
    assert len(items) == len(ref) == 6
    for p, (a, b) in enumerate(zip(items, ref)):
        assert (a.value.head.phase, a.value.head.repetition, b.phase, b.repetition) == (p, 0, p, 0)
        np.testing.assert_allclose(a.value.data, b.data, atol=1e-5 * np.abs(b.data).max())


def _stream_bytes(items, header=None) -> bytes:
    import io

    buf = io.BytesIO()
    w = mrd.BinaryMrdWriter(buf)
    w.write_header(header or mrd.Header())
    w.write_data(items)
    w.close()
    return buf.getvalue()


def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([(n & 0x7F) | 0x80])
        n >>= 7
    return out + bytes([n])


def _run_stream(data: bytes, tmp_path, server: str = ""):
    import io

    from gadgets.mrd2 import stream

    cfg = tmp_path / "operator.yaml"
    cfg.write_text(f"server:\n{server or '  max_message_mb: 1024'}\n")
    with pytest.raises(ValueError) as e:
        stream(io.BytesIO(data), io.BytesIO(), str(cfg), {"method": "zero_filled", "device": "cpu"})
    return str(e.value)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """mrd-python's phantom stream: its header and items."""
    raw = tmp_path_factory.mktemp("phantom") / "p.bin"
    subprocess.run([sys.executable, "-m", "mrd.tools.phantom", "-m", "32", "-c", "2", "-o", str(raw)], check=True,
                   timeout=120)
    return _images(raw.read_bytes())


def test_a_corrupted_array_length_is_refused_before_anything_is_allocated(tmp_path, phantom):
    # mrd-python allocates (and zero-fills) what a length field asks for before reading a byte: a corrupted
    # one could take all the memory. Asked for 64 MiB under a limit of 1 MiB, the stream is refused first.
    header, items = phantom
    acq = items[0].value
    acq.data = np.full((2, 16), 1234.5 + 6.5j, np.complex64)
    data = _stream_bytes([mrd.StreamItem.Acquisition(acq)], header)
    at = data.index(acq.data.tobytes())
    assert data[at - 2:at] == b"\x02\x10"  # the data's shape [2, 16], as varints
    bad = data[:at - 1] + _varint(1 << 22) + data[at:]  # [2, 4 Mi] complex64: 64 MiB
    err = _run_stream(bad, tmp_path, "  max_message_mb: 1")
    assert "array of 67108864 bytes" in err and "max_message_mb" in err, err


def test_a_corrupted_string_length_is_refused_before_anything_is_allocated(tmp_path, phantom):
    data = _stream_bytes([], phantom[0])
    at = data.index(b'{"protocol"')  # the schema (JSON), after the magic bytes, the format version and its length
    assert data[:5] == b"yardl" and data[9:at] == _varint(len(mrd.BinaryMrdReader.schema.encode()))
    bad = data[:9] + _varint(1 << 26) + data[at:]  # a 64 MiB schema string
    err = _run_stream(bad, tmp_path)
    assert "not an MRD v2 binary stream" in err and "string of 67108864 bytes" in err and "max_text_kb" in err, err


def test_gadgetron_internal_buffers_in_the_stream_are_refused_by_name(tmp_path, phantom):
    data = _stream_bytes([mrd.StreamItem.AcquisitionBucket(mrd.AcquisitionBucket())], phantom[0])
    err = _run_stream(data, tmp_path)
    assert "holds an item of type AcquisitionBucket" in err and "reads acquisitions" in err, err
