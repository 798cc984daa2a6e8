"""Safe to leave running on a scanner network: the server and the execute-style gadget under
attack and faults, with third-party clients (the gadgetron package's writers, ismrmrd's
serializer) and hand-made bad streams. Each test fails on the code before the hardening."""
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
from gadgetron_peer import FakeGadgetron, FireConnection, _Sock, read_replies

from ddugm_core.checkpoints import load_model, save_model
from ddugm_core.networks import NCSNpp, NetConfig
from ddugm_core.reconstruction import ReconConfig
from gadgets.replay import open_dataset
from gadgets.server import Server
from gadgets.session import Engine
from gadgets.settings import Limits, load_settings
from gadgets.simulate import simulate

FAST = {"method": "low_rank", "lowrank_iters": "5", "device": "cpu"}
SLOW = '<configuration><property name="method" value="low_rank"/><property name="lowrank_iters" value="1000"/>' \
       '<property name="device" value="cpu"/></configuration>'


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    path = d / "small.h5"
    simulate(str(path), frames=4, size=32, coils=2, accel=2, acs=8, noise=0.002, slices=1, seed=1)
    return _read(path)


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    """A slice whose 1000-iteration low-rank reconstruction takes about a minute on 2 cores."""
    d = tmp_path_factory.mktemp("heavy")
    path = d / "heavy.h5"
    simulate(str(path), frames=12, size=64, coils=4, accel=3, acs=8, noise=0.002, slices=1, seed=1)
    return _read(path)


def _read(path):
    ds = open_dataset(str(path))
    xml = ds.read_xml_header()
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    return path, xml.decode() if isinstance(xml, bytes) else xml, acqs


def _serve(limits=None, **kw):
    srv = Server("127.0.0.1", 0, overrides=FAST, limits=limits or Limits(), **kw)
    port = srv.bind()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    return srv, port, t


@pytest.fixture
def server():
    started = []

    def start(limits=None, **kw):
        started.append(_serve(limits, **kw))
        return started[-1][:2]

    yield start
    for srv, _, t in started:
        srv.shutdown()
        t.join(10)
        srv.wait_for_clients(10)


def _connect(port, timeout=30):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return s, _Sock(s)


def _send_config(sock, text: str):
    b = text.encode()
    sock.write(struct.pack("<HI", 2, len(b)) + b)


def _send_header(sock, xml):
    b = xml.encode() if isinstance(xml, str) else xml
    sock.write(struct.pack("<HI", 3, len(b)) + b)


def _props(**kw) -> str:
    return "<configuration>" + "".join(f'<property name="{k}" value="{v}"/>' for k, v in kw.items()) + \
        "</configuration>"


def _ask(port, config: str, xml=None, acqs=(), timeout=30):
    """Config, header, acquisitions (the gadgetron package's writer), close; the replies."""
    from gadgetron.external.writers import write_acquisition

    s, sock = _connect(port, timeout)
    try:
        _send_config(sock, config)
        if xml is not None:
            _send_header(sock, xml)
            for a in acqs:
                write_acquisition(sock, a)
            sock.write(struct.pack("<H", 4))
    except OSError:
        pass  # the server has answered early (an error) and stopped reading: read its answer
    r = read_replies(sock, timeout)
    s.close()
    return r


# ---------------------------------------------------------------- 1. client settings never name server files
def test_client_config_cannot_read_server_files(server, small, tmp_path):
    _, port = server()
    _, xml, acqs = small
    secret = tmp_path / "secret.yaml"
    secret.write_text("recon:\n  method: TOP-SECRET-CONTENT\n")
    replies = [_ask(port, _props(config=p), xml, acqs) for p in ("/etc/passwd", str(secret), "/no/such/file.yaml")]
    for r in replies:
        assert len(r.errors) == 1 and not r.images and "a client may not set" in r.errors[0]
        assert "root:" not in r.errors[0] and "TOP-SECRET" not in r.errors[0]
    # existing and missing files answer alike: nothing to probe
    texts = [r.errors[0].replace(p, "X") for r, p in zip(replies, ("/etc/passwd", str(secret), "/no/such/file.yaml"))]
    assert len(set(texts)) == 1


