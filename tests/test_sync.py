"""The sampler's loop never waits for the device: no host reads of tensor values per step.

On a GPU every ``.item()``, ``float(t)``, ``if t:``, ``.tolist()`` or ``.cpu()`` stalls the
host until the queue drains, so the launch-bound network calls can no longer overlap.
On the CPU the same calls are counted by patching them on ``torch.Tensor``; on CUDA the
GPU test counts real synchronisations with torch's sync debug mode.
"""
import contextlib
import sys
import warnings

import pytest
import torch

from ddugm_core.consistency import DataConsistency
from ddugm_core.networks import NCSNpp, NetConfig, ScoreFunction
from ddugm_core.operators import KWeight, fft2c, kspace_weight
from ddugm_core.sampler import SamplerSettings, ddugm_sample

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def host_reads():
    """Record ``file:line name`` for every host read of a tensor's value inside the block."""
    seen, saved = [], {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, original):
        def reader(self, *args, **kwargs):
            caller = sys._getframe(1)
            seen.append(f"{caller.f_code.co_filename}:{caller.f_lineno} {name}")
            return original(self, *args, **kwargs)
        return reader

    for name, original in saved.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield seen
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _problem(device, coils=3, t=4, n=16):
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(t, n, n, generator=g, dtype=torch.complex64)
    maps = torch.randn(coils, n, n, generator=g, dtype=torch.complex64)
    maps = maps / torch.linalg.vector_norm(maps, dim=0, keepdim=True)
    mask = (torch.rand(t, n, generator=g) < 0.5).float()[:, :, None].expand(t, n, n)
    y = fft2c(maps[:, None] * truth[None]) * mask
    return y.to(device), mask.to(device), maps.to(device)


def _scores(device):
    torch.manual_seed(0)
    cfg = NetConfig(nf=8, ch_mult=(1, 2), attn_resolutions=(8,), image_size=16)
    return ScoreFunction(NCSNpp(cfg).to(device)), ScoreFunction(NCSNpp(cfg).to(device))


def _sample(device, steps, solver="subspace", dc_mode="replace", score_i=None, around=contextlib.nullcontext):
    """Set up a multi-coil problem, then run the sampler (only that inside ``around()``)."""
    y, mask, maps = _problem(device)
    dc = DataConsistency(y, mask, maps, mode=dc_mode)
    score_k, default_i = _scores(device)
    k0 = fft2c(dc.image(dc.adjoint_image()))
    settings = SamplerSettings(steps=steps, sigma_max=0.3, rank=20, window=3, lowrank_solver=solver)
    w = KWeight(kspace_weight(16, 16, device=device))
    gen = torch.Generator(device).manual_seed(0)
    with around():
        return ddugm_sample(k0, dc, score_k, score_i or default_i, w, settings, gen, callback=lambda i, n: None)


def _reads_in_loop(**kwargs):
    """Host reads made by the sampler on the CPU (set-up not counted)."""
    seen = []

    @contextlib.contextmanager
    def counted():
        with host_reads() as reads:
            yield
        seen.extend(reads)

    _sample("cpu", steps=3, around=counted, **kwargs)
    return seen


@pytest.mark.parametrize("solver,dc_mode", [("subspace", "replace"), ("exact", "replace"), ("subspace", "cg")])
def test_sampler_loop_reads_nothing_back_from_the_device(solver, dc_mode):
    seen = _reads_in_loop(solver=solver, dc_mode=dc_mode)
    assert seen == [], "host reads in the sampler:\n" + "\n".join(seen)


def test_host_read_counter_would_catch_a_per_step_read():
    _, score_i = _scores("cpu")

    def reads_sigma(x, sigma):  # a score that turns the noise level into a Python float
        return score_i(x, float(sigma))

    seen = _reads_in_loop(score_i=reads_sigma)
    assert len(seen) == 6 and all(s.endswith("__float__") for s in seen)


@pytest.mark.gpu
def test_sampler_loop_does_not_synchronise_the_gpu():
    """Synchronisations must not grow with the number of steps (a one-off start is allowed)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    def syncs(steps):
        _sample("cuda", 1)  # warm-up: first-call library initialisation may synchronise
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _sample("cuda", steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # only the synchronisations themselves: torch also warns, once per process, that the
        # debug mode is a prototype (seen on an H200, torch 2.11: 308 at 2 steps against 307 at 6)
        return [str(w.message).splitlines()[0] for w in caught if str(w.message).startswith("called a synchroniz")]

    few, many = syncs(2), syncs(6)
    assert len(many) == len(few), f"per-step synchronisations: {len(few)} at 2 steps, {len(many)} at 6: {many[:5]}"


def _compiled_vs_eager(config, device):
    import dataclasses

    import numpy as np

    from ddugm_core import Reconstructor
    from ddugm_core.masks import variable_density_mask
    from ddugm_core.phantom import cine_phantom, coil_maps, simulate_kspace

    k = simulate_kspace(cine_phantom(4, 16, seed=1), coil_maps(2, 16), variable_density_mask(4, 16, 3, seed=2))
    cfg = dataclasses.replace(config, amp=False, device=device)  # float32 both ways: bf16 rounding would differ
    eager = Reconstructor(cfg).recon(k, seed=1)
    compiled_rec = Reconstructor(dataclasses.replace(cfg, compile=True))
    compiled = [compiled_rec.recon(k, seed=1) for _ in range(2)]  # the second call replays
    for c in compiled:
        assert np.linalg.norm(c - eager) / np.linalg.norm(eager) < 1e-4


@pytest.mark.slow
def test_compiled_networks_give_the_eager_result(tiny_config):
    """``compile: true`` (torch.compile; needs a C++ compiler on the CPU) changes speed only."""
    _compiled_vs_eager(tiny_config, "cpu")


@pytest.mark.gpu
def test_cuda_graph_networks_give_the_eager_result(tiny_config):
    """On CUDA ``compile: true`` replays CUDA graphs; outputs must not be overwritten by later calls."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _compiled_vs_eager(tiny_config, "cuda")


def test_pnp_phase_turn_adds_no_host_reads():
    """The pnp sampler's phase turn (``pnp_phase: mean``) stays on the device: the loop makes
    exactly the host reads it makes without it (the schedule and the LLR tile shifts, set on
    the host)."""
    from ddugm_core.sampler import PnPSettings, pnp_sample

    y, mask, maps = _problem("cpu")
    dc = DataConsistency(y, mask, maps)
    score_i = _scores("cpu")[1]
    x0 = dc.image(dc.adjoint_image())
    counts = {}
    for phase in ("none", "mean"):
        settings = PnPSettings(steps=3, inner=2, phase=phase, llr={"lambda_llr": 0.001, "lambda_tv": 0.01, "block": 4})
        with host_reads() as seen:
            pnp_sample(x0, dc, score_i, settings)
        counts[phase] = sorted(seen)
    assert counts["mean"] == counts["none"]
