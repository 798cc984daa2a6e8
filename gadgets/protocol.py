"""The wire, shared by the external gadget and the server.

Gadgetron's external-gadget protocol and the MRD streaming protocol of client/server recon
tools are the same framing: a little-endian uint16 message id, then the message. Config
(``CONFIG_FILE`` 1: 1024 bytes, or ``CONFIG_TEXT`` 2: uint32 length + text), the ISMRMRD
header (3: uint32 length + XML), optional text (5), data messages, close (4). Errors go to
Gadgetron as message 8 with a uint64-length string, followed by close.

:class:`SafeSocket` replaces the gadgetron package's socket wrapper, whose read loop spins
forever when the peer has gone (``recv`` returning no bytes): here that raises
:class:`PeerClosed` at once.

Every message is read under the operator's limits (:class:`~gadgets.settings.Limits`): text
messages up to ``max_text_kb``, each data message through a :class:`Budget` of
``max_message_mb``, and the headers that decide an allocation (acquisition, image,
waveform) are checked before the allocation.
"""
from __future__ import annotations

import ctypes
import logging
import select
import socket
import struct
import time
import warnings

import ismrmrd
import numpy as np
from ismrmrd.image import get_dtype_from_data_type

log = logging.getLogger("ddugm.protocol")

CONFIG_FILE, CONFIG_TEXT, HEADER, CLOSE, TEXT, ERROR = 1, 2, 3, 4, 5, 8
ACQUISITION, IMAGE, RECON_DATA, IMAGE_ARRAY, WAVEFORM = 1008, 1022, 1023, 1024, 1026

MAX_TEXT = 4 << 20  # config, header or text larger than this is not a real stream (Limits.max_text_kb)


class PeerClosed(ConnectionError):
    """The other side closed the connection."""


class ProtocolError(ValueError):
    """The stream does not follow the protocol (wrong message, bad sizes, garbage)."""


