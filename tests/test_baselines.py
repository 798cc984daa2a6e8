"""The L+S baseline (Otazo 2015): its two proximal steps and the whole iteration."""
import numpy as np
import torch

from ddugm_core.baselines import l_plus_s, singular_value_threshold, soft_threshold, temporal_ft, temporal_ift
from ddugm_core.consistency import DataConsistency
from ddugm_core.masks import variable_density_mask
from ddugm_core.metrics import psnr
from ddugm_core.operators import expand_mask
from ddugm_core.phantom import cine_phantom, simulate_kspace


def _crandn(g, *shape):
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))


def test_soft_threshold_shrinks_magnitude_keeps_phase():
    x = torch.tensor([3 + 4j, 0.1j, 0], dtype=torch.complex64)
    y = soft_threshold(x, 1.0)
    assert torch.allclose(y, torch.tensor([2.4 + 3.2j, 0, 0], dtype=torch.complex64))


def test_svt_matches_full_svd():
    g = torch.Generator().manual_seed(0)
    x = _crandn(g, 6, 10, 9)
    out = singular_value_threshold(x, 0.3)
    c = x.reshape(6, -1).T
    u, s, vh = torch.linalg.svd(c.to(torch.complex128), full_matrices=False)
    ref = (u * torch.clamp(s - 0.3 * s[0], min=0)) @ vh
    assert torch.allclose(out.reshape(6, -1).T.to(torch.complex128), ref, atol=1e-4 * float(s[0]))
    assert torch.allclose(singular_value_threshold(x, 0.0), x, atol=1e-4)
    assert torch.count_nonzero(torch.linalg.svdvals(singular_value_threshold(x, 0.8).reshape(6, -1)) > 1e-3) < 6


def test_temporal_transform_is_unitary():
    g = torch.Generator().manual_seed(1)
    x = _crandn(g, 5, 4, 4)
    assert torch.allclose(temporal_ift(temporal_ft(x)), x, atol=1e-5)
    assert torch.allclose(torch.linalg.vector_norm(temporal_ft(x)), torch.linalg.vector_norm(x), rtol=1e-5)


def test_l_plus_s_single_coil_keeps_data_and_beats_zero_filled():
    x = cine_phantom(10, 32, seed=2)
    mask = variable_density_mask(10, 32, 4, seed=3)
    k = torch.from_numpy(simulate_kspace(x, None, mask))
    m = expand_mask(torch.from_numpy(mask), (32, 32)).float()
    dc = DataConsistency(k, m)
    out = l_plus_s(dc, iters=30, lambda_l=0.01, lambda_s=0.02)
    kout = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(out, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
    assert torch.allclose(kout * m, k[0] * m, atol=1e-4)
    zf = psnr(x, dc.adjoint_image().numpy())
    assert psnr(x, out.numpy()) > zf + 3
    # no thresholds at all: nothing is regularised, the zero-filled image is a fixed point
    plain = l_plus_s(dc, iters=5, lambda_l=0.0, lambda_s=0.0)
    assert np.allclose(plain.numpy(), dc.adjoint_image().numpy(), atol=1e-4)


def test_l_plus_s_progress_reaches_the_end():
    x = cine_phantom(4, 16, seed=2)
    mask = variable_density_mask(4, 16, 2, seed=3)
    k = torch.from_numpy(simulate_kspace(x, None, mask))
    dc = DataConsistency(k, expand_mask(torch.from_numpy(mask), (16, 16)).float())
    seen = []
    l_plus_s(dc, iters=40, tol=0.05, callback=lambda i, n: seen.append((i, n)))
    assert seen[-1] == (40, 40) and len(seen) < 41
