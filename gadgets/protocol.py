"""The wire, shared by the external gadget and the server.

Gadgetron's external-gadget protocol and the MRD streaming protocol of client/server recon
tools are the same framing: a little-endian uint16 message id, then the message. Config
(``CONFIG_FILE`` 1: 1024 bytes, or ``CONFIG_TEXT`` 2: uint32 length + text), the ISMRMRD
header (3: uint32 length + XML), optional text (5), data messages, close (4). Errors go to
Gadgetron as message 8 with a uint64-length string, followed by close.

:class:`SafeSocket` replaces the gadgetron package's socket wrapper, whose read loop spins
forever when the peer has gone (``recv`` returning no bytes): here that raises
:class:`PeerClosed` at once.
"""
from __future__ import annotations

import ctypes
import logging
import socket
import struct

import ismrmrd

log = logging.getLogger("ddugm.protocol")

CONFIG_FILE, CONFIG_TEXT, HEADER, CLOSE, TEXT, ERROR = 1, 2, 3, 4, 5, 8
ACQUISITION, IMAGE, RECON_DATA, IMAGE_ARRAY, WAVEFORM = 1008, 1022, 1023, 1024, 1026

MAX_TEXT = 64 << 20  # config, header or text larger than this is not a real stream
MAX_CHANNELS = 1024
MAX_SAMPLES = 1 << 16


class PeerClosed(ConnectionError):
    """The other side closed the connection."""


class ProtocolError(ValueError):
    """The stream does not follow the protocol (wrong message, bad sizes, garbage)."""


class SafeSocket:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.closed = False

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
        """Message 8: Gadgetron reports it as the external node's error (a RemoteError)."""
        data = message.encode("utf-8", "replace")
        try:
            self.write(struct.pack("<H", ERROR) + struct.pack("<Q", len(data)) + data)
        except OSError:
            log.warning("could not send the error to the peer (connection gone)")

    def close(self) -> None:
        """Send CLOSE once (if the peer is still there) and close the socket."""
        if self.closed:
            return
        self.closed = True
        try:
            self.write(struct.pack("<H", CLOSE))
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def read_id(stream) -> int:
    return struct.unpack("<H", stream.read(2))[0]


def read_text(stream, what: str) -> bytes:
    n = struct.unpack("<I", stream.read(4))[0]
    if n > MAX_TEXT:
        raise ProtocolError(f"{what} of {n} bytes is larger than {MAX_TEXT} bytes: not a valid stream")
    return stream.read(n)


def parse_header(data: bytes):
    try:
        return ismrmrd.xsd.CreateFromDocument(data)
    except Exception as e:  # noqa: BLE001 - xsdata raises several types
        raise ProtocolError(f"the ISMRMRD header is not valid XML for the ISMRMRD schema: {e}") from None


def read_acquisition(stream):
    """An acquisition, with its sizes checked before anything is allocated."""
    size = ctypes.sizeof(ismrmrd.AcquisitionHeader)
    head = stream.read(size)
    h = ismrmrd.AcquisitionHeader.from_buffer_copy(head)
    if h.active_channels > MAX_CHANNELS or h.number_of_samples > MAX_SAMPLES or h.trajectory_dimensions > 3:
        raise ProtocolError(f"acquisition header with {h.number_of_samples} samples, {h.active_channels} channels and "
                            f"{h.trajectory_dimensions} trajectory dimensions: not a valid acquisition")
    first = [True]

    def read_exactly(n):
        if first[0]:
            first[0] = False
            return head
        return stream.read(n)

    return ismrmrd.Acquisition.deserialize_from(read_exactly)


def data_readers() -> dict:
    """Message id -> reader for the data part of a stream (the gadgetron package's own
    readers, with the acquisition reader replaced by the checked one)."""
    from gadgetron.external.readers import read_image, read_waveform
    from gadgetron.types.image_array import read_image_array
    from gadgetron.types.recon_data import read_recon_data

    return {ACQUISITION: read_acquisition, RECON_DATA: read_recon_data, IMAGE: read_image,
            IMAGE_ARRAY: read_image_array, WAVEFORM: read_waveform}


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


def run_stream(stream, session, send, readers=None) -> None:
    """Read data messages until CLOSE, feeding the session and sending what it returns;
    then finish the session (reconstruct what is buffered) and raise its collected errors."""
    readers = readers or data_readers()
    while True:
        mid = read_id(stream)
        if mid == CLOSE:
            break
        if mid == TEXT:
            log.info("text message: %s", read_text(stream, "text message").decode("utf-8", "replace")[:500])
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