class SafeSocket:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.closed = False
        self.mrd = False  # an MRD (FIRE-style) client rather than Gadgetron: errors go as TEXT "ERR ..."

    def read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except socket.timeout:
                raise PeerClosed("no data from the peer within the idle timeout") from None
            except OSError as e:
                raise PeerClosed(f"connection lost: {e}") from None
            if not chunk:
                raise PeerClosed(f"the peer closed the connection ({len(buf)} of {n} bytes of a message read)")
            buf += chunk
        return bytes(buf)

    def write(self, data) -> None:
        self.sock.sendall(bytes(data) if not isinstance(data, (bytes, bytearray, memoryview)) else data)

    def send_error(self, message: str) -> None:
        """To Gadgetron: message 8, which it reports as the external node's error (a RemoteError).
        To an MRD client (``self.mrd``; MRD defines no error message): a TEXT message starting
        with "ERR", as FIRE servers send, NUL-terminated."""
        if self.mrd:
            return self.send_text(message if message.startswith("ERR") else f"ERR {message}")
        data = message.encode("utf-8", "replace")
        try:
            self.write(struct.pack("<H", ERROR) + struct.pack("<Q", len(data)) + data)
        except OSError:
            log.warning("could not send the error to the peer (connection gone)")

    def send_text(self, message: str) -> None:
        """A TEXT message (NUL-terminated, as MRD clients expect); for MRD peers only: Gadgetron
        takes a text message from an external node as an illegal message."""
        text = message.encode("utf-8", "replace") + b"\x00"
        try:
            self.write(struct.pack("<HI", TEXT, len(text)) + text)
        except OSError:
            log.warning("could not send a text message to the peer (connection gone)")

    def peer_gone(self) -> bool:
        """Has the peer closed its side or reset the connection? (No wait, nothing consumed.)
        MRD and Gadgetron peers end a stream with CLOSE and then read; they never half-close."""
        try:
            rdhup = getattr(select, "POLLRDHUP", 0)
            if rdhup:  # Linux: the peer's FIN is seen even behind data not yet read (its CLOSE message)
                p = select.poll()
                p.register(self.sock, rdhup | select.POLLHUP | select.POLLERR)
                return any(ev & (rdhup | select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def close(self, send_close: bool = True) -> None:
        """Send CLOSE once (unless the peer is gone or ``send_close`` is false), then always close
        the socket, so a half-closed or timed-out peer sees EOF at once."""
        if not self.closed and send_close:
            try:
                self.write(struct.pack("<H", CLOSE))
            except OSError:
                pass
        self.closed = True
        if self.sock.fileno() < 0:
            return
        if send_close:
            self._drain()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _drain(self, seconds: float = 2.0, limit: int = 64 << 20) -> None:
        """Lingering close: after our last message, stop sending and read (and drop) what the
        peer still sends, until it closes or for ``seconds``. Closing with unread data would
        reset the connection, and the peer could lose the error message it has not read yet."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + seconds
            while limit > 0:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    return
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return
                limit -= len(chunk)
        except (OSError, ValueError):
            pass


class Budget:
    """A stream view that refuses to read more than ``limit`` bytes in all: a message that claims
    more is rejected before its bytes are read or a buffer for them is made."""

    def __init__(self, stream, limit: int, what: str = "message"):
        self.stream, self.left, self.limit, self.what = stream, int(limit), int(limit), what

    def read(self, n: int) -> bytes:
        n = int(n)
        if n < 0 or n > self.left:
            raise ProtocolError(f"{self.what} larger than the server's limit of {self.limit} bytes "
                                f"(server setting max_message_mb)")
        self.left -= n
        return self.stream.read(n)

    def need(self, n: int, what: str) -> None:
        """Refuse an allocation of ``n`` bytes that this message could not fill."""
        if n > self.left:
            raise ProtocolError(f"{what} of {n} bytes is larger than the server's limit of {self.limit} bytes "
                                f"(server setting max_message_mb)")


def read_id(stream) -> int:
    return struct.unpack("<H", stream.read(2))[0]


def read_text(stream, what: str, limit: int = MAX_TEXT) -> bytes:
    n = struct.unpack("<I", stream.read(4))[0]
    if n > limit:
        raise ProtocolError(f"{what} of {n} bytes is larger than the limit of {limit} bytes "
                            f"(server setting max_text_kb): not a valid stream")
    return stream.read(n)


def strip_nul(data: bytes) -> bytes:
    """Text up to its NUL terminator (MRD clients terminate config, header and text with one)."""
    return bytes(data).split(b"\x00", 1)[0]


def parse_header(data: bytes):
    """The ISMRMRD header. A value the schema parser cannot convert (text in a number field) is
    kept as text, and its warning goes to the log, one line each, not to stderr; the fields the
    reconstruction reads are checked where they are read (:func:`gadgets.geometry.geometry_from_header`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            header = ismrmrd.xsd.CreateFromDocument(strip_nul(data))
        except Exception as e:  # noqa: BLE001 - xsdata raises several types
            raise ProtocolError(f"the ISMRMRD header is not valid XML for the ISMRMRD schema: {e}") from None
    for w in caught[:20]:
        log.warning("ISMRMRD header: %s", " ".join(str(w.message).split())[:300])
    return header


def _replay_first(head: bytes, stream):
    """``read_exactly`` that returns ``head`` first (already read and checked), then reads on."""
    first = [True]

    def read_exactly(n):
        if first[0]:
            first[0] = False
            return head
        return stream.read(n)

    return read_exactly


def read_acquisition(stream, limits=None):
    """An acquisition, with its sizes checked before anything is allocated."""
    lim = _limits(limits)
    head = stream.read(ctypes.sizeof(ismrmrd.AcquisitionHeader))
    h = ismrmrd.AcquisitionHeader.from_buffer_copy(head)
    if h.active_channels > lim.max_coils or h.number_of_samples > 4 * lim.max_matrix or h.trajectory_dimensions > 3:
        raise ProtocolError(f"acquisition header with {h.number_of_samples} samples, {h.active_channels} channels and "
                            f"{h.trajectory_dimensions} trajectory dimensions: not a valid acquisition (server "
                            f"limits: max_coils {lim.max_coils}, {4 * lim.max_matrix} samples)")
    if isinstance(stream, Budget):
        stream.need(8 * h.active_channels * h.number_of_samples, "acquisition data")
    return ismrmrd.Acquisition.deserialize_from(_replay_first(head, stream))


def read_image(stream, limits=None):
    """An image, its data size checked against the message budget before it is allocated."""
    head = stream.read(ctypes.sizeof(ismrmrd.ImageHeader))
    h = ismrmrd.ImageHeader.from_buffer_copy(head)
    try:
        item = np.dtype(get_dtype_from_data_type(h.data_type)).itemsize
    except Exception:  # noqa: BLE001 - ismrmrd raises several types for unknown codes
        raise ProtocolError(f"image header with unknown data type {h.data_type}") from None
    n = int(h.channels) * int(np.prod([int(v) for v in h.matrix_size])) * item
    if isinstance(stream, Budget):
        stream.need(n, "image data")
    return ismrmrd.Image.deserialize_from(_replay_first(head, stream))


def read_waveform(stream, limits=None):
    head = stream.read(ctypes.sizeof(ismrmrd.WaveformHeader))
    h = ismrmrd.WaveformHeader.from_buffer_copy(head)
    if isinstance(stream, Budget):
        stream.need(4 * int(h.channels) * int(h.number_of_samples), "waveform data")
    return ismrmrd.Waveform.deserialize_from(_replay_first(head, stream))


def read_image_array(stream, limits=None):
    """The gadgetron package's ImageArray layout, with waveforms read by the checked reader."""
    from gadgetron.external import readers as r
    from gadgetron.types.image_array import ImageArray, read_meta_container_vector

    def waveforms(source):
        n = r.read(source, r.constants.uint64)
        return [read_waveform(source) for _ in range(n)]

    return ImageArray(data=r.read_array(stream, np.complex64),
                      headers=r.read_object_array(stream, r.read_image_header),
                      meta=read_meta_container_vector(stream),
                      waveform=r.read_optional(stream, waveforms),
                      acq_headers=r.read_optional(stream, r.read_object_array, r.read_acquisition_header))


def _limits(limits):
    if limits is None:
        from .settings import Limits

        limits = Limits()
    return limits


def data_readers(limits=None) -> dict:
    """Message id -> reader for the data part of a stream: the gadgetron package's ReconData
    reader (its arrays are read before they are allocated) and checked readers for the rest.
    Each reads through a :class:`Budget` of the operator's ``max_message_mb``."""
    from gadgetron.types.recon_data import read_recon_data

    lim = _limits(limits)
    budget = lim.max_message_bytes

    def bounded(reader, what):
        return lambda stream: reader(Budget(stream, budget, what), lim)

    return {ACQUISITION: bounded(read_acquisition, "acquisition"),
            RECON_DATA: bounded(lambda s, _: read_recon_data(s), "ReconData"),
            IMAGE: bounded(read_image, "image"), IMAGE_ARRAY: bounded(read_image_array, "ImageArray"),
            WAVEFORM: bounded(read_waveform, "waveform")}


def data_writers() -> list:
    from gadgetron.external.writers import write_acquisition, write_image, write_waveform
    from gadgetron.types.image_array import ImageArray, write_image_array

    return [(lambda i: isinstance(i, ismrmrd.Image), write_image),
            (lambda i: isinstance(i, ImageArray), write_image_array),
            (lambda i: isinstance(i, ismrmrd.Acquisition), write_acquisition),
            (lambda i: isinstance(i, ismrmrd.Waveform), write_waveform)]


def send_item(stream, item, writers=None) -> None:
    for accepts, writer in writers or data_writers():
        if accepts(item):
            return writer(stream, item)
    raise TypeError(f"no writer for {type(item).__name__}")


def run_stream(stream, session, send, readers=None, limits=None, first_id: int | None = None) -> None:
    """Read data messages until CLOSE, feeding the session and sending what it returns;
    then finish the session (reconstruct what is buffered) and raise its collected errors.
    ``first_id``: a message id already read by the caller."""
    lim = _limits(limits)
    readers = readers or data_readers(lim)
    while True:
        mid, first_id = (first_id, None) if first_id is not None else (read_id(stream), None)
        if mid == CLOSE:
            break
        if mid == TEXT:
            text = read_text(stream, "text message", lim.max_text_bytes)
            log.info("text message: %s", strip_nul(text).decode("utf-8", "replace")[:500])
            continue
        reader = readers.get(mid)
        if reader is None:
            raise ProtocolError(f"unexpected message id {mid} in the data stream "
                                f"(expected one of {sorted(readers)} or close {CLOSE})")
        try:
            item = reader(stream)
        except (PeerClosed, ProtocolError):
            raise
        except Exception as e:  # noqa: BLE001 - malformed payloads surface as many types
            raise ProtocolError(f"malformed message {mid}: {type(e).__name__}: {e}") from None
        for out in session.handle(item):
            send(out)
    for out in session.finish():
        send(out)
    session.raise_errors()
