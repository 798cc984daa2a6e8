"""The public entry: exactness on fully sampled data, scale, shapes, clear errors."""
import numpy as np
import pytest
import torch

from ddugm_core import ReconConfig, Reconstructor
from ddugm_core.coils import estimate_coil_maps
from ddugm_core.masks import variable_density_mask
from ddugm_core.operators import ifft2c
from ddugm_core.phantom import cine_phantom, coil_maps, simulate_kspace

METHODS = ["zero_filled", "low_rank", "l_plus_s", "ddugm"]


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("method", METHODS)
def test_fully_sampled_single_coil_is_inverse_fft(tiny_config, method):
    x = cine_phantom(4, 24, seed=3)
    k = simulate_kspace(x, None, np.ones((4, 24), bool))[0]
    out = Reconstructor(_dual(tiny_config)).recon(k, method=method)
    assert out.dtype == np.complex64 and out.shape == (4, 24, 24)
    assert rel(out, ifft2c(torch.from_numpy(k)).numpy()) < 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_fully_sampled_multicoil_is_sense_image(tiny_config, method):
    x = cine_phantom(4, 24, seed=3)
    maps = coil_maps(4, 24)
    k = simulate_kspace(x, maps, np.ones((4, 24), bool))
    rec = Reconstructor(_dual(tiny_config))
    assert rel(rec.recon(k, coil_maps=maps, method=method), x) < 1e-3  # true maps: the object itself
    # estimated maps: the SENSE image with those maps, S^H F^H y inside their support
    est = estimate_coil_maps(torch.from_numpy(k), torch.ones(4, 24, 24)).numpy()
    sense = (est.conj()[:, None] * ifft2c(torch.from_numpy(k)).numpy()).sum(0)
    assert rel(rec.recon(k, method=method), sense) < 1e-3


def _dual(cfg):
    """The dual-domain preset: its data consistency puts the measured samples back, so a fully
    sampled input comes out exactly (the pnp preset regularises, as LLR + TV does)."""
    return ReconConfig.from_dict({**cfg.to_dict(), "preset": "dual"})


def test_fully_sampled_pnp_is_close_to_the_least_squares_image(tiny_config):
    x = cine_phantom(4, 24, seed=3)
    maps = coil_maps(4, 24)
    k = simulate_kspace(x, maps, np.ones((4, 24), bool))
    assert rel(Reconstructor(tiny_config).recon(k, coil_maps=maps), x) < 0.05


def test_llr_ttv_fully_sampled_is_the_least_squares_image_without_regularisation(tiny_config):
    x = cine_phantom(4, 24, seed=3)
    maps = coil_maps(4, 24)
    k = simulate_kspace(x, maps, np.ones((4, 24), bool))
    plain = ReconConfig.from_dict({**tiny_config.to_dict(), "llr_lambda": 0.0, "ttv_lambda": 0.0, "llr_iters": 10})
    assert rel(Reconstructor(plain).recon(k, coil_maps=maps, method="llr_ttv"), x) < 1e-3
    # the default regularisation moves a fully sampled image only a little (the continued method,
    # which ends at 0.3 x the weights, less than the plain ADMM)
    once = ReconConfig.from_dict({**tiny_config.to_dict(), "llr_continue_iters": 0})
    assert 1e-3 < rel(Reconstructor(once).recon(k, coil_maps=maps, method="llr_ttv"), x) < 0.05
    assert 1e-4 < rel(Reconstructor(tiny_config).recon(k, coil_maps=maps, method="llr_ttv"), x) < 1e-3


def test_scaling_kspace_scales_result(tiny_config):
    x = cine_phantom(4, 24, seed=3)
    k = simulate_kspace(x, coil_maps(2, 24), variable_density_mask(4, 24, 3, seed=1))
    rec = Reconstructor(tiny_config)
    a = rec.recon(k, seed=1)
    b = rec.recon(k * 1234.5, seed=1)
    assert rel(b, a * 1234.5) < 1e-4


def test_mask_inferred_equals_given(tiny_config):
    x = cine_phantom(4, 24, seed=3)
    m = variable_density_mask(4, 24, 3, seed=1)
    k = simulate_kspace(x, None, m)[0]
    rec = Reconstructor(tiny_config)
    assert np.array_equal(rec.recon(k, seed=0), rec.recon(k, mask=m, seed=0))
    assert np.array_equal(rec.recon(k, seed=0), rec.recon(k, mask=np.broadcast_to(m[:, :, None], k.shape), seed=0))


def test_odd_matrix_sizes_and_torch_io(tiny_config):
    x = cine_phantom(3, (30, 26), seed=3)
    k = torch.from_numpy(simulate_kspace(x, None, variable_density_mask(3, 30, 2, seed=1))[0])
    out = Reconstructor(tiny_config).recon(k)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 30, 26) and out.dtype == torch.complex64
    assert torch.isfinite(torch.view_as_real(out)).all()


def test_undersampled_baselines_improve_on_zero_filled(tiny_config):
    from ddugm_core.metrics import psnr

    x = cine_phantom(8, 32, seed=3)
    k = simulate_kspace(x, coil_maps(4, 32), variable_density_mask(8, 32, 4, seed=1))
    cfg = ReconConfig.from_dict({**tiny_config.to_dict(), "lowrank_iters": 30})
    rec = Reconstructor(cfg)
    zf = psnr(x, rec.recon(k, method="zero_filled"))
    assert psnr(x, rec.recon(k, method="low_rank")) > zf + 3
    assert psnr(x, rec.recon(k, method="l_plus_s")) > zf + 3
    assert psnr(x, rec.recon(k, method="llr_ttv")) > zf + 3


