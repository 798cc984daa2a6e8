import numpy as np
import pytest
import torch

from ddugm_core.coils import estimate_coil_maps, fit_coil_maps, refine_coil_maps
from ddugm_core.masks import lattice_mask, variable_density_mask
from ddugm_core.metrics import hfen, psnr, ssim
from ddugm_core.phantom import cine_phantom, coil_maps, simulate_kspace


def test_phantom_moves_and_is_finite():
    x = cine_phantom(8, 48, seed=0)
    assert x.shape == (8, 48, 48) and x.dtype == np.complex64 and np.isfinite(x).all()
    assert np.abs(x[0] - x[4]).max() > 0.1  # the heart beats
    assert np.abs(np.angle(x[0][np.abs(x[0]) > 0.2])).max() > 0.05  # smooth phase present


def test_coil_maps_normalised_and_estimated():
    maps = coil_maps(6, 48)
    assert np.allclose((np.abs(maps) ** 2).sum(0), 1, atol=1e-5)
    x = cine_phantom(12, 48, seed=0)
    m = variable_density_mask(12, 48, 4, seed=0)
    k = simulate_kspace(x, maps, m)
    est = estimate_coil_maps(torch.from_numpy(k), torch.from_numpy(m).float()[:, :, None].expand(12, 48, 48)).numpy()
    body = np.abs(x).mean(0) > 0.2
    agreement = np.abs((est.conj() * maps).sum(0))[body]  # 1 = same up to a phase
    assert agreement.mean() > 0.99


def _maps_case(m, noise):
    """A 12-frame phantom cine with 6 coils under the lines ``m`` ``[frame, ky]``: the image, the
    true maps, k-space, the mask, the estimated maps, the body, the image in the estimated maps'
    phase convention, and the maps' misfit 1 - |<S, S_true>| over the body."""
    maps = coil_maps(6, 48)
    x = cine_phantom(12, 48, seed=0)
    k = torch.from_numpy(simulate_kspace(x, maps, m, noise=noise, seed=0))
    mask = torch.from_numpy(m).float()[:, :, None].expand(12, 48, 48)
    est = estimate_coil_maps(k, mask)
    body = torch.from_numpy(np.abs(x).mean(0) > 0.2)
    true = torch.from_numpy(maps)

    def misfit(s):
        return float((1 - (s.conj() * true).sum(0).abs())[body].mean())

    img = torch.from_numpy(x) * torch.exp(1j * torch.angle((est.conj() * true).sum(0)))
    return x, true, k, mask, est, body, img, misfit


def test_refined_coil_maps_fit_the_data_better():
    """With a good image the refinement moves estimated maps towards the true ones (the data,
    not the old maps, decide where lines were acquired); true maps and the true image are a
    fixed point; phase convention and support of the old maps are kept."""
    x, true, k, mask, est, body, img, misfit = _maps_case(variable_density_mask(12, 48, 4, seed=0), noise=0.0)
    new = refine_coil_maps(k, mask, img, est, window=3)
    assert misfit(new) < 0.5 * misfit(est)
    assert torch.allclose((new.abs() ** 2).sum(0)[body], torch.ones(()), atol=1e-4)
    assert (torch.angle((est.conj() * new).sum(0))[body].abs() < 1e-3).all()  # est's phase convention
    hole = est.clone()
    hole[:, :4] = 0
    assert (refine_coil_maps(k, mask, img, hole)[:, :4] == 0).all()  # support kept
    same = refine_coil_maps(k, mask, torch.from_numpy(x), true, window=1)
    assert misfit(same) < 1e-5


def test_fitted_coil_maps_follow_the_acquired_samples_where_every_frame_misses_the_same_lines():
    """The same lines in every frame (GRAPPA-style cine): given the image, maps fitted to the
    acquired samples alone come close to the true ones, where the refinement that takes the
    missing samples from the model keeps most of the estimated maps' error (those lines confirm
    the old maps). Normalised, in the old maps' phase convention, their support kept; the true
    maps with the true image stay put; a band outside (0, 1] is refused."""
    from ddugm_core.masks import equispaced_mask

    x, true, k, mask, est, body, img, misfit = _maps_case(equispaced_mask(12, 48, 3, 6), noise=0.002)
    fitted = fit_coil_maps(k, mask, img, est)
    averaged = refine_coil_maps(k, mask, img, est, window=9)
    assert misfit(fitted) < 0.2 * misfit(est) and misfit(fitted) < 0.5 * misfit(averaged), \
        (misfit(est), misfit(averaged), misfit(fitted))
    assert torch.allclose((fitted.abs() ** 2).sum(0)[body], torch.ones(()), atol=1e-4)
    assert (torch.angle((est.conj() * fitted).sum(0))[body].abs() < 1e-3).all()
    hole = est.clone()
    hole[:, :4] = 0
    assert (fit_coil_maps(k, mask, img, hole)[:, :4] == 0).all()
    assert misfit(fit_coil_maps(k, mask, torch.from_numpy(x), true)) < 1e-4
    for band in (0.0, 1.5):
        with pytest.raises(ValueError, match="band"):
            fit_coil_maps(k, mask, img, est, band=band)


