"""The sampler against an exact answer, and its use of randomness."""
import numpy as np
import pytest
import torch

from ddugm_core import Reconstructor
from ddugm_core.consistency import DataConsistency
from ddugm_core.operators import KWeight, fft2c, kspace_weight
from ddugm_core.sampler import SamplerSettings, ddugm_sample


def test_gaussian_prior_posterior_is_recovered():
    """Prior: iid complex Gaussian image, variance s0^2 per real component, so its k-space is
    iid with the same variance and the weighted k-space has variance (W s0)^2. With the exact
    scores, single-coil data consistency and a full-rank (neutral) low-rank step, the k-space
    chain is an exact posterior sampler: measured samples equal the data, unmeasured samples
    have the prior's mean 0 and standard deviation s0 in each real component."""
    s0, t, n = 0.7, 32, 16
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(t, n, generator=g) < 0.4).float()[:, :, None].expand(t, n, n)
    truth = s0 * torch.complex(torch.randn(t, n, n, generator=g), torch.randn(t, n, n, generator=g))
    y = (fft2c(truth) * mask)[None]
    dc = DataConsistency(y, mask)
    w = kspace_weight(n, n)
    score_k = lambda kw, s: -kw / ((w * s0) ** 2 + s**2)  # noqa: E731
    score_i = lambda x, s: -x / (s0**2 + s**2)  # noqa: E731
    settings = SamplerSettings(steps=300, sigma_min=0.005, sigma_max=30.0, snr=0.16, fusion=1.0,
                               rank=10**6, window=4, kspace_sigma_scale=1.0)
    x = ddugm_sample(y[0], dc, score_k, score_i, KWeight(w), settings, torch.Generator().manual_seed(0))
    k = fft2c(x)
    measured = mask > 0
    assert torch.allclose(k[measured], y[0][measured], atol=1e-4)
    free = torch.view_as_real(k[~measured & (w > 0)])
    assert free.numel() > 5000
    assert abs(float(free.mean())) < 0.03
    assert abs(float(free.std()) / s0 - 1) < 0.06, float(free.std())


def test_gaussian_check_would_catch_a_wrong_score():
    """The same check fails for a prior twice as wide: the test can fail."""
    s0, t, n = 0.7, 16, 16
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(t, n, generator=g) < 0.4).float()[:, :, None].expand(t, n, n)
    y = (fft2c(s0 * torch.complex(torch.randn(t, n, n, generator=g), torch.randn(t, n, n, generator=g))) * mask)[None]
    w = kspace_weight(n, n)
    wrong = lambda kw, s: -kw / ((w * 2 * s0) ** 2 + s**2)  # noqa: E731
    settings = SamplerSettings(steps=200, sigma_min=0.005, sigma_max=30.0, snr=0.16, fusion=1.0, rank=10**6, window=4)
    x = ddugm_sample(y[0], DataConsistency(y, mask), wrong, wrong, KWeight(w), settings, torch.Generator().manual_seed(0))
    free = torch.view_as_real(fft2c(x)[~(mask > 0) & (w > 0)])
    assert abs(float(free.std()) / s0 - 1) > 0.3


def _case(rng, t=4, n=24, coils=2):
    from ddugm_core.masks import variable_density_mask
    from ddugm_core.phantom import cine_phantom, coil_maps, simulate_kspace

    x = cine_phantom(t, n, seed=1)
    return simulate_kspace(x, coil_maps(coils, n) if coils > 1 else None, variable_density_mask(t, n, 3, seed=2))


def test_same_seed_same_output_different_seed_differs(tiny_config, rng):
    from ddugm_core import ReconConfig

    k = _case(rng)
    rec = Reconstructor(ReconConfig.from_dict({**tiny_config.to_dict(), "preset": "dual"}))  # the stochastic sampler
    a, b, c = rec.recon(k, seed=5), rec.recon(k, seed=5), rec.recon(k, seed=6)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    pnp = Reconstructor(ReconConfig.from_dict({**tiny_config.to_dict(), "preset": "pnp", "llr_iters": 3}))
    assert np.array_equal(pnp.recon(k, seed=5), pnp.recon(k, seed=6))  # deterministic: no noise is drawn


