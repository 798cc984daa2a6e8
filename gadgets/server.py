"""``ddugm serve``: a persistent reconstruction server.

Keeps the score models loaded (on the GPU when there is one) for Gadgetron chains that use
``<external><connect port="18000"/>...</external>``, and speaks the MRD streaming protocol
of client/server recon tools (an ``ismrmrd`` ``ProtocolSerializer`` client sending config,
header, acquisitions and close gets ISMRMRD images and a close back).

Each connection has its own thread for I/O; reconstructions go through one shared
:class:`~gadgets.session.Engine`, which runs them one at a time (the GPU queue). A client
that fails, sends garbage or vanishes gets an error message (if it is still there) and
its connection closed; the others carry on; a client that leaves cancels its job.

Safe to leave running: the operator's limits (:class:`~gadgets.settings.Limits`) cap
connections, message sizes, matrix sizes and work per stream; clients cannot name server
files outside ``allowed_dirs``; accept errors are retried with a back-off; logging goes
through a queue, so a stderr nobody reads never stalls a client; SIGINT and SIGTERM stop it
cleanly (running clients get an error message, exit code 0).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import logging.handlers
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import xml.etree.ElementTree as ET

from ddugm_core.cli import finite_float

from .protocol import (
    CONFIG_FILE,
    CONFIG_TEXT,
    HEADER,
    TEXT,
    PeerClosed,
    ProtocolError,
    SafeSocket,
    parse_header,
    read_id,
    read_text,
    run_stream,
    send_item,
    strip_nul,
)
from .session import Cancelled, Engine, ReconSession
from .settings import Limits, json_parameters, load_limits, load_settings, properties_from_xml

#: what "localhost" means for the server: both loopbacks, whichever a client resolves first
LOOPBACK = ["127.0.0.1", "::1"]



log = logging.getLogger("ddugm.server")


def chain_properties(text: bytes) -> dict:
    """Settings carried by a config text: a Gadgetron external ``<configuration>`` (all its
    properties), or a whole chain, where only the properties of our ``<external>`` node's
    configuration or of a gadget whose name mentions ddugm count."""
    s = text.decode("utf-8", "replace").strip().rstrip("\x00")
    if not s.lstrip().startswith("<") or "<" not in s.replace("<?xml", "", 1):
        return {}
    try:
        root = ET.fromstring(s)
    except ET.ParseError as e:
        raise ProtocolError(f"configuration text is not valid XML: {e}") from None
    tag = lambda el: el.tag.split("}")[-1]  # noqa: E731
    is_chain = any(tag(el) in ("stream", "gadget", "external", "readers", "writers") for el in root.iter())
    if not is_chain:
        return properties_from_xml(root)
    props = {}
    for el in root.iter():
        if tag(el) == "external":
            for conf in el:
                if tag(conf) == "configuration":
                    props.update(properties_from_xml(conf))
        elif tag(el) == "gadget":
            names = " ".join((el.findtext(n) or "") for n in ("name", "classname")).lower()
            if "ddugm" in names:
                props.update({k: v for k, v in properties_from_xml(el).items()})
    return props


class Server:
    """``limits`` (:class:`~gadgets.settings.Limits`) default to the ``server:`` section of the
    operator's YAML; ``overrides`` are the operator's command-line settings (trusted);
    ``idle_timeout``, when given, overrides the limit of that name."""

    def __init__(self, host="localhost", port: int = 18000, config: str | None = None,
                 overrides: dict | None = None, idle_timeout: float | None = None, limits: Limits | None = None):
        hosts = [host] if isinstance(host, str) else list(host or ["localhost"])
        self.hosts = [h for name in hosts for h in (LOOPBACK if name == "localhost" else [name])]
        self.host = self.hosts[0]
        self.port = port
        self.config = config
        self.overrides = dict(overrides or {})
        self.limits = limits or load_limits(config)
        if idle_timeout is not None:
            self.limits.idle_timeout = float(idle_timeout)
        self.limits.validate()
        self.engine = Engine(self.limits.max_cached)
        self.socks: list = []
        self.bound: list = []  # "address:port" actually listening
        self.connections = 0  # accepted so far
        self.refused = 0
        self.accept_errors = 0
        self._active: dict = {}  # connection number -> (thread, SafeSocket)
        self._active_lock = threading.Lock()
        self._refusing = threading.BoundedSemaphore(32)
        self._stop = threading.Event()
        load_settings(None, config, operator=self.overrides, limits=self.limits)  # fail at start, not per client

    @property
    def sock(self):
        return self.socks[0] if self.socks else None

    def bind(self) -> int:
        """Listen on every address of ``hosts`` at one port ("localhost": 127.0.0.1 and ::1, so a
        client that resolves localhost to either finds the server; ::1 is skipped with a warning
        where the machine has no IPv6 loopback). Port 0 picks a free port for all of them."""
        for attempt in range(20):
            socks, port = [], self.port
            try:
                for i, host in enumerate(self.hosts):
                    try:
                        sock = _listen(host, port)
                    except OSError as e:
                        if host == "::1" and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) and i > 0:
                            log.warning("no IPv6 loopback on this machine (%s): listening on IPv4 only", e)
                            continue
                        raise
                    socks.append(sock)
                    port = sock.getsockname()[1]
            except OSError as e:
                for sock in socks:
                    sock.close()
                if self.port == 0 and e.errno == errno.EADDRINUSE and attempt < 19:
                    continue  # the port picked for the first address is taken on another: pick again
                raise
            self.socks, self.port = socks, port
            self.bound = [(f"[{s.getsockname()[0]}]" if s.family == socket.AF_INET6 else s.getsockname()[0])
                          + f":{port}" for s in socks]
            return port
        raise OSError("could not bind every address to one port")

    def preload(self) -> None:
        """Load the models now, so the first scan does not wait for them."""
        cfg, _ = load_settings(None, self.config, operator=self.overrides, limits=self.limits)
        if cfg.method == "ddugm":
            rec = self.engine.reconstructor(cfg)
            self.engine.load_models(rec)
            log.info("models loaded on %s", rec.device)

    @property
    def active(self) -> int:
        with self._active_lock:
            return len(self._active)

    def serve_forever(self) -> None:
        """Accept until :meth:`shutdown`. Accept errors (too many open files, ...) are logged and
        retried with a back-off; connections beyond ``max_connections`` get an error and are closed."""
        if not self.socks:
            self.bind()
        log.info("DD-UGM server listening on %s (at most %d connections)", ", ".join(self.bound),
                 self.limits.max_connections)
        for sock in self.socks:
            sock.settimeout(0.5)
        backoff = 0.0
        try:
            while not self._stop.is_set():
                try:
                    ready = select.select(self.socks, [], [], 0.5)[0] if len(self.socks) > 1 else self.socks
                    if not ready:
                        continue
                    conn, addr = ready[0].accept()
                except socket.timeout:
                    continue
                except OSError as e:
                    if self._stop.is_set():
                        break
                    self.accept_errors += 1
                    backoff = min(2.0, max(0.05, 2 * backoff))
                    if self.accept_errors <= 10 or self.accept_errors % 100 == 0:
                        log.error("accept failed (%s); retrying in %.2f s (%d accept errors so far)", e, backoff,
                                  self.accept_errors)
                    self._stop.wait(backoff)
                    continue
                backoff = 0.0
                self.connections += 1
                number = self.connections
                if self.active >= self.limits.max_connections:
                    self.refused += 1
                    if self._refusing.acquire(blocking=False):  # the answer (with its lingering close) off the accept loop
                        threading.Thread(target=self._refuse, args=(conn, addr, number), daemon=True,
                                         name=f"ddugm-refuse-{number}").start()
                    else:  # a flood: no more threads, close at once
                        conn.close()
                    continue
                stream = SafeSocket(conn)
                t = threading.Thread(target=self.handle, args=(conn, addr, number, stream), daemon=True,
                                     name=f"ddugm-client-{number}")
                with self._active_lock:
                    self._active[number] = (t, stream)
                t.start()
        finally:
            for sock in self.socks:
                sock.close()

    def _refuse(self, conn, addr, number) -> None:
        if self.refused <= 10 or self.refused % 100 == 0:
            log.warning("client %d %s:%d refused: %d connections open (server setting max_connections; %d refused "
                        "so far)", number, addr[0], addr[1], self.limits.max_connections, self.refused)
        stream = SafeSocket(conn)
        try:
            conn.settimeout(1.0)
            stream.send_error(f"DD-UGM server: busy, {self.limits.max_connections} connections are open "
                              f"(server setting max_connections); try again later")
            stream.close()
        finally:
            stream.close(send_close=False)
            self._refusing.release()

    def shutdown(self) -> None:
        """Stop accepting, cancel running jobs and wake clients blocked in reads; their handlers
        send an error and close."""
        self._stop.set()
        with self._active_lock:
            streams = [st for _, st in self._active.values()]
        for st in streams:
            try:
                st.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def wait_for_clients(self, timeout: float) -> bool:
        """Join the client threads; True when all have ended within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._active_lock:
                threads = [t for t, _ in self._active.values()]
            if not threads:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            threads[0].join(min(left, 0.5))

    def handle(self, conn: socket.socket, addr, number: int, stream: SafeSocket | None = None) -> None:
        stream = stream or SafeSocket(conn)
        who = f"client {number} {addr[0]}:{addr[1]}"
        lim = self.limits

        def alive() -> bool:
            return not self._stop.is_set() and not stream.peer_gone()

        try:
            conn.settimeout(lim.handshake_timeout)
            props = self._read_config(stream, who, lim)
            header, extra = self._read_header(stream, lim, who)
            props.update(extra)
            conn.settimeout(lim.idle_timeout)
            first = read_id(stream)
            while first == TEXT:  # FIRE-style clients send their JSON parameters after the header
                props.update(self._text_parameters(stream, lim, who))
                first = read_id(stream)
            cfg, gs = load_settings(props, self.config, operator=self.overrides, limits=lim)
            session = ReconSession(header, cfg, gs, self.engine, lim, alive, job_seconds=lim.max_job_seconds)
            run_stream(stream, session, lambda item: send_item(stream, item), limits=lim, first_id=first)
            if session.received == 0:
                log.warning("%s: the stream had no data (no acquisitions); nothing reconstructed", who)
                if stream.mrd:
                    stream.send_text("WARNING DD-UGM server: the stream had no acquisitions; nothing was reconstructed")
            log.info("%s: done, %d images sent", who, session.sent_images)
            stream.close()
        except (PeerClosed, Cancelled) as e:
            if self._stop.is_set():
                log.warning("%s: stopped by the server's shutdown (%s)", who, e)
                stream.send_error("DD-UGM server: the server is shutting down; the scan was not finished")
                stream.close()
            else:
                log.warning("%s: %s", who, e)
                stream.close(send_close=False)
        except Exception as e:  # noqa: BLE001 - one client's failure must not touch the others
            log.error("%s: %s: %s", who, type(e).__name__, e)
            stream.send_error(f"DD-UGM server: {type(e).__name__}: {e}")
            stream.close()
        finally:
            stream.close(send_close=False)
            with self._active_lock:
                self._active.pop(number, None)

    @staticmethod
    def _read_config(stream, who, limits: Limits) -> dict:
        """The configuration message; it also tells who is calling. Gadgetron's ``<connect>``
        sends its node's ``<configuration>`` as CONFIG_TEXT without a terminator; MRD clients send
        a configuration name (CONFIG_FILE), or NUL-terminated or non-XML text: their errors go
        as TEXT "ERR ..." (:meth:`SafeSocket.send_error`)."""
        mid = read_id(stream)
        if mid == CONFIG_FILE:
            stream.mrd = True
            name = strip_nul(stream.read(1024)).decode("utf-8", "replace")
            log.info("%s: configuration name %r (settings come from the server's configuration)", who, name[:100])
            return {}
        if mid == CONFIG_TEXT:
            text = read_text(stream, "configuration", limits.max_text_bytes)
            body = strip_nul(text).strip()
            stream.mrd = text.endswith(b"\x00") or not body.startswith(b"<")
            return chain_properties(body) if body.startswith(b"<") else {}
        raise ProtocolError(f"expected a configuration message first (id {CONFIG_FILE} or {CONFIG_TEXT}), got id {mid}")

    def _read_header(self, stream, limits: Limits, who: str = "client") -> tuple:
        """The ISMRMRD header (NUL terminator or not) and the parameters of JSON text messages
        sent before it."""
        extra = {}
        while True:
            mid = read_id(stream)
            if mid == TEXT:
                extra.update(self._text_parameters(stream, limits, who))
                continue
            if mid != HEADER:
                raise ProtocolError(f"expected the ISMRMRD header (id {HEADER}), got id {mid}")
            data = read_text(stream, "ISMRMRD header", limits.max_text_bytes)
            if data.endswith(b"\x00"):
                stream.mrd = True
            return parse_header(data), extra

    @staticmethod
    def _text_parameters(stream, limits: Limits, who: str) -> dict:
        """A text message; JSON with a ``parameters`` object (python-ismrmrd-server's
        ``configAdditional``) gives settings: keys that name one of ours are applied (checked like
        every client setting), FIRE's own ``config`` / ``customconfig`` (a server-side
        configuration name) and other keys are logged and ignored."""
        text = strip_nul(read_text(stream, "text message", limits.max_text_bytes)).decode("utf-8", "replace")
        try:
            data = json.loads(text)
        except ValueError:
            log.info("%s: text message: %s", who, text[:500])
            return {}
        params = data.get("parameters") if isinstance(data, dict) else None
        if not isinstance(params, dict):
            log.info("%s: JSON text without parameters (ignored)", who)
            return {}
        out, ignored = json_parameters(params)
        if ignored:
            log.info("%s: JSON parameters not ours, ignored: %s", who, ", ".join(ignored)[:300])
        log.info("%s: settings from JSON parameters: %s", who, ", ".join(f"{k}={v}" for k, v in out.items()) or "none")
        return out


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # "::" serves IPv4 too; "::1" only IPv6 (127.0.0.1 has its own socket)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as e:
        sock.close()
        # the address in the message (a host that does not resolve, a port in use, a privileged port)
        raise OSError(e.errno, f"cannot listen on {host} port {port}: {e.strerror or e}") from None
    return sock