def test_static_lines_tell_the_same_lines_in_every_frame_from_masks_whose_frames_fill_each_others_gaps():
    """Segmented GRAPPA / SENSE cine (the same lines in every frame, a few frames with an extra
    line among them) against random and shifted-lattice masks, also with few frames, and a
    fully sampled one."""
    from ddugm_core.coils import static_lines
    from ddugm_core.masks import equispaced_mask, lattice_mask

    for accel in (2, 3, 4):
        eq = torch.from_numpy(equispaced_mask(15, 100, accel, 12))
        assert static_lines(eq) and static_lines(eq[:, :, None].expand(15, 100, 8))
        eq[::5, 52] = True  # an extra line in some frames
        assert static_lines(eq)
    for frames, accel in ((15, 4), (12, 12), (30, 8)):
        assert not static_lines(torch.from_numpy(variable_density_mask(frames, 100, accel, seed=0)))
    assert not static_lines(torch.from_numpy(lattice_mask(6, 100, 8, 0)))
    assert not static_lines(torch.ones(4, 32, dtype=torch.bool))  # nothing missing: nothing to fill in
    assert not static_lines(torch.from_numpy(variable_density_mask(4, 24, 3, seed=1)))  # few frames, dense centre


def test_variable_density_mask():
    m = variable_density_mask(10, 96, 8, seed=0)
    assert m.shape == (10, 96) and (m.sum(1) == 12).all()
    assert m[:, 47:49].all()  # centre lines always
    assert not (m == m[0]).all()  # lines differ between frames
    assert np.array_equal(m, variable_density_mask(10, 96, 8, seed=0))


def test_lattice_mask_shifts_per_frame():
    m = lattice_mask(4, 16, 4)
    assert (m.sum(1) == 4).all()
    assert np.flatnonzero(m[1]).tolist() == [1, 5, 9, 13]
    assert m.any(0).all()  # the union covers k-space


def test_metrics():
    rng = np.random.default_rng(0)
    ref = rng.random((3, 32, 32))
    assert psnr(ref, ref) == float("inf") and ssim(ref, ref) == pytest.approx(1.0) and hfen(ref, ref) == 0
    noisy = ref + 0.1 * rng.standard_normal(ref.shape)
    expected = 10 * np.log10(ref.max() ** 2 / np.mean((np.abs(noisy) - ref) ** 2))
    assert psnr(ref, noisy) == pytest.approx(expected)
    assert ssim(ref, noisy) < 0.95 and hfen(ref, noisy) > 0.1
    assert psnr(ref, ref + 0.01) > psnr(ref, ref + 0.1)


@pytest.mark.parametrize("coils, shape", [(8, (64, 48)), (12, (40, 56))])
def test_coil_maps_in_tiles_are_those_of_the_whole_image(coils, shape):
    """The local coil covariance has coils^2 elements per pixel (32 coils at 256 x 208: 4.6 GB
    peak for the maps alone; 128 coils at 1024 x 1024, within the server's limits, would not
    fit at all): it is formed a tile at a time, with a halo of half the kernel, and gives the
    maps of the whole image at once, for any tile size, image edges included."""
    from ddugm_core.coils import _walsh

    ny, nx = shape
    x = cine_phantom(6, shape, seed=0)
    m = variable_density_mask(6, ny, 3, seed=1)
    k = torch.from_numpy(simulate_kspace(x, coil_maps(coils, shape, seed=0), m, noise=0.01, seed=0))
    mask = torch.from_numpy(m).float()[:, :, None].expand(6, ny, nx)
    whole = estimate_coil_maps(k, mask, budget=10**12)
    for budget in (coils * coils * 40 * 40, coils * coils * 30 * 30, 1):  # tiles of 18 to 30 pixels, 16 (the least)
        got = estimate_coil_maps(k, mask, budget=budget)
        assert torch.allclose(got, whole, atol=1e-5), budget
    low = torch.randn(coils, ny, nx, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    v1, p1 = _walsh(low, 9, 6, budget=10**12)
    v2, p2 = _walsh(low, 9, 6, budget=1)  # 16 x 16 tiles with a 4-pixel halo
    assert torch.allclose(v1, v2, atol=1e-5) and torch.allclose(p1, p2, rtol=1e-5)