def test_coil_compression_is_exact_for_data_in_fewer_coils_and_close_otherwise(tiny_config):
    """8 receive channels that are mixtures of 3 coils: 3 virtual coils keep all the signal
    and give the all-coil reconstruction (given maps go through the same matrix); 2 keep less."""
    import dataclasses

    from ddugm_core.coils import compress_coils

    x = cine_phantom(4, 24, seed=3)
    m = variable_density_mask(4, 24, 2, seed=1)
    maps3 = coil_maps(3, 24)
    mix = np.random.default_rng(0).standard_normal((8, 3)) + 1j * np.random.default_rng(1).standard_normal((8, 3))
    mix = np.linalg.qr(mix)[0].astype(np.complex64)  # orthonormal columns: the 8 maps stay normalised
    maps8 = np.tensordot(mix, maps3, axes=(1, 0))
    k8 = simulate_kspace(x, maps8, m)
    mask = torch.from_numpy(np.broadcast_to(m[:, :, None], k8.shape[1:]).astype(np.float32))
    kv, mv, kept = compress_coils(torch.from_numpy(k8), mask, 3, torch.from_numpy(maps8))
    assert kv.shape == (3, *k8.shape[1:]) and mv.shape == (3, 24, 24) and kept == pytest.approx(1.0, abs=1e-5)
    assert compress_coils(torch.from_numpy(k8), mask, 8)[2] == 1.0 and compress_coils(torch.from_numpy(k8), mask, 2)[2] < 0.999

    rec = Reconstructor(tiny_config)
    for method in ("zero_filled", "low_rank"):
        full = rec.recon(k8, coil_maps=maps8, method=method)
        cfg3 = dataclasses.replace(tiny_config, virtual_coils=3)
        rec3 = Reconstructor(cfg3)
        assert rel(rec3.recon(k8, coil_maps=maps8, method=method), full) < 1e-3
        assert rec3.coil_energy_kept == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="virtual_coils"):
        ReconConfig.from_dict({"virtual_coils": -1})


def test_coil_compression_by_energy_picks_the_fewest_coils_that_keep_it():
    """Four channels of energies 8, 4, 2, 1 (orthogonal; shares 8/15, 12/15, 14/15, 1): 0.5 keeps
    one virtual coil, 0.75 two, 0.9 three, 0.95 all four (unchanged); a count caps it;
    out-of-range fractions are refused."""
    from ddugm_core.coils import compress_coils

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(4, 4, dtype=torch.complex64, generator=g))[0]
    mask = torch.ones(2, 8, 8)
    # each channel a mixture of 4 orthogonal signals of energies 8, 4, 2, 1
    sig = torch.linalg.qr(torch.randn(128, 4, dtype=torch.complex64, generator=g))[0].T  # orthonormal rows
    sig = sig * torch.tensor([8.0, 4.0, 2.0, 1.0]).sqrt()[:, None]
    k = (basis @ sig).reshape(4, 2, 8, 8)
    for energy, n, kept in ((0.5, 1, 8 / 15), (0.75, 2, 12 / 15), (0.9, 3, 14 / 15)):
        kv, _, frac = compress_coils(k, mask, 0, None, energy)
        assert kv.shape[0] == n and frac == pytest.approx(kept, rel=1e-4)
    kv, _, frac = compress_coils(k, mask, 0, None, 0.95)
    assert kv is k and frac == 1.0
    assert compress_coils(k, mask, 2, None, 0.99)[0].shape[0] == 2   # the count caps the energy's choice
    assert compress_coils(k, mask, 3, None, 0.5)[0].shape[0] == 1    # and the energy the count's
    with pytest.raises(ValueError, match="energy"):
        compress_coils(k, mask, 0, None, 1.5)
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match="virtual_coils_energy"):
            ReconConfig.from_dict({"virtual_coils_energy": bad})


# ------------------------------------------------------------------ bad input
def _good(t=3, n=16, c=2):
    return simulate_kspace(cine_phantom(t, n, seed=0), coil_maps(c, n), variable_density_mask(t, n, 2, seed=0))


@pytest.mark.parametrize("mutate, message", [
    (lambda k: np.where(np.arange(k.size).reshape(k.shape) == 5, np.nan, k).astype(np.complex64), "NaN or Inf"),
    (lambda k: np.where(np.arange(k.size).reshape(k.shape) == 5, np.inf, k).astype(np.complex64), "NaN or Inf"),
    (lambda k: k.real.copy(), "must be complex"),
    (lambda k: k[0, 0], "dimensions"),
    (lambda k: k[None], "dimensions"),
    (lambda k: np.concatenate([k[:, :1] * 0, k[:, 1:]], axis=1), "no acquired samples|all zero"),
    (lambda k: np.concatenate([k[:1] * 0, k[1:]], axis=0), r"coil\(s\) \[0\] are all zero"),
    (lambda k: k * 0, "samples nothing"),
    (lambda k: [[1, 2]], "numpy array or torch tensor"),
])
def test_bad_kspace_is_named(tiny_config, mutate, message):
    with pytest.raises(ValueError, match=message):
        Reconstructor(tiny_config).recon(mutate(_good()))