def test_client_paths_only_inside_allowed_dirs_without_symlinks(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    target = outside / "victim.npz"
    target.write_bytes(b"keep me")
    (allowed / "link").symlink_to(outside, target_is_directory=True)
    lim = Limits(allowed_dirs=[str(allowed)])
    for value, message in ((str(outside / "x"), "not inside a folder"), ("../outside", "'..' is not allowed"),
                           (str(allowed / ".." / "outside"), "'..' is not allowed"), ("link", "symbolic link"),
                           ("link/sub", "symbolic link")):
        with pytest.raises(ValueError, match=message):
            load_settings({"debug_dir": value, "method": "zero_filled"}, limits=lim)
    assert target.read_bytes() == b"keep me" and not (outside / "sub").exists()
    _, gs = load_settings({"debug_dir": "scans/today", "method": "zero_filled"}, limits=lim)
    assert Path(gs.debug_dir) == (allowed / "scans" / "today").resolve() and Path(gs.debug_dir).is_dir()
    # a client-named settings file: inside the folder, no server section, its own paths confined too
    (allowed / "ok.yaml").write_text("recon:\n  method: low_rank\n")
    cfg, _ = load_settings({"config": "ok.yaml"}, limits=lim)
    assert cfg.method == "low_rank"
    (allowed / "raise.yaml").write_text("server:\n  max_steps: 100000\n")
    with pytest.raises(ValueError, match="only 'recon:' and 'gadget:'"):
        load_settings({"config": "raise.yaml"}, limits=lim)
    (allowed / "escape.yaml").write_text(f"recon:\n  image_weights: {outside / 'w.safetensors'}\n")
    with pytest.raises(ValueError, match="not inside a folder"):
        load_settings({"config": "escape.yaml"}, limits=lim)
    for key in ("image_weights", "kspace_weights", "xt_weights"):  # every file a reconstruction loads
        with pytest.raises(ValueError, match="not inside a folder"):
            load_settings({key: str(outside / "w.safetensors")}, limits=lim)
    (allowed / "broken.yaml").write_text("recon: [SECRET-LINE\n")
    with pytest.raises(ValueError, match="not valid YAML") as e:
        load_settings({"config": "broken.yaml"}, limits=lim)
    assert "SECRET" not in str(e.value)
    # the operator's own settings are trusted
    cfg, _ = load_settings(operator={"image_weights": str(outside / "w.safetensors")}, limits=lim)
    assert cfg.image_weights == str(outside / "w.safetensors")


def test_debug_dir_never_writes_through_a_planted_symlink_and_never_loses_the_scan(small, tmp_path):
    from gadgets.session import ReconSession

    _, xml, acqs = small
    d = tmp_path / "dbg"
    d.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (d / "slice0_contrast0_repetition0_set0_average0.npz").symlink_to(victim)
    cfg, gs = load_settings(operator={"method": "zero_filled", "device": "cpu", "debug_dir": str(d)})
    s = ReconSession(ismrmrd.xsd.CreateFromDocument(xml), cfg, gs)
    out = []
    for a in acqs:
        out += s.handle(a)
    out += s.finish()
    assert len(out) == 4 and not s.errors  # the images are sent although the debug file could not be written
    assert victim.read_bytes() == b"keep me"


def test_crafted_weight_files_are_refused_before_allocating(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    net = NCSNpp(NetConfig(nf=8, ch_mult=(1, 2), attn_resolutions=(), image_size=16))
    good = tmp_path / "good.safetensors"
    save_model(good, net, "image")
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    huge = {"format": "ddugm-score-model/1", "domain": "image",
            "net_config": json.dumps({**net.config.to_dict(), "nf": 100000}), "settings": "{}"}
    save_file(tensors, str(tmp_path / "huge.safetensors"), metadata=huge)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="parameters|do not match"):
        load_model(tmp_path / "huge.safetensors")
    assert time.perf_counter() - t0 < 5
    bad = {**huge, "net_config": json.dumps({**net.config.to_dict(), "ch_mult": "x"})}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=bad)
    with pytest.raises(ValueError, match="not valid"):
        load_model(tmp_path / "bad.safetensors")
    other = {**huge, "net_config": json.dumps(net.config.to_dict())}
    save_file({**tensors, "extra": torch.zeros(3)}, str(tmp_path / "extra.safetensors"), metadata=other)
    with pytest.raises(ValueError, match="do not match"):
        load_model(tmp_path / "extra.safetensors")
    assert isinstance(load_model(good), NCSNpp)


