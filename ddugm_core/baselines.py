"""Classical reconstructions that need no network: zero-filled, low-rank-only and L+S.

All take the same :class:`~ddugm_core.consistency.DataConsistency` as the sampler, so
single- and multi-coil data go through one code path. They are the demo's references and
the fallback when a score-based reconstruction cannot run. L+S is the compressed-sensing
reference users compare with (Otazo, Candes, Sodickson, MRM 2015).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .consistency import DataConsistency, conjugate_gradient
from .lowrank import LowRankProjector
from .operators import HankelLift, fft2c, ifft2c
from .profiling import stage


def zero_filled(dc: DataConsistency) -> torch.Tensor:
    """Coil-combined inverse FFT of the zero-filled k-space ``[frame, y, x]``."""
    return dc.adjoint_image()


def low_rank(dc: DataConsistency, iters: int = 50, rank: int = 54, window: int = 6,
             callback: Optional[Callable[[int, int], None]] = None, solver: str = "exact",
             momentum: float = 0.0) -> torch.Tensor:
    """Structured low-rank reconstruction: alternate the block-Hankel rank-r projection
    of all frames' k-space with data consistency, from the zero-filled start.

    With ``momentum`` beta > 0 each projection acts on the extrapolated iterate
    k_n + beta (k_n - k_{n-1}) (heavy-ball acceleration of the alternating projections):
    the plain alternation converges slowly (its PSNR still rises after 50 iterations on
    real cine), and beta = 0.8 reaches in 20 iterations what it reaches in 50 (README,
    "Low-rank only")."""
    k = fft2c(dc.image(zero_filled(dc)))
    project = LowRankProjector(HankelLift(tuple(k.shape), window, device=k.device), rank, solver)
    y = k
    for i in range(iters):
        k_new = dc.kspace(project(y))
        y = k_new + momentum * (k_new - k) if momentum > 0 else k_new
        k = k_new
        if callback is not None:
            callback(i + 1, iters)
    return ifft2c(k)


def soft_threshold(x: torch.Tensor, lam) -> torch.Tensor:
    """Complex soft thresholding: shrink |x| by ``lam``, keep the phase."""
    mag = x.abs()
    return x * (torch.clamp(mag - lam, min=0) / torch.where(mag > 0, mag, torch.ones_like(mag)))


def singular_value_threshold(x: torch.Tensor, lam_rel: float) -> torch.Tensor:
    """SVT of the Casorati matrix of ``x`` ``[frame, y, x]`` (pixels x frames): singular
    values shrink by ``lam_rel`` times the largest one. Computed from the small Gram matrix
    C^H C (frames x frames, eigendecomposed in double precision on the host: a solver for
    such a tiny matrix is faster there than launched on a GPU), so no pixel-sized SVD."""
    t = x.shape[0]
    c = x.reshape(t, -1).T  # [pixels, frames]
    gram = (c.mH @ c).to(device="cpu", dtype=torch.complex128)
    evals, v = torch.linalg.eigh(gram)
    sv = evals.clamp(min=0).sqrt()
    smax = sv[-1]
    if not smax > 0:
        return torch.zeros_like(x)
    keep = torch.where(sv > 1e-10 * smax, torch.clamp(sv - lam_rel * smax, min=0) / sv.clamp(min=1e-300), 0.0)
    proj = ((v * keep) @ v.mH).to(device=x.device, dtype=x.dtype)  # V diag(max(s - lam, 0) / s) V^H
    return (c @ proj).T.reshape(x.shape)


def temporal_ft(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Fourier transform along the frame axis (the sparsifying transform of L+S)."""
    return torch.fft.fft(x, dim=0, norm="ortho")


