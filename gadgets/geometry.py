"""What the ISMRMRD header says about the encoding: matrices, fields of view, k-space centres."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger("ddugm.gadget")


@dataclass(frozen=True)
class Geometry:
    enc_matrix: tuple  # (x, y, z) encoded matrix
    enc_fov: tuple  # (x, y, z) mm
    recon_matrix: tuple  # (x, y, z)
    recon_fov: tuple  # (x, y, z) mm
    ky_center: int  # encoding index of the k-space centre line
    ky_max: int  # largest phase-encoding index
    phases: int  # cardiac phases announced by the header (>= 1)
    noise_bandwidth: float  # relative receiver noise bandwidth (Gadgetron's default 0.793)
    trajectory: str
    coils: int | None
    repetitions: int = 1  # repetitions announced by the header (>= 1)
    repetitions_announced: bool = False  # the header has a repetition limit (else the count is unknown, not 1)
    calibration_mode: str = ""  # parallelImaging calibrationMode (embedded, interleaved, separate, ...; "": none)

    @property
    def readout_oversampling(self) -> float:
        """Encoded over reconstructed field of view along the readout (2 for Siemens' default)."""
        if 0 < self.recon_fov[0] < math.inf and 0 < self.enc_fov[0] < math.inf:  # (NaN fails both)
            return max(1.0, self.enc_fov[0] / self.recon_fov[0])
        if self.recon_matrix[0] > 0:
            return max(1.0, self.enc_matrix[0] / self.recon_matrix[0])
        return 1.0

    @property
    def nx(self) -> int:
        """Readout grid after oversampling removal."""
        return max(1, int(round(self.enc_matrix[0] / self.readout_oversampling)))

    @property
    def ny(self) -> int:
        return int(self.enc_matrix[1])


def _number(value, field: str, kind=int):
    """A header number as ``kind``. The ISMRMRD schema parser keeps a value it cannot convert as
    its text (with a warning), so ``abc``, ``nan`` or ``1e-30`` in an integer field surfaced as a
    bare "invalid literal for int()": an integer field that holds no integer is a ValueError
    naming the field (a whole float, ``16.0``, is read as the integer); a float field that holds
    no number is NaN, which the callers take as not given (a field of view), and is logged."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if kind is int:
        if not math.isfinite(v) or v != int(v):
            raise ValueError(f"the ISMRMRD header's {field} is {str(value)[:40]!r}, not an integer")
        return int(v)
    if math.isnan(v) and not isinstance(value, float):
        log.warning("the ISMRMRD header's %s is %r, not a number: taken as not given", field, str(value)[:40])
    return v  # nan, inf: callers treat a field of view that is not one as not given


def _limit(limits, name):
    lim = getattr(limits, name, None) if limits is not None else None
    if lim is None:
        return None
    out = tuple(_number(getattr(lim, k) or 0, f"encodingLimits {name} {k}") for k in ("minimum", "center", "maximum"))
    if min(out) < 0:
        raise ValueError(f"the ISMRMRD header's encodingLimits {name} {out} holds a negative index")
    return out


def _bandwidth(bw) -> float:
    """relativeReceiverNoiseBandwidth, or Gadgetron's default 0.793 where it is missing."""
    if not bw:
        return 0.793
    try:
        v = float(bw)
    except (TypeError, ValueError):
        v = math.nan
    if not 0 < v < math.inf:  # (not read by the reconstruction: said, and the default kept)
        log.warning("the ISMRMRD header's relativeReceiverNoiseBandwidth %r is not a positive number; taking 0.793",
                    str(bw)[:40])
        return 0.793
    return v


def geometry_from_header(header, encoding: int = 0) -> Geometry:
    """Read the first encoding of an ``ismrmrd.xsd.ismrmrdHeader``; ValueError naming what is missing."""
    encs = getattr(header, "encoding", None) or []
    if len(encs) <= encoding:
        raise ValueError("the ISMRMRD header has no <encoding> section")
    e = encs[encoding]
    traj = getattr(e.trajectory, "value", str(e.trajectory)) if e.trajectory is not None else "cartesian"
    if str(traj).lower() != "cartesian":
        raise ValueError(f"trajectory {traj!r} is not supported: DD-UGM here reconstructs Cartesian data only")
    if e.encodedSpace is None or e.encodedSpace.matrixSize is None:
        raise ValueError("the ISMRMRD header has no encodedSpace matrixSize")
    em, ef = e.encodedSpace.matrixSize, e.encodedSpace.fieldOfView_mm
    rs = e.reconSpace if e.reconSpace is not None else e.encodedSpace
    rm, rf = rs.matrixSize, rs.fieldOfView_mm
    enc_matrix = tuple(_number(v, f"encodedSpace matrixSize {k}") for k, v in (("x", em.x), ("y", em.y),
                                                                                 ("z", em.z or 1)))
    if enc_matrix[0] < 2 or enc_matrix[1] < 2:
        raise ValueError(f"encoded matrix {enc_matrix[:2]} is too small for a 2D reconstruction")
    if enc_matrix[2] > 1:
        raise ValueError(f"3D encoding (encoded matrix z = {enc_matrix[2]}) is not supported: DD-UGM is a 2D cine method")
    where = "reconSpace" if e.reconSpace is not None else "encodedSpace"
    recon_matrix = tuple(_number(v, f"{where} matrixSize {k}") for k, v in (("x", rm.x), ("y", rm.y), ("z", rm.z or 1)))
    if any(v < 0 or v == 1 for v in recon_matrix[:2]):  # (0: not given, the encoded grid is kept)
        raise ValueError(f"recon matrix {recon_matrix[:2]} is too small for a 2D reconstruction")
    def fov(f, space):
        if f is None:
            return 0.0, 0.0, 0.0
        return tuple(_number(getattr(f, k), f"{space} fieldOfView_mm {k}", float) for k in "xyz")
    ky = _limit(e.encodingLimits, "kspace_encoding_step_1")
    ph = _limit(e.encodingLimits, "phase")
    rep = _limit(e.encodingLimits, "repetition")
    # a centre of 0 is the field's default (limits written, centre not set): no Cartesian scan
    # has its k-space centre on its first line, so it means the encoded matrix's middle, as
    # missing limits do (taken literally, every line beyond the matrix's half was refused)
    ky_center = ky[1] if ky is not None and ky[1] > 0 else enc_matrix[1] // 2
    if ky is not None and ky[1] == 0 and ky[2] > 0:
        log.info("encodingLimits kspace_encoding_step_1 has centre 0 (not set): taking line %d, the middle of the "
                 "encoded matrix", ky_center)
    ky_max = ky[2] if ky is not None and ky[2] else enc_matrix[1] - 1
    asi = getattr(header, "acquisitionSystemInformation", None)
    bw = getattr(asi, "relativeReceiverNoiseBandwidth", None) if asi is not None else None
    coils = getattr(asi, "receiverChannels", None) if asi is not None else None
    pi = getattr(e, "parallelImaging", None)
    mode = getattr(pi, "calibrationMode", None) if pi is not None else None
    mode = str(getattr(mode, "value", mode) or "").strip().lower()[:40]
    g = Geometry(
        enc_matrix=enc_matrix, enc_fov=fov(ef, "encodedSpace"),
        recon_matrix=recon_matrix, recon_fov=fov(rf, where),
        ky_center=int(ky_center), ky_max=int(ky_max),
        phases=(ph[2] + 1) if ph is not None else 1,
        noise_bandwidth=_bandwidth(bw),
        trajectory=str(traj), coils=_number(coils, "acquisitionSystemInformation receiverChannels") if coils else None,
        repetitions=(rep[2] + 1) if rep is not None else 1,
        repetitions_announced=rep is not None,
        calibration_mode=mode,
    )
    over = g.readout_oversampling
    if not math.isfinite(over) or g.nx < 2:  # an infinite or absurd field of view would crop the readout to 1 pixel
        raise ValueError(f"the header's readout fields of view (encoded {g.enc_fov[0]} mm, recon {g.recon_fov[0]} mm) "
                         f"give a readout oversampling of {over}, which leaves {g.nx} of the {enc_matrix[0]} readout "
                         "points: not a usable encoding")
    return g
