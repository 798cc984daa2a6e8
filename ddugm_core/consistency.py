"""Data consistency: bring an estimate back into agreement with the measured samples.

Single coil (no maps): the exact projection, measured k-space samples put back.
Multi-coil, SENSE model A = M F S, two modes:

- ``replace`` (default): expand to coil images, put the measured coil k-space samples
  back, combine with (S^H S)^-1 S^H. With normalised maps this is one gradient step of
  step 1 on ||A x - y||^2. It is exact for single coil and for full sampling, and it
  does not drift when applied again and again, as the sampler does six times a step.
- ``cg``: a few conjugate-gradient steps on (A^H A + lam I) x = A^H y + lam x0,
  warm-started at x0. Closer to the least-squares fit per call, but repeated calls
  converge to the (noise-amplifying) unregularised SENSE solution: measured on the demo,
  33.6 dB -> 32.0 dB after one extra call on an already consistent estimate.

Cartesian line masks (the same along kx, as every 2D cine acquisition has) let ``replace``
work in hybrid (ky, x) space: the data are transformed along kx once, and each call needs
only 1D FFTs along y, the same result for half the FFT work (measured: 16 coils, 30 frames,
256 x 208 on the 2-core CPU, 0.99 -> 0.61 s a call). Other masks use the 2D FFT.
"""
from __future__ import annotations

import torch

from .operators import FFT2, Mask, Sense, fft1c, fft2c, ifft1c, ifft2c
from .profiling import stage

#: On a CPU the Gram operator works on groups of coils of at most this many elements where
#: all coils together exceed twice as many: with all coils at once the cine16 bench case
#: (16 coils, 30 x 256 x 208) made 200 MB temporaries that glibc maps fresh from the kernel
#: each call (784 ms a call on the 2-core CPU, one coil at a time 320 ms; the whole case
#: 280 -> 193 s). The cine8 case (8 coils, 25 x 128 x 128, 26 MB) stays in one group, which
#: measured a little faster than groups there. On CUDA all coils go at once.
CPU_COIL_GROUP = 1 << 21


