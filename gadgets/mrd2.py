"""``ddugm stream``: MRD v2 in, MRD v2 images out (mrd-python), for Pingvin and
``mrd_hdf5_to_stream | ddugm stream | mrd_stream_to_hdf5`` pipelines.

Reads a binary MRD v2 stream (stdin or ``--input``), reconstructs it with the same
:class:`~gadgets.session.ReconSession` (and the same settings) as the gadget, the server and
``ddugm recon``, and writes the input's header followed by the images (stdout or
``--output``), each slice as soon as it is reconstructed. MRD v2 and ISMRMRD v1 share their
fields and flag bits, so the conversion here is field by field: :func:`header_to_v1`,
:func:`acquisition_to_v1` and :func:`image_to_v2` for the stream, and the reverse of the first
two (:func:`header_to_v2`, :func:`acquisition_to_v2`) to turn an ISMRMRD v1 file into a v2
stream (``ddugm stream --from-ismrmrd raw.h5``). Logs go to stderr, never to the stream.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import ismrmrd
import ismrmrd.xsd as x
import numpy as np

log = logging.getLogger("ddugm.stream")

USER = 8  # user_int / user_float slots in ISMRMRD v1 headers
#: encoding limits, named alike in ISMRMRD v1 and MRD v2
_LIMITS = ("kspace_encoding_step_0", "kspace_encoding_step_1", "kspace_encoding_step_2", "average", "slice",
           "contrast", "phase", "repetition", "set", "segment")


def _mrd():
    try:
        import mrd
    except ImportError:  # pragma: no cover - it is a dependency
        raise ValueError("MRD v2 streams need mrd-python: pip install mrd-python") from None
    return mrd


# ---------------------------------------------------------------------- a bounded reader
#: stream items ``ddugm stream`` reads: acquisitions are reconstructed, waveforms and images passed on
_READ = {"Acquisition", "WaveformUint32", "ImageUint16", "ImageInt16", "ImageUint32", "ImageInt32", "ImageFloat",
         "ImageDouble", "ImageComplexFloat", "ImageComplexDouble", "ArrayComplexFloat"}


def bounded_reader_class(max_array_bytes: int, max_text_bytes: int):
    """The class of an mrd-python reader that never allocates more than the operator's limits for
    one field. mrd-python allocates (and zero-fills) whatever size a length field asks for before
    it reads a byte, so a corrupted length could take all the memory: here an array (acquisition
    or image data) above ``max_array_bytes`` and a string above ``max_text_bytes`` are refused
    first. Items whose header arrays mrd-python allocates from their shape alone (ReconData,
    AcquisitionBucket, ImageArray: a Gadgetron-internal buffer, not what a scan sends) are refused
    by name; the reconstruction takes acquisitions."""
    mrd = _mrd()
    try:
        return _reader_class(mrd, max_array_bytes, max_text_bytes)
    except (AttributeError, ImportError, TypeError) as e:  # pragma: no cover - another mrd-python's internals
        from importlib.metadata import version

        raise RuntimeError(f"mrd-python {version('mrd-python')} reads streams differently from 2.1, which ddugm "
                           f"stream's bounded reader is written for ({type(e).__name__}: {e})") from None


def _reader_class(mrd, max_array_bytes: int, max_text_bytes: int):
    from mrd import _binary

    class BoundedInput(_binary.CodedInputStream):
        def _check(self, count, limit, what, setting):
            if count > limit:
                raise ValueError(f"an MRD v2 {what} of {count} bytes is larger than the operator's {setting} "
                                 f"({limit} bytes): a corrupted length field, or raise the limit")

        def read_bytearray(self, count):
            self._check(count, max_array_bytes, "array", "max_message_mb")
            return super().read_bytearray(count)

        def read_view(self, count):
            self._check(count, max_text_bytes, "string", "max_text_kb")
            return super().read_view(count)

    class Refused(_binary.TypeSerializer):
        def __init__(self, name):
            super().__init__(np.object_)
            self.name = name

        def read(self, stream):
            raise ValueError(f"the MRD v2 stream holds an item of type {self.name}; ddugm stream reads acquisitions (and "
                             f"passes waveforms and images on), not Gadgetron-internal buffers")

        write = write_numpy = read_numpy = read

    b = mrd.binary
    scalar = {"Uint16": _binary.uint16_serializer, "Int16": _binary.int16_serializer,
              "Uint32": _binary.uint32_serializer, "Int32": _binary.int32_serializer,
              "Float": _binary.float32_serializer, "Double": _binary.float64_serializer,
              "ComplexFloat": _binary.complexfloat32_serializer, "ComplexDouble": _binary.complexfloat64_serializer}

    def serializer(name):
        if name not in _READ:
            return Refused(name)
        if name == "Acquisition":
            return b.AcquisitionSerializer()
        if name == "WaveformUint32":
            return b.WaveformSerializer(_binary.uint32_serializer)
        if name == "ArrayComplexFloat":
            return _binary.DynamicNDArraySerializer(_binary.complexfloat32_serializer)
        return b.ImageSerializer(scalar[name[len("Image"):]])

    cases = {getattr(mrd.StreamItem, n).index: (getattr(mrd.StreamItem, n), n) for n in dir(mrd.StreamItem)
             if isinstance(getattr(getattr(mrd.StreamItem, n), "index", None), int)}
    if sorted(cases) != list(range(len(cases))):  # pragma: no cover - another mrd-python's stream items
        raise TypeError("unexpected stream item numbering")
    union = _binary.UnionSerializer(mrd.StreamItem, [(cases[i][0], serializer(cases[i][1])) for i in sorted(cases)])

    class Reader(b.BinaryMrdReader):
        def __init__(self, stream):  # the preamble as mrd-python checks it, through the bounded input
            mrd.protocols.MrdReaderBase.__init__(self)
            self._stream = BoundedInput(stream)
            if bytes(self._stream.read_view(len(_binary.MAGIC_BYTES))) != _binary.MAGIC_BYTES:
                raise ValueError("invalid magic bytes")
            if _binary.read_fixed_int32(self._stream) != _binary.CURRENT_BINARY_FORMAT_VERSION:
                raise ValueError("another binary format version")
            if _binary.string_serializer.read(self._stream) != self.schema:
                raise ValueError("another schema")

        def _read_data(self):
            return _binary.StreamSerializer(union).read(self._stream)

    return Reader


# ---------------------------------------------------------------------- headers
def _v(value, default=0):
    return default if value is None else value


def header_to_v1(h) -> x.ismrmrdHeader:
    """The parts of an MRD v2 header a reconstruction reads, as an ISMRMRD v1 header."""
    if not h.encoding:
        raise ValueError("the MRD header has no encoding")

    def space(s):
        if s is None or s.matrix_size is None:
            return None
        f = s.field_of_view_mm
        return x.encodingSpaceType(matrixSize=x.matrixSizeType(x=s.matrix_size.x, y=s.matrix_size.y,
                                                               z=_v(s.matrix_size.z, 1)),
                                   fieldOfView_mm=x.fieldOfViewMm(x=f.x, y=f.y, z=f.z) if f is not None else None)

    def limit(v):
        return None if v is None else x.limitType(minimum=v.minimum, maximum=v.maximum, center=v.center)

    encodings = []
    for e in h.encoding:
        lim = e.encoding_limits
        limits = x.encodingLimitsType(**{n: limit(getattr(lim, n, None)) for n in _LIMITS}) if lim is not None else None
        traj = getattr(e.trajectory, "name", str(e.trajectory)).lower()
        encodings.append(x.encodingType(encodedSpace=space(e.encoded_space), reconSpace=space(e.recon_space),
                                        encodingLimits=limits, trajectory=x.trajectoryType(traj),
                                        parallelImaging=_parallel_to_v1(e.parallel_imaging)))
    asi = h.acquisition_system_information
    system = None
    if asi is not None:
        system = x.acquisitionSystemInformationType(
            systemVendor=asi.system_vendor, systemModel=asi.system_model,
            systemFieldStrength_T=asi.system_field_strength_t,
            relativeReceiverNoiseBandwidth=asi.relative_receiver_noise_bandwidth, receiverChannels=asi.receiver_channels)
    ec = h.experimental_conditions
    freq = getattr(ec, "h1resonance_frequency_hz", None) if ec is not None else None
    return x.ismrmrdHeader(version=_v(h.version, 1), acquisitionSystemInformation=system, encoding=encodings,
                           experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=int(_v(freq, 0))))


def _parallel_to_v1(p):
    """MRD v2 parallel imaging (acceleration, calibration mode: the gadgets' ``calibration_lines``
    reads it) as ISMRMRD v1's, or None."""
    if p is None:
        return None
    a = p.acceleration_factor
    mode = getattr(p.calibration_mode, "name", "").lower()
    modes = {m.value for m in x.calibrationModeType}
    return x.parallelImagingType(
        accelerationFactor=x.accelerationFactorType(kspace_encoding_step_1=_v(getattr(a, "kspace_encoding_step_1", 1), 1),
                                                    kspace_encoding_step_2=_v(getattr(a, "kspace_encoding_step_2", 1), 1)),
        calibrationMode=x.calibrationModeType(mode) if mode in modes else None)


