"""The target Gadgetron starts for ``<external><execute name="gadgets.external"
target="reconstruct" type="python"/>...</external>``, i.e. ``python -m gadgetron PORT
gadgets.external reconstruct``.

Accepts ReconData buffers (AcquisitionAccumulateTrigger + BucketToBuffer upstream) or
plain acquisitions (buffered here), sends images or ImageArrays on. Any failure reaches
Gadgetron as an error message (id 8) before the close, never as a silent normal end; a
peer that disappears ends the process at once.

The start of the stream (configuration and header) is read by :func:`startup`, which
:mod:`gadgets.guard` puts in place of the gadgetron package's ``Connection.__init__``: its
own start-up reads spin forever on a vanished peer. The chain's properties are *client*
settings (a Gadgetron client may send the whole chain); the operator's YAML
(``$DDUGM_CONFIG``, else the shipped one) gives the defaults and the limits.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET

from .protocol import (
    CONFIG_TEXT,
    HEADER,
    PeerClosed,
    ProtocolError,
    SafeSocket,
    parse_header,
    read_id,
    read_text,
    run_stream,
)
from .session import Cancelled, Engine, ReconSession
from .settings import load_limits, load_settings, properties_from_xml

log = logging.getLogger("ddugm.gadget")

#: models stay loaded across the connections one process serves (the server uses this too)
_ENGINE = None


def engine(max_cached: int = 4) -> Engine:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Engine(max_cached)
    return _ENGINE


class _Struct:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def startup(conn, sock) -> None:
    """``gadgetron.external.Connection.__init__`` for our modules: the same attributes, with the
    configuration and header read by the checked readers under the operator's limits. A peer
    that vanishes ends the process (exit 1) at once; anything else that is wrong (a first
    message that is not the configuration, oversized lengths, a header that is not ISMRMRD XML)
    is answered with an error message and a close, then exit 1."""
    stream = SafeSocket(sock)
    conn.socket = stream
    conn.readers = type(conn)._default_readers()
    conn.writers = type(conn)._default_writers()
    conn.raw_bytes = _Struct(config=None, header=None)
    conn.filters = []
    conn.limits = None
    try:
        limits = load_limits()
        conn.limits = limits
        sock.settimeout(limits.handshake_timeout)
        mid = read_id(stream)
        if mid != CONFIG_TEXT:
            raise ProtocolError(f"expected the configuration (id {CONFIG_TEXT}) first, got id {mid}")
        config = read_text(stream, "configuration", limits.max_text_bytes)
        try:
            conn.config = ET.fromstring(config)
        except ET.ParseError:
            conn.config = None  # as the gadgetron package does; properties_from_xml names the problem
        conn.raw_bytes.config = config
        mid = read_id(stream)
        if mid != HEADER:
            raise ProtocolError(f"expected the ISMRMRD header (id {HEADER}) after the configuration, got id {mid}")
        header = read_text(stream, "ISMRMRD header", limits.max_text_bytes)
        conn.header = parse_header(header)
        conn.raw_bytes.header = header
        sock.settimeout(limits.idle_timeout)
    except PeerClosed as e:
        log.error("Gadgetron went away during start-up (%s); stopping", e)
        stream.close(send_close=False)
        raise SystemExit(1) from None
    except Exception as e:  # noqa: BLE001 - every start-up failure must reach Gadgetron
        log.error("DD-UGM gadget: start-up failed: %s: %s", type(e).__name__, e)
        stream.send_error(f"DD-UGM gadget: {type(e).__name__}: {e}")
        stream.close()
        raise SystemExit(1) from None


def reconstruct(connection) -> None:
    """Entry point called by ``python -m gadgetron`` with a ``gadgetron.external.Connection``
    whose config and header have been read."""
    if isinstance(connection.socket, SafeSocket):  # read by startup (the guard is installed)
        stream = connection.socket
    else:
        stream = SafeSocket(connection.socket.socket)
        connection.socket = stream  # the Connection's writers and its close now use the safe socket
    try:
        limits = getattr(connection, "limits", None) or load_limits()
        stream.sock.settimeout(limits.idle_timeout)
        cfg, gs = load_settings(properties_from_xml(connection.raw_bytes.config), limits=limits)
        logging.getLogger("ddugm").setLevel(gs.log_level.upper())
        session = ReconSession(connection.header, cfg, gs, engine(limits.max_cached), limits,
                               alive=lambda: not stream.peer_gone())
        log.info("DD-UGM gadget: method %s, preset %s, device %s, output %s", cfg.method, cfg.preset, cfg.device, gs.output)
        run_stream(stream, session, connection.send, limits=limits)
        log.info("stream closed normally: %d images sent", session.sent_images)
    except PeerClosed as e:
        log.error("Gadgetron went away mid-stream (%s); stopping", e)
        stream.close(send_close=False)
        raise SystemExit(1) from None
    except Cancelled as e:
        log.error("Gadgetron went away during the reconstruction (%s); stopping", e)
        stream.close(send_close=False)
        raise SystemExit(1) from None
    except Exception as e:
        log.exception("DD-UGM gadget failed")
        stream.send_error(f"DD-UGM gadget: {type(e).__name__}: {e}")
        raise
