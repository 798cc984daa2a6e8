"""Gadgetron's side of the external-gadget protocol, for tests (no Gadgetron server exists here).

Listens on loopback, starts our module exactly as Gadgetron does (``python -m gadgetron PORT
MODULE TARGET``), sends config, header, items (with the gadgetron package's own writers) and
close, and reads back what comes: images, image arrays, error messages, close.
"""
from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field

import ismrmrd
import numpy as np
from gadgetron.external import writers
from gadgetron.external.readers import read_image
from gadgetron.types.image_array import ImageArray, read_image_array, write_image_array
from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData, SamplingDescription, write_recon_data

from gadgets.replay import open_dataset


class _Sock:
    def __init__(self, s):
        self.s = s

    def write(self, b):
        self.s.sendall(b)

    def read(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf


@dataclass
class Reply:
    images: list = field(default_factory=list)
    arrays: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    closed: bool = False  # a CLOSE message arrived
    others: list = field(default_factory=list)


def read_replies(sock: _Sock, timeout: float = 120) -> Reply:
    sock.s.settimeout(timeout)
    r = Reply()
    while True:
        try:
            mid = struct.unpack("<H", sock.read(2))[0]
        except EOFError:
            return r
        if mid == 1022:
            r.images.append(read_image(sock))
        elif mid == 1024:
            r.arrays.append(read_image_array(sock))
        elif mid == 8:
            n = struct.unpack("<Q", sock.read(8))[0]
            r.errors.append(sock.read(n).decode())
        elif mid == 4:
            r.closed = True
            return r
        else:
            r.others.append(mid)
            return r


class FakeGadgetron:
    def __init__(self, module="gadgets.external", target="reconstruct", env=None):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "gadgetron", str(self.port), module, target],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.listener.settimeout(60)
        conn, _ = self.listener.accept()
        self.sock = _Sock(conn)

    def send_config(self, properties: dict | None = None, raw: bytes | None = None):
        if raw is None:
            props = "".join(f'<property name="{k}" value="{v}"/>' for k, v in (properties or {}).items())
            raw = f'<?xml version="1.0"?>\n<configuration>{props}</configuration>\n'.encode()
        self.sock.write(struct.pack("<H", 2) + struct.pack("<I", len(raw)) + raw)

    def send_header(self, xml: str | bytes):
        b = xml.encode() if isinstance(xml, str) else xml
        self.sock.write(struct.pack("<H", 3) + struct.pack("<I", len(b)) + b)

    def send(self, item):
        if isinstance(item, ismrmrd.Acquisition):
            writers.write_acquisition(self.sock, item)
        elif isinstance(item, ReconData):
            write_recon_data(self.sock, item)
        elif isinstance(item, ImageArray):
            write_image_array(self.sock, item)
        elif isinstance(item, ismrmrd.Image):
            writers.write_image(self.sock, item)
        else:
            raise TypeError(type(item))

    def close_stream(self):
        self.sock.write(struct.pack("<H", 4))

    def replies(self, timeout=120) -> Reply:
        return read_replies(self.sock, timeout)

    def wait(self, timeout=30) -> tuple[int, float, str]:
        t0 = time.perf_counter()
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            return None, time.perf_counter() - t0, err.decode(errors="replace")
        return self.proc.returncode, time.perf_counter() - t0, err.decode(errors="replace")

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self.sock.s.close()
        self.listener.close()


def recon_data_from_file(path: str, slice_: int = 0, n_dimension: str = "phase"):
    """What AcquisitionAccumulateTrigger + BucketToBuffer (with NoiseAdjust upstream, so
    no noise scan) would deliver for one slice of a raw file: one ReconBit, data
    [E0, E1, 1, CHA, N, 1, 1] (phases, or another counter, along N: BucketToBuffer's
    N_dimension), headers [E1, 1, N, 1, 1]; calibration lines in a reference buffer of the same
    frames (BucketToBuffer sizes its N from the lines it holds), and
    calibration-only ones (ACQ_IS_PARALLEL_CALIBRATION) there only, as AcquisitionAccumulateTrigger
    sorts them."""
    ds = open_dataset(path)
    hdr = ismrmrd.xsd.CreateFromDocument(ds.read_xml_header())
    enc = hdr.encoding[0]
    e0, e1 = enc.encodedSpace.matrixSize.x, enc.encodedSpace.matrixSize.y
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    acqs = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) and a.idx.slice == slice_]
    n = max(getattr(a.idx, n_dimension) for a in acqs) + 1
    cha = acqs[0].active_channels
    data = np.zeros((e0, e1, 1, cha, n, 1, 1), np.complex64)
    ref = np.zeros((e0, e1, 1, cha, n, 1, 1), np.complex64)
    empty = ismrmrd.AcquisitionHeader()
    heads = np.empty((e1, 1, n, 1, 1), dtype=object)
    rheads = np.empty((e1, 1, n, 1, 1), dtype=object)
    for idx in np.ndindex(heads.shape):
        heads[idx] = ismrmrd.AcquisitionHeader.from_buffer_copy(empty)
    for idx in np.ndindex(rheads.shape):
        rheads[idx] = ismrmrd.AcquisitionHeader.from_buffer_copy(empty)
    for a in acqs:
        off = e0 // 2 - a.center_sample
        ky, ph = a.idx.kspace_encode_step_1, getattr(a.idx, n_dimension)
        calibration_only = a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        if not calibration_only:  # AcquisitionAccumulateTrigger: calibration-only lines go to the reference only
            data[off:off + a.number_of_samples, ky, 0, :, ph, 0, 0] = a.data.T
            heads[ky, 0, ph, 0, 0] = a.getHead()
        if calibration_only or a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING):
            ref[off:off + a.number_of_samples, ky, 0, :, ph, 0, 0] = a.data.T
            rheads[ky, 0, ph, 0, 0] = a.getHead()
    sd = SamplingDescription()
    lim = enc.encodingLimits.kspace_encoding_step_1
    sd.encoded_matrix[:] = (e0, e1, 1)
    sd.recon_matrix[:] = (enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y, 1)
    sd.sampling_limits[0].min, sd.sampling_limits[0].center, sd.sampling_limits[0].max = 0, e0 // 2, e0 - 1
    sd.sampling_limits[1].min, sd.sampling_limits[1].center, sd.sampling_limits[1].max = lim.minimum, lim.center, lim.maximum
    buf = ReconBuffer(data, None, None, heads, sd)
    rbuf = ReconBuffer(ref, None, None, rheads, sd)
    return hdr, ReconData([ReconBit(buf, rbuf)])


class FireConnection:
    """What a python-ismrmrd-server module sees of its ``Connection``: the items (then None) to
    iterate, ``send_image`` and ``send_logging``, kept in ``images`` and ``logs``."""

    def __init__(self, items):
        self.items = list(items)
        self.images, self.logs = [], []

    def __iter__(self):
        return iter(self.items + [None])

    def send_image(self, images):
        self.images += images

    def send_logging(self, level, text):
        self.logs.append((level, text))