def _parallel_to_v2(p):
    """ISMRMRD v1 parallel imaging as MRD v2's, or None."""
    if p is None:
        return None
    mrd = _mrd()
    a = p.accelerationFactor
    mode = getattr(p.calibrationMode, "value", p.calibrationMode)
    return mrd.ParallelImagingType(
        acceleration_factor=mrd.AccelerationFactorType(
            kspace_encoding_step_1=int(_v(getattr(a, "kspace_encoding_step_1", 1), 1)),
            kspace_encoding_step_2=int(_v(getattr(a, "kspace_encoding_step_2", 1), 1))),
        calibration_mode=mrd.CalibrationMode[str(mode).upper()] if mode else mrd.CalibrationMode.NOACCELERATION)


def header_to_v2(h: x.ismrmrdHeader):
    """An ISMRMRD v1 header's encodings and acquisition system as an MRD v2 header."""
    mrd = _mrd()

    def space(s):
        if s is None:
            return None
        f = s.fieldOfView_mm
        return mrd.EncodingSpaceType(matrix_size=mrd.MatrixSizeType(x=s.matrixSize.x, y=s.matrixSize.y,
                                                                    z=_v(s.matrixSize.z, 1)),
                                     field_of_view_mm=mrd.FieldOfViewMm(x=f.x, y=f.y, z=f.z))

    def limit(v):
        return None if v is None else mrd.LimitType(minimum=_v(v.minimum), maximum=_v(v.maximum), center=_v(v.center))

    encodings = []
    for e in h.encoding:
        lim = e.encodingLimits
        limits = mrd.EncodingLimitsType(**{n: limit(getattr(lim, n, None)) for n in _LIMITS}) if lim else None
        traj = getattr(e.trajectory, "value", str(e.trajectory)).upper()
        encodings.append(mrd.EncodingType(encoded_space=space(e.encodedSpace), recon_space=space(e.reconSpace),
                                          encoding_limits=limits, trajectory=mrd.Trajectory[traj],
                                          parallel_imaging=_parallel_to_v2(e.parallelImaging)))
    asi = h.acquisitionSystemInformation
    system = None
    if asi is not None:
        system = mrd.AcquisitionSystemInformationType(
            system_vendor=asi.systemVendor, system_model=asi.systemModel,
            system_field_strength_t=asi.systemFieldStrength_T,
            relative_receiver_noise_bandwidth=asi.relativeReceiverNoiseBandwidth, receiver_channels=asi.receiverChannels)
    ec = h.experimentalConditions
    conditions = mrd.ExperimentalConditionsType(h1resonance_frequency_hz=int(ec.H1resonanceFrequency_Hz)) \
        if ec is not None else mrd.ExperimentalConditionsType()
    return mrd.Header(acquisition_system_information=system, experimental_conditions=conditions, encoding=encodings)