def test_lazy_torch_views_are_accepted(tiny_config):
    """``k.conj()`` and ``-k`` of a torch tensor are lazy views (conjugate / negative bits) that
    torch cannot view as real; the reconstruction takes them as the tensors they stand for."""
    k = torch.from_numpy(_good())
    maps = torch.from_numpy(coil_maps(2, 16))
    rec = Reconstructor(tiny_config)
    assert k.conj().is_conj()
    for lazy, plain in ((k.conj(), k.conj().resolve_conj()), (k, k)):
        a = rec.recon(lazy, coil_maps=maps.conj(), method="llr_ttv")
        b = rec.recon(plain, coil_maps=maps.conj().resolve_conj(), method="llr_ttv")
        assert torch.equal(a, b)


def test_bad_mask_and_maps_are_named(tiny_config):
    k = _good()
    rec = Reconstructor(tiny_config)
    with pytest.raises(ValueError, match="does not match kspace"):
        rec.recon(k, mask=np.ones((3, 15), bool))
    with pytest.raises(ValueError, match="samples nothing"):
        rec.recon(k, mask=np.zeros((3, 16), bool))
    with pytest.raises(ValueError, match=r"frame\(s\) \[1\] have no acquired samples"):
        m = np.ones((3, 16), bool)
        m[1] = False
        rec.recon(k, mask=m)
    with pytest.raises(ValueError, match="0 or 1"):
        rec.recon(k, mask=np.full((3, 16), 0.5))
    with pytest.raises(ValueError, match="coil_maps shape"):
        rec.recon(k, coil_maps=coil_maps(3, 16))
    with pytest.raises(ValueError, match="coil_maps must be complex"):
        rec.recon(k, coil_maps=np.ones((2, 16, 16)))


def test_missing_weights_named(tiny_config, tmp_path):
    cfg = ReconConfig.from_dict({**tiny_config.to_dict(), "image_weights": str(tmp_path / "none.safetensors")})
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        Reconstructor(cfg).recon(_good())


def test_wrong_domain_weights_named(tiny_weights, tiny_config):
    cfg = ReconConfig.from_dict({**tiny_config.to_dict(), "image_weights": str(tiny_weights["kspace"])})
    with pytest.raises(ValueError, match="expected 'image'"):
        Reconstructor(cfg).recon(_good())


