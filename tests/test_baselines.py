"""The L+S baseline (Otazo 2015): its two proximal steps and the whole iteration."""
import numpy as np
import pytest
import torch

from ddugm_core.baselines import (
    l_plus_s,
    llr_ttv,
    locally_low_rank,
    singular_value_soft_threshold,
    singular_value_threshold,
    soft_threshold,
    temporal_diff,
    temporal_diff_adjoint,
    temporal_ft,
    temporal_ift,
)
from ddugm_core.consistency import DataConsistency, conjugate_gradient
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


# ---------------------------------------------------------------------- LLR + temporal TV
@pytest.mark.parametrize("cyclic", [False, True])
def test_temporal_difference_adjoint(cyclic):
    g = torch.Generator().manual_seed(4)
    x, d = _crandn(g, 5, 3, 4), _crandn(g, 5 if cyclic else 4, 3, 4)
    lhs = torch.vdot(temporal_diff(x, cyclic).flatten(), d.flatten())
    rhs = torch.vdot(x.flatten(), temporal_diff_adjoint(d, cyclic).flatten())
    assert torch.allclose(lhs, rhs, atol=1e-4)
    # cyclic: the last frame's difference is to the first; a constant series has none
    if cyclic:
        assert torch.allclose(temporal_diff(x, True)[-1], x[0] - x[-1])
        assert float(temporal_diff(x[:1].expand(5, 3, 4), True).abs().max()) == 0


@pytest.mark.parametrize("m,t", [(64, 25), (16, 40), (9, 9)])
def test_batched_singular_value_soft_threshold_matches_the_svd(m, t):
    """The Gram-matrix route gives the SVD's answer: tall and wide batches, a tile of rank 2
    under a dominant component (singular values 1e3 down to 1e-2), and a zero tile; to 1e-4
    of the largest singular value (float32 Gram matrices: 2e-5 on the ill-conditioned tile)."""
    g = torch.Generator().manual_seed(1)
    a = _crandn(g, 4, m, t)
    a[1] = 1e3 * _crandn(g, m, 1) @ _crandn(g, 1, t) / (m * t) ** 0.5 + 1e-2 * _crandn(g, m, 2) @ _crandn(g, 2, t)
    a[2] = 0
    for thr in (0.0, 0.5, 3.0):
        u, s, vh = torch.linalg.svd(a.to(torch.complex128), full_matrices=False)
        ref = (u * torch.clamp(s - thr, min=0).unsqueeze(-2).to(u.dtype)) @ vh
        out = singular_value_soft_threshold(a, thr).to(torch.complex128)
        scale = s[:, :1, None] + 1  # per matrix: its largest singular value
        assert bool(((out - ref).abs() <= 1e-4 * scale).all()), thr
    assert float(singular_value_soft_threshold(a, 1.0)[2].abs().max()) == 0


@pytest.mark.parametrize("shape,block,shift", [((6, 16, 16), 8, (0, 0)), ((5, 13, 10), 4, (3, 1))])
def test_locally_low_rank_thresholds_each_tile(shape, block, shift):
    g = torch.Generator().manual_seed(5)
    x = _crandn(g, *shape)
    assert torch.allclose(locally_low_rank(x, 0.0, block, shift), x, atol=1e-4)  # no threshold: unchanged
    out = locally_low_rank(x, 2.0, block, shift)
    # by hand: the tile at rows/cols [0, block) of the shifted, zero-padded image
    z = torch.roll(x, shifts=shift, dims=(-2, -1))[:, :block, :block]
    c = z.reshape(shape[0], -1).T
    u, s, vh = torch.linalg.svd(c, full_matrices=False)
    ref = ((u * torch.clamp(s - 2.0, min=0).to(u.dtype)) @ vh).T.reshape(z.shape)
    got = torch.roll(out, shifts=shift, dims=(-2, -1))[:, :block, :block]
    assert torch.allclose(got, ref, atol=1e-4)
    assert float(torch.linalg.vector_norm(out)) < float(torch.linalg.vector_norm(x))


