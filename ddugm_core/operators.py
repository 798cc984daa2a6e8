"""Linear operators of the DD-UGM forward model, each with its adjoint.

Conventions (used everywhere in the package): complex64, centred k-space (DC at index
n // 2), orthonormal FFT; k-space ``[coil, frame, ky, kx]``, images ``[frame, y, x]``,
masks ``[frame, ky, kx]`` (a ``[frame, ky]`` line mask is expanded by :func:`expand_mask`).

Operators compose with ``@`` and expose their adjoint as ``.H``, so the multi-coil
forward model reads ``A = M @ F @ S`` and its adjoint ``A.H``.
"""
from __future__ import annotations

import math

import torch


class LinearOperator:
    """A linear map with an adjoint. Subclasses implement ``forward`` and ``adjoint``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    @property
    def H(self) -> "LinearOperator":
        return _Adjoint(self)

    def __matmul__(self, other: "LinearOperator") -> "LinearOperator":
        return _Composition(self, other)


class _Adjoint(LinearOperator):
    def __init__(self, op: LinearOperator):
        self.op = op

    def forward(self, x):
        return self.op.adjoint(x)

    def adjoint(self, y):
        return self.op.forward(y)

    @property
    def H(self):
        return self.op


class _Composition(LinearOperator):
    def __init__(self, outer: LinearOperator, inner: LinearOperator):
        self.outer, self.inner = outer, inner

    def forward(self, x):
        return self.outer.forward(self.inner.forward(x))

    def adjoint(self, y):
        return self.inner.adjoint(self.outer.adjoint(y))


# --------------------------------------------------------------------------- FFT
def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two axes (image -> centred k-space)."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c` (centred k-space -> image); also its adjoint."""
    k = torch.fft.ifftshift(k, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.ifft2(k, norm="ortho"), dim=(-2, -1))


