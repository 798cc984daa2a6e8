"""``ddugm serve``: a persistent reconstruction server.

Keeps the score models loaded (on the GPU when there is one) for Gadgetron chains that use
``<external><connect port="18000"/>...</external>``, and speaks the MRD streaming protocol
of client/server recon tools (an ``ismrmrd`` ``ProtocolSerializer`` client sending config,
header, acquisitions and close gets ISMRMRD images and a close back).

Each connection has its own thread for I/O; reconstructions go through one shared
:class:`~gadgets.session.Engine`, which runs them one at a time (the GPU queue). A client
that fails, sends garbage or vanishes gets an error message (if it is still there) and
its connection closed; the others carry on.
"""
from __future__ import annotations

import argparse
import logging
import socket
import threading
import xml.etree.ElementTree as ET

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
)
from .session import Engine, ReconSession
from .settings import load_settings, properties_from_xml

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
    def __init__(self, host: str = "127.0.0.1", port: int = 18000, config: str | None = None,
                 overrides: dict | None = None, idle_timeout: float = 3600.0):
        self.host, self.port = host, port
        self.config = config
        self.overrides = dict(overrides or {})
        self.idle_timeout = idle_timeout
        self.engine = Engine()
        self.sock = None
        self.connections = 0
        self._stop = threading.Event()
        load_settings(self.overrides, config)  # fail at start on bad settings, not per client

    def bind(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.host, self.port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        return self.port

    def preload(self) -> None:
        """Load the models now, so the first scan does not wait for them."""
        cfg, _ = load_settings(self.overrides, self.config)
        if cfg.method == "ddugm":
            rec = self.engine.reconstructor(cfg)
            rec.load_models()
            log.info("models loaded on %s", rec.device)

    def serve_forever(self) -> None:
        if self.sock is None:
            self.bind()
        log.info("DD-UGM server listening on %s:%d", self.host, self.port)
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            self.connections += 1
            threading.Thread(target=self.handle, args=(conn, addr, self.connections), daemon=True,
                             name=f"ddugm-client-{self.connections}").start()
        self.sock.close()

    def shutdown(self) -> None:
        self._stop.set()

    def handle(self, conn: socket.socket, addr, number: int) -> None:
        conn.settimeout(self.idle_timeout)
        stream = SafeSocket(conn)
        who = f"client {number} {addr[0]}:{addr[1]}"
        try:
            props = self._read_config(stream, who)
            header = self._read_header(stream)
            cfg, gs = load_settings({**self.overrides, **props}, self.config)
            session = ReconSession(header, cfg, gs, self.engine)
            run_stream(stream, session, lambda item: send_item(stream, item))
            log.info("%s: done, %d images sent", who, session.sent_images)
        except PeerClosed as e:
            log.warning("%s: %s", who, e)
            stream.closed = True
        except Exception as e:  # noqa: BLE001 - one client's failure must not touch the others
            log.error("%s: %s: %s", who, type(e).__name__, e)
            stream.send_error(f"DD-UGM server: {type(e).__name__}: {e}")
        finally:
            stream.close()

    @staticmethod
    def _read_config(stream, who) -> dict:
        mid = read_id(stream)
        if mid == CONFIG_FILE:
            name = stream.read(1024).split(b"\x00", 1)[0].decode("utf-8", "replace")
            log.info("%s: configuration name %r (settings come from the server's configuration)", who, name)
            return {}
        if mid == CONFIG_TEXT:
            return chain_properties(read_text(stream, "configuration"))
        raise ProtocolError(f"expected a configuration message first (id {CONFIG_FILE} or {CONFIG_TEXT}), got id {mid}")

    @staticmethod
    def _read_header(stream):
        while True:
            mid = read_id(stream)
            if mid == TEXT:
                read_text(stream, "text message")
                continue
            if mid != HEADER:
                raise ProtocolError(f"expected the ISMRMRD header (id {HEADER}), got id {mid}")
            return parse_header(read_text(stream, "ISMRMRD header"))


def add_parser(sub):
    p = sub.add_parser("serve", help="persistent reconstruction server for Gadgetron <connect> and MRD clients")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; '::' or 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=18000, help="port (default: %(default)s)")
    p.add_argument("--config", default=None, help="YAML settings (default: config/recon.yaml)")
    p.add_argument("--device", default=None, help="override the device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--preset", default=None, help="override the preset (default, paper)")
    p.add_argument("--idle-timeout", type=float, default=3600.0, help="seconds a silent client is kept (default: %(default)s)")
    p.add_argument("--no-preload", action="store_true", help="load the models on the first scan instead of at start")
    p.add_argument("--log-level", default="INFO")


def run(a: argparse.Namespace) -> int:
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s [%(threadName)s] %(message)s")
    overrides = {k: v for k, v in (("device", a.device), ("preset", a.preset)) if v}
    server = Server(a.host, a.port, a.config, overrides, a.idle_timeout)
    server.bind()
    if not a.no_preload:
        server.preload()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    return 0
