"""The DD-UGM dual-domain predictor-corrector sampler (one function, no I/O).

State: the coil-combined k-space of all frames ``[frame, ky, kx]`` (normalised scale).
Every network call sees all frames as one batch; the low-rank step ties the frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .consistency import DataConsistency
from .lowrank import LowRankProjector
from .operators import HankelLift, KWeight, fft2c, ifft2c
from .sde import VESDE

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 1000
    sigma_min: float = 0.01
    sigma_max: float = 4.0
    eps: float = 1e-5
    snr: float = 0.075
    kspace_sigma_scale: float = 1.0  # k-space noise levels = this x the image ones
    fusion: float = 0.75             # weight of the low-rank k-space in the fused estimate
    rank: int = 54
    window: int = 6
    lowrank_solver: str = "exact"    # exact (eigh every step) or subspace (warm-started power iteration)
    correctors: bool = True          # the Langevin corrector steps (3 and 7); without them 2 network calls a step


def _randn(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return VESDE.noise(like.shape, generator, like.device)


def _frame_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.flatten(1), dim=1)[:, None, None]


def reverse_diffusion(x, score: Score, sigma, sigma_next, generator, add_noise=True):
    """VE reverse-diffusion predictor: x + (s^2 - s'^2) score + sqrt(s^2 - s'^2) z."""
    g2 = sigma**2 - sigma_next**2
    mean = x + g2 * score(x, sigma)
    return mean + g2.sqrt() * _randn(x, generator) if add_noise else mean


def langevin(x, score: Score, sigma, snr: float, generator, add_noise=True):
    """Annealed Langevin corrector with the step set by the signal-to-noise ratio (per frame)."""
    grad = score(x, sigma)
    z = _randn(x, generator)
    step = 2 * (snr * _frame_norm(z) / _frame_norm(grad).clamp(min=1e-12)) ** 2
    mean = x + step * grad
    return mean + (2 * step).sqrt() * z if add_noise else mean


def ddugm_sample(k0: torch.Tensor, dc: DataConsistency, score_k: Score, score_i: Score,
                 weight: KWeight, settings: SamplerSettings, generator: torch.Generator,
                 callback: Optional[Callable[[int, int], None]] = None,
                 trace: Optional[Callable[[dict], None]] = None) -> torch.Tensor:
    """Reconstruct images ``[frame, y, x]`` from a data-consistent start ``k0`` ``[frame, ky, kx]``.

    ``trace``, if given, is called once a step with the noise levels the two networks are
    told and the inputs they get (weighted k-space, image), so that a caller who knows
    the truth can measure whether the noise model holds (``ddugm evaluate --trace``)."""
    s = settings
    sde = VESDE(s.sigma_min, s.sigma_max)
    sigmas = sde.discrete_sigmas(s.steps, s.eps, device=k0.device)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    project = LowRankProjector(HankelLift(tuple(k0.shape), s.window, device=k0.device), s.rank, s.lowrank_solver)
    ks = s.kspace_sigma_scale

    # start: the measured data plus noise at the first level, made consistent again
    k = dc.kspace(weight.unweight(weight(k0) + ks * sigmas[0] * _randn(k0, generator), k0))
    for i in range(s.steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        last = i == s.steps - 1  # the final step returns the noise-free mean
        sig_c = sigma_next if not last else sigma  # corrector level: what remains after the predictor
        # 1-2. k-space predictor on the weighted k-space; unweight, data consistency, reweight
        kw_in = weight(k)
        kw = reverse_diffusion(kw_in, score_k, ks * sigma, ks * sigma_next, generator, not last)
        k = dc.kspace(weight.unweight(kw, k))
        # 3-4. k-space Langevin corrector; unweight, data consistency
        if s.correctors:
            kw = langevin(weight(k), score_k, ks * sig_c, s.snr, generator, not last)
            k = dc.kspace(weight.unweight(kw, k))
        # 5. structured low-rank step over all frames; data consistency
        k_lr = dc.kspace(project(k))
        # 6-7. image predictor and corrector, each followed by data consistency
        x_in = ifft2c(k_lr)
        if trace is not None:
            trace({"step": i, "sigma": float(sigma), "kspace_sigma": float(ks * sigma), "kspace_input": kw_in,
                   "image_input": x_in})
        x = dc.image(reverse_diffusion(x_in, score_i, sigma, sigma_next, generator, not last))
        if s.correctors:
            x = dc.image(langevin(x, score_i, sig_c, s.snr, generator, not last))
        # 8. fuse the two domains; both chains restart from the fused estimate
        k = dc.kspace(s.fusion * k_lr + (1 - s.fusion) * fft2c(x))
        if callback is not None:
            callback(i + 1, s.steps)
    return ifft2c(k)


XT_PLANES = ("both", "alternate")  # PnPSettings.xt_planes (ReconConfig.pnp_xt_planes)
PHASES = ("none", "mean")  # PnPSettings.phase (ReconConfig.pnp_phase)


@dataclass(frozen=True)
class PnPSettings:
    """The plug-and-play sampler (``sampler: pnp``): per noise level one Tweedie denoising of
    every frame by the image prior, then ``inner`` ADMM iterations of LLR + temporal TV with
    data consistency and gamma / 2 ||x - denoised||^2 (DiffPIR / DDS-style; re-noising with
    ``eta`` is optional and measured worse). ``llr`` holds the ADMM's weights, which the
    reconstructor sets to ``pnp_reg_scale`` times those of the start.
    With ``xt_weight`` > 0 the anchor blends in the Tweedie denoising by the spatio-temporal
    (x-t / y-t plane) prior: ``(1 - xt_weight) D_frame + xt_weight D_xt``; with ``xt_planes``
    ``alternate`` it scores the x-t planes at even levels and the y-t planes at odd ones."""

    steps: int = 5
    sigma_max: float = 0.05
    sigma_min: float = 0.01
    gamma: float = 0.1
    inner: int = 5
    xt_weight: float = 0.0
    eta: float = 0.0       # re-noising: the networks see x + eta * sigma * z (fresh z each level)
    ensemble: int = 1      # flips averaged per denoising: 1 (none), 2 (x), 4 (x, y, both)
    keep_duals: bool = True   # carry the ADMM iterates (duals) from level to level instead of restarting
    xt_planes: str = "alternate"  # plane prior: one orientation a level (x-t at even levels, y-t at odd), or "both" each level
    phase: str = "none"    # "mean": the priors see the cine turned so that its sum is real and positive
    llr: dict | None = None  # keyword arguments of baselines.llr_ttv (thresholds, block, rho, cg_iters)


def _flip_dims(n: int) -> list[tuple[int, ...]]:
    if n not in (1, 2, 4):
        raise ValueError(f"ensemble must be 1, 2 or 4, got {n}")
    return [(), (-1,), (-2,), (-2, -1)][:n]


def _turn(x: torch.Tensor) -> torch.Tensor:
    """The unit complex number of the sum of ``x`` (1 where the sum is 0)."""
    s = x.sum()
    return torch.where(s == 0, torch.ones_like(s), torch.sgn(s))


def pnp_denoise(x: torch.Tensor, sigma: float, score_i: Optional[Score], score_xt: Optional[Score],
                xt_weight: float, ensemble: int = 1, planes: str = "both", phase: str = "none") -> torch.Tensor:
    """Tweedie denoising D(x) = x + sigma^2 score(x, sigma) of all frames ``[frame, y, x]``:
    the frame prior, the plane prior or their blend, averaged over ``ensemble`` spatial flips
    (the priors are trained with flips, so each flip is an equally valid denoiser). ``planes``
    goes to the plane prior (:class:`~ddugm_core.networks.PlaneScore`) where not ``both``.
    ``phase`` ``mean``: the priors score the cine turned so that its sum is real and positive
    (the global phase they saw most in training), and the result is turned back. Turning
    each frame and each plane on its own instead measured the same (+0.005 dB on validation)."""
    if phase == "mean":  # no host read
        turn = _turn(x)
        return pnp_denoise(x * turn.conj(), sigma, score_i, score_xt, xt_weight, ensemble, planes) * turn
    w = xt_weight
    out = 0
    dims = _flip_dims(ensemble)
    for d in dims:
        xf = x.flip(d) if d else x
        score = 0
        if w < 1:
            score = (1 - w) * score_i(xf, sigma)
        if w > 0:
            score = score + w * (score_xt(xf, sigma) if planes == "both" else score_xt(xf, sigma, planes))
        out = out + (score.flip(d) if d else score)
    return x + sigma ** 2 * out / len(dims)


def pnp_sample(x0: torch.Tensor, dc: DataConsistency, score_i: Optional[Score], settings: PnPSettings,
               callback: Optional[Callable[[int, int], None]] = None,
               trace: Optional[Callable[[dict], None]] = None, score_xt: Optional[Score] = None,
               generator: Optional[torch.Generator] = None, state: Optional[dict] = None) -> torch.Tensor:
    """Refine a classical estimate ``x0`` ``[frame, y, x]`` with the priors: a geometric
    schedule sigma_max -> sigma_min; at each level the denoised frames D(x) (all frames one
    batch; :func:`pnp_denoise`) anchor the next ADMM iterations, warm-started at x. With
    ``eta`` > 0 the networks see x plus fresh Gaussian noise of std eta * sigma (DDS-style
    re-noising; needs ``generator``). With ``xt_planes`` ``alternate`` (the default) ``score_xt``
    is called as ``score_xt(x, sigma, "xt" | "yt")`` (:class:`~ddugm_core.networks.PlaneScore`
    takes that third argument). With ``keep_duals`` the ADMM iterates carry from level to
    level, starting from ``state`` (the dict :func:`baselines.llr_ttv` filled while computing
    ``x0``) where given."""
    from .baselines import llr_ttv

    s = settings
    w = s.xt_weight
    if not 0 <= w <= 1 or (w > 0 and score_xt is None) or (w < 1 and score_i is None):
        raise ValueError(f"xt_weight {w} needs the frame prior (below 1) and the plane prior (above 0)")
    if s.eta < 0 or (s.eta > 0 and generator is None):
        raise ValueError(f"eta must be >= 0 (and > 0 needs a generator), got {s.eta}")
    _flip_dims(s.ensemble)
    if s.xt_planes not in XT_PLANES:
        raise ValueError(f"xt_planes must be one of {XT_PLANES}, got {s.xt_planes!r}")
    if s.phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {s.phase!r}")
    sigmas = VESDE(s.sigma_min, s.sigma_max).discrete_sigmas(s.steps, 0.0)
    x = x0
    state = (state if state is not None else {}) if s.keep_duals else None
    for i, sigma in enumerate(sigmas.tolist()):
        x_in = x + (s.eta * sigma) * _randn(x, generator) if s.eta > 0 else x
        planes = "both" if s.xt_planes == "both" else ("xt", "yt")[i % 2]
        # gamma 0: no prior in the objective, so no network call (the classical continuation)
        denoised = pnp_denoise(x_in, sigma, score_i, score_xt, w, s.ensemble, planes, s.phase) if s.gamma > 0 else None
        if trace is not None:  # the networks' input and their denoised anchor (None without a prior)
            trace({"step": i, "sigma": sigma, "image_input": x_in, "anchor": denoised})
        # the caller's callback is polled after every inner iteration too, the count staying at the
        # levels done: a level of pnp_inner iterations (up to a server's max_iterations) is long
        poll = None if callback is None else (lambda j, m, i=i: callback(i, s.steps))
        x = llr_ttv(dc, s.inner, **(s.llr or {}), seed=i + 1, x0=x, anchor=denoised, gamma=s.gamma,
                    state=state, callback=poll)
        if callback is not None:
            callback(i + 1, s.steps)
    return x