def _port(text: str) -> int:
    """argparse type of --port: a TCP port number."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0 to 65535, got {v}")
    return v


def add_parser(sub):
    p = sub.add_parser("serve", help="persistent reconstruction server for Gadgetron <connect> and MRD clients")
    p.add_argument("--host", action="append", default=None,
                   help="address to listen on, repeatable (default: localhost = 127.0.0.1 and ::1, loopback only; "
                        "'::' for every IPv4 and IPv6 address, 0.0.0.0 for every IPv4 one)")
    p.add_argument("--port", type=_port, default=18000, help="port (default: %(default)s; 0: any free one)")
    p.add_argument("--config", default=None, help="the operator's YAML settings, with its server: limits "
                                                  "(default: $DDUGM_CONFIG, else config/recon.yaml)")
    p.add_argument("--device", default=None, help="override the device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--preset", default=None, help="override the preset (default, pnp, dual, paper)")
    p.add_argument("--idle-timeout", type=finite_float, default=None, help="seconds a silent client is kept mid-stream "
                                                                    "(server setting idle_timeout, default 3600)")
    p.add_argument("--max-connections", type=int, default=None, help="open connections; more are refused "
                                                                     "(server setting max_connections, default 16)")
    p.add_argument("--gpu-memory-gb", type=finite_float, default=None, metavar="GB",
                   help="GPU memory this server may allocate; a job needing more falls back to LLR + TV on the CPU "
                        "(server setting gpu_memory_gb, default 0: the whole card)")
    p.add_argument("--allow-dir", action="append", default=None, metavar="DIR",
                   help="a folder whose files clients may name in config, debug_dir and the weight settings "
                        "(repeatable; server setting allowed_dirs; default: none)")
    p.add_argument("--no-preload", action="store_true", help="load the models on the first scan instead of at start")
    p.add_argument("--log-level", default="INFO")


class _DropQueueHandler(logging.handlers.QueueHandler):
    """Never blocks: when the writer is stuck (a full, unread stderr pipe) records are dropped
    and counted instead of freezing the threads that log."""

    def __init__(self, q):
        super().__init__(q)
        self.dropped = 0

    def enqueue(self, record):
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def setup_logging(level: str) -> tuple:
    """Log through a bounded queue and one writer thread, so no client or accept thread ever
    waits on stderr. Returns (handler, writer thread, queue)."""
    q: queue.Queue = queue.Queue(maxsize=10000)
    handler = _DropQueueHandler(q)
    out = logging.StreamHandler(sys.stderr)
    out.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(threadName)s] %(message)s"))

    def write():
        while True:
            record = q.get()
            if record is None:
                return
            try:
                out.handle(record)
            except Exception:  # noqa: BLE001 - a broken stderr must not end the writer
                pass

    writer = threading.Thread(target=write, name="ddugm-log", daemon=True)
    writer.start()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler, writer, q


def run(a: argparse.Namespace) -> int:
    handler, writer, q = setup_logging(a.log_level)
    overrides = {k: v for k, v in (("device", a.device), ("preset", a.preset)) if v}
    limit_overrides = {"idle_timeout": a.idle_timeout, "max_connections": a.max_connections,
                       "allowed_dirs": a.allow_dir, "gpu_memory_gb": a.gpu_memory_gb}
    limits = load_limits(a.config, limit_overrides)
    server = Server(a.host or ["localhost"], a.port, a.config, overrides, limits=limits)
    server.bind()
    stopping = []

    def on_signal(signum, _frame):
        if not stopping:
            stopping.append(signum)
            log.info("signal %d: stopping (running scans get %.0f s)", signum, limits.shutdown_grace)
        server.shutdown()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if not a.no_preload:
        server.preload()
    server.serve_forever()
    clean = server.wait_for_clients(limits.shutdown_grace)
    log.info("stopped%s", "" if clean else " (some client threads did not end in time)")
    if handler.dropped:
        log.warning("%d log records were dropped while stderr was not being read", handler.dropped)
    try:
        q.put(None, timeout=2.0)
    except queue.Full:
        pass
    writer.join(2.0)
    if not clean or writer.is_alive():
        # a client thread is still inside a long device call (interpreter teardown would abort it),
        # or stderr is not being read (flushing it at exit would block forever): leave at once
        os._exit(0)
    return 0