def fft1c(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Centred orthonormal 1D FFT along ``dim`` (the 2D one is this along both axes)."""
    x = torch.fft.ifftshift(x, dim=dim)
    return torch.fft.fftshift(torch.fft.fft(x, dim=dim, norm="ortho"), dim=dim)


def ifft1c(k: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse (and adjoint) of :func:`fft1c`."""
    k = torch.fft.ifftshift(k, dim=dim)
    return torch.fft.fftshift(torch.fft.ifft(k, dim=dim, norm="ortho"), dim=dim)


class FFT2(LinearOperator):
    """Centred orthonormal 2D Fourier transform on the last two axes. Unitary: F^H = F^-1."""

    def forward(self, x):
        return fft2c(x)

    def adjoint(self, y):
        return ifft2c(y)


# --------------------------------------------------------------------------- mask
def expand_mask(mask: torch.Tensor, shape_ky_kx: tuple[int, int]) -> torch.Tensor:
    """Return a ``[frame, ky, kx]`` mask from a ``[frame, ky]`` or ``[frame, ky, kx]`` one."""
    if mask.dim() == 2:
        mask = mask[:, :, None].expand(-1, -1, shape_ky_kx[1])
    return mask


class Mask(LinearOperator):
    """Sampling operator: multiplies k-space ``[..., frame, ky, kx]`` by a 0/1 mask.

    Kept in the full k-space grid (zeros where not sampled), so it is self-adjoint and a
    projection: M^H = M, M M = M.
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def forward(self, x):
        return x * self.mask

    def adjoint(self, y):
        return y * self.mask


# --------------------------------------------------------------------------- coils
class Sense(LinearOperator):
    """Coil sensitivity operator S: image ``[frame, y, x]`` -> coil images ``[coil, frame, y, x]``.

    ``maps`` is ``[coil, y, x]`` (static) or ``[coil, frame, y, x]``. Adjoint: sum_c conj(S_c) y_c.
    """

    def __init__(self, maps: torch.Tensor):
        self.maps = maps if maps.dim() == 4 else maps[:, None]

    def forward(self, x):
        return self.maps * x[None]

    def adjoint(self, y):
        return (self.maps.conj() * y).sum(0)

    def normal_diagonal(self) -> torch.Tensor:
        """S^H S, a real diagonal ``[1 or frame, y, x]``."""
        return (self.maps.abs() ** 2).sum(0)


# --------------------------------------------------------------------------- k-space weighting
#: Weight at the midpoint of the k-space edge, as in the published code (0.011 / 96 per
#: sample for 192 x 192 with an unnormalised FFT); see :func:`kspace_weight`.
KSPACE_WEIGHT_EDGE = 0.011


def kspace_weight(ny: int, nx: int, edge: float = KSPACE_WEIGHT_EDGE, device=None) -> torch.Tensor:
    """Linear radial ramp W(k) = c |k| on the centred grid, zero at the centre (ny//2, nx//2).

    The published code uses ``W = 0.011 * |k| / 96`` on 192 x 192 k-space from an
    unnormalised FFT. With our orthonormal FFT the same weighted values need an extra
    factor sqrt(ny * nx). The radius is normalised per axis (1.0 at the midpoint of each
    edge), so non-square matrices get the same edge weight on both axes.
    """
    ky = (torch.arange(ny, device=device, dtype=torch.float32) - ny // 2) / (ny / 2)
    kx = (torch.arange(nx, device=device, dtype=torch.float32) - nx // 2) / (nx / 2)
    r = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    return edge * math.sqrt(ny * nx) * r


class KWeight(LinearOperator):
    """Diagonal k-space weighting by W (real, non-negative). Self-adjoint.

    :meth:`unweight` is its inverse on W > 0; where W = 0 (the k-space centre) it puts
    back the given fill value (the measured or current sample), since W kills it.
    """

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self._zero = weight == 0
        safe = torch.where(self._zero, torch.ones_like(weight), weight)
        self._inv = torch.where(self._zero, torch.zeros_like(weight), 1.0 / safe)

    def forward(self, x):
        return x * self.weight

    def adjoint(self, y):
        return y * self.weight

    def unweight(self, kw: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        return torch.where(self._zero, fill, kw * self._inv)


# --------------------------------------------------------------------------- Hankel lifting
class HankelLift(LinearOperator):
    """SAKE-style block-Hankel lifting of multi-frame k-space.

    A ``w x w`` window slides over (ky, kx) of ``[frame, ky, kx]`` data; the frames are
    channels. ``forward`` gives the matrix ``[positions, frame * w * w]``; ``adjoint`` sums
    the entries back onto the grid; :meth:`average` is the adjoint divided by the number of
    windows covering each k-space sample (the least-squares inverse of the lifting).
    """

    def __init__(self, shape: tuple[int, int, int], window: int = 6, device=None):
        t, ny, nx = shape
        if ny < window or nx < window:
            raise ValueError(f"k-space {ny}x{nx} is smaller than the low-rank window {window}")
        self.shape, self.window = (t, ny, nx), window
        def cover(n):  # how many window positions along an axis of length n cover each index
            i = torch.arange(n, device=device)
            return (torch.clamp(i, max=n - window) - torch.clamp(i - window + 1, min=0) + 1).float()

        self._inv_mult = 1.0 / (cover(ny)[:, None] * cover(nx)[None, :])

    # Both directions move whole shifted copies of the frames, one per window offset (36
    # slices for 6 x 6), instead of unfold / fold: on the 2-core CPU the lifting of
    # 30 x 256 x 208 k-space takes 0.33 s instead of 0.75 s and its adjoint 0.02 s instead of 0.76 s.
    def _offsets(self):
        w = self.window
        return [(dy, dx) for dy in range(w) for dx in range(w)]

    def forward(self, x):
        """``[frame, ky, kx]`` -> ``[positions, frame * w * w]`` (a transposed view of a
        contiguous ``[frame * w * w, positions]`` matrix; columns ordered frame, dy, dx)."""
        t, ny, nx = self.shape
        w = self.window
        p, q = ny - w + 1, nx - w + 1
        cols = torch.stack([x[:, dy:dy + p, dx:dx + q] for dy, dx in self._offsets()], dim=1)
        return cols.reshape(t * w * w, p * q).mT

    def adjoint(self, y):
        """``[positions, frame * w * w]`` -> ``[frame, ky, kx]`` (sums overlapping windows).
        Fastest when ``y.mT`` is contiguous, as :meth:`forward`'s output is."""
        t, ny, nx = self.shape
        w = self.window
        p, q = ny - w + 1, nx - w + 1
        cols = y.mT.reshape(t, w, w, p, q)
        out = torch.zeros((t, ny, nx), dtype=y.dtype, device=y.device)
        for dy, dx in self._offsets():
            out[:, dy:dy + p, dx:dx + q] += cols[:, dy, dx]
        return out

    def average(self, y):
        return self.adjoint(y) * self._inv_mult
