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
                 image_index: int, series_index: int) -> ismrmrd.ImageHeader:
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
    h.phase = frame  # frame order is cardiac phase order
    h.version = 1
    h.data_type = ismrmrd.DATATYPE_CXFLOAT if np.dtype(dtype) == np.complex64 else ismrmrd.DATATYPE_FLOAT
    h.flags = 0
    h.matrix_size[:] = (int(shape[1]), int(shape[0]), 1)
    h.field_of_view[:] = (float(geometry.recon_fov[0]), float(geometry.recon_fov[1]), float(geometry.recon_fov[2]))
    h.channels = 1
    h.image_type = image_type
    h.image_index = image_index
    h.image_series_index = series_index
    return h


def make_meta(method: str, preset: str, warning: str | None, frame: int, frames: int) -> ismrmrd.Meta:
    m = ismrmrd.Meta()
    m["GADGETRON_DataRole"] = "Image"
    m["GADGETRON_ImageProcessingHistory"] = ["DDUGM"]
    m["GADGETRON_ImageComment"] = ["DDUGM", method] + (["FALLBACK"] if warning else [])
    m["GADGETRON_SeqDescription"] = "_DDUGM"
    m["DDUGM_Method"] = method
    m["DDUGM_Preset"] = preset
    m["DDUGM_Frame"] = f"{frame + 1}/{frames}"
    if warning:
        m["DDUGM_Warning"] = warning
    return m


def frames_to_images(x: np.ndarray, cine, geometry: Geometry, *, complex_output: bool, first_index: int,
                     series_index: int, method: str, preset: str, warning: str | None) -> list:
    """``x [frame, y, x]`` complex -> list of ``ismrmrd.Image`` (data ``[1, 1, y, x]``)."""
    t = x.shape[0]
    out = []
    for f in range(t):
        data = x[f].astype(np.complex64) if complex_output else np.abs(x[f]).astype(np.float32)
        head = image_header(cine.headers[f], f, cine.key, geometry, data.shape, data.dtype,
                            ismrmrd.IMTYPE_COMPLEX if complex_output else ismrmrd.IMTYPE_MAGNITUDE,
                            first_index + f, series_index)
        img = ismrmrd.Image(head=head)  # allocates [channels, z, y, x] from the header
        img.data[:] = data[None, None]
        img.meta = make_meta(method, preset, warning, f, t)
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
