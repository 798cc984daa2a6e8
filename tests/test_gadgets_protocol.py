"""Gadgetron compatibility over loopback: our module started exactly as Gadgetron starts it
(``python -m gadgetron PORT gadgets.external reconstruct``), Gadgetron's side played with the
gadgetron package's own writers and readers; the persistent server with concurrent clients
(one sending garbage) and an ``ismrmrd`` MRD-protocol client."""
import importlib.util
import os
import socket
import struct
import threading
import time
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest
from gadgetron_peer import FakeGadgetron, FireConnection, _Sock, read_replies, recon_data_from_file

from gadgets.replay import open_dataset
from gadgets.server import Server, chain_properties
from gadgets.session import ReconSession
from gadgets.settings import load_settings
from gadgets.simulate import simulate

FAST = {"method": "low_rank", "lowrank_iters": "5", "device": "cpu"}
#: ismrmrd's MRD serializer (ProtocolSerializer / ProtocolDeserializer) came with ismrmrd 1.15;
#: Gadgetron 4.7's image has 1.14, where these client-side tests are skipped
needs_serializer = pytest.mark.skipif(importlib.util.find_spec("ismrmrd.serialization") is None,
                                      reason="ismrmrd < 1.15 has no MRD serializer")


@pytest.fixture(scope="module")
def cine(tmp_path_factory):
    d = tmp_path_factory.mktemp("cine")
    path = d / "cine.h5"
    simulate(str(path), frames=5, size=40, coils=4, accel=3, acs=10, noise=0.002, slices=2, seed=2)
    ds = open_dataset(str(path))
    xml = ds.read_xml_header()
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    return path, xml, acqs


@pytest.fixture
def gadgetron():
    peers = []

    def start(env=None):
        peers.append(FakeGadgetron(env=env))
        return peers[-1]

    yield start
    for p in peers:
        p.cleanup()


# ---------------------------------------------------------------- external gadget (execute)
def operator_env(tmp_path, text: str) -> dict:
    """The environment of a Gadgetron whose operator YAML ($DDUGM_CONFIG) holds ``text``."""
    y = tmp_path / "operator.yaml"
    y.write_text(text)
    return {**os.environ, "DDUGM_CONFIG": str(y)}


