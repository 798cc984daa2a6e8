"""The one public entry: ``Reconstructor(config, device).recon(kspace, mask, coil_maps, seed)``.

It validates the input, derives the mask and coil maps when not given, normalises the
scale, runs the chosen method (DD-UGM, low-rank-only or zero-filled) on the compute
device, and returns complex64 images ``[frame, y, x]`` in the input's scale.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml

from . import MAX_SAMPLE, baselines
from .checkpoints import DEFAULT_WEIGHTS, load_model
from .coils import (
    compress_coils,
    estimate_coil_maps,
    estimate_noise_std,
    fit_coil_maps,
    refine_coil_maps,
    static_lines,
    time_averaged_kspace,
)
from .consistency import DataConsistency
from .lowrank import default_rank
from .networks import ATTENTION, PlaneScore, ScoreFunction, bf16_is_fast
from .operators import KWeight, expand_mask, fft2c, ifft2c, kspace_weight
from .sampler import PHASES, XT_PLANES, PnPSettings, SamplerSettings, ddugm_sample, pnp_sample

METHODS = ("ddugm", "low_rank", "l_plus_s", "llr_ttv", "zero_filled")
INITS = ("zero_filled", "low_rank", "l_plus_s", "llr_ttv")  # where the sampler starts
SAMPLERS = ("ddugm", "pnp")
TTV_REFERENCE_ACCEL = 8.0  # the acceleration at which ttv_lambda is the temporal-TV weight

#: Sampling schedules. "paper" is the published one; "dual" the fast warm-started dual-domain
#: one; "pnp" the image prior with LLR + temporal TV; "default" is whichever measured best
#: (README, "Settings").
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"steps": 1000, "sigma_min": 0.01, "sigma_max": 4.0, "snr": 0.075, "kspace_sigma_scale": 1.0,
              "init": "zero_filled", "lowrank_solver": "exact", "correctors": True, "sampler": "ddugm",
              "pnp_xt_weight": 0.0},
    "dual": {"steps": 10, "sigma_min": 0.01, "sigma_max": 0.3, "snr": 0.075, "kspace_sigma_scale": 0.1,
             "init": "l_plus_s", "lowrank_solver": "subspace", "correctors": False, "sampler": "ddugm",
             "pnp_xt_weight": 0.0},
    "pnp": {"steps": 8, "sigma_min": 0.01, "sigma_max": 0.05, "snr": 0.075, "kspace_sigma_scale": 1.0,
            "init": "llr_ttv", "lowrank_solver": "subspace", "correctors": False, "sampler": "pnp",
            "pnp_xt_weight": 0.6},
}
PRESETS["default"] = PRESETS["pnp"]  # chosen by measurement on the validation split (README, "Settings")


#: noise_estimate: where no noise is told, estimate it from the coils (:func:`estimate_noise_std`) or not
NOISE_ESTIMATES = ("coils", "off")


#: how the coil-map refinement forms each round's maps (ReconConfig.coil_refine_mode)
COIL_REFINE_MODES = ("fit", "average")


@dataclass
class ReconConfig:
    """Reconstruction settings. ``None`` means "take it from the preset"."""

    method: str = "ddugm"
    preset: str = "default"
    steps: Optional[int] = None
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    snr: Optional[float] = None
    kspace_sigma_scale: Optional[float] = None
    init: Optional[str] = None          # start of the sampler: zero_filled, low_rank or l_plus_s (warm starts)
    eps: float = 1e-5
    fusion: float = 0.75
    window: int = 6
    rank: Optional[int] = None          # default floor(1.5 * window^2) = 54
    lowrank_solver: Optional[str] = None  # exact (eigh each time) or subspace (warm-started power iteration)
    correctors: Optional[bool] = None   # Langevin corrector steps (off: half the network calls)
    sampler: Optional[str] = None       # ddugm (the dual-domain predictor-corrector) or pnp (image prior + LLR/TV ADMM)
    pnp_gamma: float = 0.1              # pnp: weight of the denoised anchor in each ADMM solve
    pnp_inner: int = 5                  # pnp: ADMM iterations per noise level
    pnp_xt_weight: Optional[float] = None  # pnp: share of the spatio-temporal (x-t / y-t) prior in the anchor
    pnp_eta: float = 0.0                # pnp: re-noising, the networks see x + eta * sigma * z
    pnp_ensemble: int = 1               # pnp: spatial flips averaged per denoising (1, 2 or 4)
    pnp_phase: str = "mean"             # pnp: the cine turned so its sum is real before each denoising ("none": as it is)
    pnp_keep_duals: bool = True         # pnp: carry the ADMM iterates from the start and between levels
    pnp_xt_planes: str = "alternate"    # pnp: plane prior on x-t planes at even levels, y-t at odd ones, or "both" each level
    pnp_reg_scale: float = 0.15         # pnp: LLR and temporal-TV weights in the sampler's ADMM, x those of the start
    start_reg_scale: float = 2.0        # the LLR + TV start (of DD-UGM and of the continued llr_ttv) and its coil-map
                                        #   rounds: weights x llr_lambda / ttv_lambda
    llr_continue_iters: int = 40        # llr_ttv: after that start, this many ADMM iterations more (0: no continuation:
                                        #   llr_iters at llr_lambda / ttv_lambda themselves, the earlier llr_ttv)
    llr_continue_scale: float = 0.3     #   at these weights x llr_lambda / ttv_lambda (DD-UGM's sampler without its priors)
    lowrank_iters: int = 20             # iterations of the low-rank-only method (and of its warm start),
    lowrank_momentum: float = 0.8       #   heavy-ball extrapolation between them (0: plain alternation)
    ls_iters: int = 50                  # L+S baseline (Otazo 2015): max iterations,
    ls_lambda_l: float = 0.01           #   SVT threshold relative to the largest singular value,
    ls_lambda_s: float = 0.02           #   temporal-Fourier soft threshold (normalised units),
    ls_tol: float = 0.0025              #   stop when the relative update is below this
    llr_iters: int = 50                 # locally low-rank + temporal TV (ADMM): iterations,
    llr_block: int = 8                  #   tile size of the locally low-rank penalty,
    llr_lambda: float = 0.0005          #   its singular-value threshold (per unit noise singular value),
    ttv_lambda: float = 0.005           #   temporal TV weight (normalised image units) at acceleration R = 8,
    ttv_accel_power: float = 1.5        #   and at R: ttv_lambda * (R / 8) ** ttv_accel_power (0: the same at every R),
    ttv_cyclic: bool = False            #   temporal TV ties the last frame to the first (a whole-cycle cine),
    llr_rho: float = 0.2                #   ADMM penalty,
    llr_cg_iters: int = 3               #   conjugate-gradient steps per x-update
    noise_reference: float = 0.005      #   k-space noise std (per real component, normalised units) the weights suit,
    noise_adapt: float = 1.0            #   and where the data's noise is known (a noise scan): the LLR and temporal-TV
                                        #   weights x max(1, noise / noise_reference) ** noise_adapt (0: off),
    noise_adapt_sigma: float = 0.6      #   and the pnp sampler's noise levels x that ratio ** noise_adapt_sigma (0: off)
    noise_estimate: str = "coils"       #   unknown noise: estimated from the coil covariance (coils) or left unknown (off)
    dc_mode: str = "replace"            # multi-coil data consistency: replace (coil k-space) or cg
    dc_iters: int = 5                   # conjugate-gradient steps when dc_mode is cg
    dc_lambda: float = 0.0
    virtual_coils: int = 0              # SVD coil compression to this many coils (0: use all coils)
    virtual_coils_energy: float = 0.999  # and to the fewest coils keeping this fraction of the energy (0: off)
    coil_calib: int = 0                 # max calibration lines for coil maps (0: as many as sampled)
    coil_threshold: float = 0.02        # coil-map support: pixels below this fraction of the max signal are zeroed (0: none)
    coil_refine: int = 5                # estimated maps refined this many times from a first LLR + TV reconstruction (0: off)
    coil_refine_window: int = 5         #   neighbourhood (pixels) the refined maps are averaged over,
    coil_refine_window_static: int = 9  #   and where every frame has the same lines (GRAPPA / SENSE-style cine:
                                        #   coils.static_lines), whose missing lines only the model gives
    coil_refine_static: int = 10        #   rounds there (coil_refine elsewhere; 0: as coil_refine)
    coil_refine_iters: int = 10         #   ADMM iterations per round, each round continuing the last (0: llr_iters)
    coil_refine_continue: int = 10      #   the LLR + TV after the rounds continues theirs this many iterations (0: afresh)
    coil_refine_min_frames: int = 12    #   only series with at least this many frames are refined (fewer: unreliable)
    coil_refine_mode: str = "fit"       #   each round's maps: fit (smooth maps fitted to the acquired samples
                                        #   alone, coils.fit_coil_maps) | average (coil images with the missing
                                        #   samples from the model, averaged over coil_refine_window pixels)
    coil_fit_band: float = 0.0625       #   fit: the maps' k-space extent, a fraction of the acquired one,
    coil_fit_band_static: float = 0.04  #   and where every frame has the same lines
    coil_fit_iters: int = 20            #   fit: conjugate-gradient steps per round
    coil_fit_lam: float = 0.01          #   fit: weight holding the maps where the image is dark
    scale_percentile: float = 99.0
    image_weights: str = ""             # "" = the shipped weights
    kspace_weights: str = ""
    xt_weights: str = ""                # the spatio-temporal plane prior ("" = the shipped one, if any)
    device: str = "auto"
    amp: bool = True                    # bf16 network calls where bf16 is fast (CUDA; CPUs with AVX512-BF16/AMX)
    compile: bool = False               # torch.compile the networks (CUDA: CUDA graphs); compiles per frame size
    attention: str = "window"           # image-domain priors' attention on frames larger than training: window | global

    def ttv_weight(self, accel: float = TTV_REFERENCE_ACCEL) -> float:
        """The temporal-TV weight of LLR + TV at acceleration ``accel`` (samples of the full grid
        per acquired sample): ``ttv_lambda`` at R = 8, scaled by (R / 8) ** ``ttv_accel_power``.
        The aliasing that the temporal TV removes grows with R; one weight for every R
        over-smooths at R = 4 what it leaves aliased at R = 12 (README "Classical baselines")."""
        return self.ttv_lambda * (max(float(accel), 1.0) / TTV_REFERENCE_ACCEL) ** self.ttv_accel_power

    # ------------------------------------------------------------------ loading and checks
    @classmethod
    def from_dict(cls, d: dict) -> "ReconConfig":
        if not isinstance(d, dict):
            raise ValueError(f"settings must be a mapping, got {type(d).__name__}")
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown reconstruction setting(s): {', '.join(unknown)}; known: {', '.join(names)}")
        values = {}
        for key, val in d.items():
            values[key] = _coerce(key, val, names[key].type)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path) -> "ReconConfig":
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        data = data or {}
        if isinstance(data, dict) and isinstance(data.get("recon"), dict):
            data = data["recon"]
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def validate(self) -> None:
        odd = [f.name for f in fields(self) if isinstance(getattr(self, f.name), float)
               and not math.isfinite(getattr(self, f.name))]
        if odd:  # NaN passes every range check below and ends as a NaN image or a solver's failure
            raise ValueError("settings must be finite numbers: " + ", ".join(f"{k} = {getattr(self, k)}" for k in odd))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        s = self.sampler_settings()
        if s.steps < 1:
            raise ValueError("steps must be >= 1")
        if not 0 < s.sigma_min <= s.sigma_max:
            raise ValueError(f"need 0 < sigma_min <= sigma_max, got {s.sigma_min}, {s.sigma_max}")
        if s.snr <= 0 or s.kspace_sigma_scale <= 0:
            raise ValueError("snr and kspace_sigma_scale must be positive")
        if self.resolved("sampler") not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.pnp_gamma < 0 or self.pnp_inner < 1 or not 0 <= self.resolved("pnp_xt_weight") <= 1:
            raise ValueError("pnp_gamma must be >= 0, pnp_inner >= 1 and pnp_xt_weight in [0, 1]")
        if self.llr_continue_iters < 0 or self.llr_continue_scale < 0:
            raise ValueError(f"llr_continue_iters and llr_continue_scale must be >= 0 (iterations 0: no continuation), "
                             f"got {self.llr_continue_iters} and {self.llr_continue_scale}")
        if self.pnp_eta < 0 or self.pnp_ensemble not in (1, 2, 4) or self.pnp_reg_scale < 0 or self.start_reg_scale < 0:
            raise ValueError(f"pnp_eta, pnp_reg_scale and start_reg_scale must be >= 0 and pnp_ensemble 1, 2 or 4, "
                             f"got {self.pnp_eta}, {self.pnp_reg_scale}, {self.start_reg_scale}, {self.pnp_ensemble}")
        if self.noise_estimate not in NOISE_ESTIMATES:
            raise ValueError(f"noise_estimate must be one of {NOISE_ESTIMATES}, got {self.noise_estimate!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.pnp_xt_planes not in XT_PLANES:
            raise ValueError(f"pnp_xt_planes must be one of {XT_PLANES}, got {self.pnp_xt_planes!r}")
        if self.pnp_phase not in PHASES:
            raise ValueError(f"pnp_phase must be one of {PHASES}, got {self.pnp_phase!r}")
        if self.resolved("init") not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not 0 <= self.fusion <= 1:
            raise ValueError(f"fusion must be in [0, 1], got {self.fusion}")
        if self.window < 2 or s.rank < 1:
            raise ValueError("window must be >= 2 and rank >= 1")
        if s.lowrank_solver not in ("exact", "subspace"):
            raise ValueError(f"lowrank_solver must be 'exact' or 'subspace', got {s.lowrank_solver!r}")
        if self.dc_mode not in ("replace", "cg"):
            raise ValueError(f"dc_mode must be 'replace' or 'cg', got {self.dc_mode!r}")
        if self.ls_iters < 1 or not 0 <= self.ls_lambda_l < 1 or self.ls_lambda_s < 0 or self.ls_tol < 0:
            raise ValueError("ls_iters must be >= 1, ls_lambda_l in [0, 1), ls_lambda_s >= 0, ls_tol >= 0")
        if self.llr_iters < 1 or self.llr_block < 1 or self.llr_cg_iters < 1 or self.llr_rho <= 0 \
                or self.llr_lambda < 0 or self.ttv_lambda < 0 or not 0 <= self.ttv_accel_power <= 4:
            raise ValueError("llr_iters, llr_block and llr_cg_iters must be >= 1, llr_rho > 0, "
                             "llr_lambda and ttv_lambda >= 0, ttv_accel_power in [0, 4]")
        if not self.noise_reference > 0 or not 0 <= self.noise_adapt <= 4 or not 0 <= self.noise_adapt_sigma <= 4:
            raise ValueError(f"noise_reference must be > 0, noise_adapt and noise_adapt_sigma in [0, 4] (0: off), got "
                             f"{self.noise_reference}, {self.noise_adapt} and {self.noise_adapt_sigma}")
        if self.virtual_coils < 0:
            raise ValueError(f"virtual_coils must be >= 0 (0: no compression), got {self.virtual_coils}")
        if not 0 <= self.virtual_coils_energy < 1:
            raise ValueError(f"virtual_coils_energy must be in [0, 1) (0: off; e.g. 0.99 keeps 99 % of the "
                             f"signal energy), got {self.virtual_coils_energy}")
        if self.lowrank_iters < 1 or self.dc_iters < 1 or self.dc_lambda < 0:
            raise ValueError("lowrank_iters and dc_iters must be >= 1, dc_lambda >= 0")
        if not 0 <= self.lowrank_momentum < 1:
            raise ValueError(f"lowrank_momentum must be in [0, 1) (0: none), got {self.lowrank_momentum}")
        if not 0 < self.scale_percentile <= 100 or not 0 <= self.coil_threshold < 1 or 0 < self.coil_calib < 3:
            raise ValueError("scale_percentile in (0, 100], coil_threshold in [0, 1), coil_calib 0 (no limit) or >= 3")
        if self.coil_refine < 0 or self.coil_refine_static < 0 or self.coil_refine_window < 1 \
                or self.coil_refine_window_static < 1 or self.coil_refine_iters < 0 or self.coil_refine_continue < 0 \
                or self.coil_refine_min_frames < 0:
            raise ValueError(f"coil_refine and coil_refine_static must be >= 0 (0: off; coil_refine_static 0: as "
                             f"coil_refine), coil_refine_window and coil_refine_window_static >= 1, and "
                             f"coil_refine_iters, coil_refine_continue and coil_refine_min_frames >= 0, got "
                             f"{self.coil_refine}, {self.coil_refine_static}, {self.coil_refine_window}, "
                             f"{self.coil_refine_window_static}, {self.coil_refine_iters}, {self.coil_refine_continue} "
                             f"and {self.coil_refine_min_frames}")
        if self.coil_refine_mode not in COIL_REFINE_MODES:
            raise ValueError(f"coil_refine_mode must be one of {', '.join(COIL_REFINE_MODES)}, got {self.coil_refine_mode!r}")
        if not (0 < self.coil_fit_band <= 1 and 0 < self.coil_fit_band_static <= 1) or self.coil_fit_iters < 0 \
                or not self.coil_fit_lam >= 0:
            raise ValueError(f"coil_fit_band and coil_fit_band_static must be in (0, 1] (a fraction of the acquired "
                             f"k-space), coil_fit_iters >= 0 and coil_fit_lam >= 0, got {self.coil_fit_band}, "
                             f"{self.coil_fit_band_static}, {self.coil_fit_iters} and {self.coil_fit_lam}")
        if self.device != "auto":
            try:
                kind = torch.device(self.device).type
            except RuntimeError as e:
                raise ValueError(f"device: {e}") from None
            if kind not in ("cpu", "cuda", "mps", "xpu"):  # "meta" and the like hold no data
                raise ValueError(f"device must be auto, cpu, cuda, cuda:N, mps or xpu, got {self.device!r}")

    def resolved(self, name: str):
        """A setting's value, the preset's where it is None."""
        value = getattr(self, name)
        return PRESETS[self.preset][name] if value is None else value

    def sampler_settings(self) -> SamplerSettings:
        pick = self.resolved
        return SamplerSettings(steps=int(pick("steps")), sigma_min=float(pick("sigma_min")),
                               sigma_max=float(pick("sigma_max")), eps=self.eps, snr=float(pick("snr")),
                               kspace_sigma_scale=float(pick("kspace_sigma_scale")), fusion=self.fusion,
                               rank=self.rank if self.rank is not None else default_rank(self.window),
                               window=self.window, lowrank_solver=str(pick("lowrank_solver")),
                               correctors=bool(pick("correctors")))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(key: str, val, typ):
    t = str(typ)
    if val is None and "Optional" in t:
        return None
    if "bool" in t:
        if isinstance(val, bool):
            return val
        raise ValueError(f"{key} must be true or false, got {val!r}")
    if "int" in t:
        if isinstance(val, bool) or not isinstance(val, (int, float)) or float(val) != int(val):
            raise ValueError(f"{key} must be an integer, got {val!r}")
        return int(val)
    if "float" in t:
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise ValueError(f"{key} must be a number, got {val!r}")
        return float(val)
    if not isinstance(val, str):
        raise ValueError(f"{key} must be a string, got {val!r}")
    return val


# ---------------------------------------------------------------------- input checks
def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.resolve_conj().resolve_neg()  # a lazy x.conj() view cannot be viewed as real
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def prepare_inputs(kspace, mask=None, coil_maps=None, device="cpu"):
    """Validate and convert. Returns (kspace ``[coil, frame, ky, kx]``, mask ``[frame, ky, kx]``
    float 0/1, maps or None), all on ``device``. Raises ValueError naming the problem."""
    k = _as_tensor(kspace, "kspace")
    if not k.is_complex():
        raise ValueError(f"kspace must be complex (complex64), got dtype {k.dtype}")
    if k.dim() == 3:
        k = k[None]
    if k.dim() != 4:
        raise ValueError(f"kspace must be [coil, frame, ky, kx] or [frame, ky, kx], got {k.dim()} dimensions {tuple(k.shape)}")
    if min(k.shape) == 0:
        raise ValueError(f"kspace is empty: shape {tuple(k.shape)}")
    k = k.to(device=device, dtype=torch.complex64)
    largest = float(torch.view_as_real(k).abs().max())  # (NaN where any sample is NaN: max propagates it)
    if not math.isfinite(largest):
        raise ValueError("kspace contains NaN or Inf values")
    if largest > MAX_SAMPLE:  # (squared and summed, as coil covariances and norms are, it overflows float32)
        raise ValueError(f"kspace holds a sample of {largest:.3g}, beyond {MAX_SAMPLE:.0e}, which single precision "
                         "cannot square and sum: a corrupted sample, or data in far larger units than any scanner's?")
    c, t, ny, nx = k.shape
    if mask is None:
        m = (k.abs() > 0).any(dim=0).any(dim=-1)  # [frame, ky]: lines that carry data
    else:
        m = _as_tensor(mask, "mask")
        if m.is_complex():
            raise ValueError(f"mask must be boolean or 0/1 numbers, got dtype {m.dtype}")
        m = m.to(device)
        if m.dtype != torch.bool:
            if not torch.isfinite(m.float()).all() or not ((m == 0) | (m == 1)).all():
                raise ValueError("mask values must be 0 or 1")
            m = m != 0
        if tuple(m.shape) not in ((t, ny), (t, ny, nx)):
            raise ValueError(f"mask shape {tuple(m.shape)} does not match kspace {tuple(k.shape)}: "
                             f"expected [frame, ky] = ({t}, {ny}) or [frame, ky, kx] = ({t}, {ny}, {nx})")
    m = expand_mask(m, (ny, nx))
    if not m.any():
        raise ValueError("the mask samples nothing")
    empty = torch.nonzero(~m.flatten(1).any(1)).flatten().tolist()
    if empty:
        raise ValueError(f"frame(s) {empty} have no acquired samples")
    sampled = k * m
    zero_frames = torch.nonzero(~(sampled.abs() > 0).any(0).flatten(1).any(1)).flatten().tolist()
    if zero_frames:
        raise ValueError(f"frame(s) {zero_frames} are all zero")
    zero_coils = torch.nonzero(~(sampled.abs() > 0).flatten(1).any(1)).flatten().tolist()
    if zero_coils:
        raise ValueError(f"coil(s) {zero_coils} are all zero")
    maps = None
    if coil_maps is not None:
        maps = _as_tensor(coil_maps, "coil_maps")
        if not maps.is_complex():
            raise ValueError(f"coil_maps must be complex, got dtype {maps.dtype}")
        if tuple(maps.shape) not in ((c, ny, nx), (c, t, ny, nx)):
            raise ValueError(f"coil_maps shape {tuple(maps.shape)} does not match kspace {tuple(k.shape)}: "
                             f"expected ({c}, {ny}, {nx}) or ({c}, {t}, {ny}, {nx})")
        maps = maps.to(device=device, dtype=torch.complex64)
        if not torch.isfinite(torch.view_as_real(maps)).all():
            raise ValueError("coil_maps contain NaN or Inf values")
        if not (maps.abs() > 0).any():
            raise ValueError("coil_maps are all zero")
    return k, m.to(torch.float32), maps


# ---------------------------------------------------------------------- the reconstructor
_MALLOC_TUNED: Optional[bool] = None


def keep_freed_memory() -> bool:
    """On Linux with glibc, let the process reuse freed memory instead of handing it back to
    the kernel and faulting it in again at the next allocation (mallopt: allocations up to
    32 MB from the heap, no trimming of the heap top). A CPU reconstruction allocates and
    frees tensors of tens of MB thousands of times; without this a third of its CPU time went
    to page faults in the kernel (the cine8 bench case, 2-core CPU: 8 million minor faults,
    29 s system time per slice). The cost: the process keeps its peak heap. Done once per
    process, by the first :class:`Reconstructor` on a CPU; skipped where the environment
    already sets any ``MALLOC_*`` variable or ``DDUGM_KEEP_MEMORY=0``. Returns whether the
    settings are in effect."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = False
        user = os.environ.get("DDUGM_KEEP_MEMORY") == "0" or any(k.startswith("MALLOC_") for k in os.environ)
        if sys.platform.startswith("linux") and not user:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
                _MALLOC_TUNED = all(libc.mallopt(opt, val) == 1 for opt, val in (
                    (m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 256 << 20)))
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                pass
    return _MALLOC_TUNED


