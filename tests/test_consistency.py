"""Data consistency: the hybrid-space (1D FFT) path for line masks equals the 2D definition."""
import pytest
import torch

from ddugm_core.consistency import DataConsistency
from ddugm_core.operators import fft1c, fft2c, ifft1c, ifft2c

g = torch.Generator().manual_seed(0)


def rc(*shape):
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))


def test_1d_centred_fft_composes_to_the_2d_one():
    x = rc(2, 9, 8)
    assert torch.allclose(fft1c(fft1c(x, -1), -2), fft2c(x), atol=1e-5)
    assert torch.allclose(ifft1c(fft1c(x, -2), -2), x, atol=1e-5)
    assert torch.allclose(ifft1c(ifft1c(x, -2), -1), ifft2c(x), atol=1e-5)


def _by_definition(y, mask, maps, x):
    """S^H F^-1 (M y + (1 - M) F S x) / S^H S on the support, with 2D FFTs."""
    m = maps if maps.dim() == 4 else maps[:, None]
    coil_k = torch.where(mask > 0, y * mask, fft2c(m * x[None]))
    diag = (m.abs() ** 2).sum(0)
    return torch.where(diag > 0, (m.conj() * ifft2c(coil_k)).sum(0) / diag.clamp(min=1e-30), 0)


@pytest.mark.parametrize("ny,nx", [(16, 12), (18, 10), (15, 12), (13, 9)])  # ny/2 even, ny/2 odd, odd ny
@pytest.mark.parametrize("per_frame_maps", [False, True])
def test_line_mask_path_matches_the_definition(ny, nx, per_frame_maps):
    c, t = 3, 4
    maps = rc(c, t, ny, nx) if per_frame_maps else rc(c, ny, nx)
    maps[..., 0, 0] = 0  # a pixel outside every coil's support
    lines = (torch.rand(t, ny, generator=g) < 0.4).float()
    mask = lines[:, :, None].expand(t, ny, nx)
    y, x = rc(c, t, ny, nx), rc(t, ny, nx)
    dc = DataConsistency(y, mask, maps)
    assert dc._hybrid is not None and ("maps_t" in dc._hybrid) != bool(ny % 2)  # even ny: the plain-FFT path
    ref = _by_definition(y, mask, maps, x)
    assert torch.allclose(dc.image(x), ref, atol=1e-4), float((dc.image(x) - ref).abs().max())
    assert torch.allclose(dc.kspace(fft2c(x)), fft2c(ref), atol=1e-4)


def test_other_masks_use_the_2d_path():
    c, t, ny, nx = 2, 3, 12, 10
    mask = (torch.rand(t, ny, nx, generator=g) < 0.5).float()  # not constant along kx
    maps, y, x = rc(c, ny, nx), rc(c, t, ny, nx), rc(t, ny, nx)
    dc = DataConsistency(y, mask, maps)
    assert dc._hybrid is None
    assert torch.allclose(dc.image(x), _by_definition(y, mask, maps, x), atol=1e-4)


@pytest.mark.parametrize("ny,line_mask,group", [(16, True, None), (15, True, None), (16, False, None),
                                                 (16, True, 1), (16, True, 2)])
def test_normal_operator_is_a_h_a(ny, line_mask, group, monkeypatch):
    """group: coils per group of the CPU Gram operator (None: the default, all 5 at once)."""
    import ddugm_core.consistency as consistency

    c, t, nx = 5, 4, 10
    if group:
        monkeypatch.setattr(consistency, "CPU_COIL_GROUP", group * t * ny * nx)  # 5 coils: more than 2 groups
    maps, y, x = rc(c, ny, nx), rc(c, t, ny, nx), rc(t, ny, nx)
    if line_mask:
        mask = (torch.rand(t, ny, 1, generator=g) < 0.4).float().expand(t, ny, nx)
    else:
        mask = (torch.rand(t, ny, nx, generator=g) < 0.4).float()
    dc = DataConsistency(y, mask, maps)
    ref = (maps.conj()[:, None] * ifft2c(mask * fft2c(maps[:, None] * x[None]))).sum(0)
    assert torch.allclose(dc.normal(x), ref, atol=1e-4)
    assert torch.allclose(dc.adjoint(), (maps.conj()[:, None] * ifft2c(y * mask)).sum(0), atol=1e-4)
    single = DataConsistency(y[:1], mask)
    assert torch.allclose(single.normal(x), ifft2c(mask * fft2c(x)), atol=1e-4)