class DataConsistency:
    """Measured k-space ``y`` ``[coil, frame, ky, kx]`` (zeros where not sampled), mask ``[frame, ky, kx]``."""

    def __init__(self, y: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor | None = None,
                 cg_iters: int = 5, lam: float = 0.0, mode: str = "replace"):
        if mode not in ("replace", "cg"):
            raise ValueError(f"data consistency mode must be 'replace' or 'cg', got {mode!r}")
        self.mode = mode
        self.mask = mask.to(y.real.dtype)
        self.maps = maps
        self.cg_iters, self.lam = cg_iters, lam
        if maps is None:
            if y.shape[0] != 1:
                raise ValueError("multi-coil data needs coil maps")
            self.y = y[0] * self.mask
            self.A = None
        else:
            self.y = y * self.mask
            self.S = Sense(maps)
            self.A = Mask(self.mask) @ FFT2() @ self.S
            self.Ahy = self.A.H(self.y)
            diag = self.S.normal_diagonal()
            self.support = diag > 0
            self._inv_diag = torch.where(self.support, 1.0 / torch.where(self.support, diag, torch.ones_like(diag)),
                                         torch.zeros_like(diag))
            self._hybrid = None
            if bool((self.mask == self.mask[..., :1]).all()):
                self._hybrid = self._hybrid_setup()

    def _hybrid_setup(self) -> dict:
        """For line masks: measured lines ``[frame, ky, 1]`` and the data transformed along kx.

        For even ny the centring shifts of the FFT along y are folded into the maps and the
        data: centred FFT = s c_k FFT(c_m x) with c = (-1)^index and s = (-1)^(ny/2), so
        with maps c_m S and data s c_k y every call needs plain FFTs only, no shifts. Maps and
        data are stored transposed, y last, so that these FFTs run along contiguous rows: an
        FFT along the second-last axis was 1.8x slower on the 2-core CPU (8 coils x 25 x 128 x
        128: 10.8 against 6.1 ms); transposing the coil-combined image costs far less.
        """
        lines = self.mask[..., :1]
        y_hybrid = ifft1c(self.y, dim=-1)
        ny = self.mask.shape[-2]
        if ny % 2:
            return {"lines": lines, "y": y_hybrid}
        c = 1.0 - 2.0 * (torch.arange(ny, device=self.y.device) % 2).to(self.mask.dtype)[:, None]  # (-1)^index
        sign = -1.0 if (ny // 2) % 2 else 1.0
        maps = (self.S.maps * c).transpose(-1, -2).contiguous()
        return {"lines_t": lines.transpose(-1, -2), "y_t": (sign * c * y_hybrid).transpose(-1, -2).contiguous(),
                "maps_t": maps, "maps_t_conj": maps.conj().resolve_conj()}

    # -- the two entry points used by the sampler
    def kspace(self, k: torch.Tensor) -> torch.Tensor:
        """Project combined k-space ``[frame, ky, kx]``."""
        with stage("data consistency"):
            return self._kspace(k)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """Project an image ``[frame, y, x]``."""
        with stage("data consistency"):
            return self._image(x)

    def _kspace(self, k: torch.Tensor) -> torch.Tensor:
        if self.A is None:
            return torch.where(self.mask > 0, self.y, k)
        return fft2c(self._image(ifft2c(k)))

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        if self.A is None:
            return ifft2c(torch.where(self.mask > 0, self.y, fft2c(x)))
        if self.mode == "replace":
            h = self._hybrid
            if h is not None and "maps_t" in h:  # line mask, even ny: plain 1D FFTs along y (last)
                xt = x.transpose(-1, -2).contiguous()
                coil = torch.where(h["lines_t"] > 0, h["y_t"], torch.fft.fft(h["maps_t"] * xt[None], dim=-1, norm="ortho"))
                out = torch.fft.ifft(coil, dim=-1, norm="ortho").mul_(h["maps_t_conj"]).sum(0)
                return out.transpose(-1, -2).contiguous() * self._inv_diag
            if h is not None:  # line mask, odd ny: centred 1D FFTs along y
                coil = torch.where(h["lines"] > 0, h["y"], fft1c(self.S(x), dim=-2))
                return self.S.adjoint(ifft1c(coil, dim=-2)) * self._inv_diag
            coil_k = torch.where(self.mask > 0, self.y, fft2c(self.S(x)))
            return self.S.adjoint(ifft2c(coil_k)) * self._inv_diag
        return self._cg(x)

    def adjoint_image(self) -> torch.Tensor:
        """A^H y normalised by S^H S: the coil-combined zero-filled image."""
        if self.A is None:
            return ifft2c(self.y)
        return self.Ahy * self._inv_diag

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """A^H A x (single coil: F^H M F x): the Gram operator of the measurement."""
        if self.A is None:
            return ifft2c(self.mask * fft2c(x))
        h = self._hybrid
        if h is not None and "maps_t" in h:  # line mask, even ny: F^H M F = c IFFT_y(M FFT_y(c .))
            group = h["maps_t"].shape[0]
            if x.device.type == "cpu" and group * x.numel() > 2 * CPU_COIL_GROUP:  # see CPU_COIL_GROUP
                group = max(1, CPU_COIL_GROUP // x.numel())
            xt = x.transpose(-1, -2).contiguous()
            out = None
            for m, mc in zip(h["maps_t"].split(group), h["maps_t_conj"].split(group)):
                coil = torch.fft.fft(m * xt[None], dim=-1, norm="ortho").mul_(h["lines_t"])  # in place: fresh
                part = torch.fft.ifft(coil, dim=-1, norm="ortho").mul_(mc).sum(0)
                out = part if out is None else out.add_(part)
            return out.transpose(-1, -2).contiguous()
        if h is not None:  # line mask, odd ny
            return self.S.adjoint(ifft1c(fft1c(self.S(x), dim=-2) * h["lines"], dim=-2))
        return self.A.H(self.A(x))

    def adjoint(self) -> torch.Tensor:
        """A^H y, the unnormalised adjoint of the data (single coil: the zero-filled image)."""
        return ifft2c(self.y) if self.A is None else self.Ahy

    def _normal(self, x):
        out = self.normal(x)
        return out + self.lam * x if self.lam else out

    def _cg(self, x0: torch.Tensor) -> torch.Tensor:
        b = self.Ahy + self.lam * x0 if self.lam else self.Ahy
        return conjugate_gradient(self._normal, b, x0, self.cg_iters)


def conjugate_gradient(normal, b: torch.Tensor, x: torch.Tensor, iters: int,
                       state: dict | None = None) -> torch.Tensor:
    """``iters`` conjugate-gradient steps on normal(x) = b (Hermitian positive semi-definite),
    warm-started at ``x``. A direction with no curvature left gets step 0 (no host reads).

    ``state``, a dict, saves one application of ``normal`` per call where the same operator is
    solved again and again from the previous solution (the x-updates of an ADMM): on return it
    holds ``nx`` = normal(x) of the returned x (kept by the same recurrence as the residual),
    and where it holds one on entry, that is taken as normal(x) of the start ``x``. The caller
    must pass the state only back with that x and the same operator."""
    if state is not None and state.get("nx") is not None:
        nx = state["nx"]
    else:
        nx = normal(x)
    r = b - nx
    p = r
    rr = torch.vdot(r.flatten(), r.flatten()).real
    tiny = 1e-30 + 1e-12 * torch.vdot(b.flatten(), b.flatten()).real
    for _ in range(iters):
        ap = normal(p)
        pap = torch.vdot(p.flatten(), ap.flatten()).real
        alpha = torch.where(pap > tiny, rr / pap.clamp(min=1e-30), torch.zeros_like(rr))
        x = x + alpha * p
        r = r - alpha * ap
        if state is not None:
            nx = nx + alpha * ap
        rr_new = torch.vdot(r.flatten(), r.flatten()).real
        p = r + (rr_new / rr.clamp(min=1e-30)) * p
        rr = rr_new
    if state is not None:
        state["nx"] = nx
    return x