class Reconstructor:
    """Holds the settings and (lazily) the two score models on the compute device."""

    def __init__(self, config: ReconConfig | None = None, device: str | torch.device | None = None):
        self.config = config or ReconConfig()
        self.config.validate()
        dev = device if device is not None else self.config.device
        if str(dev) == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if self.device.type == "cpu":
            keep_freed_memory()
        self._scores = None
        self.coil_energy_kept = 1.0  # of the last reconstruction (below 1 with virtual_coils)
        self.coils_used = (0, 0)     # of the last reconstruction: (coils in the data, coils reconstructed)
        self.noise_ratio = 1.0       # of the last reconstruction: max(1, its known noise / noise_reference),
        self.noise_factor = 1.0      #   and its LLR and temporal-TV weights x this (noise_adapt)
        self.noise_std = None        #   its noise std (input units; None: unknown),
        self.noise_source = None     #   "told" (noise_std=), "estimated" (noise_estimate) or None

    def _model_domains(self) -> tuple:
        """The score models this configuration uses: image and k-space always (they are the
        method), the spatio-temporal plane prior where the pnp anchor blends it in."""
        cfg = self.config
        uses_xt = cfg.resolved("sampler") == "pnp" and cfg.resolved("pnp_xt_weight") > 0
        return ("image", "kspace", "xt") if uses_xt else ("image", "kspace")

    def _model_paths(self) -> dict:
        cfg = self.config
        return {d: Path(getattr(cfg, f"{d}_weights") or DEFAULT_WEIGHTS[d]) for d in self._model_domains()}

    def model_key(self) -> tuple:
        """What the loaded models depend on: reconstructors with equal keys can share them."""
        cfg = self.config
        paths = tuple(str(p) for p in self._model_paths().values())
        return paths + (str(self.device), bool(cfg.amp and bf16_is_fast(self.device)), bool(cfg.compile),
                         cfg.attention)

    def use_models(self, scores: dict) -> None:
        """Share the score models another reconstructor with the same :meth:`model_key` loaded."""
        self._scores = scores

    def load_models(self):
        """Load the image and k-space score models (done once, on first use)."""
        if self._scores is None:
            cfg = self.config
            paths = self._model_paths()
            if "xt" in paths and not paths["xt"].is_file():
                raise ValueError(f"pnp_xt_weight is {cfg.resolved('pnp_xt_weight')} but there is no spatio-temporal "
                                 f"prior at {paths['xt']}: train one (ddugm train --domain xt), name it with "
                                 f"xt_weights, or set pnp_xt_weight: 0")
            amp = cfg.amp and bf16_is_fast(self.device)
            # tiles for the image-domain priors, trained on crops of larger frames; the k-space prior
            # saw the whole k-space of its training frames, so it keeps attending to all of it
            scores = {d: ScoreFunction(load_model(p, self.device, expect_domain=d), amp=amp, compile=cfg.compile,
                                       attention="global" if d == "kspace" else cfg.attention)
                      for d, p in paths.items()}
            if "xt" in scores:
                scores["xt"] = PlaneScore(scores["xt"])
            self._scores = scores
        return self._scores

    def recon(self, kspace, mask=None, coil_maps=None, seed: int = 0, method: str | None = None,
              callback: Optional[Callable[[int, int], None]] = None, trace: Optional[Callable[[dict], None]] = None,
              refine_maps: Optional[bool] = None, noise_std: Optional[float] = None):
        """Reconstruct ``[frame, y, x]`` complex64 images from centred k-space.

        kspace: ``[coil, frame, ky, kx]`` or ``[frame, ky, kx]``, zeros where not acquired.
        mask: ``[frame, ky, kx]`` or ``[frame, ky]``; inferred from the non-zero lines if None.
        coil_maps: ``[coil, y, x]``, normalised (sum |S|^2 = 1); estimated if None and coil > 1.
        refine_maps: whether the maps are refined from a first reconstruction (``coil_refine``
        rounds). None (default): the estimated ones only, given maps are used as they are;
        True: given maps too (the gadgets' maps from separate reference / ACS lines: a 24-line
        reference gives coarse maps, which refining improves, README "Coil maps").
        Returns a numpy array for numpy input, else a tensor on the input's device.
        trace: passed to the sampler (:func:`~ddugm_core.sampler.ddugm_sample`), each record with
        ``scale`` (the normalisation: states are in the input's units divided by it) and ``weight``.
        noise_std: the standard deviation of the k-space noise (each real component) in the input's
        units, where it is known (prewhitened with a noise scan: the gadgets pass it); the LLR and
        temporal-TV weights then grow with it above ``noise_reference`` (``noise_adapt``), and
        ``self.noise_factor`` says by how much. None: unknown; with ``noise_estimate: coils`` (the
        default) estimated from the data's coil covariance where it can be
        (:func:`~ddugm_core.coils.estimate_noise_std`: 8 coils or more, a noise floor), else the
        weights as set. ``self.noise_std`` and ``self.noise_source`` say what was used.
        A reconstruction that breaks down numerically (NaN or inf; settings far outside their range)
        raises FloatingPointError naming the method, never returns such an image.
        """
        if noise_std is not None and not (math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0 (or None: unknown), got {noise_std}")
        method = method or self.config.method
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        try:
            x = self._recon(kspace, mask, coil_maps, seed, method, callback, trace, refine_maps, noise_std)
        except torch.linalg.LinAlgError as e:  # an SVD / eigendecomposition of non-finite values
            raise FloatingPointError(f"the {method} reconstruction broke down numerically ({str(e).splitlines()[0][:120]}): "
                                     "settings far outside their usual range (weights, iterations) can do this") from None
        if not bool(torch.isfinite(torch.view_as_real(torch.as_tensor(x))).all()):  # never a silent NaN / inf image
            raise FloatingPointError(f"the {method} reconstruction produced non-finite values (NaN or inf): "
                                     "settings far outside their usual range (weights, iterations) can do this")
        return x

    def _recon(self, kspace, mask, coil_maps, seed, method, callback, trace, refine_maps, noise_std=None):
        cfg = self.config
        as_numpy = isinstance(kspace, np.ndarray)
        out_device = None if as_numpy else getattr(kspace, "device", None)
        k, m, maps = prepare_inputs(kspace, mask, coil_maps, self.device)
        coils = k.shape[0]
        self.noise_source = "told" if noise_std is not None else None
        self.coil_refinement = None  # how the maps were refined: coil_refine_mode (None: not refined)
        self.coil_window = None  # the average refinement's window (None: not refined so)
        if noise_std is None and cfg.noise_estimate == "coils":  # before compression drops the noise-only coils
            noise_std = estimate_noise_std(k, m)
            self.noise_source = "estimated" if noise_std is not None else None
        self.noise_std = noise_std
        k, maps, self.coil_energy_kept = compress_coils(k, m, cfg.virtual_coils, maps, cfg.virtual_coils_energy)
        self.coils_used = (coils, k.shape[0])
        estimated = maps is None and coils > 1  # also for data compressed to one virtual coil
        if estimated:
            maps = estimate_coil_maps(k, m, cfg.coil_calib, cfg.coil_threshold)

        scale = self._scale(k, m, maps)
        accel = float(m.numel() / m.sum())  # samples of the full grid per acquired one (m: [frame, ky, kx])
        kn = k / scale
        dc = DataConsistency(kn, m, maps, cg_iters=cfg.dc_iters, lam=cfg.dc_lambda, mode=cfg.dc_mode)
        s = cfg.sampler_settings()
        refinable = maps is not None and (estimated if refine_maps is None else bool(refine_maps)) \
            and k.shape[1] >= cfg.coil_refine_min_frames  # few frames sample the coil covariance too little
        static = refinable and static_lines(m)  # the same lines in every frame: its own rounds and window
        rounds = (cfg.coil_refine_static or cfg.coil_refine) if static and cfg.coil_refine else cfg.coil_refine
        refine = rounds if refinable and method != "zero_filled" else 0  # (zero-filled: the plain adjoint)
        # DD-UGM starts from a more strongly regularised LLR + TV than the plain ADMM's own optimum
        # (the sampler then continues at pnp_reg_scale of it; chosen on validation); the llr_ttv
        # method starts the same way and continues at llr_continue_scale without any prior
        continued = method == "llr_ttv" and cfg.llr_continue_iters > 0
        # noisier data than the weights were chosen at (known from a noise scan): stronger LLR + TV,
        # in proportion to the noise (chosen on validation: README "Noise")
        self.noise_ratio = max(1.0, float(noise_std / scale) / cfg.noise_reference) if noise_std else 1.0
        self.noise_factor = self.noise_ratio ** cfg.noise_adapt
        reg = (cfg.start_reg_scale if method == "ddugm" or continued else 1.0) * self.noise_factor
        # the LLR + TV after the rounds (the method, or DD-UGM's start) continues their ADMM iterates
        continuing = bool(refine and cfg.coil_refine_continue)
        llr_iters = cfg.coil_refine_continue if continuing else cfg.llr_iters
        carry: Optional[dict] = None
        if refine:
            # the same maps for every method: refined from the strongest classical reconstruction.
            # One progress count over the rounds and the method, so that a caller's callback (the
            # gadgets' cancellation check) is polled in the rounds too
            per_round = cfg.coil_refine_iters or cfg.llr_iters
            before, total = refine * per_round, refine * per_round + self._iterations(method, llr_iters)
            carry = {}  # each round's ADMM continues from the previous one's iterates
            window = cfg.coil_refine_window_static if static else cfg.coil_refine_window
            mode = cfg.coil_refine_mode
            band = cfg.coil_fit_band_static if static else cfg.coil_fit_band
            self.coil_refinement = mode
            self.coil_window = window if mode == "average" else None
            for r in range(refine):
                cb = None if callback is None else (lambda i, n, r=r: callback(r * per_round + i, total))
                first = self._classical("llr_ttv", dc, cb, carry, iters=per_round, accel=accel, reg=reg)
                if mode == "fit":
                    maps = fit_coil_maps(kn, m, first, maps, band, cfg.coil_fit_iters, cfg.coil_fit_lam)
                else:
                    maps = refine_coil_maps(kn, m, first, maps, window)
                dc = DataConsistency(kn, m, maps, cg_iters=cfg.dc_iters, lam=cfg.dc_lambda, mode=cfg.dc_mode)
            if callback is not None:
                user_callback = callback
                callback = lambda i, n: user_callback(before + i, before + n)  # noqa: E731
        if method == "zero_filled":
            x = baselines.zero_filled(dc)
        elif method == "low_rank":
            x = baselines.low_rank(dc, cfg.lowrank_iters, s.rank, s.window, callback, s.lowrank_solver,
                                   cfg.lowrank_momentum)
        elif method in ("l_plus_s", "llr_ttv"):
            # llr_ttv: the start, then (continued) the ADMM goes on from its iterates at the lower
            # weights, the sampler's own continuation without a prior (README "Classical baselines")
            more = cfg.llr_continue_iters if continued else 0
            state = carry if continuing else ({} if more else None)
            first = callback if callback is None or not more else (lambda i, n: callback(i, n + more))
            x = self._classical(method, dc, first, state, llr_iters, accel, reg)
            if more:
                then = None if callback is None else (lambda i, n: callback(llr_iters + i, llr_iters + n))
                x = self._classical(method, dc, then, state, more, accel, cfg.llr_continue_scale * self.noise_factor,
                                    seed=1)
        else:
            scores = self.load_models()
            gen = torch.Generator(self.device).manual_seed(int(seed))
            init = cfg.resolved("init")
            offset = self._iterations(init, llr_iters, start=True)  # (0 for the zero-filled start)
            # one progress count over the warm start and the sampler
            progress = None if callback is None else (lambda i, n: callback(offset + i, offset + n))
            warm_cb = None if callback is None else (lambda i, n: callback(i, n + s.steps))
            admm = None  # the start's ADMM iterates, for pnp_keep_duals
            if init == "llr_ttv":
                admm = carry if continuing else {}
            if init == "low_rank":  # a classical estimate, then refine
                x0 = baselines.low_rank(dc, cfg.lowrank_iters, s.rank, s.window, warm_cb, s.lowrank_solver,
                                        cfg.lowrank_momentum)
            elif init in ("l_plus_s", "llr_ttv"):
                x0 = self._classical(init, dc, warm_cb, admm, llr_iters, accel, reg)
            else:
                x0 = dc.image(baselines.zero_filled(dc))
            k0 = fft2c(x0)
            weight = KWeight(kspace_weight(*k0.shape[-2:], device=self.device))
            tr = None if trace is None else (lambda rec: trace({**rec, "scale": scale, "weight": weight}))
            if cfg.resolved("sampler") == "pnp":
                x = pnp_sample(x0, dc, scores["image"], self.pnp_settings(accel, reg, self.noise_ratio), progress, tr,
                               scores.get("xt"), gen, admm)
            else:
                x = ddugm_sample(k0, dc, scores["kspace"], scores["image"], weight, s, gen, progress, tr)
        if maps is not None:
            x = x * dc.support
        x = (x * scale).to(torch.complex64)
        if as_numpy:
            return x.cpu().numpy()
        return x.to(out_device) if out_device is not None else x

    def _iterations(self, method: str, llr_iters: int, start: bool = False) -> int:
        """The progress count of ``method`` (what its callback's ``n`` is), or with ``start`` of
        that classical method as DD-UGM's start (the llr_ttv start has no continuation)."""
        cfg = self.config
        classical = {"low_rank": cfg.lowrank_iters, "l_plus_s": cfg.ls_iters, "llr_ttv": llr_iters}
        if method == "llr_ttv" and not start:
            return llr_iters + cfg.llr_continue_iters
        if method in classical:
            return classical[method]
        if method == "ddugm":
            return classical.get(cfg.resolved("init"), 0) + cfg.sampler_settings().steps
        return 0

    def pnp_settings(self, accel: float = TTV_REFERENCE_ACCEL, reg: float = 1.0, noise_ratio: float = 1.0) -> PnPSettings:
        """The pnp sampler's settings for data at acceleration ``accel`` (the temporal-TV weight
        depends on it, :meth:`ReconConfig.ttv_weight`), from a start whose LLR + TV weights are
        ``reg`` x ``llr_lambda`` and ``ttv_weight(accel)`` (``start_reg_scale``), for data whose
        known noise is ``noise_ratio`` x ``noise_reference`` (>= 1: its noise levels x that ** ``noise_adapt_sigma``)."""
        cfg, s = self.config, self.config.sampler_settings()
        lift = noise_ratio ** cfg.noise_adapt_sigma  # noisier data than noise_reference: higher noise levels
        return PnPSettings(steps=s.steps, sigma_max=s.sigma_max * lift, sigma_min=s.sigma_min * lift, gamma=cfg.pnp_gamma,
                           inner=cfg.pnp_inner, xt_weight=float(cfg.resolved("pnp_xt_weight")),
                           eta=cfg.pnp_eta, ensemble=cfg.pnp_ensemble, keep_duals=bool(cfg.pnp_keep_duals),
                           xt_planes=cfg.pnp_xt_planes, phase=cfg.pnp_phase,
                           llr={"lambda_llr": cfg.llr_lambda * reg * cfg.pnp_reg_scale,
                                "lambda_tv": cfg.ttv_weight(accel) * reg * cfg.pnp_reg_scale, "block": cfg.llr_block,
                                "cyclic": bool(cfg.ttv_cyclic),
                                "rho": cfg.llr_rho, "cg_iters": cfg.llr_cg_iters})

    def _classical(self, method: str, dc: DataConsistency, callback, state: Optional[dict] = None,
                   iters: Optional[int] = None, accel: float = TTV_REFERENCE_ACCEL, reg: float = 1.0,
                   seed: int = 0) -> torch.Tensor:
        """L+S, or ``iters`` ADMM iterations of LLR + TV at ``reg`` x the weights of
        ``llr_lambda`` and ``ttv_weight(accel)`` (from ``state``'s iterates where it holds them)."""
        cfg = self.config
        if method == "l_plus_s":
            return baselines.l_plus_s(dc, cfg.ls_iters, cfg.ls_lambda_l, cfg.ls_lambda_s, cfg.ls_tol, callback)
        return baselines.llr_ttv(dc, iters or cfg.llr_iters, reg * cfg.llr_lambda, reg * cfg.ttv_weight(accel),
                                 cfg.llr_block, cfg.llr_rho, cfg.llr_cg_iters, seed=seed,
                                 callback=callback, state=state, cyclic=bool(cfg.ttv_cyclic))

    def _scale(self, k, m, maps) -> torch.Tensor:
        """Robust percentile of the time-averaged coil-combined image (no reference used)."""
        avg = ifft2c(time_averaged_kspace(k, m))
        img = (maps.conj() * avg[:, None] if maps.dim() == 4 else maps.conj() * avg).sum(0) if maps is not None else avg[0]
        mag = img.abs().flatten()
        if not torch.isfinite(mag).all():  # (it used to end as "the data have no signal")
            raise FloatingPointError("the time-averaged coil-combined image is not finite: the k-space values "
                                     "overflow single precision on the way (samples of 1e19 or more?)")
        scale = torch.quantile(mag, self.config.scale_percentile / 100.0) if mag.numel() <= 2**24 else mag.max()
        if not scale > 0:
            if float(mag.max()) > 0:  # a signal, but the percentile falls in the empty background
                raise ValueError(f"the time-averaged image's {self.config.scale_percentile:g}th percentile is zero "
                                 "(scale_percentile too low for this image's background)")
            raise ValueError("the data have no signal (time-averaged image is zero)")
        return scale


_GPU_CAPS: dict = {}  # device -> the cap applied (GiB), so that it is set once


def cap_gpu_memory(device, gb: float) -> Optional[str]:
    """Cap what this process may allocate on the CUDA ``device`` at ``gb`` GiB (the server
    setting ``gpu_memory_gb``; 0: no cap), through torch's per-process memory fraction: beyond
    it an allocation fails as out of memory instead of taking memory the scanner's other GPU
    software needs. Returns a line for the log when it sets a new cap, else None."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if _GPU_CAPS.get(device, 0) == gb:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 2**30 / total) if gb > 0 else 1.0, device)
    _GPU_CAPS[device] = gb
    return (f"GPU memory capped at {gb:.3g} GiB of the {total / 2**30:.3g} GiB of {device} (gpu_memory_gb)"
            if gb > 0 else f"GPU memory cap on {device} lifted")