def test_default_reconstruction_does_not_depend_on_the_global_phase_of_the_data(tiny_config, rng):
    """A scanner's data carry an arbitrary global phase (receiver phase, coil referencing). The
    whole default pipeline (coil maps, scale, LLR + TV start, priors, ADMM) turns with it when
    the priors see the cine turned to a real, positive sum (``pnp_phase: mean``, the default);
    with ``none`` the networks, not equivariant to phase, give a different image: the check can
    fail."""
    from ddugm_core import ReconConfig

    k = _case(rng, coils=3)
    turn = np.exp(2.1j).astype(np.complex64)
    base = {**tiny_config.to_dict(), "preset": "default", "llr_iters": 3, "pnp_inner": 2}
    for phase, equal in (("mean", True), ("none", False)):
        rec = Reconstructor(ReconConfig.from_dict({**base, "pnp_phase": phase}))
        a, b = rec.recon(k), rec.recon(k * turn)
        err = np.linalg.norm(b - a * turn) / np.linalg.norm(a)
        assert (err < 1e-4) == equal, (phase, err)
    with pytest.raises(ValueError, match="pnp_phase"):
        ReconConfig.from_dict({"pnp_phase": "median"})


def test_correctors_setting_sets_network_calls_per_step():
    """With the Langevin correctors each step calls each network twice, without them once."""
    t, n = 3, 16
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(t, n, generator=g) < 0.5).float()[:, :, None].expand(t, n, n)
    y = (fft2c(torch.randn(t, n, n, generator=g, dtype=torch.complex64)) * mask)[None]
    calls = {"k": 0, "i": 0}

    def counting(name):
        def score(x, sigma):
            calls[name] += 1
            return -x
        return score

    for correctors, per_step in ((True, 2), (False, 1)):
        calls.update(k=0, i=0)
        settings = SamplerSettings(steps=4, sigma_max=0.3, rank=10, window=3, correctors=correctors)
        ddugm_sample(y[0], DataConsistency(y, mask), counting("k"), counting("i"), KWeight(kspace_weight(n, n)),
                     settings, torch.Generator().manual_seed(0))
        assert calls == {"k": 4 * per_step, "i": 4 * per_step}


def _pnp_problem():
    """A small multi-coil cine problem for the pnp sampler: truth, data consistency, LLR + TV
    settings."""
    from ddugm_core.masks import variable_density_mask
    from ddugm_core.operators import expand_mask
    from ddugm_core.phantom import cine_phantom, coil_maps, simulate_kspace

    truth = torch.from_numpy(cine_phantom(8, 32, seed=1))
    maps = coil_maps(3, 32, seed=2)
    mask = variable_density_mask(8, 32, 6, seed=4)
    y = torch.from_numpy(simulate_kspace(truth.numpy(), maps, mask, noise=0.005, seed=1))
    dc = DataConsistency(y, expand_mask(torch.from_numpy(mask), (32, 32)).float(), torch.from_numpy(maps))
    llr = {"lambda_llr": 0.001, "lambda_tv": 0.01, "block": 8, "rho": 0.2, "cg_iters": 3}
    return truth, dc, llr


def test_pnp_sampler_moves_towards_what_the_prior_denoises_to():
    """An oracle prior (its Tweedie denoiser returns the truth) must pull the estimate towards
    the truth; a prior that returns a wrong image must pull it away. Both keep the data."""
    from ddugm_core.baselines import llr_ttv
    from ddugm_core.sampler import PnPSettings, pnp_sample

    truth, dc, llr = _pnp_problem()
    x0 = llr_ttv(dc, 20, **llr)
    err = lambda x: float(torch.linalg.vector_norm(x - truth))  # noqa: E731
    oracle = lambda x, s: (truth - x) / s**2  # noqa: E731
    wrong = lambda x, s: (torch.roll(truth, 3, dims=-1) - x) / s**2  # noqa: E731
    settings = PnPSettings(steps=3, sigma_max=0.05, sigma_min=0.01, gamma=1.0, inner=4, llr=llr)
    seen = []
    good = pnp_sample(x0, dc, oracle, settings, callback=lambda i, n: seen.append((i, n)))
    bad = pnp_sample(x0, dc, wrong, settings)
    assert seen[-1] == (3, 3)
    assert err(good) < 0.8 * err(x0) < err(bad)
    # gamma 0: no prior in the objective, so no network is called (the classical continuation:
    # the same ADMM iterations as with a prior whose anchor weighs nothing)
    def boom(x, s):
        raise AssertionError("a network was called at gamma 0")
    none = PnPSettings(steps=3, sigma_max=0.05, sigma_min=0.01, gamma=0.0, inner=4, llr=llr)
    plain = pnp_sample(x0, dc, boom, none)
    ignored = pnp_sample(x0, dc, wrong, none)
    assert torch.equal(plain, ignored) and err(good) < err(plain)