def test_locally_low_rank_tile_larger_than_the_image_is_the_whole_image(monkeypatch):
    """A tile larger than the image used to pad the image to whole tiles: llr_block 20000 from a
    client padded a 24 x 24 cine to 20000 x 20000 and the server was killed for memory. It is now
    the whole image (the padding's zero rows change no singular value): the same result, at the
    cost of one image, for any block from the image's size up."""
    g = torch.Generator().manual_seed(7)
    x = _crandn(g, 4, 24, 20)
    ref = locally_low_rank(x, 2.0, 24, (3, 5))
    c = torch.roll(x, shifts=(3, 5), dims=(-2, -1)).reshape(4, -1).T  # the whole image's Casorati matrix
    u, s, vh = torch.linalg.svd(c, full_matrices=False)
    whole = torch.roll(((u * torch.clamp(s - 2.0, min=0).to(u.dtype)) @ vh).T.reshape(4, 24, 20), (-3, -5), (-2, -1))
    assert torch.allclose(ref, whole, atol=1e-4)
    padded = []
    real_pad = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, "pad", lambda t, *a, **kw: (lambda o: (padded.append(o.numel()), o)[1])(
        real_pad(t, *a, **kw)))
    for block in (25, 1000, 3000, 20000, 10**9):  # (3000 cost 550 MB before; 20000 was killed)
        padded.clear()
        assert torch.allclose(locally_low_rank(x, 2.0, block, (3, 5)), ref, atol=1e-5)
        assert max(padded, default=0) <= 2 * 4 * 24 * 24, block  # at most the image padded to a square


def test_conjugate_gradient_solves_a_hermitian_system():
    g = torch.Generator().manual_seed(6)
    a = _crandn(g, 6, 6)
    h = a @ a.mH + 6 * torch.eye(6, dtype=a.dtype)
    b = _crandn(g, 6)
    x = conjugate_gradient(lambda v: h @ v, b, torch.zeros_like(b), 12)
    assert torch.allclose(h @ x, b, atol=1e-3)


def test_conjugate_gradient_state_keeps_the_normal_of_its_solution():
    """With a state, each call returns normal(x) of its solution and the next call, warm-started
    there, uses it instead of applying the operator: one call less, the same iterates."""
    g = torch.Generator().manual_seed(7)
    a = _crandn(g, 8, 8)
    h = a @ a.mH + 2 * torch.eye(8, dtype=a.dtype)
    calls = []

    def normal(v):
        calls.append(1)
        return h @ v

    x_plain = x_kept = torch.zeros(8, dtype=a.dtype)
    state = {}
    for _ in range(6):  # an ADMM-like sequence of right-hand sides, each warm-started
        b = _crandn(g, 8)
        x_plain = conjugate_gradient(lambda v: h @ v, b, x_plain, 2)
        x_kept = conjugate_gradient(normal, b, x_kept, 2, state)
        assert torch.allclose(state["nx"], h @ x_kept, atol=1e-4)
    assert torch.allclose(x_kept, x_plain, atol=1e-4)
    assert len(calls) == 1 + 6 * 2  # the start once, then only the search directions


def test_llr_ttv_keeps_the_normal_only_for_the_same_operator():
    """The sampler carries the ADMM state into calls with a different pull (gamma): the kept
    normal(x) must then be recomputed, and with the same operator it must be right."""
    x = cine_phantom(6, 32, seed=4)
    mask = variable_density_mask(6, 32, 6, seed=5)
    k = torch.from_numpy(simulate_kspace(x, None, mask, noise=0.005, seed=2))
    dc = DataConsistency(k, expand_mask(torch.from_numpy(mask), (32, 32)).float(), None)
    kw = dict(lambda_llr=0.0, lambda_tv=0.05, rho=0.2)
    anchor = torch.from_numpy(x).to(torch.complex64)
    for gamma in (0.0, 0.3):
        state = {}
        llr_ttv(dc, 4, **kw, state=state)
        fresh = {k: v for k, v in state.items() if k != "nx"}  # the same iterates, no kept normal(x)
        a = llr_ttv(dc, 3, **kw, anchor=anchor, gamma=gamma, state=state)
        b = llr_ttv(dc, 3, **kw, anchor=anchor, gamma=gamma, state=fresh)
        assert torch.allclose(a, b, atol=1e-5), (gamma, float((a - b).abs().max()))


