"""One scan stream, independent of how it arrives (Gadgetron external gadget, the server,
an MRD client, or a file replay).

:class:`ReconSession` takes items in arrival order and returns what to send on: acquisitions
are buffered per slice / contrast / repetition / set / average and reconstructed when the
slice ends (``ACQ_LAST_IN_SLICE`` or ``ACQ_LAST_IN_MEASUREMENT``) or the stream closes;
ReconData buffers are reconstructed as they come. A slice whose reconstruction fails does
not stop the others: its error is collected and raised as :class:`ScanErrors` by
:meth:`ReconSession.finish`, after every other slice has been sent.

:class:`Engine` owns the reconstructors (models loaded once per settings) and serialises
reconstructions with a lock, so a server's connections share one GPU queue while their I/O
runs concurrently.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import ismrmrd
import numpy as np
import torch

from ddugm_core.coils import estimate_coil_maps
from ddugm_core.reconstruction import ReconConfig, Reconstructor, prepare_inputs

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
    cine_from_recon_bit,
    finalize_images,
    flag_set,
    group_key,
)
from .settings import GadgetSettings

log = logging.getLogger("ddugm.gadget")


class ScanErrors(RuntimeError):
    """One or more slices of a stream could not be reconstructed (the others were sent)."""


class Engine:
    """Reconstructors keyed by their settings; one reconstruction at a time per engine."""

    def __init__(self):
        self._recons = {}
        self._lock = threading.Lock()
        self.count = 0

    def reconstructor(self, cfg: ReconConfig) -> Reconstructor:
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key not in self._recons:
            self._recons[key] = Reconstructor(cfg)
        return self._recons[key]

    def run(self, cine: CineData, cfg: ReconConfig, gs: GadgetSettings):
        """Reconstruct one slice: returns (frames ``[T, y, x]`` complex64 on the encoded grid,
        method used, device used, warning or None). Falls back to low-rank on CPU if the score-based
        reconstruction fails and ``gs.fallback`` is on."""
        with self._lock:
            self.count += 1
            rec = self.reconstructor(cfg)
            prepare_inputs(cine.kspace, cine.mask)  # bad input: a clear error, no fallback (it would fail too)
            maps = coil_maps_from_ref(cine, cfg, rec.device)
            try:
                x = rec.recon(cine.kspace, cine.mask, maps, seed=gs.seed)
                if 0 < cfg.virtual_coils < cine.kspace.shape[0]:
                    log.info("slice %s: %d coils compressed to %d virtual coils, %.2f %% of the signal energy kept",
                             cine.key, cine.kspace.shape[0], cfg.virtual_coils, 100 * rec.coil_energy_kept)
                return x, cfg.method, rec.device, None
            except Exception as e:  # noqa: BLE001 - any failure of the primary method
                if not gs.fallback or cfg.method != "ddugm":
                    raise
                warning = f"DD-UGM failed ({type(e).__name__}: {e}); low-rank reconstruction used instead"
                log.warning("slice %s: %s", cine.key, warning)
                fb = Reconstructor(ReconConfig.from_dict({**cfg.to_dict(), "method": "low_rank", "device": "cpu"}))
                x = fb.recon(cine.kspace, cine.mask, None if maps is None else maps.cpu(), seed=gs.seed)
                return x, "low_rank", fb.device, warning


def coil_maps_from_ref(cine: CineData, cfg: ReconConfig, device):
    """Coil maps from the calibration (ACS / reference) lines when there are some, else None
    (the reconstructor then estimates them from the time-averaged data)."""
    if cine.ref is None or cine.kspace.shape[0] < 2:
        return None
    ref = torch.from_numpy(np.ascontiguousarray(cine.ref)).to(device)[:, None]
    m = torch.from_numpy(np.ascontiguousarray(cine.ref_mask)).to(device)[None].float()
    try:
        return estimate_coil_maps(ref, m, cfg.coil_calib, cfg.coil_threshold)
    except ValueError as e:
        log.info("reference lines unusable for coil maps (%s); estimating from the data", e)
        return None


class ReconSession:
    def __init__(self, header, cfg: ReconConfig, gs: GadgetSettings, engine: Engine | None = None):
        self.header = header
        self.geometry: Geometry = geometry_from_header(header)
        self.cfg, self.gs = cfg, gs
        self.engine = engine or Engine()
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

    # ---------------------------------------------------------------- input
    def handle(self, item) -> list:
        """Take one item; return the items to send on (possibly none)."""
        if isinstance(item, ismrmrd.Acquisition):
            return self._acquisition(item)
        from gadgetron.types.recon_data import ReconData

        if isinstance(item, ReconData):
            out = []
            self._check_whitener()
            for bit in item.bits:
                try:
                    cines = cine_from_recon_bit(bit, self.geometry, self.whitener)
                except ValueError as e:
                    self._fail("ReconData", e)
                    continue
                for cine in cines:
                    out += self._reconstruct(cine, "image_array")
            return out
        return [item]  # images, waveforms, anything else: passed on unchanged

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
        key = group_key(acq)
        if key in self.failed:
            return []  # this group already failed; its error is recorded once
        self._check_whitener()
        col = self.collectors.get(key)
        if col is None:
            col = self.collectors[key] = AcquisitionCollector(key, self.geometry)
        try:
            col.add(acq, self.whitener)
        except ValueError as e:
            self.collectors.pop(key, None)
            self.failed.add(key)
            self._fail(col.describe(), e)
            return []
        out = []
        if flag_set(flags, LAST_IN_MEASUREMENT):
            out += self.flush()
        elif flag_set(flags, LAST_IN_SLICE):
            out += self.flush(slice_=key[0])
        return out

    def _check_whitener(self):
        """A noise scan that cannot whiten (dead channel, zeros) is reported once and not used."""
        if self.whitener.ready and not self.whitener_checked:
            self.whitener_checked = True
            try:
                self.whitener.matrix()
            except ValueError as e:
                log.warning("%s; reconstructing without prewhitening", e)
                self.whitener = NoiseWhitener()

    def flush(self, slice_: int | None = None) -> list:
        """Reconstruct buffered groups (all, or those of one slice)."""
        out = []
        for key in sorted(k for k in self.collectors if slice_ is None or k[0] == slice_):
            col = self.collectors.pop(key)
            try:
                cine = col.build()
            except ValueError as e:
                self._fail(col.describe(), e)
                continue
            out += self._reconstruct(cine, "images")
        return out

    def finish(self) -> list:
        """End of stream: reconstruct what is still buffered; raise ScanErrors if any slice failed."""
        return self.flush()

    def raise_errors(self):
        if self.errors:
            raise ScanErrors("; ".join(self.errors))

    # ---------------------------------------------------------------- reconstruction
    def _fail(self, where: str, e: Exception):
        msg = f"{where}: {type(e).__name__}: {e}"
        log.error("reconstruction failed: %s", msg)
        self.errors.append(msg)

    def _reconstruct(self, cine: CineData, natural: str) -> list:
        where = ", ".join(f"{k}={v}" for k, v in cine.key.items())
        t0 = time.perf_counter()
        try:
            x, method, device, warning = self.engine.run(cine, self.cfg, self.gs)
            x = finalize_images(np.asarray(x), self.geometry)
        except Exception as e:  # noqa: BLE001 - one slice's failure must not lose the others
            self._fail(where, e)
            return []
        seconds = time.perf_counter() - t0
        self.timings.append(seconds)
        log.info("%s: %d frames %s on %s in %.2f s%s", where, x.shape[0], method, device, seconds,
                 f" (WARNING: {warning})" if warning else "")
        images = frames_to_images(x, cine, self.geometry, complex_output=self.gs.output == "complex",
                                  first_index=self.next_index, series_index=self.gs.series_index,
                                  method=method, preset=self.cfg.preset, warning=warning)
        self.next_index += len(images)
        self.sent_images += len(images)
        if self.gs.debug_dir:
            d = Path(self.gs.debug_dir)
            d.mkdir(parents=True, exist_ok=True)
            name = "_".join(f"{k}{v}" for k, v in cine.key.items())
            extra = {} if cine.ref is None else {"ref": cine.ref, "ref_mask": cine.ref_mask}
            np.savez(d / f"{name}.npz", kspace=cine.kspace, mask=cine.mask, images=x, **extra)
        send = self.gs.send if self.gs.send != "auto" else natural
        return [images_to_array(images)] if send == "image_array" else images
