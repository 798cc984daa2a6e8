"""One scan stream, independent of how it arrives (Gadgetron external gadget, the server,
an MRD client, or a file replay).

:class:`ReconSession` takes items in arrival order and returns what to send on: acquisitions
are buffered per slice / contrast / repetition / set / average and reconstructed when the
slice ends (``ACQ_LAST_IN_SLICE`` or ``ACQ_LAST_IN_MEASUREMENT``) or the stream closes;
ReconData buffers are reconstructed as they come. A slice whose reconstruction fails does
not stop the others: its error is collected and raised as :class:`ScanErrors` by
:meth:`ReconSession.finish`, after every other slice has been sent.

:class:`Engine` owns the reconstructors (a bounded cache; score models loaded once and
shared by every settings set that uses the same weights and device) and serialises
reconstructions with a lock, so a server's connections share one GPU queue while their I/O
runs concurrently. A stream's ``alive`` check is polled while it waits for the queue and at
every iteration of its reconstruction: a client that has gone, or a server shutting down,
cancels the job (:class:`Cancelled`).

Every stream is held to the operator's :class:`~gadgets.settings.Limits` before anything is
allocated: the header's matrices, frames and coils, each slice's grid and what the stream
buffers.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import ismrmrd
import numpy as np
import torch

from ddugm_core.coils import calibration_width, estimate_coil_maps, require_centre
from ddugm_core.reconstruction import ReconConfig, Reconstructor, cap_gpu_memory, prepare_inputs

from .geometry import Geometry, geometry_from_header
from .images import frames_to_images, images_to_array
from .kspace import (
    IGNORED,
    LAST_IN_MEASUREMENT,
    LAST_IN_SLICE,
    NOISE,
    AcquisitionCollector,
    CineData,
    NoiseWhitener,
    UnlabelledCine,
    calibration_as_data,
    cine_from_recon_bit,
    finalize_images,
    flag_set,
    group_key,
)
from .settings import GadgetSettings, Limits

log = logging.getLogger("ddugm.gadget")


def slice_name(key: dict) -> str:
    """How logs and errors name a slice: ``slice=0, contrast=0, ...``."""
    return ", ".join(f"{k}={v}" for k, v in key.items())


DEFAULT_PHASES = 20  # frame_axis ecg without cardiac_phases or a phase count in the header


class ScanErrors(RuntimeError):
    """One or more slices of a stream could not be reconstructed (the others were sent)."""


class Cancelled(RuntimeError):
    """The stream's client went away (or the server is stopping): its job was not finished."""


class TimeLimit(RuntimeError):
    """A slice's reconstruction ran past the server's ``max_job_seconds`` (no fallback after it)."""