def test_acquisitions_in_images_out_with_score_models(gadgetron, cine, tiny_weights, tmp_path):
    _, xml, acqs = cine
    # the chain names the weights: allowed only because the operator allows their folder
    g = gadgetron(operator_env(tmp_path, f"server:\n  allowed_dirs: ['{tiny_weights['image'].parent}']\n"))
    g.send_config({"image_weights": tiny_weights["image"], "kspace_weights": tiny_weights["kspace"],
                   "xt_weights": tiny_weights["xt"], "steps": 2,
                   "lowrank_iters": 3, "llr_iters": 5, "pnp_inner": 2, "device": "cpu", "series_index": 7})
    g.send_header(xml)
    for a in acqs:
        g.send(a)
    g.close_stream()
    r = g.replies()
    rc, _, err = g.wait()
    assert r.closed and not r.errors, err
    assert len(r.images) == 10 and rc == 0
    for i, im in enumerate(r.images):
        h = im.getHead()
        assert (h.slice, h.phase, h.image_index, h.image_series_index) == (i // 5, i % 5, i + 1, 7)
        assert tuple(h.matrix_size) == (40, 40, 1) and h.field_of_view[0] == 320.0
        assert tuple(h.position) == (0.0, 0.0, 8.0 * (i // 5)) and tuple(h.phase_dir) == (0.0, 1.0, 0.0)
        assert im.meta["DDUGM_Method"] == "ddugm" and np.isfinite(im.data).all() and im.data.max() > 0


def test_recon_data_in_image_array_out(gadgetron, cine):
    path, _, _ = cine
    hdr, recon_data = recon_data_from_file(str(path), slice_=1)
    g = gadgetron()
    g.send_config({**FAST, "output": "complex"})
    g.send_header(hdr.toXML())
    g.send(recon_data)
    g.close_stream()
    r = g.replies()
    rc, _, err = g.wait()
    assert r.closed and not r.errors, err
    assert len(r.arrays) == 1 and rc == 0
    arr = r.arrays[0]
    assert arr.data.shape == (40, 40, 1, 1, 5, 1, 1) and arr.data.dtype == np.complex64
    assert arr.headers.shape == (5, 1, 1) and len(arr.meta) == 5
    for n in range(5):
        h = arr.headers[n, 0, 0]
        assert h.phase == n and h.image_index == n + 1 and h.image_type == ismrmrd.IMTYPE_COMPLEX
        assert tuple(h.matrix_size) == (40, 40, 1) and tuple(h.read_dir) == (1.0, 0.0, 0.0)
    assert ismrmrd.Meta.deserialize(arr.meta[0])["DDUGM_Method"] == "low_rank"
    assert all(arr.headers[n, 0, 0].slice == 1 for n in range(5))
    # the same slice through the acquisition path (without the noise scan, as NoiseAdjust upstream
    # would have consumed it) gives the same images
    _, _, acqs = cine
    cfg, gs = load_settings({**FAST, "output": "complex"})
    s = ReconSession(hdr, cfg, gs)
    direct = []
    for a in acqs:
        if a.idx.slice == 1 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            direct += s.handle(a)
    direct += s.finish()
    expect = np.stack([np.asarray(i.data[0, 0]).T for i in direct], axis=-1)  # [x, y, N]
    got = arr.data[:, :, 0, 0, :, 0, 0]
    assert np.linalg.norm(got - expect) < 1e-3 * np.linalg.norm(expect)


def test_invalid_setting_is_reported_as_an_error_message(gadgetron, cine):
    _, xml, acqs = cine
    g = gadgetron()
    g.send_config({"preset": "bogus"})
    g.send_header(xml)
    r = g.replies(timeout=60)
    rc, seconds, _ = g.wait()
    assert len(r.errors) == 1 and "preset must be one of" in r.errors[0]
    assert r.closed and rc not in (0, None)


def test_malformed_stream_gets_an_error_and_the_process_ends(gadgetron, cine):
    _, xml, acqs = cine
    g = gadgetron()
    g.send_config(FAST)
    g.send_header(xml)
    g.send(acqs[1])
    g.sock.write(struct.pack("<H", 777) + b"garbage" * 10)
    t0 = time.perf_counter()
    r = g.replies(timeout=30)
    rc, _, _ = g.wait(timeout=30)
    assert len(r.errors) == 1 and "unexpected message id 777" in r.errors[0] and r.closed
    assert rc not in (0, None) and time.perf_counter() - t0 < 10


def test_garbage_acquisition_sizes_are_rejected_before_allocating(gadgetron, cine):
    _, xml, acqs = cine
    g = gadgetron()
    g.send_config(FAST)
    g.send_header(xml)
    head = ismrmrd.AcquisitionHeader()
    head.number_of_samples, head.active_channels = 65535, 65535
    g.sock.write(struct.pack("<H", 1008) + bytes(head))
    r = g.replies(timeout=30)
    assert r.errors and "not a valid acquisition" in r.errors[0]


def test_disconnect_mid_stream_ends_the_process_promptly(gadgetron, cine):
    _, xml, acqs = cine
    g = gadgetron()
    g.send_config(FAST)
    g.send_header(xml)
    for a in acqs[:20]:
        g.send(a)
    g.sock.s.close()  # Gadgetron vanishes
    rc, seconds, err = g.wait(timeout=30)
    assert rc is not None, "the module kept running after its peer vanished"
    assert rc != 0 and seconds < 10 and "went away" in err


def test_a_failed_slice_reaches_gadgetron_as_error_after_the_good_ones(gadgetron, cine):
    _, xml, acqs = cine
    g = gadgetron()
    g.send_config(FAST)
    g.send_header(xml)
    for a in acqs:
        if a.idx.slice == 1 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            a = ismrmrd.Acquisition(a.getHead(), np.full_like(a.data, np.nan))
        g.send(a)
    g.close_stream()
    r = g.replies()
    assert len(r.images) == 5 and all(im.slice == 0 for im in r.images)
    assert len(r.errors) == 1 and "slice=1" in r.errors[0] and r.closed


# ---------------------------------------------------------------- persistent server
@pytest.fixture
def server():
    srv = Server("127.0.0.1", 0, overrides=FAST, idle_timeout=30)
    port = srv.bind()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, port
    srv.shutdown()
    t.join(5)


def _mrd_client(port, xml_text, acqs, config=None, out=None):
    """An MRD client: ismrmrd's ProtocolSerializer out, ProtocolDeserializer in."""
    from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolDeserializer, ProtocolSerializer

    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    wf = sock.makefile("wb")
    ser = ProtocolSerializer(wf)
    ser.serialize(ConfigText(config) if config else ConfigFile("ddugm"))
    ser.serialize(ismrmrd.xsd.CreateFromDocument(xml_text))
    ser.serialize("a text message from the client")
    for a in acqs:
        ser.serialize(a)
    ser.close()
    wf.flush()
    images = list(ProtocolDeserializer(sock.makefile("rb")).deserialize())
    sock.close()
    if out is not None:
        out.append(images)
    return images


@needs_serializer
def test_server_mrd_client_gets_images(server, cine):
    _, port = server
    _, xml, acqs = cine
    config = '<configuration><property name="series_index" value="9"/></configuration>'
    images = _mrd_client(port, xml, acqs, config)
    assert len(images) == 10 and all(isinstance(i, ismrmrd.Image) for i in images)
    assert {i.image_series_index for i in images} == {9}


@needs_serializer
def test_server_concurrent_clients_one_sending_garbage(server, cine):
    srv, port = server
    _, xml, acqs = cine
    results, garbage = [], {}

    def bad():
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"\x99\x99this is not MRD" * 4)
        garbage["reply"] = read_replies(_Sock(s), timeout=30)
        s.close()

    threads = [threading.Thread(target=_mrd_client, args=(port, xml, acqs, None, results)) for _ in range(2)]
    threads.append(threading.Thread(target=bad))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2 and all(len(r) == 10 for r in results)
    a, b = (np.stack([i.data for i in r]) for r in results)
    np.testing.assert_array_equal(a, b)  # the same scan gives the same images, whatever ran beside it
    assert garbage["reply"].errors and "expected a configuration message" in garbage["reply"].errors[0]
    assert srv.engine.count == 4  # two clients x two slices went through the one queue


def test_server_gadgetron_connect_style_with_recon_data(server, cine):
    _, port = server
    path, _, _ = cine
    hdr, recon_data = recon_data_from_file(str(path))
    from gadgetron.types.recon_data import write_recon_data

    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock = _Sock(s)
    cfg = b'<?xml version="1.0"?>\n<configuration><property name="send" value="images"/></configuration>\n'
    sock.write(struct.pack("<HI", 2, len(cfg)) + cfg)
    x = hdr.toXML().encode()
    sock.write(struct.pack("<HI", 3, len(x)) + x)
    write_recon_data(sock, recon_data)
    sock.write(struct.pack("<H", 4))
    r = read_replies(sock, timeout=60)
    s.close()
    assert r.closed and not r.errors and len(r.images) == 5


@needs_serializer
def test_server_client_vanishing_does_not_disturb_the_server(server, cine):
    srv, port = server
    _, xml, acqs = cine
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(struct.pack("<HI", 2, 0))
    x = xml.encode() if isinstance(xml, str) else xml
    s.sendall(struct.pack("<HI", 3, len(x)) + x)
    s.close()
    assert len(_mrd_client(port, xml, acqs)) == 10


def test_chain_properties_pick_our_node_only():
    chain = b"""<?xml version="1.0"?><configuration><version>2</version><stream>
      <gadget><name>Acc</name><dll>gadgetron_mricore</dll><classname>AcquisitionAccumulateTriggerGadget</classname>
        <property name="trigger_dimension" value="slice"/></gadget>
      <external><connect port="18000"/><configuration><property name="preset" value="paper"/></configuration></external>
    </stream></configuration>"""
    assert chain_properties(chain) == {"preset": "paper"}
    assert chain_properties(b'<configuration><property name="steps" value="3"/></configuration>') == {"steps": "3"}
    assert chain_properties(b"") == {}


@needs_serializer
def test_ddugm_serve_command(cine):
    """The installed command: binds loopback by default, loads, serves an MRD client, stops on SIGINT."""
    import subprocess
    import sys

    _, xml, acqs = cine
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = subprocess.Popen([sys.executable, "-m", "gadgets.cli", "serve", "--port", str(port), "--device", "cpu"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        line = ""
        while "listening on 127.0.0.1" not in line and time.time() < deadline:
            line = proc.stderr.readline()
        assert "listening on 127.0.0.1" in line, "server did not start"
        images = _mrd_client(port, xml, acqs, '<configuration><property name="method" value="low_rank"/>'
                                              '<property name="lowrank_iters" value="3"/></configuration>')
        assert len(images) == 10
    finally:
        proc.send_signal(2)
        proc.wait(10)
    assert proc.returncode == 0


# ---------------------------------------------------------------- MRD / FIRE clients
CLIENTS = Path(__file__).resolve().parents[2] / "shared" / "clients" / "python-ismrmrd-server"


def _fire_client(port, raw, out, cwd, config="ddugm"):
    """python-ismrmrd-server's own client.py, unmodified, run from where it is shipped."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(CLIENTS / "client.py"), str(raw), "-a", "127.0.0.1", "-p", str(port),
                           "-c", config, "-o", str(out)], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(CLIENTS)})


#: python-ismrmrd-server's client.py itself needs ismrmrd >= 1.14.1 (Dataset as a context manager)
needs_fire_client = pytest.mark.skipif(not (CLIENTS / "client.py").is_file() or not hasattr(ismrmrd.Dataset, "__enter__"),
                                       reason="python-ismrmrd-server client not in ../shared, or ismrmrd < 1.14.1")


@needs_fire_client
def test_python_ismrmrd_server_client_gets_images_and_readable_errors(server, cine, tmp_path):
    import json

    _, port = server
    path, _, _ = cine
    r = _fire_client(port, path, tmp_path / "out.h5", tmp_path)
    log = r.stdout + r.stderr
    assert "Received    10 images" in log, log[-2000:]  # its NUL-terminated header is accepted
    # its JSON parameters (configAdditional, sent as text after the header) are settings, checked like the rest
    (tmp_path / "ddugm.json").write_text(json.dumps({"parameters": {"series_index": 4, "unrelated": "x"}}))
    r = _fire_client(port, path, tmp_path / "out2.h5", tmp_path)
    log = r.stdout + r.stderr
    assert "Received    10 images" in log, log[-2000:]
    with h5py.File(tmp_path / "out2.h5") as f:
        group = f[list(f.keys())[0]]
        assert any(k.startswith("image_4") for k in group.keys()), list(group.keys())
    (tmp_path / "ddugm.json").write_text(json.dumps({"parameters": {"steps": 100000}}))
    r = _fire_client(port, path, tmp_path / "out3.h5", tmp_path)
    log = r.stdout + r.stderr
    assert "ERR DD-UGM server: ValueError: steps = 100000 exceeds the server's limit max_steps" in log, log[-2000:]
    assert "unknown message type" not in log.lower()


@needs_serializer
def test_mrd_serializer_client_reads_errors_as_text(server, cine):
    """An ismrmrd ProtocolDeserializer has no message 8: an MRD client's error comes as TEXT "ERR ..."."""
    from ismrmrd.serialization import ConfigFile, ProtocolDeserializer, ProtocolSerializer

    _, port = server
    _, xml, acqs = cine
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    wf = sock.makefile("wb")
    ser = ProtocolSerializer(wf)
    ser.serialize(ConfigFile("ddugm"))
    hdr = ismrmrd.xsd.CreateFromDocument(xml)
    hdr.encoding[0].encodedSpace.matrixSize.x = 100000
    ser.serialize(hdr)
    ser.close()
    wf.flush()
    items = list(ProtocolDeserializer(sock.makefile("rb")).deserialize())
    sock.close()
    assert len(items) == 1 and isinstance(items[0], str) and items[0].startswith("ERR ") and "max_matrix" in items[0]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("first", ["::1", "127.0.0.1"])
def test_connect_finds_the_default_server_whichever_localhost_resolves_to_first(cine, first):
    """Gadgetron's <connect> without an address resolves "localhost" and tries the first address
    only: the default server listens on both loopbacks."""
    if first == "::1" and not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    srv = Server(port=0, overrides=FAST, idle_timeout=30)
    port = srv.bind()
    assert srv.hosts == ["127.0.0.1", "::1"]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        path, _, _ = cine
        hdr, recon_data = recon_data_from_file(str(path))
        from gadgetron.types.recon_data import write_recon_data

        family = socket.AF_INET6 if ":" in first else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect((first, port))
        sock = _Sock(s)
        cfg = b'<?xml version="1.0"?>\n<configuration><property name="send" value="images"/></configuration>\n'
        sock.write(struct.pack("<HI", 2, len(cfg)) + cfg)
        x = hdr.toXML().encode()
        sock.write(struct.pack("<HI", 3, len(x)) + x)
        write_recon_data(sock, recon_data)
        sock.write(struct.pack("<H", 4))
        r = read_replies(sock, timeout=60)
        s.close()
        assert r.closed and not r.errors and len(r.images) == 5
    finally:
        srv.shutdown()
        t.join(10)


@needs_serializer
def test_mrd_client_int16_output_and_a_warning_for_an_empty_stream(server, cine):
    from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolDeserializer, ProtocolSerializer

    _, port = server
    _, xml, acqs = cine

    def exchange(config, items):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        wf = sock.makefile("wb")
        ser = ProtocolSerializer(wf)
        ser.serialize(config)
        ser.serialize(ismrmrd.xsd.CreateFromDocument(xml))
        for a in items:
            ser.serialize(a)
        ser.close()
        wf.flush()
        out = list(ProtocolDeserializer(sock.makefile("rb")).deserialize())
        sock.close()
        return out

    images = exchange(ConfigText('<configuration><property name="output" value="int16"/></configuration>'), acqs)
    assert len(images) == 10 and all(isinstance(i, ismrmrd.Image) for i in images)
    assert images[0].data.dtype == np.int16 and images[0].getHead().data_type == ismrmrd.DATATYPE_SHORT
    per_slice = max(int(np.asarray(i.data).max()) for i in images[:5])
    assert per_slice == 4095 and int(images[0].meta["WindowWidth"]) > 0
    out = exchange(ConfigFile("ddugm"), [])
    assert len(out) == 1 and isinstance(out[0], str) and out[0].startswith("WARNING") and "no acquisitions" in out[0]


@needs_fire_client
def test_fire_process_module_in_a_python_ismrmrd_server_loop(cine, tmp_path, monkeypatch):
    """gadgets.fire.process driven the way python-ismrmrd-server drives a module (its own Connection
    class), with its unmodified client.py on the other end."""
    import sys

    from gadgets.fire import parameters, process

    monkeypatch.syspath_prepend(str(CLIENTS))
    from connection import Connection  # python-ismrmrd-server's, from ../shared

    op = tmp_path / "operator.yaml"
    op.write_text("recon:\n  method: low_rank\n  lowrank_iters: 5\n  device: cpu\n")
    monkeypatch.setenv("DDUGM_CONFIG", str(op))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    done = {}

    def serve_once():
        sock, _ = listener.accept()
        conn = Connection(sock, False)
        config = conn.next()  # the configuration name
        metadata = ismrmrd.xsd.CreateFromDocument(conn.next())
        process(conn, config, metadata)
        conn.send_close()
        conn.shutdown_close()
        done["ok"] = True

    t = threading.Thread(target=serve_once, daemon=True)
    t.start()
    path, _, _ = cine
    r = _fire_client(port, path, tmp_path / "out.h5", tmp_path)
    t.join(60)
    listener.close()
    log = r.stdout + r.stderr
    assert done.get("ok") and "Received    10 images" in log, log[-2000:]
    assert parameters({"parameters": {"steps": 3, "config": "x", "other": 1}}) == {"steps": "3"}
    assert parameters("not json") == {}
    del sys.modules["connection"]


def test_fire_process_reports_bad_settings_as_error_text(cine):
    from gadgets.fire import process

    _, xml, acqs = cine

    c = FireConnection(acqs)
    process(c, {"parameters": {"steps": 100000}}, xml)
    assert not c.images and c.logs[0][0] == "ERROR" and "max_steps" in c.logs[0][1]
    c = FireConnection(acqs)
    process(c, {"parameters": {"method": "low_rank", "lowrank_iters": 3, "device": "cpu"}}, xml)
    assert len(c.images) == 10 and not c.logs