# ---------------------------------------------------------------- 2. limits, checked before allocating
def _header_with_matrix(xml: str, n: int) -> str:
    hdr = ismrmrd.xsd.CreateFromDocument(xml)
    for space in (hdr.encoding[0].encodedSpace, hdr.encoding[0].reconSpace):
        space.matrixSize.x = space.matrixSize.y = n
    return hdr.toXML()


def test_huge_header_matrix_is_refused_at_once(server, small):
    _, port = server()
    _, xml, acqs = small
    for n in (4096, 100000):
        t0 = time.perf_counter()
        r = _ask(port, _props(), _header_with_matrix(xml, n), acqs[:3])
        assert r.errors and "max_matrix" in r.errors[0] and time.perf_counter() - t0 < 5


def test_oversized_messages_are_refused_before_allocating(server, small):
    _, port = server(Limits(max_message_mb=16))
    _, xml, _ = small
    head = ismrmrd.ImageHeader()
    head.matrix_size[:] = (32768, 32768, 1)
    head.channels, head.data_type = 1, ismrmrd.DATATYPE_CXDOUBLE  # 16 GiB claimed
    for message in (struct.pack("<H", 1022) + bytes(head) + struct.pack("<Q", 0),
                    struct.pack("<H", 1023) + struct.pack("<Q", 1) + struct.pack("<Q", 2) + struct.pack("<QQ", 1 << 20, 1 << 20),
                    struct.pack("<H", 5) + struct.pack("<I", 0xFFFFFFFF)):
        s, sock = _connect(port)
        _send_config(sock, _props())
        _send_header(sock, xml)
        t0 = time.perf_counter()
        sock.write(message)
        r = read_replies(sock, 10)
        s.close()
        assert r.errors and "limit" in r.errors[0] and time.perf_counter() - t0 < 5, r


def test_work_limits_steps_iterations_compile(server, small):
    _, port = server()
    _, xml, acqs = small
    for props, message in (({"steps": 100000}, "max_steps"), ({"preset": "paper", "steps": 1001}, "max_steps"),
                           ({"lowrank_iters": 5000}, "max_iterations"), ({"compile": "true"}, "allow_compile"),
                           ({"window": 40}, "max_window"), ({"llr_iters": 5000}, "llr_iters"),
                           ({"pnp_inner": 5000}, "pnp_inner"), ({"llr_cg_iters": 5000}, "max_iterations"),
                           # the coil-map refinement's rounds and continuation (uncapped before this release)
                           ({"coil_refine": 1000000000}, "coil_refine = 1000000000 rounds"),
                           ({"coil_refine": 200, "coil_refine_iters": 10}, "(6000 in all)"),
                           # each round's map fit counts too (40 rounds of 10 ADMM iterations alone would pass)
                           ({"coil_refine": 40, "coil_refine_iters": 10, "coil_fit_iters": 20}, "(1200 in all)"),
                           ({"coil_refine_static": 1000000000}, "coil_refine_static = 1000000000 rounds"),
                           ({"coil_refine_continue": 5000}, "coil_refine_continue")):
        r = _ask(port, _props(**props), xml, acqs[:3])
        assert r.errors and message in r.errors[0], (props, r.errors)


def test_a_job_past_max_job_seconds_stops_with_a_named_error_and_the_server_goes_on(server, small, heavy):
    """The work caps are per setting and nested loops multiply, so a client could hold the one
    reconstruction queue for hours within them. max_job_seconds stops such a job (a 1000-iteration
    low-rank slice, about a minute on 2 cores, under a 1 s limit) with an error naming the limit,
    without fallback; the next client is served."""
    _, port = server(Limits(max_job_seconds=1.0))
    _, xml, acqs = heavy
    t0 = time.perf_counter()
    r = _ask(port, SLOW, xml, acqs, timeout=60)
    assert r.errors and "max_job_seconds = 1 s" in r.errors[0] and time.perf_counter() - t0 < 20, r
    assert "LLR + temporal TV" not in r.errors[0]  # no fallback
    _, xml, acqs = small
    r = _ask(port, _props(), xml, acqs)
    assert not r.errors and len(r.images) == 4
    with pytest.raises(ValueError, match="max_job_seconds must be 0"):
        Limits(max_job_seconds=-1).validate()