class Engine:
    """Reconstructors keyed by their settings (at most ``max_cached``, least recently used
    dropped; the score models are shared between settings that use the same weights and
    device); one reconstruction at a time per engine."""

    def __init__(self, max_cached: int = 4):
        self.max_cached = max(1, int(max_cached))
        self._recons: OrderedDict = OrderedDict()
        self._models: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self.count = 0

    def reconstructor(self, cfg: ReconConfig) -> Reconstructor:
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        with self._cache_lock:
            rec = self._recons.pop(key, None)
            if rec is None:
                rec = Reconstructor(cfg)
            self._recons[key] = rec  # most recently used last
            while len(self._recons) > self.max_cached:
                self._recons.popitem(last=False)
            return rec

    def load_models(self, rec: Reconstructor) -> None:
        """Give ``rec`` the score models loaded for its weights and device, loading them on the
        first use of that pair (at most ``max_cached`` pairs stay loaded)."""
        if rec.config.method != "ddugm":
            return
        mkey = rec.model_key()
        with self._cache_lock:
            scores = self._models.pop(mkey, None)
        if scores is None:
            scores = rec.load_models()
        rec.use_models(scores)
        with self._cache_lock:
            self._models[mkey] = scores  # most recently used last
            while len(self._models) > self.max_cached:
                self._models.popitem(last=False)

    @property
    def cached(self) -> int:
        return len(self._recons)

    def _acquire(self, alive: Optional[Callable[[], bool]]) -> None:
        if alive is None:
            self._lock.acquire()
            return
        while not self._lock.acquire(timeout=0.2):
            if not alive():
                raise Cancelled("the client went away while its scan waited for the reconstruction queue")

    def run(self, cine: CineData, cfg: ReconConfig, gs: GadgetSettings, alive: Optional[Callable[[], bool]] = None,
            job_seconds: float = 0.0, gpu_memory_gb: float = 0.0):
        """Reconstruct one slice: returns (frames ``[T, y, x]`` complex64 on the encoded grid,
        method used, device used, warning or None, the noise the weights followed: :func:`noise_of`).
        Falls back to LLR + temporal TV on CPU if the score-based reconstruction fails and
        ``gs.fallback`` is on. ``alive()`` is polled while waiting for the queue and at every
        iteration; when it turns false the job stops with :class:`Cancelled`.
        With ``job_seconds`` > 0 (``ddugm serve``'s ``max_job_seconds``, counted from leaving the
        queue) a job still running after that long stops with :class:`TimeLimit`, without fallback:
        the per-setting caps allow products of nested loops (steps x pnp_inner, llr_iters x
        llr_cg_iters) that would hold the queue for hours. On a GPU, ``gpu_memory_gb`` > 0 caps
        what this process may allocate there (:func:`cap_gpu_memory`: a job that needs more fails
        as out of memory, then falls back), and the memory a job cached is handed back to the card
        when it ends (other processes share a scanner's GPU)."""
        self._acquire(alive)
        deadline = time.monotonic() + job_seconds if job_seconds > 0 else None
        rec = None
        try:
            self.count += 1
            rec = self.reconstructor(cfg)
            if rec.device.type == "cuda" and (note := cap_gpu_memory(rec.device, gpu_memory_gb)):
                log.info("%s", note)
            prepare_inputs(cine.kspace, cine.mask)  # bad input: a clear error, no fallback (it would fail too)
            maps = coil_maps_from_ref(cine, cfg, rec.device)
            if maps is None and cine.kspace.shape[0] > 1:  # the same: maps from data without their centre
                require_centre(torch.from_numpy(np.asarray(cine.mask)), cfg.coil_calib)

            def check(i, n):
                if alive is not None and not alive():
                    raise Cancelled(f"the client went away; reconstruction stopped at iteration {i} of {n}")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeLimit(f"the reconstruction ran past the server's limit max_job_seconds = {job_seconds:g} "
                                    f"s and was stopped at iteration {i} of {n}")

            try:
                self.load_models(rec)
                x = rec.recon(cine.kspace, cine.mask, maps, seed=gs.seed, callback=check, refine_maps=True,
                              noise_std=cine.noise_std)
                if rec.noise_ratio > 1:
                    lift = (f", sampler noise levels x {rec.noise_ratio ** cfg.noise_adapt_sigma:.2f}"
                            if cfg.method == "ddugm" and cfg.resolved("sampler") == "pnp" else "")
                    source = ("from the noise scan" if rec.noise_source == "told"
                              else "estimated from the coil covariance of the data (noise_estimate)")
                    log.info("%s: noise %.2f times noise_reference (%s): LLR and temporal-TV weights "
                             "x %.2f%s", slice_name(cine.key), rec.noise_ratio, source, rec.noise_factor, lift)
                if rec.coils_used[1] < rec.coils_used[0]:
                    log.info("%s: %d coils compressed to %d virtual coils, %.2f %% of the signal energy kept",
                             slice_name(cine.key), *rec.coils_used, 100 * rec.coil_energy_kept)
                return x, cfg.method, rec.device, None, noise_of(rec)
            except (Cancelled, TimeLimit):
                raise
            except Exception as e:  # noqa: BLE001 - any failure of the primary method
                if not gs.fallback or cfg.method != "ddugm":
                    raise
                warning = f"DD-UGM failed ({type(e).__name__}: {e}); LLR + temporal TV reconstruction used instead"
                log.warning("%s: %s", slice_name(cine.key), warning)
                fb = Reconstructor(ReconConfig.from_dict({**cfg.to_dict(), "method": FALLBACK, "device": "cpu"}))
                x = fb.recon(cine.kspace, cine.mask, None if maps is None else maps.cpu(), seed=gs.seed, callback=check,
                             refine_maps=True, noise_std=cine.noise_std)
                return x, FALLBACK, fb.device, warning, noise_of(fb)
        finally:
            if rec is not None and rec.device.type == "cuda":
                torch.cuda.empty_cache()
            self._lock.release()