# ------------------------------------------------------------------ settings
def test_config_yaml_roundtrip_and_validation(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("preset: paper\nsteps: 7\nfusion: 0.5\ndevice: cpu\n")
    cfg = ReconConfig.from_yaml(p)
    s = cfg.sampler_settings()
    assert (s.steps, s.sigma_max, s.fusion, s.rank) == (7, 4.0, 0.5, 54)
    assert ReconConfig(preset="paper").sampler_settings().steps == 1000
    for text, msg in [("stepz: 3", "unknown reconstruction setting"), ("steps: three", "must be an integer"),
                      ("steps: 0", "steps must be"), ("preset: fast", "preset must be"),
                      ("fusion: 2", "fusion must be"), ("amp: 1", "true or false"),
                      ("sigma_min: 5\nsigma_max: 1", "sigma_min"), ("- a\n- b", "mapping"),
                      ("x: !!python/object/apply:os.system ['true']", "not valid YAML"),
                      ("method: magic", "method must be"), ("init: magic", "init must be"),
                      ("ls_lambda_l: 1.5", "ls_lambda_l"), ("ls_lambda_s: -1", "ls_lambda_s"),
                      ("lowrank_solver: svd", "lowrank_solver"), ("llr_rho: 0", "llr_rho"),
                      ("ttv_lambda: -1", "ttv_lambda"), ("ttv_accel_power: -1", "ttv_accel_power"),
                      ("llr_block: 0", "llr_block"), ("init: llr", "init must be"),
                      # "meta" holds no data: it ended in "Tensor.item() cannot be called on meta tensors"
                      ("device: meta", "device must be auto, cpu, cuda"), ("device: gpu0", "device:")]:
        p.write_text(text)
        with pytest.raises(ValueError, match=msg):
            ReconConfig.from_yaml(p)


def test_shipped_config_file_loads():
    import dataclasses
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / "config" / "recon.yaml"
    cfg = ReconConfig.from_yaml(path)
    assert cfg.method == "ddugm"
    # every setting is documented there, at its default (or null: the preset's)
    listed = yaml.safe_load(path.read_text())["recon"]
    for f in dataclasses.fields(ReconConfig):
        assert f.name in listed, f"config/recon.yaml does not document {f.name}"
        assert listed[f.name] in (None, getattr(ReconConfig(), f.name)) or f.name.endswith("_weights"), f.name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_classical_methods(tiny_config):
    x = cine_phantom(4, 24, seed=3)
    k = simulate_kspace(x, coil_maps(2, 24), variable_density_mask(4, 24, 3, seed=1))
    cpu = Reconstructor(tiny_config, device="cpu").recon(k, method="low_rank")
    gpu = Reconstructor(tiny_config, device="cuda").recon(k, method="low_rank")
    assert rel(gpu, cpu) < 1e-3
    out = Reconstructor(tiny_config, device="cuda").recon(torch.from_numpy(k).cuda())
    assert out.is_cuda and torch.isfinite(torch.view_as_real(out)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_cap_refuses_what_exceeds_it():
    """The server setting gpu_memory_gb on a real card (in a child process: the cap is per process):
    256 MiB fail as out of memory under a 20 MiB cap, 4 MiB fit."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch\nfrom ddugm_core.reconstruction import cap_gpu_memory\nprint(cap_gpu_memory('cuda', 0.02))\n"
            "try:\n    torch.empty(64 * 2**20, device='cuda')\n    print('allocated')\n"
            "except torch.cuda.OutOfMemoryError:\n    print('out of memory')\n"
            "torch.empty(2**20, device='cuda')\nprint('small fits')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert "GPU memory capped at 0.02 GiB" in r.stdout and "out of memory" in r.stdout and "small fits" in r.stdout


@pytest.mark.parametrize("overrides", [{"preset": "paper", "steps": 3}, {"dc_mode": "cg", "dc_iters": 3},
                                       {"init": "low_rank"}, {"lowrank_solver": "exact"}])
def test_paper_preset_and_cg_paths_run(tiny_config, overrides):
    x = cine_phantom(4, 24, seed=3)
    k = simulate_kspace(x, coil_maps(2, 24), variable_density_mask(4, 24, 3, seed=1))
    cfg = ReconConfig.from_dict({**tiny_config.to_dict(), "preset": "dual", **overrides})
    assert cfg.resolved("init") == ("zero_filled" if overrides.get("preset") == "paper" else overrides.get("init", "l_plus_s"))
    out = Reconstructor(cfg).recon(k, coil_maps=coil_maps(2, 24))
    assert out.shape == (4, 24, 24) and np.isfinite(out).all()
    if overrides.get("preset") == "paper":
        return  # 3 steps from sigma 4 with an untrained net: only that it runs is meaningful
    # data consistency holds at the end: measured coil samples are reproduced closely
    full = simulate_kspace(out, coil_maps(2, 24), np.ones((4, 24), bool))
    m = variable_density_mask(4, 24, 3, seed=1)[None, :, :, None]
    assert rel(full * m, k) < 0.2


def test_pnp_preset_runs_from_the_llr_ttv_start_with_one_progress_count(tiny_config, monkeypatch):
    x = cine_phantom(4, 24, seed=3)
    k = simulate_kspace(x, coil_maps(2, 24), variable_density_mask(4, 24, 3, seed=1))
    cfg = ReconConfig.from_dict({**tiny_config.to_dict(), "preset": "pnp", "steps": None, "llr_iters": 4,
                                 "pnp_inner": 2, "coil_refine_min_frames": 4})  # (these 4 frames are refined)
    assert (cfg.resolved("sampler"), cfg.resolved("init"), cfg.sampler_settings().steps) == ("pnp", "llr_ttv", 8)
    seen = []
    out = Reconstructor(ReconConfig.from_dict({**cfg.to_dict(), "coil_refine": 0})).recon(
        k, callback=lambda i, n: seen.append((i, n)))
    assert out.shape == (4, 24, 24) and np.isfinite(out).all()
    assert seen[0] == (1, 12) and seen[-1] == (12, 12)  # 4 start iterations + 8 levels
    # the coil-map refinement's rounds (estimated maps) count too: a caller's check is polled there
    for method, work in (("ddugm", 12), ("llr_ttv", 4 + cfg.llr_continue_iters), ("l_plus_s", cfg.ls_iters),
                         ("low_rank", 3)):
        seen.clear()
        Reconstructor(ReconConfig.from_dict({**cfg.to_dict(), "coil_refine": 2, "coil_refine_iters": 3,
                                             "coil_refine_continue": 0})).recon(
            k, method=method, callback=lambda i, n: seen.append((i, n)))
        assert seen[:6] == [(i, 6 + work) for i in range(1, 7)], method
        assert {n for _, n in seen} == {6 + work} and seen[-1] == (6 + work, 6 + work), method
        assert [i for i, _ in seen] == sorted(i for i, _ in seen), method

    class Stop(Exception):
        pass

    def stop_at(i, n):
        if i == 2:
            raise Stop
    import ddugm_core.reconstruction as rc
    refined, real_refine = [], rc.fit_coil_maps  # (each round's maps: the fit, the default)
    monkeypatch.setattr(rc, "fit_coil_maps", lambda *a, **kw: (refined.append(1), real_refine(*a, **kw))[1])
    with pytest.raises(Stop):  # raised inside the first refinement round, before its maps
        Reconstructor(ReconConfig.from_dict({**cfg.to_dict(), "coil_refine": 2, "coil_refine_iters": 3})).recon(
            k, callback=stop_at)
    assert refined == []
    # given maps are used as they are unless refine_maps says otherwise; estimated ones are refined
    # unless refine_maps is False
    two = ReconConfig.from_dict({**cfg.to_dict(), "coil_refine": 2, "coil_refine_iters": 2, "method": "llr_ttv"})
    for given, refine_maps, rounds in ((True, None, 0), (True, True, 2), (False, None, 2), (False, False, 0)):
        refined.clear()
        out = Reconstructor(two).recon(k, coil_maps=coil_maps(2, 24) if given else None, refine_maps=refine_maps)
        assert len(refined) == rounds and np.isfinite(out).all(), (given, refine_maps)
    # a series with fewer frames than coil_refine_min_frames (the default 12) is not refined at all
    refined.clear()
    Reconstructor(ReconConfig.from_dict({**two.to_dict(), "coil_refine_min_frames": 5})).recon(k, refine_maps=True)
    assert refined == [] and ReconConfig().coil_refine_min_frames == 12
    # inside the sampler the LLR / TV weights are pnp_reg_scale x the start's, and the start's
    # ADMM iterates carry into the sampler (pnp_keep_duals): the sampler's first ADMM call
    # gets the dict the start filled
    st = Reconstructor(ReconConfig.from_dict({**cfg.to_dict(), "pnp_reg_scale": 0.5})).pnp_settings()
    assert st.llr["lambda_tv"] == 0.5 * cfg.ttv_lambda and st.llr["lambda_llr"] == 0.5 * cfg.llr_lambda
    assert st.keep_duals and not st.llr["cyclic"]
    import ddugm_core.baselines as bl
    calls, real = [], bl.llr_ttv
    monkeypatch.setattr(bl, "llr_ttv", lambda *a, **kw: (calls.append(dict(kw.get("state") or {})), real(*a, **kw))[1])
    for keep in (True, False):  # (the coil-map refinement's own LLR + TV rounds off: counted below)
        calls.clear()
        Reconstructor(ReconConfig.from_dict({**cfg.to_dict(), "pnp_keep_duals": keep, "coil_refine": 0})).recon(k)
        assert len(calls) == 9 and calls[0] == {}  # the start + one ADMM call per level
        assert ({"x", "z1", "u1", "z2", "u2"} <= set(calls[1])) == keep
    for cont in (0, 2):
        calls.clear()
        Reconstructor(ReconConfig.from_dict({**cfg.to_dict(), "coil_refine": 3, "coil_refine_continue": cont})).recon(k)
        assert len(calls) == 12 and calls[0] == {} and {"x", "z1"} <= set(calls[1])  # 3 refinement rounds, continued
        # the start after them: afresh (0), or continuing their iterates (coil_refine_continue)
        assert ({"x", "z1", "u1", "z2", "u2"} <= set(calls[3])) == (cont > 0)
    # with ttv_accel_power the temporal-TV weight follows the data's acceleration (samples of the
    # grid per acquired one): ttv_lambda at R = 8, x (R / 8) ** power, in the start, the
    # refinement rounds and (times pnp_reg_scale) the sampler; power 0: the same at every R.
    scaled = ReconConfig.from_dict({**cfg.to_dict(), "ttv_accel_power": 1.5, "ttv_lambda": 0.004})
    assert scaled.ttv_weight(8) == 0.004 and scaled.ttv_weight(2) == pytest.approx(0.004 / 8)
    assert ReconConfig.from_dict({**scaled.to_dict(), "ttv_accel_power": 0}).ttv_weight(2) == 0.004
    accel = 4 * 24 / float(np.abs(k).sum(axis=(0, 3)).astype(bool).sum())  # k: [coil, frame, ky, kx]
    calls.clear()
    monkeypatch.setattr(bl, "llr_ttv",
                        lambda *a, **kw: (calls.append(a[3] if len(a) > 3 else kw["lambda_tv"]), real(*a, **kw))[1])
    Reconstructor(ReconConfig.from_dict({**scaled.to_dict(), "coil_refine": 1, "coil_refine_iters": 2})).recon(k)
    # DD-UGM's start and map rounds at start_reg_scale x the llr_ttv method's weights
    w = 0.004 * (accel / 8) ** 1.5
    assert scaled.start_reg_scale == 2.0
    assert len(calls) == 10 and calls[:2] == [pytest.approx(2 * w)] * 2
    assert calls[2:] == [pytest.approx(2 * w * scaled.pnp_reg_scale)] * 8
    # the llr_ttv method: the same start (map round and ADMM at start_reg_scale x), then
    # llr_continue_iters more at llr_continue_scale x; with 0 of them, the plain ADMM at 1 x
    calls.clear()
    Reconstructor(ReconConfig.from_dict({**scaled.to_dict(), "coil_refine": 1, "coil_refine_iters": 2})).recon(
        k, method="llr_ttv")
    assert calls == [pytest.approx(2 * w)] * 2 + [pytest.approx(scaled.llr_continue_scale * w)]
    assert scaled.llr_continue_scale == 0.3 and scaled.llr_continue_iters == 40
    calls.clear()
    Reconstructor(ReconConfig.from_dict({**scaled.to_dict(), "coil_refine": 1, "coil_refine_iters": 2,
                                         "llr_continue_iters": 0})).recon(k, method="llr_ttv")
    assert calls == [pytest.approx(w)] * 2
    assert accel > 2
    iters = []
    monkeypatch.setattr(bl, "llr_ttv", lambda *a, **kw: (iters.append(a[1]), real(*a, **kw))[1])
    seen.clear()
    Reconstructor(ReconConfig.from_dict({**cfg.to_dict(), "coil_refine": 3, "coil_refine_iters": 2,
                                         "coil_refine_continue": 3})).recon(k, callback=lambda i, n: seen.append((i, n)))
    assert iters == [2, 2, 2, 3] + [cfg.pnp_inner] * 8 and seen[-1] == (6 + 3 + 8, 6 + 3 + 8)
    # the continued llr_ttv: one progress count over the rounds, the start and the continuation,
    # whose iterates carry on from the start's (and the start's from the rounds')
    iters.clear(), seen.clear()
    monkeypatch.setattr(bl, "llr_ttv", lambda *a, **kw: (iters.append((a[1], set(kw.get("state") or {}))),
                                                          real(*a, **kw))[1])
    rec = Reconstructor(ReconConfig.from_dict({**cfg.to_dict(), "coil_refine": 2, "coil_refine_iters": 2,
                                               "coil_refine_continue": 3, "llr_continue_iters": 4}))
    rec.recon(k, method="llr_ttv", callback=lambda i, n: seen.append((i, n)))
    assert [n for n, _ in iters] == [2, 2, 3, 4] and all({"x", "u1", "u2"} <= st for _, st in iters[1:])
    assert seen[-1] == (4 + 3 + 4, 4 + 3 + 4) and all(n == 11 for _, n in seen)
    assert [i for i, _ in seen] == list(range(1, 12))
    for bad, msg in [({"coil_refine": -1}, "coil_refine"), ({"coil_refine_window": 0}, "coil_refine"),
                     ({"coil_refine_window_static": 0}, "coil_refine_window_static >= 1"),
                     ({"coil_refine_static": -1}, "coil_refine and coil_refine_static must be >= 0"),
                     ({"coil_refine_continue": -1}, "coil_refine_continue"), ({"lowrank_momentum": 1.0}, "lowrank_momentum"),
                     ({"lowrank_momentum": -0.1}, "lowrank_momentum"), ({"coil_refine_min_frames": -1}, "coil_refine_min"),
                     ({"sampler": "dps"}, "sampler must be"), ({"pnp_gamma": -1.0}, "pnp_gamma"),
                     ({"pnp_eta": -0.1}, "pnp_eta"), ({"pnp_ensemble": 3}, "pnp_ensemble"),
                     ({"pnp_reg_scale": -1.0}, "pnp_reg_scale"), ({"pnp_xt_planes": "xy"}, "pnp_xt_planes"),
                     ({"llr_continue_iters": -1}, "llr_continue_iters"),
                     ({"llr_continue_scale": -0.1}, "llr_continue_scale"),
                     ({"llr_continue_scale": float("nan")}, "finite numbers: llr_continue_scale = nan"),
                     ({"pnp_gamma": float("inf"), "ttv_lambda": float("nan")}, "pnp_gamma = inf, ttv_lambda = nan")]:
        with pytest.raises(ValueError, match=msg):
            ReconConfig.from_dict({**tiny_config.to_dict(), **bad})


def test_a_numerical_breakdown_is_an_error_not_an_image(tiny_config, monkeypatch):
    """NaN / inf in the result, or an SVD that fails on them (a weight so large that float32
    overflows), raise FloatingPointError naming the method: never a NaN image to a scanner."""
    x = cine_phantom(4, 16, seed=1)
    k = simulate_kspace(x, coil_maps(2, 16), variable_density_mask(4, 16, 2, seed=1))
    rec = Reconstructor(ReconConfig.from_dict({**tiny_config.to_dict(), "llr_iters": 2, "llr_continue_iters": 1}))
    assert np.isfinite(rec.recon(k, method="llr_ttv")).all()
    huge = {**tiny_config.to_dict(), "preset": "pnp", "steps": 2, "llr_iters": 2, "pnp_inner": 2, "pnp_xt_weight": 0.0,
            "pnp_gamma": 1e30}  # finite, but the ADMM's float32 overflows
    with pytest.raises(FloatingPointError, match="the ddugm reconstruction (broke down numerically|produced non-finite)"):
        Reconstructor(ReconConfig.from_dict(huge)).recon(k)
    real = Reconstructor._recon
    for poison in ("nan", "inf"):
        monkeypatch.setattr(Reconstructor, "_recon", lambda self, *a, p=poison: real(self, *a) + float(p))
        with pytest.raises(FloatingPointError, match="the llr_ttv reconstruction produced non-finite values"):
            rec.recon(k, method="llr_ttv")
    monkeypatch.setattr(Reconstructor, "_recon", lambda self, *a: (_ for _ in ()).throw(torch.linalg.LinAlgError("eigh")))
    with pytest.raises(FloatingPointError, match="the ddugm reconstruction broke down numerically"):
        rec.recon(k)


def test_pnp_with_the_plane_prior(tiny_config, tiny_weights, tmp_path):
    """pnp_xt_weight > 0 (the default preset's 0.6) loads the spatio-temporal plane prior (any
    frame count: 5 frames is not a multiple of its divisor) and keeps it out of the models
    otherwise; a missing file is a clear error naming the setting."""
    assert ReconConfig().resolved("pnp_xt_weight") == 0.6 and ReconConfig(preset="dual").resolved("pnp_xt_weight") == 0
    x = cine_phantom(5, 24, seed=3)
    k = simulate_kspace(x, coil_maps(2, 24), variable_density_mask(5, 24, 3, seed=1))
    base = {**tiny_config.to_dict(), "preset": "pnp", "steps": 2, "llr_iters": 3, "pnp_inner": 2}
    rec = Reconstructor(ReconConfig.from_dict({**base, "xt_weights": str(tiny_weights["xt"]), "pnp_xt_weight": 0.5}))
    out = rec.recon(k)
    assert out.shape == (5, 24, 24) and np.isfinite(out).all()
    assert set(rec.load_models()) == {"image", "kspace", "xt"} and str(tiny_weights["xt"]) in rec.model_key()
    plain = Reconstructor(ReconConfig.from_dict({**base, "pnp_xt_weight": 0.0}))
    assert set(plain.load_models()) == {"image", "kspace"}
    missing = Reconstructor(ReconConfig.from_dict({**base, "xt_weights": str(tmp_path / "none.safetensors"),
                                                   "pnp_xt_weight": 1.0}))
    with pytest.raises(ValueError, match="pnp_xt_weight"):
        missing.recon(k)
    with pytest.raises(ValueError, match="pnp_xt_weight"):
        ReconConfig.from_dict({**base, "pnp_xt_weight": 2.0})


def test_a_scale_percentile_in_the_background_is_named(tiny_config):
    """A scale_percentile so low that it falls in the empty background used to say "the data
    have no signal"; the error now names the setting."""
    from ddugm_core.phantom import cine_phantom, simulate_kspace

    x = np.zeros((2, 16, 16), np.complex64)
    x[:, 6:10, 6:10] = cine_phantom(2, (16, 16), seed=0)[:, 6:10, 6:10]
    k = simulate_kspace(x, None, np.ones((2, 16), bool), noise=0.0, seed=0)
    cfg = ReconConfig.from_dict({**tiny_config.to_dict(), "method": "zero_filled", "scale_percentile": 1e-9})
    with pytest.raises(ValueError, match="scale_percentile too low"):
        Reconstructor(cfg).recon(k)


def test_a_known_noise_level_strengthens_lr_tv_and_lifts_the_sampler(tiny_config):
    """noise_std (from a noise scan): above noise_reference the LLR and temporal-TV weights grow
    in proportion (noise_adapt 1) and the pnp sampler's noise levels by the ratio ** 0.6; at or
    below it, or unknown, nothing changes; noise_adapt 0 turns it off."""
    x = cine_phantom(4, 24, seed=3)
    k = simulate_kspace(x, coil_maps(2, 24), variable_density_mask(4, 24, 3, seed=1))
    rec = Reconstructor(tiny_config, device="cpu")
    plain = rec.recon(k, method="llr_ttv")
    assert rec.noise_factor == 1.0 and rec.noise_ratio == 1.0
    quiet = rec.recon(k, method="llr_ttv", noise_std=1e-6)
    assert rec.noise_factor == 1.0 and np.array_equal(quiet, plain)
    noisy = rec.recon(k, method="llr_ttv", noise_std=0.5)
    assert rec.noise_ratio > 5 and rec.noise_factor == pytest.approx(rec.noise_ratio)
    tv = lambda v: float(np.abs(np.diff(v, axis=0)).sum())  # noqa: E731
    assert tv(noisy) < tv(plain)  # stronger temporal TV
    base = rec.pnp_settings()
    lifted = rec.pnp_settings(noise_ratio=4.0)
    assert lifted.sigma_max == pytest.approx(base.sigma_max * 4 ** 0.6)
    assert lifted.sigma_min == pytest.approx(base.sigma_min * 4 ** 0.6)
    off = Reconstructor(ReconConfig.from_dict({**tiny_config.to_dict(), "noise_adapt": 0, "noise_adapt_sigma": 0}))
    assert np.array_equal(off.recon(k, method="llr_ttv", noise_std=0.5), plain) and off.noise_factor == 1.0
    assert off.pnp_settings(noise_ratio=4.0).sigma_max == base.sigma_max
    with pytest.raises(ValueError, match="noise_std must be"):
        rec.recon(k, method="llr_ttv", noise_std=-1.0)
    with pytest.raises(ValueError, match="noise_reference must be > 0"):
        ReconConfig(noise_reference=0).validate()


@pytest.mark.parametrize("noise", [0.01, 0.05])
def test_the_noise_of_prewhitened_coils_is_estimated_from_the_data(noise):
    """Without a noise scan the noise was unknown, so the noise adaptation never ran in the
    Gadgetron chains (their NoiseAdjustGadget whitens and keeps the scan). With 8 or more coils
    and a noise floor across them, the smallest eigenvalue of the coil covariance over the outer
    readout is the noise: within 10 % of the simulated one. Fewer coils, or signal in every
    direction across the coils (no floor), tell nothing (None)."""
    from ddugm_core.coils import estimate_noise_std

    x = cine_phantom(6, 48, seed=2)
    mask = variable_density_mask(6, 48, 4, seed=0)
    k = torch.from_numpy(simulate_kspace(x, coil_maps(10, 48), mask, noise=noise, seed=1))
    m = torch.from_numpy(mask)
    est = estimate_noise_std(k, m)
    assert est == pytest.approx(noise, rel=0.1)
    assert estimate_noise_std(k[:6], m) is None  # too few coils to hold a noise-only direction
    g = torch.Generator().manual_seed(0)
    loud = k + 10 * noise * torch.randn(10, 1, 1, 1, generator=g) * torch.randn(k.shape, dtype=torch.complex64,
                                                                                 generator=g)
    assert estimate_noise_std(loud, m) is None  # coils of very different noise: no floor


def test_unknown_noise_is_estimated_and_strengthens_the_weights(tiny_config):
    """recon() without noise_std: the estimate stands in for it (noise_source "estimated"), as
    a noise scan's would; the same weights as the told noise give. noise_estimate: off keeps the
    weights as set; a told noise wins over the estimate; a bad value is refused at load."""
    x = cine_phantom(6, 32, seed=3)
    k = simulate_kspace(x, coil_maps(10, 32), variable_density_mask(6, 32, 3, seed=1), noise=0.05, seed=2)
    rec = Reconstructor(tiny_config, device="cpu")
    est = rec.recon(k, method="llr_ttv")
    assert rec.noise_source == "estimated" and rec.noise_std == pytest.approx(0.05, rel=0.1) and rec.noise_ratio > 5
    factor = rec.noise_factor
    told = rec.recon(k, method="llr_ttv", noise_std=rec.noise_std)
    assert rec.noise_source == "told" and rec.noise_factor == factor and np.allclose(told, est)
    off = Reconstructor(ReconConfig.from_dict({**tiny_config.to_dict(), "noise_estimate": "off"}), device="cpu")
    plain = off.recon(k, method="llr_ttv")
    assert off.noise_source is None and off.noise_factor == 1.0 and not np.allclose(plain, est)
    with pytest.raises(ValueError, match="noise_estimate must be one of"):
        ReconConfig.from_dict({"noise_estimate": "scan"})


def test_maps_of_the_same_lines_in_every_frame_are_refined_with_their_own_window(tiny_config):
    """``coil_refine_mode: average``: ``coil_refine_window_static`` where every frame has the
    same lines (GRAPPA-style cine), ``coil_refine_window`` where the frames' lines fill the
    centre; the image follows the window. The default mode, fit, has no window."""
    from ddugm_core.masks import equispaced_mask

    x = cine_phantom(12, 32, seed=1)
    maps = coil_maps(4, 32)
    cfg = ReconConfig.from_dict({**tiny_config.to_dict(), "coil_refine": 2, "coil_refine_iters": 2,
                                 "coil_refine_min_frames": 12, "coil_refine_mode": "average"})
    out = {}
    for name, m in (("static", equispaced_mask(12, 32, 3, 6)), ("random", variable_density_mask(12, 32, 3, seed=0))):
        k = simulate_kspace(x, maps, m, noise=0.002, seed=0)
        for w in (3, 9):
            rec = Reconstructor(ReconConfig.from_dict({**cfg.to_dict(), "coil_refine_window_static": w}))
            out[name, w] = rec.recon(k, m, method="llr_ttv")
            assert rec.coil_window == (w if name == "static" else cfg.coil_refine_window)
            assert rec.coil_refinement == "average"
    assert not torch.allclose(torch.as_tensor(out["static", 3]), torch.as_tensor(out["static", 9]))
    assert torch.equal(torch.as_tensor(out["random", 3]), torch.as_tensor(out["random", 9]))
    assert cfg.coil_refine_window == 5 and ReconConfig().coil_refine_window_static == 9
    fit = Reconstructor(ReconConfig.from_dict({**cfg.to_dict(), "coil_refine_mode": "fit"}))
    fit.recon(k, m, method="llr_ttv")
    assert fit.coil_refinement == "fit" and fit.coil_window is None and ReconConfig().coil_refine_mode == "fit"
    # the fit's band: coil_fit_band_static where every frame has the same lines, else coil_fit_band
    import ddugm_core.reconstruction as rc
    bands = []
    real = rc.fit_coil_maps
    try:
        rc.fit_coil_maps = lambda *a, **kw: (bands[-1].add(a[4]), real(*a, **kw))[1]
        for m in (equispaced_mask(12, 32, 3, 6), variable_density_mask(12, 32, 3, seed=0)):
            bands.append(set())
            fit.recon(simulate_kspace(x, maps, m, noise=0.002, seed=0), m, method="llr_ttv")
    finally:
        rc.fit_coil_maps = real
    assert bands == [{0.04}, {0.0625}] and ReconConfig().coil_fit_band_static == 0.04


def test_maps_of_the_same_lines_in_every_frame_get_their_own_refinement_rounds(tiny_config, monkeypatch):
    """``coil_refine_static`` rounds where every frame has the same lines (0: as ``coil_refine``),
    ``coil_refine`` elsewhere; ``coil_refine: 0`` stays off for both."""
    import ddugm_core.reconstruction as rc
    from ddugm_core.masks import equispaced_mask

    rounds = []
    for name in ("fit_coil_maps", "refine_coil_maps"):  # (the fit, the default, or the average)
        real = getattr(rc, name)
        monkeypatch.setattr(rc, name, lambda *a, real=real, **kw: (rounds.append(1), real(*a, **kw))[1])
    x, maps = cine_phantom(12, 32, seed=1), coil_maps(4, 32)
    base = {**tiny_config.to_dict(), "coil_refine": 2, "coil_refine_iters": 1, "coil_refine_min_frames": 12}
    for m, over, expect in ((equispaced_mask(12, 32, 3, 6), {"coil_refine_static": 3}, 3),
                            (equispaced_mask(12, 32, 3, 6), {"coil_refine_static": 0}, 2),
                            (equispaced_mask(12, 32, 3, 6), {"coil_refine": 0, "coil_refine_static": 3}, 0),
                            (variable_density_mask(12, 32, 3, seed=0), {"coil_refine_static": 3}, 2)):
        rounds.clear()
        k = simulate_kspace(x, maps, m, noise=0.002, seed=0)
        Reconstructor(ReconConfig.from_dict({**base, **over})).recon(k, m, method="llr_ttv")
        assert len(rounds) == expect, (over, len(rounds))
    assert ReconConfig().coil_refine_static == 10 and ReconConfig().coil_refine == 5