def test_max_job_seconds_is_polled_within_a_sampler_level(server, heavy):
    """The pnp sampler's levels each run pnp_inner ADMM iterations (up to max_iterations = 1000),
    and the limit was checked only between levels: one level of 1000 iterations ran to its end
    past the limit (about a minute here). The limit is now polled after every inner iteration."""
    _, port = server(Limits(max_job_seconds=2.0))
    _, xml, acqs = heavy
    t0 = time.perf_counter()  # (no map refinement, one start iteration: the sampler's level is reached)
    r = _ask(port, _props(method="ddugm", steps=1, pnp_inner=1000, coil_refine=0, llr_iters=1, device="cpu"), xml,
             acqs, timeout=120)
    took = time.perf_counter() - t0
    assert r.errors and "max_job_seconds = 2 s" in r.errors[0] and "iteration 1 of 2" in r.errors[0], r
    assert took < 15, took


def test_the_fire_module_keeps_max_job_seconds_too(heavy, tmp_path, monkeypatch):
    """python-ismrmrd-server is a network service as well: a FIRE client's settings must not hold
    its process for hours either. The operator's max_job_seconds applies to the FIRE module."""
    from gadgets.fire import process

    op = tmp_path / "operator.yaml"
    op.write_text("server:\n  max_job_seconds: 1\n")
    monkeypatch.setenv("DDUGM_CONFIG", str(op))
    _, xml, acqs = heavy

    c = FireConnection(acqs)
    t0 = time.perf_counter()
    process(c, {"parameters": {"method": "low_rank", "lowrank_iters": 1000, "device": "cpu"}}, xml)
    assert time.perf_counter() - t0 < 20 and not c.images
    assert c.logs and c.logs[-1][0] == "ERROR" and "max_job_seconds = 1 s" in c.logs[-1][1], c.logs


def test_reconstructor_cache_is_bounded_and_models_are_shared(tiny_weights):
    engine = Engine(max_cached=3)
    recs = []
    for i in range(8):
        cfg = ReconConfig(image_weights=str(tiny_weights["image"]), kspace_weights=str(tiny_weights["kspace"]),
                          xt_weights=str(tiny_weights["xt"]), fusion=0.1 * i, device="cpu")
        rec = engine.reconstructor(cfg)
        engine.load_models(rec)
        recs.append(rec)
    assert engine.cached == 3 and len(engine._models) == 1
    assert all(r.load_models() is recs[0].load_models() for r in recs)  # one copy of the networks


def test_too_many_connections_get_a_clear_refusal(server, small):
    _, port = server(Limits(max_connections=2))
    _, xml, acqs = small
    idle = [_connect(port)[0] for _ in range(2)]
    time.sleep(0.3)
    r = _ask(port, _props(), xml, acqs)
    assert r.errors and "max_connections" in r.errors[0] and r.closed
    for s in idle:
        s.close()
    time.sleep(0.5)
    r = _ask(port, _props(), xml, acqs)
    assert not r.errors and len(r.images) == 4


def test_a_job_is_cancelled_when_its_client_leaves(server, heavy, small):
    srv, port = server()
    _, xml, acqs = heavy
    from gadgetron.external.writers import write_acquisition

    s, sock = _connect(port)
    _send_config(sock, SLOW)
    _send_header(sock, xml)
    for a in acqs:
        write_acquisition(sock, a)
    sock.write(struct.pack("<H", 4))
    deadline = time.time() + 20
    while srv.engine.count == 0 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the 60 s reconstruction is running
    s.close()  # the client leaves
    _, sxml, sacqs = small
    t0 = time.perf_counter()
    r = _ask(port, _props(), sxml, sacqs, timeout=60)
    assert not r.errors and len(r.images) == 4
    assert time.perf_counter() - t0 < 15  # the queue was freed, not held for the abandoned minute


# ---------------------------------------------------------------- 3. accept errors, timeouts, half-close, logging
def test_handshake_timeout_and_half_close_close_the_socket(server):
    _, port = server(Limits(handshake_timeout=1.0))
    s, sock = _connect(port)
    t0 = time.perf_counter()
    s.settimeout(10)
    assert s.recv(1 << 16) == b"" and time.perf_counter() - t0 < 5  # EOF: the server closed its side
    s.close()
    s, sock = _connect(port)
    sock.write(struct.pack("<HI", 2, 100) + b"<configur")  # part of a config, then a half-close
    s.shutdown(socket.SHUT_WR)
    t0 = time.perf_counter()
    s.settimeout(10)
    data = b""
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    assert time.perf_counter() - t0 < 5  # EOF at once, not a socket left in CLOSE_WAIT
    s.close()