def temporal_ift(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft(x, dim=0, norm="ortho")


def l_plus_s(dc: DataConsistency, iters: int = 50, lambda_l: float = 0.01, lambda_s: float = 0.02,
             tol: float = 0.0025, callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Low-rank plus sparse reconstruction (Otazo et al., MRM 2015, their Algorithm 1).

    x = L + S with L low rank (SVT of the Casorati matrix, threshold ``lambda_l`` relative
    to the largest singular value) and S sparse in temporal Fourier (soft threshold
    ``lambda_s``, absolute, in the normalised units the reconstructor works in), with a
    SENSE data-consistency step M = L + S - E^H (E (L + S) - d). Stops after ``iters``
    iterations or when the relative update falls below ``tol``.
    """
    m = zero_filled(dc)
    s = torch.zeros_like(m)
    l_prev = m
    for i in range(iters):
        m0 = m
        with stage("low-rank"):
            low = singular_value_threshold(m - s, lambda_l)
        s = temporal_ift(soft_threshold(temporal_ft(m - l_prev), lambda_s))
        m = dc.image(low + s)
        l_prev = low
        if callback is not None:
            callback(i + 1, iters)
        change = torch.linalg.vector_norm(m - m0) / torch.linalg.vector_norm(m0).clamp(min=1e-30)
        if tol > 0 and change < tol:
            if callback is not None:
                callback(iters, iters)
            break
    return m


# ---------------------------------------------------------------------- LLR + temporal TV
def temporal_diff(x: torch.Tensor, cyclic: bool = False) -> torch.Tensor:
    """Forward differences along the frame axis: ``[T, y, x] -> [T - 1, y, x]``, or, with
    ``cyclic`` (a cine that covers one whole cardiac cycle: its last frame neighbours its
    first), ``[T, y, x]`` including x_0 - x_{T-1}. Not cyclic by default: a real-time series
    need not be periodic."""
    if cyclic:
        return torch.roll(x, -1, dims=0) - x
    return x[1:] - x[:-1]


def temporal_diff_adjoint(d: torch.Tensor, cyclic: bool = False) -> torch.Tensor:
    """Adjoint of :func:`temporal_diff` (same ``cyclic``), back to ``[T, y, x]``."""
    if cyclic:
        return torch.roll(d, 1, dims=0) - d
    zero = torch.zeros_like(d[:1])
    return torch.cat([zero, d]) - torch.cat([d, zero])


def singular_value_soft_threshold(a: torch.Tensor, threshold: float) -> torch.Tensor:
    """U max(S - threshold, 0) V^H of every matrix of the batch ``a`` ``[n, m, t]``, through
    the eigendecomposition of the smaller Gram matrix (A^H A = V S^2 V^H, so the result is
    A V diag(max(s - threshold, 0) / s) V^H) rather than an SVD: 2x faster on the 2-core CPU
    for the 8 x 8-pixel tiles of a cine (256 tiles x 64 pixels x 25 frames: 63 -> 32 ms), the
    same result to about 1e-6 of the largest singular value on such tiles, 2e-5 on an
    ill-conditioned one (float32 Gram matrices; a test compares it with the SVD)."""
    m, t = a.shape[-2:]
    tall = t <= m
    g = a.mH @ a if tall else a @ a.mH
    lam, v = torch.linalg.eigh(g)
    s = lam.clamp(min=0).sqrt()
    f = torch.where(s > threshold, 1 - threshold / torch.clamp(s, min=torch.finfo(s.dtype).tiny), 0.0)
    p = (v * f.unsqueeze(-2).to(v.dtype)) @ v.mH
    return a @ p if tall else p @ a


def locally_low_rank(x: torch.Tensor, threshold: float, block: int, shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Proximal step of the locally low-rank penalty: singular-value soft thresholding of
    the Casorati matrix (block pixels x frames) of every ``block`` x ``block`` tile of
    ``x`` ``[T, y, x]``. The tiling is shifted cyclically by ``shift`` (random shifts from one
    iteration to the next avoid block artefacts, as in Trzasko & Manduca 2011); the image
    is zero-padded to whole tiles. ``threshold`` is absolute."""
    t, ny, nx = x.shape
    # a tile larger than the image is the whole image: the padding's zero rows change no singular
    # value, so the result is the same, and a client's llr_block of 20000 no longer pads a 24 x 24
    # cine to 20000 x 20000 (the server was killed for memory)
    block = max(1, min(int(block), max(ny, nx)))
    z = torch.roll(x, shifts=shift, dims=(-2, -1))
    py, px = (-ny) % block, (-nx) % block
    if py or px:
        z = torch.nn.functional.pad(torch.view_as_real(z).permute(3, 0, 1, 2), (0, px, 0, py))
        z = torch.complex(z[0], z[1])
    by, bx = z.shape[-2] // block, z.shape[-1] // block
    tiles = z.reshape(t, by, block, bx, block).permute(1, 3, 2, 4, 0).reshape(by * bx, block * block, t)
    tiles = singular_value_soft_threshold(tiles, threshold)
    z = tiles.reshape(by, bx, block, block, t).permute(4, 0, 2, 1, 3).reshape(t, by * block, bx * block)
    z = z[:, :ny, :nx]
    return torch.roll(z, shifts=(-shift[0], -shift[1]), dims=(-2, -1))


def llr_ttv(dc: DataConsistency, iters: int = 40, lambda_llr: float = 0.01, lambda_tv: float = 0.01,
            block: int = 8, rho: float = 0.5, cg_iters: int = 3, seed: int = 0,
            callback: Optional[Callable[[int, int], None]] = None, x0: Optional[torch.Tensor] = None,
            anchor: Optional[torch.Tensor] = None, gamma: float = 0.0,
            state: Optional[dict] = None, cyclic: bool = False) -> torch.Tensor:
    """Locally low-rank plus temporal total variation, by ADMM (the regularisers of BART's
    ``pics -R L`` and ``-R T``, together; our own implementation).

    minimise 1/2 ||A x - y||^2 + lambda_llr sum_tiles ||tile(x)||_* + lambda_tv ||D_t x||_1

    with the splitting z1 = x, z2 = D_t x. The x-update solves
    (A^H A + rho I + rho D_t^H D_t) x = A^H y + rho (z1 - u1) + rho D_t^H (z2 - u2)
    with ``cg_iters`` warm-started conjugate-gradient steps. The singular-value threshold
    of a tile is ``lambda_llr`` times (block + sqrt(frames)), the size of the largest
    singular value of a tile of unit-variance noise, so that one ``lambda_llr`` suits any
    frame count; ``lambda_tv`` is in the normalised image units the reconstructor works in.
    Tiles are shifted randomly each iteration (``seed``: deterministic). With ``cyclic`` the
    temporal TV also ties the last frame to the first (:func:`temporal_diff`).

    With ``anchor`` and ``gamma`` > 0 the objective gets gamma / 2 ||x - anchor||^2 (the
    plug-and-play step of the sampler: the anchor is a denoised estimate); ``x0`` is the start
    (default: the zero-filled image).

    ``state``, a dict, carries the ADMM iterates between calls: where it holds them (``x``,
    ``z1``, ``u1``, ``z2``, ``u2``, from an earlier call on the same problem) they are the
    start, instead of ``x0`` with zero dual variables; on return it holds the final ones. A
    restart with zero duals forgets the regularisers' pull and costs accuracy (the sampler
    calls this once per noise level).
    """
    t = dc.mask.shape[0]
    ahy = dc.adjoint()
    if anchor is not None and gamma > 0:
        ahy = ahy + gamma * anchor
    else:
        gamma = 0.0
    # normal(x) of the current x, kept from one x-update to the next (and between calls, for the
    # same operator: rho, gamma, cyclic): one Gram-operator call less per iteration
    operator = (dc, float(rho), float(gamma), bool(cyclic))
    cg_state: dict = {}
    if state and "x" in state:
        x, z1, u1, z2, u2 = (state[k] for k in ("x", "z1", "u1", "z2", "u2"))
        if state.get("operator") == operator:  # dc compares by identity
            cg_state["nx"] = state.get("nx")
    else:
        x = zero_filled(dc) if x0 is None else x0
        z1, u1 = x.clone(), torch.zeros_like(x)
        z2 = temporal_diff(x, cyclic) if t > 1 else x[:0]
        u2 = torch.zeros_like(z2)
    block = max(1, min(block, *x.shape[-2:]))
    thr = lambda_llr * (block + t ** 0.5) / rho
    gen = torch.Generator().manual_seed(int(seed))

    def normal(v):
        out = dc.normal(v) + (rho + gamma) * v
        return out + rho * temporal_diff_adjoint(temporal_diff(v, cyclic), cyclic) if t > 1 else out

    for i in range(iters):
        rhs = ahy + rho * (z1 - u1)
        if t > 1:
            rhs = rhs + rho * temporal_diff_adjoint(z2 - u2, cyclic)
        x = conjugate_gradient(normal, rhs, x, cg_iters, cg_state)
        shift = tuple(int(v) for v in torch.randint(0, block, (2,), generator=gen))
        with stage("low-rank"):
            z1 = locally_low_rank(x + u1, thr, block, shift) if lambda_llr > 0 else x + u1
        u1 = u1 + x - z1
        if t > 1:
            dx = temporal_diff(x, cyclic)
            z2 = soft_threshold(dx + u2, lambda_tv / rho)
            u2 = u2 + dx - z2
        if callback is not None:
            callback(i + 1, iters)
    if state is not None:
        state.update(x=x, z1=z1, u1=u1, z2=z2, u2=u2, nx=cg_state.get("nx"), operator=operator)
    return x

