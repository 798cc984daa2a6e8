"""Measure the README's table of bad inputs and faults: ``python tests/fault_table.py``.

Starts a real ``ddugm serve`` (stderr to a file), plays Gadgetron for the execute-style gadget
(``python -m gadgetron PORT gadgets.external reconstruct``) and runs ``ddugm recon`` on broken
files; prints one Markdown row per case: what the client sees, seconds until the connection
or process ended, and the exit code or the server's state afterwards. Not a test (no asserts);
the tests in ``test_hardening.py`` check the same behaviour.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ismrmrd  # noqa: E402
import numpy as np  # noqa: E402
from gadgetron_peer import FakeGadgetron, _Sock, read_replies  # noqa: E402
from test_hardening import SLOW, _header_with_matrix, _props, _read, _send_config, _send_header  # noqa: E402

from gadgets.simulate import simulate  # noqa: E402

ROWS = []


def row(case, sees, seconds, after):
    ROWS.append((case, sees, seconds, after))
    print(f"| {case} | {sees} | {seconds} | {after} |", flush=True)


def short(r) -> str:
    if r.errors:
        text = r.errors[0].replace("DD-UGM server: ", "").replace("DD-UGM gadget: ", "")
        return f"error: {text[:110]}{'...' if len(text) > 110 else ''}" + (" + close" if r.closed else "")
    if r.images:
        return f"{len(r.images)} images" + (" + close" if r.closed else "")
    return "close" if r.closed else "EOF"


def start_server(tmp: Path, yaml_text: str):
    y = tmp / "operator.yaml"
    y.write_text(yaml_text)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    log = open(tmp / f"serve_{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gadgets.cli", "serve", "--port", str(port), "--config", str(y),
                             "--no-preload"], stderr=log)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    return proc, port, tmp / f"serve_{port}.log"


def exchange(port, config=None, xml=None, acqs=(), raw=b"", timeout=60):
    from gadgetron.external.writers import write_acquisition

    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock = _Sock(s)
    t0 = time.perf_counter()
    try:
        if config is not None:
            _send_config(sock, config)
        if xml is not None:
            _send_header(sock, xml)
        if raw:
            sock.write(raw)
        for a in acqs:
            write_acquisition(sock, a)
        if acqs:
            sock.write(struct.pack("<H", 4))
    except OSError:
        pass
    try:
        r = read_replies(sock, timeout)
    except OSError as e:
        r = None
        print("  (read failed:", e, ")")
    s.close()
    return r, round(time.perf_counter() - t0, 2)


def rss_mb(pid) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    tmp = Path(tempfile.mkdtemp(prefix="faults_"))
    simulate(str(tmp / "small.h5"), frames=4, size=32, coils=2, accel=2, acs=8, noise=0.002, slices=1, seed=1)
    simulate(str(tmp / "heavy.h5"), frames=12, size=64, coils=4, accel=3, acs=8, noise=0.002, slices=1, seed=1)
    _, xml, acqs = _read(tmp / "small.h5")
    _, hxml, hacqs = _read(tmp / "heavy.h5")
    base = "recon:\n  method: low_rank\n  lowrank_iters: 5\n  device: cpu\n"
    print("| bad input or fault | what the client sees | seconds to close | afterwards |\n|---|---|---|---|")

    proc, port, log = start_server(tmp, base + "server:\n  handshake_timeout: 2\n")
    secret = tmp / "secret.yaml"
    secret.write_text("recon:\n  method: SECRET\n")
    for name, value in (("config", "/etc/shadow"), ("config", "/no/such/file"), ("config", str(secret)),
                        ("debug_dir", "/tmp/../etc/evil"), ("image_weights", "/etc/passwd")):
        r, sec = exchange(port, _props(**{name: value}), xml, acqs)
        row(f"client setting `{name}={value}`", short(r), sec, f"server up: {proc.poll() is None}")
    for n in (4096, 100000):
        r, sec = exchange(port, _props(), _header_with_matrix(xml, n), acqs[:3])
        row(f"header matrix {n} x {n}", short(r), sec, f"server up: {proc.poll() is None}")
    head = ismrmrd.ImageHeader()
    head.matrix_size[:] = (32768, 32768, 1)
    head.channels, head.data_type = 1, ismrmrd.DATATYPE_CXFLOAT
    before = rss_mb(proc.pid)
    r, sec = exchange(port, _props(), xml, raw=struct.pack("<H", 1022) + bytes(head) + struct.pack("<Q", 0))
    row("IMAGE message claiming 8 GiB", short(r), sec, f"server RSS {before:.0f} -> {rss_mb(proc.pid):.0f} MB")
    r, sec = exchange(port, _props(), xml, raw=struct.pack("<HI", 5, 0xFFFFFFFF))
    row("TEXT message claiming 4 GiB", short(r), sec, f"server up: {proc.poll() is None}")
    for props in ({"steps": 100000}, {"compile": "true"}, {"lowrank_iters": 100000}, {"window": 64},
                  {"pnp_gamma": "nan"}, {"llr_lambda": "inf"}):
        r, sec = exchange(port, _props(**props), xml, acqs)
        row("client setting " + ", ".join(f"`{k}={v}`" for k, v in props.items()), short(r), sec,
            f"server up: {proc.poll() is None}")
    # idle connections
    idle, refused = [], 0
    t0 = time.perf_counter()
    for _ in range(1100):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        idle.append(s)
    time.sleep(1.0)
    for s in idle[16:]:
        s.settimeout(5)
        try:
            r = read_replies(_Sock(s), 5)
            refused += bool(r.errors and "max_connections" in r.errors[0])
        except OSError:
            pass
    r, sec = exchange(port, _props(), xml, acqs)
    row("1,100 idle connections", f"{refused} of 1084 beyond the limit: error 'busy ... max_connections' + close",
        round(time.perf_counter() - t0, 1), f"server up: {proc.poll() is None}; meanwhile a valid client got "
        f"{short(r)}")
    for s in idle:
        s.close()
    time.sleep(3)
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    t0 = time.perf_counter()
    s.settimeout(30)
    eof = s.recv(10) == b""
    row("connect and send nothing (`handshake_timeout: 2`)", "EOF" if eof else "data",
        round(time.perf_counter() - t0, 2), "socket closed by the server")
    s.close()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(struct.pack("<HI", 2, 100) + b"<configur")
    s.shutdown(socket.SHUT_WR)
    t0 = time.perf_counter()
    eof = s.recv(10) == b""
    row("half-close mid-message", "EOF" if eof else "data", round(time.perf_counter() - t0, 2),
        "socket closed by the server (no CLOSE_WAIT)")
    s.close()
    # a client leaving mid-job
    from gadgetron.external.writers import write_acquisition

    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock = _Sock(s)
    _send_config(sock, SLOW)
    _send_header(sock, hxml)
    for a in hacqs:
        write_acquisition(sock, a)
    sock.write(struct.pack("<H", 4))
    while "reconstructing" not in log.read_text():
        time.sleep(0.1)
    time.sleep(1.0)
    s.close()
    r, sec = exchange(port, _props(), xml, acqs)
    row("client leaves during its 60 s reconstruction", "(gone)", "-",
        f"job cancelled; the next client got {short(r)} in {sec} s")
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)

    # unread stderr
    y = tmp / "noread.yaml"
    y.write_text(base)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    p2 = subprocess.Popen([sys.executable, "-m", "gadgets.cli", "serve", "--port", str(port), "--config", str(y),
                           "--no-preload", "--log-level", "DEBUG"], stderr=subprocess.PIPE)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    t0 = time.perf_counter()
    answered = 0
    for _ in range(400):
        r, _ = exchange(port, _props(), xml, raw=struct.pack("<HI", 5, 500) + b"x" * 500 + b"\x99\x99", timeout=10)
        answered += bool(r and r.errors)
    sec = round(time.perf_counter() - t0, 1)
    p2.send_signal(signal.SIGTERM)
    rc = p2.wait(60)
    p2.stderr.close()
    row("stderr never read, 400 clients logging 200 kB", f"{answered} of 400 answered", sec, f"SIGTERM: exit {rc}")

    # signals during a reconstruction
    for sig in (signal.SIGINT, signal.SIGTERM):
        codes, seen, secs = [], set(), []
        for _ in range(3):
            proc, port, log = start_server(tmp, base)
            s = socket.create_connection(("127.0.0.1", port), timeout=60)
            sock = _Sock(s)
            _send_config(sock, SLOW)
            _send_header(sock, hxml)
            for a in hacqs:
                write_acquisition(sock, a)
            sock.write(struct.pack("<H", 4))
            while "reconstructing" not in log.read_text():
                time.sleep(0.1)
            time.sleep(1.5)
            t0 = time.perf_counter()
            proc.send_signal(sig)
            r = read_replies(sock, 60)
            codes.append(proc.wait(60))
            secs.append(round(time.perf_counter() - t0, 2))
            seen.add(short(r))
            s.close()
        row(f"{signal.Signals(sig).name} during a reconstruction (3 tries)", " / ".join(sorted(seen)),
            f"{min(secs)}-{max(secs)}", f"exit codes {codes}")

    # execute style
    for case in ("vanish before anything", "vanish after the config", "vanish mid-header", "garbage first message",
                 "config length 4 GiB", "header not XML", "config not XML", "valid scan"):
        g = FakeGadgetron()
        t0 = time.perf_counter()
        if case.startswith("vanish"):
            if case != "vanish before anything":
                g.send_config({"method": "low_rank"})
            if case == "vanish mid-header":
                g.sock.write(struct.pack("<HI", 3, len(xml)) + xml.encode()[:100])
            g.sock.s.close()
            rc, _, _ = g.wait(30)
            sees = "(gone)"
        else:
            if case == "garbage first message":
                g.sock.write(b"\x99\x99garbage")
            elif case == "config length 4 GiB":
                g.sock.write(struct.pack("<HI", 2, 0xFFFFFFFF))
            elif case == "config not XML":
                g.send_config(raw=b"<configuration><property name=")
                g.send_header(xml)
            else:
                g.send_config({"method": "low_rank", "lowrank_iters": "5", "device": "cpu"})
                g.send_header(b"not XML" if case == "header not XML" else xml)
                if case == "valid scan":
                    for a in acqs:
                        g.send(a)
                    g.close_stream()
            r = g.replies(30)
            rc, _, _ = g.wait(30)
            sees = short(r)
        row(f"execute style: {case}", sees, round(time.perf_counter() - t0, 2), f"exit code {rc}")
        g.cleanup()

    # ddugm recon
    raw = (tmp / "small.h5").read_bytes()
    cut = int(0.7 * len(raw))
    (tmp / "corrupted.h5").write_bytes(raw[:cut] + bytes(4096) + raw[cut + 4096:])
    ds = ismrmrd.Dataset(str(tmp / "empty.h5"), "dataset", create_if_needed=True)  # ismrmrd 1.14: no "with"
    ds.write_xml_header(xml)
    ds.close()
    ds = ismrmrd.Dataset(str(tmp / "nan.h5"), "dataset", create_if_needed=True)  # ismrmrd 1.14: no "with"
    ds.write_xml_header(xml)
    for a in acqs:
        if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            a = ismrmrd.Acquisition(a.getHead(), np.full_like(a.data, np.nan))
        ds.append_acquisition(a)
    ds.close()
    (tmp / "text.h5").write_text("not HDF5\n")
    for name in ("corrupted", "empty", "nan", "text"):
        out = tmp / f"{name}.out.h5"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "gadgets.cli", "recon", str(tmp / f"{name}.h5"), str(out), "--quiet",
                            "--method", "zero_filled", "--device", "cpu"], capture_output=True, text=True)
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        last = last.replace(str(tmp) + os.sep, "")
        row(f"`ddugm recon` on a {name} file", last[:120] + ("..." if len(last) > 120 else ""),
            round(time.perf_counter() - t0, 1), f"exit {p.returncode}, output written: {out.exists()}, "
            f"traceback: {'Traceback' in p.stderr}")


if __name__ == "__main__":
    threading.stack_size(0)
    main()