def test_accept_errors_are_survived(server, small, monkeypatch):
    srv, port = server()
    real = srv.socks[0]
    errors = [OSError(24, "Too many open files")] * 5

    class Flaky:
        def __getattr__(self, name):
            return getattr(real, name)

        def accept(self):
            if errors:
                raise errors.pop()
            return real.accept()

    srv.socks[0] = Flaky()
    deadline = time.time() + 20
    while srv.accept_errors < 5 and time.time() < deadline:  # each error is retried after a back-off
        time.sleep(0.05)
    assert srv.accept_errors == 5
    _, xml, acqs = small
    r = _ask(port, _props(), xml, acqs)
    assert not r.errors and len(r.images) == 4


def _serve_process(tmp_path, *args, stderr=None, preexec=None):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    log = open(tmp_path / "serve.log", "w") if stderr is None else None
    proc = subprocess.Popen([sys.executable, "-m", "gadgets.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--no-preload", *args], stderr=stderr if stderr is not None else log,
                            preexec_fn=preexec)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    return proc, port


def test_file_descriptor_exhaustion_does_not_stop_the_server(tmp_path, small):
    import resource

    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    proc, port = _serve_process(tmp_path, "--max-connections", "1000", preexec=low_fd_limit)
    _, xml, acqs = small
    try:
        idle = []
        for _ in range(160):  # more than the server has descriptors
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        time.sleep(1.0)
        assert proc.poll() is None, "the server exited on an accept error"
        for s in idle:
            s.close()
        time.sleep(2.5)  # the handshake of each idle connection ends (EOF), descriptors come back
        r = _ask(port, _props(method="low_rank", lowrank_iters=3), xml, acqs, timeout=60)
        assert not r.errors and len(r.images) == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert "accept failed" in (tmp_path / "serve.log").read_text()


def test_an_unread_stderr_never_blocks_the_server(tmp_path, small):
    _, xml, _ = small
    proc, port = _serve_process(tmp_path, "--log-level", "DEBUG", stderr=subprocess.PIPE)  # never read
    try:
        t0 = time.perf_counter()
        for i in range(400):  # each logs a 500-character text message: 200 kB, three times a pipe's buffer
            s, sock = _connect(port, timeout=10)
            _send_config(sock, _props())
            _send_header(sock, xml)
            sock.write(struct.pack("<H", 5) + struct.pack("<I", 500) + b"x" * 500 + b"\x99\x99")
            r = read_replies(sock, 10)
            s.close()
            assert r.errors, f"client {i} got no answer"
        assert time.perf_counter() - t0 < 120
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            proc.stderr.close()
    assert proc.returncode == 0


# ---------------------------------------------------------------- 4. clean shutdown
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_reconstruction_stops_cleanly(tmp_path, heavy, sig):
    proc, port = _serve_process(tmp_path)
    _, xml, acqs = heavy
    from gadgetron.external.writers import write_acquisition

    try:
        s, sock = _connect(port, timeout=60)
        _send_config(sock, SLOW)
        _send_header(sock, xml)
        for a in acqs:
            write_acquisition(sock, a)
        sock.write(struct.pack("<H", 4))
        log = tmp_path / "serve.log"
        deadline = time.time() + 30
        while "reconstructing" not in log.read_text() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # inside the reconstruction
        proc.send_signal(sig)
        t0 = time.perf_counter()
        r = read_replies(sock, 60)
        s.close()
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log.read_text()[-2000:]
    assert r.errors and "shutting down" in r.errors[0] and r.closed
    assert time.perf_counter() - t0 < 30
    assert "terminate called" not in log.read_text()


# ---------------------------------------------------------------- 5. execute style: every failure is an ERROR, never a spin
@pytest.fixture
def gadgetron():
    peers = []

    def start():
        peers.append(FakeGadgetron())
        return peers[-1]

    yield start
    for p in peers:
        p.cleanup()


def test_guard_is_installed():
    out = subprocess.run([sys.executable, "-c", "import sys; print([type(f).__name__ for f in sys.meta_path])"],
                         capture_output=True, text=True, check=True).stdout
    assert "_Hook" in out, "ddugm_gadgetron_guard.pth is not active: reinstall the package"