def test_plane_score_scores_rows_and_columns_of_any_cine():
    """The plane prior sees every x-t plane (a row through time) and every y-t plane (a column
    through time): with a fake network that multiplies by a weight along the plane's last
    axis, the result is the mean of the weight along x and along y; frames are padded by
    continuing the cycle and cropped back, for any frame count and matrix size."""
    from ddugm_core.networks import PlaneScore

    class Fake:
        divisor = 8
        calls = []

        def __call__(self, planes, sigma):
            self.calls.append(tuple(planes.shape))
            w = torch.arange(planes.shape[-1], dtype=torch.float32) + 1
            return planes * w

    for t, ny, nx in [(5, 12, 10), (16, 7, 9), (1, 8, 8)]:
        x = torch.randn(t, ny, nx, dtype=torch.complex64)
        fake = Fake()
        out = PlaneScore(fake)(x, 0.1)
        tp = -(-t // 8) * 8
        assert fake.calls[-2:] == [(ny, tp, nx), (nx, tp, ny)]
        wx = torch.arange(nx, dtype=torch.float32) + 1
        wy = torch.arange(ny, dtype=torch.float32)[:, None] + 1
        assert out.shape == (t, ny, nx)
        assert torch.allclose(out, 0.5 * (x * wx + x * wy), atol=1e-5)


def test_pnp_blends_the_plane_prior_into_the_anchor():
    """xt_weight 1 uses only the plane prior (an oracle pulls to the truth, with no frame
    prior at all); 0.5 blends an oracle with a wrong prior: in between; a missing prior for a
    weight that needs it is an error naming the setting."""
    from ddugm_core.sampler import PnPSettings, pnp_sample

    truth, dc, llr = _pnp_problem()
    x0 = dc.image(torch.zeros_like(truth))
    err = lambda x: float(torch.linalg.vector_norm(x - truth))  # noqa: E731
    oracle = lambda x, s, planes="both": (truth - x) / s**2  # noqa: E731  (a plane prior takes planes)
    wrong = lambda x, s, planes="both": (torch.roll(truth, 3, dims=-1) - x) / s**2  # noqa: E731
    run = lambda w, si, sx: pnp_sample(x0, dc, si, PnPSettings(steps=3, gamma=1.0, inner=4, llr=llr,  # noqa: E731
                                                                 xt_weight=w), score_xt=sx)
    only_xt = run(1.0, None, oracle)
    blend = run(0.5, wrong, oracle)
    only_wrong = run(0.0, wrong, None)
    assert err(only_xt) < err(blend) < err(only_wrong)
    for w, si, sx in [(0.5, oracle, None), (0.5, None, oracle), (1.5, oracle, oracle)]:
        with pytest.raises(ValueError, match="xt_weight"):
            run(w, si, sx)


def test_pnp_alternate_planes_asks_one_orientation_a_level():
    """xt_planes alternate: the plane prior is asked for x-t planes at even levels and y-t
    planes at odd ones (both: the plain call); an unknown value is an error naming it."""
    from ddugm_core.sampler import PnPSettings, pnp_sample

    truth, dc, llr = _pnp_problem()
    x0 = dc.image(torch.zeros_like(truth))
    asked = []

    def plane_prior(x, s, planes="both"):
        asked.append(planes)
        return (truth - x) / s**2

    for mode, want in [("alternate", ["xt", "yt", "xt", "yt"]), ("both", ["both"] * 4)]:
        asked.clear()
        pnp_sample(x0, dc, None, PnPSettings(steps=4, inner=1, llr=llr, xt_weight=1.0, xt_planes=mode),
                   score_xt=plane_prior)
        assert asked == want
    with pytest.raises(ValueError, match="xt_planes"):
        pnp_sample(x0, dc, None, PnPSettings(steps=2, llr=llr, xt_weight=1.0, xt_planes="zt"), score_xt=plane_prior)


def test_plane_score_one_orientation_is_half_of_both():
    """PlaneScore: the average of both orientations is the mean of the x-t-only and y-t-only
    scores, any frame count (5 frames, padded by the cycle)."""
    from ddugm_core.networks import NCSNpp, NetConfig, PlaneScore, ScoreFunction

    torch.manual_seed(0)
    ps = PlaneScore(ScoreFunction(NCSNpp(NetConfig(nf=8, ch_mult=(1, 2), attn_resolutions=(), image_size=8))))
    x = torch.randn(5, 6, 7, dtype=torch.complex64)
    xt, yt = ps(x, 0.2, "xt"), ps(x, 0.2, "yt")
    assert xt.shape == x.shape and not torch.allclose(xt, yt)
    assert torch.allclose(ps(x, 0.2), 0.5 * (xt + yt), atol=1e-5)
    with pytest.raises(ValueError, match="planes"):
        ps(x, 0.2, "zt")


def test_pnp_flip_ensemble_averages_flipped_denoisings():
    """pnp_denoise with ensemble n averages the denoising of n flips of the input, each flipped
    back: a flip-equivariant prior gives the same result; one that is not (it pulls to a
    fixed image, so the flipped passes pull to its flips) gives the mean of those images."""
    from ddugm_core.sampler import pnp_denoise

    g = torch.Generator().manual_seed(0)
    x = torch.complex(torch.randn(3, 6, 5, generator=g), torch.randn(3, 6, 5, generator=g))
    target = torch.complex(torch.randn(3, 6, 5, generator=g), torch.randn(3, 6, 5, generator=g))
    smooth = lambda v, s: (0.5 * v - v) / s**2  # noqa: E731  (denoises to v / 2: equivariant)
    fixed = lambda v, s: (target - v) / s**2  # noqa: E731
    for n in (2, 4):
        assert torch.allclose(pnp_denoise(x, 0.1, smooth, None, 0.0, n), 0.5 * x, atol=1e-5)
    flips = [target, target.flip(-1), target.flip(-2), target.flip(-2, -1)]
    assert torch.allclose(pnp_denoise(x, 0.1, fixed, None, 0.0, 1), target, atol=1e-5)
    assert torch.allclose(pnp_denoise(x, 0.1, fixed, None, 0.0, 2), sum(flips[:2]) / 2, atol=1e-5)
    assert torch.allclose(pnp_denoise(x, 0.1, None, fixed, 1.0, 4), sum(flips) / 4, atol=1e-5)
    with pytest.raises(ValueError, match="ensemble"):
        pnp_denoise(x, 0.1, fixed, None, 0.0, 3)


def test_pnp_renoising_shows_the_networks_noise_of_eta_sigma():
    """With eta > 0 the networks see x plus fresh noise of std eta * sigma per real component
    (measured through the trace), reproducibly for a seed; eta 0 shows them x itself; eta > 0
    without a generator is an error naming eta."""
    from ddugm_core.sampler import PnPSettings, pnp_sample

    truth, dc, llr = _pnp_problem()
    x0 = dc.image(torch.zeros_like(truth))
    prior = lambda x, s: -x * 0  # noqa: E731  (denoising is the identity)

    def inputs(eta, seed=0):
        seen, out = [], []
        settings = PnPSettings(steps=2, sigma_max=0.2, sigma_min=0.1, gamma=1.0, inner=1, eta=eta, llr=llr)
        gen = torch.Generator().manual_seed(seed)
        pnp_sample(x0, dc, lambda x, s: (out.append(x), prior(x, s))[1], settings,
                   trace=seen.append, generator=gen)
        return seen, out

    seen, out = inputs(0.0)
    assert torch.equal(seen[0]["image_input"], x0) and torch.equal(out[0], x0)
    seen, out = inputs(0.5)
    noise = out[0] - x0
    std = float(torch.cat([noise.real.flatten(), noise.imag.flatten()]).std())
    assert abs(std - 0.5 * 0.2) < 0.01
    assert torch.equal(inputs(0.5)[1][1], out[1]) and not torch.equal(inputs(0.5, seed=1)[1][1], out[1])
    with pytest.raises(ValueError, match="eta"):
        pnp_sample(x0, dc, prior, PnPSettings(eta=0.5, llr=llr))