def noise_of(rec: Reconstructor) -> dict:
    """What the last reconstruction of ``rec`` knew of the noise: ``source`` (``noise scan``,
    ``estimated`` from the data, or ``unknown``) and ``ratio`` (max(1, noise / noise_reference):
    the LLR + TV weights grew by ratio ** noise_adapt)."""
    source = {"told": "noise scan", "estimated": "estimated"}.get(rec.noise_source, "unknown")
    return {"source": source, "ratio": float(rec.noise_ratio)}


#: the classical method a failed score-based reconstruction falls back to (the strongest one
#: measured: ``ddugm evaluate``, README)
FALLBACK = "llr_ttv"


def coil_maps_from_ref(cine: CineData, cfg: ReconConfig, device):
    """Coil maps from the calibration (ACS / reference) lines, unless the frames' lines together
    sample a wider band around the centre almost fully (at least 90 % of its lines): then None,
    and the reconstructor estimates the maps from the time-averaged data. Either way they are
    ours, not the user's: the session asks the reconstructor to refine them (``coil_refine``).

    Across a cine the frames' lines add up to a band much wider than a typical ACS block: on
    simulated cines (12 to 25 frames, 64 to 192 lines, R = 4 and 8, 8 coils, LLR + TV) the maps
    from the data were better in every case measured, by 0.1 to 1.2 dB with 6 to 24 ACS lines and
    9.8 dB with 2 (and by 0.0 / 0.3 dB for 4 frames / 1 frame of random lines). A single
    frame on a regular lattice (every other line) has no such band, only the ACS block: its
    data band would be aliased, so the reference is used, as it is where the bands are equal,
    unless the maps will be refined (``coil_refine``, series of ``coil_refine_min_frames``): a
    GRAPPA-style cine (the same lattice in every frame, its reference lines among the data) has
    the reference's band alone, and the maps of the data's wider, partly aliased band, refined,
    were 1.6 to 2.4 dB better there (README "Calibration lines")."""
    if cine.ref is None or cine.kspace.shape[0] < 2:
        return None
    ref_width = calibration_width(torch.from_numpy(np.ascontiguousarray(cine.ref_mask))[None], cfg.coil_calib, 0.9)
    data_width = calibration_width(torch.from_numpy(np.ascontiguousarray(cine.mask)), cfg.coil_calib, 0.9)
    refined = cfg.coil_refine > 0 and cine.kspace.shape[1] >= cfg.coil_refine_min_frames
    if data_width > ref_width or (refined and data_width == ref_width):
        return None
    ref = torch.from_numpy(np.ascontiguousarray(cine.ref)).to(device)[:, None]
    m = torch.from_numpy(np.ascontiguousarray(cine.ref_mask)).to(device)[None].float()
    try:
        return estimate_coil_maps(ref, m, cfg.coil_calib, cfg.coil_threshold)
    except ValueError as e:
        log.info("reference lines unusable for coil maps (%s); estimating from the data", e)
        return None


def check_geometry(g: Geometry, limits: Limits, axis: str = "phase", block: int = 0) -> None:
    """The header's sizes against the operator's limits, before any buffer is made from them
    (``block``: a real-time series reconstructed that many repetitions at a time)."""
    for what, (x, y) in (("encoded", g.enc_matrix[:2]), ("recon", g.recon_matrix[:2])):
        if max(x, y) > limits.max_matrix:
            raise ValueError(f"the header's {what} matrix {x} x {y} exceeds the server's limit max_matrix = "
                             f"{limits.max_matrix}")
    frames, what = (g.phases, "cardiac phases") if axis == "phase" else (g.repetitions, "repetitions (the frames)")
    if axis == "ecg":  # the frames are the binned phases (checked by the session); repetitions are not frames
        return _check_coils(g, limits)
    if axis == "repetition" and block:
        frames, what = block, "repetitions per block (realtime_block)"
    if frames > limits.max_frames:
        raise ValueError(f"the header announces {frames} {what}, more than the server's limit "
                         f"max_frames = {limits.max_frames}")
    _check_coils(g, limits)