@pytest.mark.parametrize("when", ["after the config", "mid-header", "before anything"])
def test_gadgetron_vanishing_at_start_up_ends_the_module(gadgetron, small, when):
    _, xml, _ = small
    g = gadgetron()
    if when != "before anything":
        g.send_config(FAST)
    if when == "mid-header":
        g.sock.write(struct.pack("<HI", 3, len(xml)) + xml.encode()[:100])
    g.sock.s.close()
    rc, seconds, err = g.wait(timeout=20)
    assert rc is not None, "the module kept running (spinning) after Gadgetron vanished"
    assert rc != 0 and seconds < 15 and "went away" in err


@pytest.mark.parametrize("case", ["garbage first message", "4 GiB config length", "header not XML",
                                  "wrong second message", "config not XML"])
def test_bad_start_of_stream_gets_an_error_message(gadgetron, small, case):
    _, xml, _ = small
    g = gadgetron()
    if case == "garbage first message":
        g.sock.write(b"\x99\x99this is not a configuration")
    elif case == "4 GiB config length":
        g.sock.write(struct.pack("<HI", 2, 0xFFFFFFFF))
    elif case == "config not XML":
        g.send_config(raw=b"<configuration><property name=")
        g.send_header(xml)
    else:
        g.send_config(FAST)
        if case == "header not XML":
            g.send_header(b"this is not XML")
        else:
            g.sock.write(struct.pack("<H", 1008))
    r = g.replies(timeout=20)
    rc, seconds, _ = g.wait(timeout=20)
    assert len(r.errors) == 1 and r.closed, case
    assert rc not in (0, None) and seconds < 15


# ---------------------------------------------------------------- 6. ddugm recon
def _recon(*args):
    return subprocess.run([sys.executable, "-m", "gadgets.cli", "recon", *map(str, args), "--quiet",
                           "--method", "zero_filled", "--device", "cpu"], capture_output=True, text=True, timeout=120)


def test_recon_of_corrupted_empty_and_nan_files(tmp_path):
    path = tmp_path / "tiny.h5"
    simulate(str(path), frames=2, size=16, coils=2, accel=2, acs=4, noise=0.002, slices=1, seed=1)
    path, xml, acqs = _read(path)
    raw = path.read_bytes()
    cases = {}
    broken = tmp_path / "broken.h5"
    broken.write_bytes(raw[: int(0.7 * len(raw))])  # truncated (bytes overwritten mid-file: the next test)
    cases["truncated"] = broken
    empty = tmp_path / "empty.h5"
    ds = ismrmrd.Dataset(str(empty), "dataset", create_if_needed=True)  # ismrmrd 1.14: no "with"
    ds.write_xml_header(xml)
    ds.close()
    cases["no acquisitions"] = empty
    nan = tmp_path / "nan.h5"
    ds = ismrmrd.Dataset(str(nan), "dataset", create_if_needed=True)  # ismrmrd 1.14: no "with"
    ds.write_xml_header(xml)
    for a in acqs:
        if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            a = ismrmrd.Acquisition(a.getHead(), np.full_like(a.data, np.nan))
        ds.append_acquisition(a)
    ds.close()
    cases["NaN data"] = nan
    text = tmp_path / "text.h5"
    text.write_text("not HDF5 at all\n")
    cases["not HDF5"] = text
    for name, src in cases.items():
        out = tmp_path / f"{name}.out.h5"
        p = _recon(src, out)
        assert p.returncode in (1, 2), (name, p.stderr)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert "Traceback" not in p.stderr and lines[-1].startswith("ddugm recon: error:"), (name, p.stderr)
        assert not out.exists(), name


