"""The reconstruction as a python-ismrmrd-server (FIRE-style) module:
``process(connection, config, metadata)``.

python-ismrmrd-server imports the module a client names in its configuration message and calls
``process`` with its ``Connection`` (an iterator over acquisitions, images, waveforms and
texts, with ``send_image`` and ``send_logging``), the configuration (the name, or the client's
JSON ``configAdditional`` as a dict) and the metadata (the ISMRMRD header, parsed or as text).
Put a one-line ``ddugm.py`` beside that server's modules::

    from gadgets.fire import process  # noqa: F401

and clients that ask for configuration ``ddugm`` get DD-UGM images. Settings come from
``$DDUGM_CONFIG`` (else the shipped YAML) and the JSON ``parameters`` that name one of ours
(checked like every client setting); errors go back as ``send_logging("ERROR", ...)`` text, and
the slices that did reconstruct are sent first.
"""
from __future__ import annotations

import json
import logging

import ismrmrd

from .external import engine
from .protocol import parse_header
from .session import ReconSession
from .settings import json_parameters, load_limits, load_settings

log = logging.getLogger("ddugm.fire")

def parameters(config) -> dict:
    """Our settings among a FIRE configuration's JSON ``parameters`` (a dict or JSON text)."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return {}
    params = config.get("parameters") if isinstance(config, dict) else None
    return json_parameters(params)[0] if isinstance(params, dict) else {}


def _send_error(connection, message: str) -> None:
    log.error("%s", message)
    if hasattr(connection, "send_logging"):
        connection.send_logging("ERROR", message)
    else:
        connection.send_text(f"ERR {message}")


def process(connection, config, metadata) -> None:
    """Reconstruct everything ``connection`` yields until its close; send the images."""
    try:
        header = metadata if not isinstance(metadata, (str, bytes)) else parse_header(
            metadata.encode() if isinstance(metadata, str) else metadata)
        limits = load_limits()
        cfg, gs = load_settings(parameters(config), limits=limits)
        gs.send = "images"
        # a network service like ``ddugm serve``: the same wall-clock limit per slice
        session = ReconSession(header, cfg, gs, engine(limits.max_cached), limits, job_seconds=limits.max_job_seconds)
    except Exception as e:  # noqa: BLE001 - every failure must reach the client
        _send_error(connection, f"DD-UGM: {type(e).__name__}: {e}")
        return
    sent = 0
    try:
        for item in connection:
            if item is None:
                break
            if isinstance(item, str):  # text (e.g. a late JSON configAdditional): settings are fixed by now
                log.info("text message: %s", item[:300])
                continue
            if isinstance(item, ismrmrd.Acquisition):
                out = session.handle(item)
            else:  # images, waveforms: passed back as FIRE modules do
                out = [item]
            sent += _send(connection, out)
        sent += _send(connection, session.finish())
    except Exception as e:  # noqa: BLE001
        _send_error(connection, f"DD-UGM: {type(e).__name__}: {e}")
        return
    if session.errors:
        _send_error(connection, "DD-UGM: some slices failed (the others were sent): " + "; ".join(session.errors))
    elif session.received == 0 and hasattr(connection, "send_logging"):
        connection.send_logging("WARNING", "DD-UGM: the stream had no acquisitions; nothing was reconstructed")
    log.info("DD-UGM: %d images sent", sent)


def _send(connection, items: list) -> int:
    images = [i for i in items if isinstance(i, ismrmrd.Image)]
    if images:
        connection.send_image(images)
    for other in items:
        if isinstance(other, ismrmrd.Waveform) and hasattr(connection, "send_waveform"):
            connection.send_waveform(other)
    return len(images)