def _check_coils(g: Geometry, limits: Limits) -> None:
    if g.coils is not None and g.coils > limits.max_coils:
        raise ValueError(f"the header announces {g.coils} receiver channels, more than the server's limit "
                         f"max_coils = {limits.max_coils}")


def frames_allowed(g: Geometry, limits: Limits) -> int:
    """The most frames one slice may hold under the limits (frames and k-space samples)."""
    return min(limits.max_frames, limits.max_slice_elements // max(1, (g.coils or 1) * g.ny * g.nx),
               limits.max_slice_pixels // max(1, g.ny * g.nx))


def resolve_frame_axis(setting: str, g: Geometry, limits: Limits, block: int = 0) -> tuple[str, int]:
    """The acquisition counter that numbers the frames, and the block size: ``phase`` (a cine:
    cardiac phases; block 0) or ``repetition`` (a real-time series, as real-time cine sequences label
    their frames). ``auto`` takes repetition where the header announces one phase and several
    repetitions (and a slice whose phase counters turn out unset while its lines run through
    heartbeats is binned by its trigger times at the end: :meth:`ReconSession._bin_unlabelled`).
    A real-time series is reconstructed ``block`` repetitions at a time (the setting
    ``realtime_block``); with 0 as one series, or, where that would exceed the operator's limits,
    in the fewest blocks of even length that fit (each at least 2 repetitions: else repetition by
    repetition, with a warning, under ``auto``)."""
    if setting == "ecg":
        return "ecg", 0
    if setting == "phase" or (setting == "auto" and not (g.phases == 1 and g.repetitions > 1)):
        return "phase", 0
    if block or g.repetitions <= 1:
        return "repetition", block
    most = frames_allowed(g, limits)
    if g.repetitions <= most:
        if setting == "auto":
            log.info("the header announces 1 cardiac phase and %d repetitions: the repetitions are the frames (a "
                     "real-time series; frame_axis: phase keeps each repetition a separate image)", g.repetitions)
        return "repetition", 0
    if most < 2:
        if setting == "auto":
            log.warning("the header announces 1 cardiac phase and %d repetitions, but the server's limits (max_frames "
                        "%d, max_slice_elements %d, max_slice_pixels %d) hold fewer than 2 of them at a time: each "
                        "repetition is reconstructed on its own", g.repetitions, limits.max_frames,
                        limits.max_slice_elements, limits.max_slice_pixels)
            return "phase", 0
        return "repetition", 0  # refused by name (check_geometry)
    n = -(-g.repetitions // most)
    block = -(-g.repetitions // n)
    log.warning("the header announces %d repetitions (a real-time series), more than one reconstruction may hold under "
                "the server's limits (max_frames %d, max_slice_elements %d, max_slice_pixels %d): reconstructed in "
                "%d blocks of %d repetitions, each sent when its last repetition arrives", g.repetitions,
                limits.max_frames, limits.max_slice_elements, limits.max_slice_pixels, n, block)
    return "repetition", block


class ReconSession:
    def __init__(self, header, cfg: ReconConfig, gs: GadgetSettings, engine: Engine | None = None,
                 limits: Limits | None = None, alive: Optional[Callable[[], bool]] = None, job_seconds: float = 0.0):
        self.header = header
        self.limits = limits or Limits()
        self.job_seconds = job_seconds  # a slice's wall-clock limit (ddugm serve: max_job_seconds; 0: none)
        self.geometry: Geometry = geometry_from_header(header)
        self.frame_axis, self.block = resolve_frame_axis(gs.frame_axis, self.geometry, self.limits, gs.realtime_block)
        self.cardiac_phases = gs.cardiac_phases or (self.geometry.phases if self.geometry.phases > 1 else DEFAULT_PHASES)
        if self.frame_axis == "ecg":
            log.info("frame_axis ecg: every line binned by its ECG trigger delay into %d cardiac phases (%s)",
                     self.cardiac_phases, "cardiac_phases" if gs.cardiac_phases else
                     "the header's phase count" if self.geometry.phases > 1 else "the default")
        check_geometry(self.geometry, self.limits, self.frame_axis, self.block)
        self.alive = alive
        self.buffered = 0  # k-space samples held by the collectors
        self.cfg, self.gs = cfg, gs
        self.calibration_data = calibration_as_data(gs.calibration_lines, self.geometry.calibration_mode)
        self.engine = engine or Engine(self.limits.max_cached)
        self.whitener = NoiseWhitener()
        self.collectors: dict[tuple, AcquisitionCollector] = {}
        self.errors: list[str] = []
        self.next_index = 1
        self.sent_images = 0
        self.timings = []
        self.ignored = 0
        self.failed = set()
        self.ignored_spaces = 0
        self.whitener_checked = False
        self.received = 0  # data items handled
        self.ecg_hinted = False  # a real-time series with ECG timing was told about frame_axis ecg
        self.unannounced_told = False  # the log said that slices wait for the end (no repetition count)

    # ---------------------------------------------------------------- input
    def handle(self, item) -> list:
        """Take one item; return the items to send on (possibly none)."""
        self.received += 1
        if isinstance(item, ismrmrd.Acquisition):
            return self._acquisition(item)
        from gadgetron.types.recon_data import ReconData

        if isinstance(item, ReconData):
            out = []
            if self.frame_axis == "ecg":
                self._fail("ReconData", ValueError(
                    "frame_axis ecg bins plain acquisitions by their trigger times, but this chain sends ReconData "
                    "buffers, already arranged by the chain's BucketToBufferGadget: put the DD-UGM gadget before the "
                    "accumulator and bucket gadgets, or choose another frame_axis"))
                return []
            self._check_whitener()
            for bit in item.bits:
                try:
                    self._check_recon_bit(bit)
                    cines = cine_from_recon_bit(bit, self.geometry, self.whitener, self.calibration_data)
                except Exception as e:  # noqa: BLE001 - a buffer this reader did not foresee fails its bit, not the
                    self._fail("ReconData", e)  # stream (Gadgetron's handler ends the stream on any exception)
                    continue
                for cine in cines:
                    out += self._reconstruct(cine, "image_array")
            return out
        return [item]  # images, waveforms, anything else: passed on unchanged

    def _check_recon_bit(self, bit) -> None:
        shape = tuple(np.asarray(bit.data.data).shape)
        if len(shape) == 7:
            cha, n = shape[3], shape[4]
            lim = self.limits
            if n > lim.max_frames or cha > lim.max_coils:
                raise ValueError(f"ReconData with {n} frames and {cha} coils exceeds the server's limits "
                                 f"(max_frames {lim.max_frames}, max_coils {lim.max_coils})")
            elements = cha * n * max(self.geometry.ny, shape[1]) * self.geometry.nx
            if elements > lim.max_slice_elements:
                raise ValueError(f"ReconData of {elements} grid samples exceeds the server's limit "
                                 f"max_slice_elements = {lim.max_slice_elements}")
            pixels = n * max(self.geometry.ny, shape[1]) * self.geometry.nx
            if pixels > lim.max_slice_pixels:
                raise ValueError(f"ReconData of {n} frames x {max(self.geometry.ny, shape[1])} x {self.geometry.nx} "
                                 f"= {pixels} image pixels exceeds the server's limit max_slice_pixels = "
                                 f"{lim.max_slice_pixels}")

    def _acquisition(self, acq) -> list:
        flags = int(acq.flags)
        if flag_set(flags, NOISE):
            self.whitener.add(np.asarray(acq.data), acq.sample_time_us)
            return []
        if any(flag_set(flags, b) for b in IGNORED):
            self.ignored += 1
            return []
        if acq.encoding_space_ref != 0:  # e.g. a separate reference scan in a second encoding space
            if not self.ignored_spaces:
                log.warning("acquisitions of encoding space %d ignored: only the first encoding space is "
                            "reconstructed", acq.encoding_space_ref)
            self.ignored_spaces += 1
            return []
        key = group_key(acq, self.frame_axis, self.block)
        if key in self.failed:
            return []  # this group already failed; its error is recorded once
        self._check_whitener()
        col = self.collectors.get(key)
        if col is None:
            col = self.collectors[key] = AcquisitionCollector(key, self.geometry, self.frame_axis, self.block,
                                                              self.cardiac_phases, self.gs.arrhythmia_rejection,
                                                              self.calibration_data)
        try:
            self._check_size(col, acq)
            col.add(acq, self.whitener)
            self.buffered += acq.active_channels * self.geometry.nx
        except ValueError as e:
            self.collectors.pop(key, None)
            self.buffered -= col.samples
            self.failed.add(key)
            self._fail(col.describe(), e)
            return []
        out = []
        if flag_set(flags, LAST_IN_MEASUREMENT):
            out += self.flush()
        elif flag_set(flags, LAST_IN_SLICE) and self._slice_complete(acq):
            out += self.flush(slice_=key[0], block=key[-1] if self.block else None)
        return out

    def _slice_complete(self, acq) -> bool:
        """At a line flagged LAST_IN_SLICE: is the slice (or its block) whole? A cine's is. A
        real-time or ECG-binned slice spans the repetitions, each of which may end LAST_IN_SLICE:
        it is whole at the last repetition the header announces, or at its block's last; where the
        header announces no repetition count, only at the end of the stream (taking each repetition
        as a slice would reconstruct every frame on its own)."""
        if self.frame_axis == "phase":
            return True
        rep = acq.idx.repetition
        if self.block and (rep + 1) % self.block == 0:
            return True
        if not self.geometry.repetitions_announced:
            if not self.unannounced_told:
                self.unannounced_told = True
                log.info("frame_axis %s: the header announces no repetition count, so each slice is reconstructed "
                         "at the end of the stream, not at its lines flagged LAST_IN_SLICE", self.frame_axis)
            return False
        return rep + 1 >= self.geometry.repetitions

    def _check_size(self, col: AcquisitionCollector, acq) -> None:
        """This line must not take the slice or the stream past the operator's limits."""
        lim, g = self.limits, self.geometry
        frame = col.frame_of(acq)
        if frame >= lim.max_frames:
            if self.frame_axis == "ecg":
                raise ValueError(f"cardiac_phases = {frame + 1} exceeds the server's limit max_frames = {lim.max_frames}")
            what = "cardiac phase" if self.frame_axis == "phase" else "repetition (frame)"
            raise ValueError(f"{what} index {frame} exceeds the server's limit max_frames = {lim.max_frames}")
        frames = max(frame + 1, col.frames)
        elements = int(acq.active_channels) * frames * g.ny * g.nx
        if elements > lim.max_slice_elements:
            raise ValueError(f"{acq.active_channels} coils x {frames} frames x {g.ny} x {g.nx} = {elements} k-space "
                             f"samples exceed the server's limit max_slice_elements = {lim.max_slice_elements}")
        if frames * g.ny * g.nx > lim.max_slice_pixels:
            raise ValueError(f"{frames} frames x {g.ny} x {g.nx} = {frames * g.ny * g.nx} image pixels exceed the "
                             f"server's limit max_slice_pixels = {lim.max_slice_pixels}")
        if self.buffered + int(acq.active_channels) * g.nx > lim.max_stream_elements:
            raise ValueError(f"the stream buffers more than the server's limit max_stream_elements = "
                             f"{lim.max_stream_elements} k-space samples")

    def _check_whitener(self):
        """A noise scan that cannot whiten (dead channel, zeros) is reported once and not used."""
        if self.whitener.ready and not self.whitener_checked:
            self.whitener_checked = True
            try:
                self.whitener.matrix()
            except ValueError as e:
                log.warning("%s; reconstructing without prewhitening", e)
                self.whitener = NoiseWhitener()

    def flush(self, slice_: int | None = None, block: int | None = None) -> list:
        """Reconstruct buffered groups (all, or those of one slice; of a real-time series in
        blocks, of one block)."""
        out = []
        for key in sorted(k for k in self.collectors if (slice_ is None or k[0] == slice_)
                          and (block is None or k[-1] == block)):
            col = self.collectors.pop(key)
            self.buffered -= col.samples
            try:
                try:
                    cine = col.build()
                except UnlabelledCine as e:
                    if self.gs.frame_axis != "auto":  # the operator chose the phase counter: say why it fails
                        raise
                    cine = self._bin_unlabelled(col, e)
            except ValueError as e:
                self._fail(col.describe(), e)
                continue
            if self.frame_axis == "repetition" and col.heartbeats >= 2 and not self.ecg_hinted:
                self.ecg_hinted = True
                log.info("%s: these repetitions carry ECG trigger delays through %d heartbeats: frame_axis ecg would "
                         "bin every line into one cine of cardiac phases (retrospective gating)", col.describe(),
                         col.heartbeats + 1)
            out += self._reconstruct(cine, "images")
        return out

    def _bin_unlabelled(self, col: AcquisitionCollector, why: UnlabelledCine) -> CineData:
        """frame_axis auto: a cine whose phase counters were never set but whose lines run through
        heartbeats at varying trigger delays (a retrospectively gated scan) is binned by its ECG
        trigger times into the session's cardiac phases, as frame_axis ecg does, within the limits."""
        phases, lim = self.cardiac_phases, self.limits
        elements = (col.channels or 1) * phases * self.geometry.ny * self.geometry.nx
        if phases > lim.max_frames or elements > lim.max_slice_elements or \
                phases * self.geometry.ny * self.geometry.nx > lim.max_slice_pixels:
            raise ValueError(f"{why}; binned into {phases} cardiac phases it would exceed the server's limits "
                             "(max_frames, max_slice_elements, max_slice_pixels)")
        log.info("%s: its phase counters are unset but its lines run through %d heartbeats at varying trigger "
                 "delays (a retrospectively gated cine): frame_axis auto bins them by their ECG trigger time "
                 "into %d cardiac phases, as frame_axis ecg does", col.describe(), col.heartbeats + 1, phases)
        col.bin_by_ecg(phases)
        return col.build()

    def finish(self) -> list:
        """End of stream: reconstruct what is still buffered; raise ScanErrors if any slice failed."""
        return self.flush()

    def raise_errors(self):
        if self.errors:
            raise ScanErrors("; ".join(self.errors))

    def _save_debug(self, cine: CineData, x: np.ndarray) -> None:
        """The slice's k-space, mask and images as .npz in ``debug_dir``; never through a symbolic
        link, and a failure is a warning: the images are sent anyway."""
        name = "_".join(f"{k}{v}" for k, v in cine.key.items()) + ".npz"
        extra = {} if cine.ref is None else {"ref": cine.ref, "ref_mask": cine.ref_mask}
        try:
            d = Path(self.gs.debug_dir)
            d.mkdir(parents=True, exist_ok=True)
            fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o640)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, kspace=cine.kspace, mask=cine.mask, images=x, **extra)
        except OSError as e:
            log.warning("debug_dir: could not save %s (%s); images sent anyway", name, e.strerror or e)

    # ---------------------------------------------------------------- reconstruction
    def _fail(self, where: str, e: Exception):
        msg = f"{where}: {type(e).__name__}: {e}"
        log.error("reconstruction failed: %s", msg)
        self.errors.append(msg)

    def _reconstruct(self, cine: CineData, natural: str) -> list:
        where = slice_name(cine.key)
        log.info("%s: reconstructing %d frames (%s)", where, cine.kspace.shape[1], self.cfg.method)
        t0 = time.perf_counter()
        try:
            x, method, device, warning, noise = self.engine.run(cine, self.cfg, self.gs, self.alive,
                                                                self.job_seconds, self.limits.gpu_memory_gb)
            x = finalize_images(np.asarray(x), self.geometry)
        except Cancelled:
            raise  # the stream is over: nobody to send the other slices to
        except Exception as e:  # noqa: BLE001 - one slice's failure must not lose the others
            self._fail(where, e)
            return []
        fallback, warning = warning is not None, "; ".join(w for w in (*cine.notes, warning) if w) or None
        seconds = time.perf_counter() - t0
        self.timings.append(seconds)
        log.info("%s: %d frames %s on %s in %.2f s%s", where, x.shape[0], method, device, seconds,
                 f" (WARNING: {warning})" if warning else "")
        images = frames_to_images(x, cine, self.geometry, output=self.gs.output,
                                  first_index=self.next_index, series_index=self.gs.series_index,
                                  method=method, preset=self.cfg.preset, warning=warning, noise=noise,
                                  fallback=fallback)
        self.next_index += len(images)
        self.sent_images += len(images)
        if self.gs.debug_dir:
            self._save_debug(cine, x)
        send = self.gs.send if self.gs.send != "auto" else natural
        return [images_to_array(images)] if send == "image_array" else images