@pytest.mark.parametrize("coils", [1, 4])
def test_llr_ttv_beats_zero_filled_and_l_plus_s_on_the_phantom(coils):
    from ddugm_core.phantom import coil_maps

    x = cine_phantom(12, 32, seed=2)
    maps = coil_maps(coils, 32, seed=1) if coils > 1 else None
    mask = variable_density_mask(12, 32, 4, seed=3)
    k = torch.from_numpy(simulate_kspace(x, maps, mask, noise=0.005, seed=1))
    dc = DataConsistency(k, expand_mask(torch.from_numpy(mask), (32, 32)).float(),
                         torch.from_numpy(maps) if maps is not None else None)
    out = llr_ttv(dc, iters=30, lambda_llr=0.001, lambda_tv=0.02, block=8)
    assert psnr(x, out.numpy()) > psnr(x, dc.adjoint_image().numpy()) + 5
    assert psnr(x, out.numpy()) > psnr(x, l_plus_s(dc).numpy())
    # no regularisation: conjugate gradients on the least-squares problem keep the measured data
    plain = llr_ttv(dc, iters=20, lambda_llr=0.0, lambda_tv=0.0, rho=0.1)
    kout = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(plain, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
    if coils == 1:
        m = expand_mask(torch.from_numpy(mask), (32, 32))
        assert torch.allclose(kout[m], k[0][m], atol=1e-3)


def test_llr_ttv_state_continues_the_admm_where_it_stopped():
    """With a state dict, 10 + 10 iterations are the 20 of one call (without the locally
    low-rank term, whose random tile shifts depend on the seed); a restart from x alone,
    with zero dual variables, is not."""
    x = cine_phantom(8, 32, seed=2)
    mask = variable_density_mask(8, 32, 6, seed=3)
    k = torch.from_numpy(simulate_kspace(x, None, mask, noise=0.005, seed=1))
    dc = DataConsistency(k, expand_mask(torch.from_numpy(mask), (32, 32)).float(), None)
    kw = dict(lambda_llr=0.0, lambda_tv=0.05, rho=0.2)
    whole = llr_ttv(dc, 20, **kw)
    state = {}
    half = llr_ttv(dc, 10, **kw, state=state)
    assert {"x", "z1", "u1", "z2", "u2", "nx"} <= set(state) and torch.equal(state["x"], half)
    assert torch.allclose(llr_ttv(dc, 10, **kw, state=state), whole, atol=1e-5)
    restarted = llr_ttv(dc, 10, **kw, x0=half)
    assert not torch.allclose(restarted, whole, atol=1e-3)


# ---------------------------------------------------------------------- low-rank only
def test_low_rank_momentum_converges_faster_and_keeps_the_data():
    """The heavy-ball extrapolation reaches in few iterations what the plain alternation of
    Hankel projection and data consistency does not; the acquired samples are kept."""
    from ddugm_core.baselines import low_rank

    x = cine_phantom(6, 32, seed=1)
    mask = variable_density_mask(6, 32, 3, seed=2)
    k = torch.from_numpy(simulate_kspace(x, None, mask))
    m = expand_mask(torch.from_numpy(mask), (32, 32)).float()
    dc = DataConsistency(k, m)
    plain = low_rank(dc, iters=8, rank=30, window=4, solver="subspace")
    fast = low_rank(dc, iters=8, rank=30, window=4, solver="subspace", momentum=0.8)
    p_plain, p_fast = psnr(x, plain.numpy()), psnr(x, fast.numpy())
    assert p_fast > p_plain + 0.5, (p_plain, p_fast)
    kout = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(fast, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
    assert torch.allclose(kout * m, k[0] * m, atol=1e-4)
