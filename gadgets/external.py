"""The target Gadgetron starts for ``<external><execute name="gadgets.external"
target="reconstruct" type="python"/>...</external>``, i.e. ``python -m gadgetron PORT
gadgets.external reconstruct``.

Accepts ReconData buffers (AcquisitionAccumulateTrigger + BucketToBuffer upstream) or
plain acquisitions (buffered here), sends images or ImageArrays on. Any failure reaches
Gadgetron as an error message (id 8) before the close, never as a silent normal end; a
peer that disappears ends the process at once.
"""
from __future__ import annotations

import logging

from .protocol import PeerClosed, SafeSocket, run_stream
from .session import Engine, ReconSession
from .settings import load_settings, properties_from_xml

log = logging.getLogger("ddugm.gadget")

#: models stay loaded across the connections one process serves (the server uses this too)
_ENGINE = None


def engine() -> Engine:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Engine()
    return _ENGINE


def reconstruct(connection) -> None:
    """Entry point called by ``python -m gadgetron`` with a ``gadgetron.external.Connection``
    whose config and header have been read."""
    stream = SafeSocket(connection.socket.socket)
    connection.socket = stream  # the Connection's writers and its close now use the safe socket
    try:
        cfg, gs = load_settings(properties_from_xml(connection.raw_bytes.config))
        logging.getLogger("ddugm").setLevel(gs.log_level.upper())
        session = ReconSession(connection.header, cfg, gs, engine())
        log.info("DD-UGM gadget: method %s, preset %s, device %s, output %s", cfg.method, cfg.preset, cfg.device, gs.output)
        run_stream(stream, session, connection.send)
        log.info("stream closed normally: %d images sent", session.sent_images)
    except PeerClosed as e:
        log.error("Gadgetron went away mid-stream (%s); stopping", e)
        stream.closed = True  # nobody to send a close to
        raise SystemExit(1) from None
    except Exception as e:
        log.exception("DD-UGM gadget failed")
        stream.send_error(f"DD-UGM gadget: {type(e).__name__}: {e}")
        raise
