import numpy as np
import torch

from ddugm_core.lowrank import default_rank, lowrank_project
from ddugm_core.operators import HankelLift


def test_published_rank():
    assert default_rank(6) == 54


def _sparse_image_kspace(frames=4, n=16, points=2, seed=0):
    """k-space of a few point sources with complex, frame-varying amplitudes: low Hankel rank."""
    rng = np.random.default_rng(seed)
    ky, kx = np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij")
    k = np.zeros((frames, n, n), np.complex64)
    for _ in range(points):
        y0, x0 = rng.uniform(-0.4, 0.4, 2)
        amp = rng.standard_normal(frames) + 1j * rng.standard_normal(frames)
        k += amp[:, None, None] * np.exp(-2j * np.pi * (ky * y0 + kx * x0))[None]
    return torch.from_numpy(k)


def test_complex_low_rank_signal_is_kept():
    # Rank of the lifted matrix is the number of point sources (2). A rebuild with V^T
    # instead of V^H (the published bug) would not return the signal.
    k = _sparse_image_kspace()
    lift = HankelLift(tuple(k.shape), 4)
    out = lowrank_project(k, lift, 2)
    assert torch.linalg.vector_norm(out - k) / torch.linalg.vector_norm(k) < 1e-3


def test_projection_reduces_rank_and_is_idempotent():
    g = torch.Generator().manual_seed(1)
    k = torch.complex(torch.randn(3, 12, 12, generator=g), torch.randn(3, 12, 12, generator=g))
    lift = HankelLift(tuple(k.shape), 4)
    p1 = lowrank_project(k, lift, 5)
    assert not torch.allclose(p1, k, atol=1e-3)
    # full rank returns the input unchanged
    assert torch.equal(lowrank_project(k, lift, 48), k)
    s = torch.linalg.svdvals(lift(k))
    s1 = torch.linalg.svdvals(lift(p1))
    assert s1[5:].sum() < s[5:].sum()  # energy beyond rank 5 goes down


def test_subspace_solver_tracks_the_exact_projection():
    import pytest

    from ddugm_core.lowrank import LowRankProjector

    g = torch.Generator().manual_seed(3)
    k = _sparse_image_kspace(frames=4, n=16, points=3, seed=2)
    noise = lambda: 0.05 * torch.complex(torch.randn(k.shape, generator=g), torch.randn(k.shape, generator=g))  # noqa: E731
    lift = HankelLift(tuple(k.shape), 4)
    exact = LowRankProjector(lift, 3, "exact")
    sub = LowRankProjector(lift, 3, "subspace")
    errs = []
    for _ in range(6):  # k changes a little between calls, as in the sampler
        k = k + noise()
        a, b = exact(k), sub(k)
        errs.append(float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a)))
    assert errs[0] == 0.0  # the first call is exact
    assert max(errs) < 1e-3
    assert torch.allclose(exact(k), lowrank_project(k, lift, 3))
    with pytest.raises(ValueError, match="solver"):
        LowRankProjector(lift, 3, "svd")
