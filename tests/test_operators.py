"""Every operator: adjointness <Ax, y> = <x, A^H y>, shapes, and the inverses it promises."""
import numpy as np
import pytest
import torch

from ddugm_core.operators import FFT2, HankelLift, KWeight, Mask, Sense, expand_mask, fft2c, ifft2c, kspace_weight

g = torch.Generator().manual_seed(0)


def rc(*shape):
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))


def assert_adjoint(op, x_shape, y_shape=None):
    x = rc(*x_shape)
    ax = op(x)
    if y_shape is not None:
        assert tuple(ax.shape) == tuple(y_shape)
    y = rc(*ax.shape)
    lhs = torch.vdot(ax.flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), op.H(y).flatten())
    assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-3), (lhs, rhs)


def test_fft_adjoint_and_unitary():
    assert_adjoint(FFT2(), (3, 10, 7), (3, 10, 7))
    x = rc(2, 9, 8)
    assert torch.allclose(ifft2c(fft2c(x)), x, atol=1e-5)
    assert torch.allclose(torch.linalg.vector_norm(fft2c(x)), torch.linalg.vector_norm(x), rtol=1e-5)


def test_fft_is_centred():
    x = torch.ones(1, 8, 6, dtype=torch.complex64)
    k = fft2c(x)
    assert abs(k[0, 4, 3]) == pytest.approx(np.sqrt(48), rel=1e-5)  # DC at n // 2
    assert k.abs().sum() == pytest.approx(np.sqrt(48), rel=1e-4)


def test_mask_adjoint_and_projection():
    m = expand_mask(torch.rand(4, 10, generator=g) > 0.5, (10, 6)).float()
    assert m.shape == (4, 10, 6)
    op = Mask(m)
    assert_adjoint(op, (2, 4, 10, 6))
    x = rc(4, 10, 6)
    assert torch.equal(op(op(x)), op(x))


@pytest.mark.parametrize("maps_shape", [(3, 8, 6), (3, 4, 8, 6)])
def test_sense_adjoint(maps_shape):
    op = Sense(rc(*maps_shape))
    assert_adjoint(op, (4, 8, 6), (3, 4, 8, 6))


def test_composed_forward_model_adjoint():
    m = (torch.rand(4, 8, 6, generator=g) > 0.5).float()
    A = Mask(m) @ FFT2() @ Sense(rc(3, 8, 6))
    assert_adjoint(A, (4, 8, 6), (3, 4, 8, 6))


def test_kspace_weight_and_unweight():
    w = kspace_weight(12, 10)
    assert w[6, 5] == 0 and (w > 0).sum() == 12 * 10 - 1
    assert w[0, 5] == pytest.approx(0.011 * np.sqrt(120), rel=1e-5)  # edge midpoint, both axes
    assert w[6, 0] == pytest.approx(0.011 * np.sqrt(120), rel=1e-5)
    op = KWeight(w)
    assert_adjoint(op, (3, 12, 10))
    k, fill = rc(3, 12, 10), rc(3, 12, 10)
    back = op.unweight(op(k), fill)
    assert torch.allclose(back[:, 6, 5], fill[:, 6, 5])  # W = 0: the given value is put back
    keep = w > 0
    assert torch.allclose(back[:, keep], k[:, keep], atol=1e-4)


def test_hankel_adjoint_shape_and_average():
    lift = HankelLift((3, 10, 9), window=4)
    assert_adjoint(lift, (3, 10, 9), ((10 - 3) * (9 - 3), 3 * 16))
    x = rc(3, 10, 9)
    assert torch.allclose(lift.average(lift(x)), x, atol=1e-5)


def test_hankel_rejects_small_kspace():
    with pytest.raises(ValueError, match="smaller than the low-rank window"):
        HankelLift((2, 4, 8), window=6)
