"""Reconstructed frames -> ISMRMRD images with the header fields Gadgetron's recon gadgets set.

Position, orientation, patient table position, time stamps, user fields and the indices
(average, slice, contrast, phase, repetition, set) come from the acquisition nearest the
k-space centre of each frame; field of view and matrix size from the header's recon space;
image type, image_index (running from 1 within the stream) and image_series_index from the
settings. Meta attributes name the method and carry a warning when a fallback was used.
"""
from __future__ import annotations

import ismrmrd
import numpy as np

from .geometry import Geometry

COPIED_FIELDS = ("version", "measurement_uid", "position", "read_dir", "phase_dir", "slice_dir",
                 "patient_table_position", "acquisition_time_stamp", "physiology_time_stamp", "user_int", "user_float")
INDEX_FIELDS = ("average", "slice", "contrast", "phase", "repetition", "set")


def image_header(acq_head, frame: int, key: dict, geometry: Geometry, shape, dtype, image_type: int,
                 image_index: int, series_index: int, frame_axis: str = "phase") -> ismrmrd.ImageHeader:
    h = ismrmrd.ImageHeader()
    if acq_head is not None:
        for name in COPIED_FIELDS:
            setattr(h, name, getattr(acq_head, name))
        for name in INDEX_FIELDS:
            setattr(h, name, getattr(acq_head.idx, name))
    else:
        h.version = 1
        for name in INDEX_FIELDS:
            setattr(h, name, int(key.get(name, 0)))
    setattr(h, frame_axis, frame)  # frame order is cardiac phase (or, real-time, repetition) order
    h.version = 1
    h.data_type = {np.dtype(np.complex64): ismrmrd.DATATYPE_CXFLOAT,
                   np.dtype(np.int16): ismrmrd.DATATYPE_SHORT}.get(np.dtype(dtype), ismrmrd.DATATYPE_FLOAT)
    h.flags = 0
    h.matrix_size[:] = (int(shape[1]), int(shape[0]), 1)
    h.field_of_view[:] = (float(geometry.recon_fov[0]), float(geometry.recon_fov[1]), float(geometry.recon_fov[2]))
    h.channels = 1
    h.image_type = image_type
    h.image_index = image_index
    h.image_series_index = series_index
    return h


def make_meta(method: str, preset: str, warning: str | None, frame: int, frames: int,
              noise: dict | None = None, fallback: bool = False) -> ismrmrd.Meta:
    """``fallback``: the primary method failed and ``method`` stood in (``FALLBACK`` in the image
    comment); ``warning`` may also say other things (corrupted lines left out)."""
    m = ismrmrd.Meta()
    m["GADGETRON_DataRole"] = "Image"
    m["GADGETRON_ImageProcessingHistory"] = ["DDUGM"]
    m["GADGETRON_ImageComment"] = ["DDUGM", method] + (["FALLBACK"] if fallback else [])
    m["GADGETRON_SeqDescription"] = "_DDUGM"
    m["DDUGM_Method"] = method
    m["DDUGM_Preset"] = preset
    m["DDUGM_Frame"] = f"{frame + 1}/{frames}"
    if warning:
        m["DDUGM_Warning"] = warning
    if noise is not None:  # what the weights followed: the noise scan's, an estimate, or none
        m["DDUGM_NoiseSource"] = noise["source"]
        m["DDUGM_NoiseRatio"] = f"{noise['ratio']:.2f}"
    return m


INT16_MAX = 4095  # int16 output: 12-bit magnitudes, as scanners store them


def frames_to_images(x: np.ndarray, cine, geometry: Geometry, *, complex_output: bool = False, first_index: int,
                     series_index: int, method: str, preset: str, warning: str | None, output: str | None = None,
                     noise: dict | None = None, fallback: bool = False) -> list:
    """``x [frame, y, x]`` complex -> list of ``ismrmrd.Image`` (data ``[1, 1, y, x]``).

    ``output``: ``magnitude`` (float32), ``complex`` (complex64) or ``int16`` (magnitude scaled
    so the slice's brightest pixel is 4095, as FIRE examples send, with ``WindowCenter`` /
    ``WindowWidth`` meta from its 1st-99th percentile range)."""
    output = output or ("complex" if complex_output else "magnitude")
    t = x.shape[0]
    mag = np.abs(x)
    scale = INT16_MAX / max(float(mag.max()), 1e-30)
    if output == "int16":
        lo, hi = (float(v) * scale for v in np.percentile(mag, [1, 99]))
        window = (int(round((lo + hi) / 2)), max(1, int(round(hi - lo))))
    out = []
    for f in range(t):
        if output == "complex":
            data = x[f].astype(np.complex64)
        elif output == "int16":
            data = np.clip(np.round(mag[f] * scale), 0, INT16_MAX).astype(np.int16)
        else:
            data = mag[f].astype(np.float32)
        head = image_header(cine.headers[f], cine.frame_offset + f, cine.key, geometry, data.shape, data.dtype,
                            ismrmrd.IMTYPE_COMPLEX if output == "complex" else ismrmrd.IMTYPE_MAGNITUDE,
                            first_index + f, series_index, cine.frame_axis)
        img = ismrmrd.Image(head=head)  # allocates [channels, z, y, x] from the header
        img.data[:] = data[None, None]
        img.meta = make_meta(method, preset, warning, f, t, noise, fallback)
        if output == "int16":
            img.meta["WindowCenter"], img.meta["WindowWidth"] = str(window[0]), str(window[1])
        out.append(img)
    return out


def images_to_array(images: list):
    """The frames of one slice as a Gadgetron ImageArray: data ``[X, Y, Z, CHA, N, S, LOC]``
    complex64 (N = frames), headers ``[N, S, LOC]``, one meta container per image."""
    from gadgetron.types.image_array import ImageArray

    n = len(images)
    ny, nx = images[0].data.shape[-2:]
    data = np.zeros((nx, ny, 1, 1, n, 1, 1), dtype=np.complex64)
    headers = np.empty((n, 1, 1), dtype=object)
    for i, img in enumerate(images):
        data[:, :, 0, 0, i, 0, 0] = np.asarray(img.data[0, 0]).T
        h = ismrmrd.ImageHeader.from_buffer_copy(bytes(img.getHead()))
        h.data_type = ismrmrd.DATATYPE_CXFLOAT
        h.attribute_string_len = 0
        headers[i, 0, 0] = h
    meta = [img.meta.serialize() for img in images]
    return ImageArray(data=data, headers=headers, meta=meta, waveform=None, acq_headers=None)