def test_recon_of_a_file_that_breaks_mid_way_writes_the_completed_slices(tmp_path, monkeypatch):
    """An acquisition that cannot be read (HDF5's errors for bytes overwritten mid-file; how long
    HDF5 takes to give up depends on the bytes and its version, so the read fails on cue here)."""
    from gadgets import replay as replay_module
    from gadgets.replay import ReplayError, open_dataset, replay
    from gadgets.session import ScanErrors

    raw = tmp_path / "two.h5"
    simulate(str(raw), frames=2, size=16, coils=2, accel=2, acs=4, noise=0.002, slices=2, seed=1)
    ds = open_dataset(raw)
    n = ds.number_of_acquisitions()
    slices = [ds.read_acquisition(i).idx.slice for i in range(n)]
    ds.close()
    first_of_slice1 = slices.index(1)
    real = ismrmrd.Dataset.read_acquisition

    real_block = replay_module._read_block

    def broken_after(limit):  # the block reader and ismrmrd's own one both fail from acquisition `limit` on
        def block(ds, start, stop):
            if stop > limit:
                raise OSError("Can't synchronously read data (bad global heap collection signature)")
            return real_block(ds, start, stop)

        monkeypatch.setattr(replay_module, "_read_block", block)

        def read(self, i):
            if i >= limit:
                raise OSError("Can't synchronously read data (bad global heap collection signature)")
            return real(self, i)
        return read

    monkeypatch.setattr(replay_module, "READ_BLOCK", 3)  # the break falls inside a block
    monkeypatch.setattr(ismrmrd.Dataset, "read_acquisition", broken_after(first_of_slice1 + 3))
    out = tmp_path / "out.h5"
    with pytest.raises(ScanErrors, match=f"acquisition {first_of_slice1 + 3} of {n} cannot be read"):
        replay(str(raw), str(out), overrides={"method": "zero_filled", "device": "cpu"}, quiet=True)
    ds = open_dataset(out)
    images = [ds.read_image("image_1", i) for i in range(ds.number_of_images("image_1"))]
    ds.close()
    assert len(images) == 2 and {im.slice for im in images} == {0}  # slice 0 only; slice 1 not from partial data
    monkeypatch.setattr(ismrmrd.Dataset, "read_acquisition", broken_after(3))
    out2 = tmp_path / "out2.h5"
    with pytest.raises(ReplayError, match="nothing written"):
        replay(str(raw), str(out2), overrides={"method": "zero_filled", "device": "cpu"}, quiet=True)
    assert not out2.exists()


@pytest.mark.parametrize("argv", [
    ["demo", "--accel", "nan"], ["demo", "--noise", "inf"], ["evaluate", "--noise", "nan"],
    ["train", "--domain", "image", "--lr", "nan"], ["simulate", "x.h5", "--noise", "nan"],
    ["serve", "--idle-timeout", "inf"],
])
def test_number_options_refuse_nan_and_inf(argv, capsys, tmp_path, monkeypatch):
    """NaN passes every range check (``simulate --noise nan`` used to write a raw file of NaN
    samples): every number option of the ``ddugm`` commands refuses it, naming the option."""
    from gadgets.cli import main as ddugm

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        ddugm(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {argv[-2]}: must be a finite number, got {argv[-1]!r}" in err
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("port, message", [("70000", "a TCP port is 0 to 65535, got 70000"),
                                           ("-1", "a TCP port is 0 to 65535, got -1"), ("http", "not a port number")])
def test_serve_port_out_of_range_is_named(port, message, capsys):
    """It used to end in an OverflowError traceback from bind()."""
    from gadgets.cli import main as ddugm

    with pytest.raises(SystemExit) as e:
        ddugm(["serve", "--port", port])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unusable_output_paths_are_one_line_errors(tmp_path, capsys):
    """A folder named as an output file, or a file named as an output folder: exit 2 and one
    line naming the path (these ended in tracebacks), and nothing of the user's is touched."""
    from gadgets.cli import main as ddugm

    raw = tmp_path / "raw.h5"
    simulate(str(raw), frames=3, size=16, coils=2, accel=2, acs=4, noise=0.002, slices=1, seed=1)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    folder = tmp_path / "folder"
    folder.mkdir()
    for argv in (["recon", str(raw), str(folder), "--method", "zero_filled"],
                 ["recon", str(raw), str(tmp_path / "o.h5"), "--method", "zero_filled", "--png", str(a_file)],
                 ["simulate", str(folder)], ["stream", "--from-ismrmrd", str(raw), "--output", str(folder)],
                 ["demo", "--out", str(a_file), "--size", "16", "--frames", "2", "--steps", "1", "--quiet"]):
        assert ddugm(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"ddugm {argv[0]}: error:" in err and "Traceback" not in err, (argv, err)
    assert a_file.read_text() == "keep" and list(folder.iterdir()) == [] and not (tmp_path / "o.h5").exists()
    assert not list(tmp_path.glob("*.part"))  # no half-written file left beside it