# ---------------------------------------------------------------------- acquisitions and images
_IDX = ("kspace_encode_step_1", "kspace_encode_step_2", "average", "slice", "contrast", "phase", "repetition", "set",
        "segment")
_VECTORS = ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position")


def acquisition_to_v1(a) -> ismrmrd.Acquisition:
    data = np.ascontiguousarray(np.asarray(a.data, dtype=np.complex64))
    if data.ndim != 2:
        raise ValueError(f"MRD acquisition data must be [channels, samples], got shape {data.shape}")
    traj = None if a.trajectory is None or np.asarray(a.trajectory).size == 0 else np.asarray(a.trajectory, np.float32)
    src = a.head
    h = ismrmrd.AcquisitionHeader()
    h.version = 1
    h.flags = int(src.flags)
    h.measurement_uid = int(_v(src.measurement_uid))
    h.scan_counter = int(_v(src.scan_counter))
    h.acquisition_time_stamp = int(_v(src.acquisition_time_stamp))
    for i, v in enumerate(list(src.physiology_time_stamp)[:3]):
        h.physiology_time_stamp[i] = int(v)
    h.number_of_samples = data.shape[1]
    h.active_channels = h.available_channels = data.shape[0]
    h.discard_pre, h.discard_post = int(_v(src.discard_pre)), int(_v(src.discard_post))
    h.center_sample = int(_v(src.center_sample, data.shape[1] // 2))
    h.encoding_space_ref = int(_v(src.encoding_space_ref))
    h.trajectory_dimensions = 0 if traj is None else traj.shape[0]
    h.sample_time_us = float(_v(src.sample_time_us, 0.0))
    for name in _VECTORS:
        getattr(h, name)[:] = [float(v) for v in np.asarray(getattr(src, name), dtype=np.float64)[:3]]
    for name in _IDX:
        setattr(h.idx, name, int(_v(getattr(src.idx, name))))
    for i, v in enumerate(list(src.idx.user)[:USER]):
        h.idx.user[i] = int(v)
    for i, v in enumerate(list(src.user_int)[:USER]):
        h.user_int[i] = int(v)
    for i, v in enumerate(list(src.user_float)[:USER]):
        h.user_float[i] = float(v)
    return ismrmrd.Acquisition(h, data, traj) if traj is not None else ismrmrd.Acquisition(h, data)


def acquisition_to_v2(a: ismrmrd.Acquisition):
    mrd = _mrd()
    src = a.getHead()
    idx = mrd.EncodingCounters(**{n: int(getattr(src.idx, n)) for n in _IDX}, user=[int(v) for v in src.idx.user])
    head = mrd.AcquisitionHeader(
        flags=mrd.AcquisitionFlags(int(src.flags)), idx=idx, measurement_uid=int(src.measurement_uid),
        scan_counter=int(src.scan_counter), acquisition_time_stamp=int(src.acquisition_time_stamp),
        physiology_time_stamp=[int(v) for v in src.physiology_time_stamp],
        channel_order=list(range(int(src.active_channels))), discard_pre=int(src.discard_pre),
        discard_post=int(src.discard_post), center_sample=int(src.center_sample),
        encoding_space_ref=int(src.encoding_space_ref), sample_time_us=float(src.sample_time_us),
        **{n: np.asarray(getattr(src, n), dtype=np.float32) for n in _VECTORS},
        user_int=[int(v) for v in src.user_int], user_float=[float(v) for v in src.user_float])
    traj = np.asarray(a.traj, np.float32).T if src.trajectory_dimensions else None
    return mrd.Acquisition(head=head, data=np.asarray(a.data, np.complex64), trajectory=traj)


def image_to_v2(img: ismrmrd.Image):
    """An ISMRMRD image (data ``[channels, z, y, x]``) as an MRD v2 stream item."""
    mrd = _mrd()
    src = img.getHead()
    data = np.asarray(img.data)
    kinds = {np.dtype(np.float32): mrd.StreamItem.ImageFloat, np.dtype(np.complex64): mrd.StreamItem.ImageComplexFloat,
             np.dtype(np.int16): mrd.StreamItem.ImageInt16}
    kind = kinds.get(data.dtype)
    if kind is None:
        raise ValueError(f"no MRD v2 image type for {data.dtype}")
    types = {ismrmrd.IMTYPE_MAGNITUDE: mrd.ImageType.MAGNITUDE, ismrmrd.IMTYPE_PHASE: mrd.ImageType.PHASE,
             ismrmrd.IMTYPE_REAL: mrd.ImageType.REAL, ismrmrd.IMTYPE_IMAG: mrd.ImageType.IMAG,
             ismrmrd.IMTYPE_COMPLEX: mrd.ImageType.COMPLEX}
    head = mrd.ImageHeader(
        measurement_uid=int(src.measurement_uid), field_of_view=np.asarray(src.field_of_view, np.float32),
        position=np.asarray(src.position, np.float32), col_dir=np.asarray(src.read_dir, np.float32),
        line_dir=np.asarray(src.phase_dir, np.float32), slice_dir=np.asarray(src.slice_dir, np.float32),
        patient_table_position=np.asarray(src.patient_table_position, np.float32),
        average=int(src.average), slice=int(src.slice), contrast=int(src.contrast), phase=int(src.phase),
        repetition=int(src.repetition), set=int(src.set), acquisition_time_stamp=int(src.acquisition_time_stamp),
        physiology_time_stamp=[int(v) for v in src.physiology_time_stamp],
        image_type=types.get(int(src.image_type), mrd.ImageType.MAGNITUDE), image_index=int(src.image_index),
        image_series_index=int(src.image_series_index), user_int=[int(v) for v in src.user_int],
        user_float=[float(v) for v in src.user_float])
    meta = {}
    for key in img.meta.keys():
        v = img.meta[key]
        meta[key] = [mrd.ImageMetaValue.String(str(e)) for e in (v if isinstance(v, (list, tuple)) else [v])]
    return kind(mrd.Image(head=head, data=data, meta=meta))


def ismrmrd_file_to_v2(path: str, out, group: str = "dataset") -> int:
    """Write an ISMRMRD v1 raw file as an MRD v2 binary stream; returns the acquisitions written.
    A file that cannot be read raises as :func:`replay.open_raw` says, before anything is written."""
    from .replay import iter_acquisitions, open_raw

    mrd = _mrd()
    ds, _, header, n = open_raw(path, group)
    try:
        w = mrd.BinaryMrdWriter(out)
        w.write_header(header_to_v2(header))
        w.write_data(mrd.StreamItem.Acquisition(acquisition_to_v2(acq)) for acq in iter_acquisitions(ds, n))
        w.close()
    finally:
        ds.close()
    return n


# ---------------------------------------------------------------------- the command
def stream(inp, out, config: str | None = None, overrides: dict | None = None) -> dict:
    """Reconstruct an MRD v2 stream ``inp`` into ``out`` (binary files, or the path of one, created only
    once the input's header has been read); returns a summary. Slices that fail are logged and skipped
    (the others are written); the summary lists them."""
    from .session import ReconSession
    from .settings import load_limits, load_settings

    mrd = _mrd()
    limits = load_limits(config)
    cfg, gs = load_settings(None, config, operator=overrides, limits=limits)
    gs.send = "images"
    reader_class = bounded_reader_class(limits.max_message_bytes, limits.max_text_bytes)
    try:
        reader = reader_class(inp)
        header = reader.read_header()
    except Exception as e:  # noqa: BLE001 - bad magic bytes, another schema, an empty input
        raise ValueError(f"the input is not an MRD v2 binary stream ({type(e).__name__}: {e})") from None
    if header is None:
        raise ValueError("the MRD stream has no header")
    session = ReconSession(header_to_v1(header), cfg, gs, limits=limits)
    counts = {"acquisitions": 0, "images": 0, "passed_on": 0}

    broken: list[str] = []

    def items():
        """The input's items. A truncated or corrupted stream (mrd-python raises EOFError, BufferError
        or others, depending on where the bytes stop) ends them, and is noted in ``broken``: the
        output is then closed as a valid stream of the slices completed before, and the error raised."""
        it = iter(reader.read_data())
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - see above
                broken.append(f"the MRD v2 stream ended early or is corrupted after {counts['acquisitions']} "
                              f"acquisitions ({type(e).__name__}: {e}); the images of the slices completed "
                              f"before were written")
                return
            yield item

    def images():
        for item in items():
            if isinstance(item, mrd.StreamItem.Acquisition):
                counts["acquisitions"] += 1
                produced = session.handle(acquisition_to_v1(item.value))
            else:  # waveforms, images, anything else: passed on unchanged
                counts["passed_on"] += 1
                yield item
                continue
            for img in produced:
                counts["images"] += 1
                yield image_to_v2(img)
        if broken:  # the slice the input broke in is incomplete: not reconstructed
            return
        for img in session.finish():
            counts["images"] += 1
            yield image_to_v2(img)

    path = out if isinstance(out, str) else None
    out = open(path, "wb") if path else out
    try:
        writer = mrd.BinaryMrdWriter(out)
        writer.write_header(header)
        writer.write_data(images())
        writer.close()  # the end marker: a reader of the output gets every image written
    finally:
        out.flush()
        if path:
            out.close()
    if broken:
        raise ValueError(broken[0])
    reader.close()
    if counts["acquisitions"] == 0:
        log.warning("the stream had no acquisitions; nothing reconstructed")
    return {**counts, "errors": session.errors, "seconds_per_slice": [round(t, 2) for t in session.timings]}


def add_parser(sub):
    from .settings import CALIBRATION_LINES

    p = sub.add_parser("stream", help="MRD v2 stream in (stdin), MRD v2 images out (stdout): for Pingvin and "
                                      "mrd_hdf5_to_stream / mrd_stream_to_hdf5 pipelines")
    p.add_argument("--input", default=None, help="read this MRD v2 binary file instead of stdin")
    p.add_argument("--output", default=None, help="write to this file instead of stdout")
    p.add_argument("--from-ismrmrd", default=None, metavar="RAW.h5",
                   help="only convert this ISMRMRD v1 raw file into an MRD v2 stream (to --output or stdout)")
    p.add_argument("--config", default=None, help="YAML settings (default: config/recon.yaml)")
    p.add_argument("--method", default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--steps", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--output-type", default=None, help="magnitude | complex | int16")
    p.add_argument("--frame-axis", default=None, help="phase (a cine) | repetition (a real-time series) | auto | "
                                                      "ecg (bin every line by its ECG trigger time)")
    p.add_argument("--cardiac-phases", default=None, help="frame axis ecg: cardiac phases to bin into (default: the header's "
                                                          "phase count where above 1, else 20)")
    p.add_argument("--arrhythmia-rejection", default=None,
                   help="frame axis ecg: leave out heartbeats whose RR is more than this fraction off the median (0: none)")
    p.add_argument("--realtime-block", default=None,
                   help="a real-time series: repetitions per reconstruction, each block sent when it is complete (0: "
                        "the whole series, split into even blocks only where the server's limits require)")
    p.add_argument("--calibration-lines", default=None, choices=CALIBRATION_LINES,
                   help="calibration-only lines: data of their frame too, coil-map reference only, or auto (data "
                        "where the header says the reference is embedded; the default)")
    p.add_argument("--log-level", default="INFO")


def _convert(src: str, output: str | None) -> int:
    """``--from-ismrmrd``: all or nothing. A file is written beside ``output`` and renamed onto it only
    once every acquisition has been converted, so a raw file that breaks part-way leaves no output."""
    if not output:
        return ismrmrd_file_to_v2(src, sys.stdout.buffer)
    target = os.path.abspath(output)
    fd, tmp = tempfile.mkstemp(prefix=".ddugm-", suffix=".part", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as out:
            n = ismrmrd_file_to_v2(src, out)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return n


def run(a: argparse.Namespace) -> int:
    logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s %(message)s", stream=sys.stderr)
    src = a.from_ismrmrd or a.input
    if src and a.output and Path(a.output).exists() and Path(src).exists() and Path(a.output).samefile(src):
        raise ValueError(f"{a.output}: the output would replace the input file; name another output file")
    if a.from_ismrmrd:
        n = _convert(a.from_ismrmrd, a.output)
        log.info("%d acquisitions written as MRD v2", n)
        return 0
    inp = open(a.input, "rb") if a.input else sys.stdin.buffer
    try:
        overrides = {k: v for k, v in (("method", a.method), ("preset", a.preset), ("steps", a.steps),
                                       ("device", a.device), ("output", a.output_type),
                                       ("frame_axis", a.frame_axis), ("realtime_block", a.realtime_block),
                                       ("cardiac_phases", a.cardiac_phases),
                                   ("arrhythmia_rejection", a.arrhythmia_rejection),
                                   ("calibration_lines", a.calibration_lines))
                     if v is not None}
        summary = stream(inp, a.output or sys.stdout.buffer, a.config, overrides)  # no output file for a bad input
    finally:
        if a.input:
            inp.close()
    log.info("%d acquisitions in, %d images out%s", summary["acquisitions"], summary["images"],
             f"; failed: {'; '.join(summary['errors'])}" if summary["errors"] else "")
    return 1 if summary["errors"] else 0
