"""Artifact-aware fine-tuning (``ddugm train --objective artifacts``): what it collects, that the
fine-tuning moves the denoiser towards the truth on held-out cases, and its files."""
import json

import numpy as np
import pytest
import torch

from ddugm_core.artifacts import aligned_truth, collect, denoiser_error_ratio, finetune
from ddugm_core.checkpoints import load_model, read_metadata


def _smooth_cine(rng, t=6, n=16):
    yy, xx = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    frames = []
    for k in range(t):
        r = 0.5 + 0.1 * np.sin(2 * np.pi * k / t)
        frames.append((xx ** 2 + yy ** 2 < r ** 2) * (1 + 0.2 * rng.standard_normal()) + 0.2 * (np.abs(xx) < 0.8))
    return np.array(frames, np.float32)


def test_aligned_truth_takes_the_iterates_scale_and_smooth_phase():
    rng = np.random.default_rng(0)
    truth = torch.from_numpy(_smooth_cine(rng, 6, 48)).to(torch.complex64) + 0.1
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 48), indexing="ij")
    x = 2.5 * truth * torch.polar(torch.ones(48, 48), 0.7 + 0.3 * xx)  # another scale and a smooth phase ramp
    a = aligned_truth(x, truth)  # (the 9-pixel window smooths the phase: 1 % error here, 2 % on 32 pixels)
    assert float((a - x).abs().pow(2).mean().sqrt() / x.abs().pow(2).mean().sqrt()) < 0.02
    assert float((aligned_truth(truth * 1j, truth) - truth * 1j).abs().max()) < 1e-5
    assert float((aligned_truth(truth, truth) - truth).abs().max()) < 1e-5


def _cases(rng, n, t=6, size=16, sigma=0.03):
    """x = truth blurred in time (the error the classical start leaves), as pairs at two levels."""
    cases = []
    for i in range(n):
        truth = torch.from_numpy(_smooth_cine(rng, t, size)).to(torch.complex64)
        x = 0.5 * truth + 0.25 * (truth.roll(1, 0) + truth.roll(-1, 0))
        cases.append({"name": f"c{i}", "accel": 8.0, "pairs": [(x, truth, sigma), (x, truth, sigma / 2)]})
    return cases


@pytest.mark.parametrize("domain", ["image", "xt"])
def test_finetuning_moves_the_denoiser_towards_the_truth(tmp_path, tiny_weights, domain):
    rng = np.random.default_rng(1)
    cases = _cases(rng, 12)
    net = load_model(tiny_weights[domain], expect_domain=domain)
    before = denoiser_error_ratio(net, cases[-4:], domain)
    info = finetune(domain, tiny_weights[domain], cases, tmp_path, steps=150, lr=2e-3, holdout=4, ema=0.9,
                    dsm_share=0.0, log=lambda m: None)
    assert info["holdout_error_ratio_before"] == before
    after = info["holdout_error_ratio_after"]
    assert all(after[k] < 0.9 * before[k] for k in before), (before, after)  # measured on cases it never saw
    new = load_model(tmp_path / f"{domain}.safetensors", expect_domain=domain)
    assert denoiser_error_ratio(new, cases[-4:], domain) == after
    meta = json.loads(read_metadata(tmp_path / f"{domain}.safetensors")["settings"])
    assert meta["objective"] == "artifacts" and meta["steps"] == 150 and meta["cases"] == 8
    lines = (tmp_path / f"{domain}_loss.csv").read_text().splitlines()
    assert lines[0] == "step,seconds,artifact_loss,loss" and len(lines) == 151
    assert json.loads((tmp_path / f"{domain}_settings.json").read_text())["holdout_cases"] == 4


def test_finetuning_refuses_what_it_cannot_do(tmp_path, tiny_weights):
    cases = _cases(np.random.default_rng(2), 3)
    with pytest.raises(ValueError, match="domain image or xt"):
        finetune("kspace", tiny_weights["kspace"], cases, tmp_path, steps=1)
    with pytest.raises(ValueError, match="need more than the 8 held out"):
        finetune("image", tiny_weights["image"], cases, tmp_path, steps=1)
    with pytest.raises(ValueError, match="--minutes or --steps"):
        finetune("image", tiny_weights["image"], cases * 4, tmp_path)


def test_collect_keeps_the_samplers_own_inputs(tmp_path, tiny_config):
    rng = np.random.default_rng(3)
    f = tmp_path / "series.npy"
    np.save(f, _smooth_cine(rng, t=6, n=24)[:, None].transpose(1, 0, 2, 3)[0])  # [T, y, x]
    cfg = tiny_config
    cfg.coil_refine = 0
    cases = collect([f], minutes=5, accels=(4.0,), coils=4, seed=1, config=cfg, max_cases=1, log=lambda m: None)
    assert len(cases) == 1 and cases[0]["accel"] == 4.0
    pairs = cases[0]["pairs"]
    assert [round(s, 4) for *_, s in pairs] == [0.05, 0.0224, 0.01]  # the preset's levels (3 steps here)
    for x, ta, _ in pairs:
        assert x.shape == ta.shape == (6, 24, 24) and x.dtype == torch.complex64
        assert float(x.sum().imag.abs()) < 1e-3 * float(x.abs().sum())  # turned as the priors see it
        err = float((x - ta).abs().pow(2).mean() / ta.abs().pow(2).mean())
        assert 0 < err < 0.5  # an undersampled reconstruction: close to the truth, not equal


def test_collect_from_a_pack_of_whole_cycles(tmp_path, tiny_config):
    """What a GPU machine has: ``ddugm pack``'s cycles.npz (no data folder)."""
    from ddugm_core.data import write_pack

    rng = np.random.default_rng(4)
    files = []
    for i in range(2):
        files.append(tmp_path / f"s{i}.npy")
        np.save(files[-1], _smooth_cine(rng, t=6, n=24))
    pack = tmp_path / "cycles.npz"
    write_pack(files, pack, whole_cycles=True, stride=1)
    cfg = tiny_config
    cfg.coil_refine = 0
    cases = collect([pack], minutes=5, accels=(4.0,), coils=4, seed=1, config=cfg, max_cases=3, log=lambda m: None)
    assert [c["name"] for c in cases] == ["cycles_0", "cycles_1", "cycles_0_r1"]  # each series once a round
    assert [c["group"] for c in cases] == ["cycles_0", "cycles_1", "cycles_0"]
    assert all(len(c["pairs"]) == 3 and c["pairs"][0][0].shape == (6, 24, 24) for c in cases)
    assert not torch.equal(cases[0]["pairs"][0][0], cases[2]["pairs"][0][0])  # another mask, coils and noise


def test_held_out_patients_stay_out_of_the_finetuning(tmp_path, tiny_weights):
    """A held-out case's patient (``group``) is not trained on under another mask either."""
    cases = _cases(np.random.default_rng(5), 6)
    for i, c in enumerate(cases):
        c["group"] = f"p{i % 3}"  # the last two cases' patients (p1, p2) also appear earlier
    info = finetune("image", tiny_weights["image"], cases, tmp_path, steps=2, holdout=2, log=lambda m: None)
    assert info["cases"] == 2 and info["holdout_cases"] == 2  # p0's two cases
    with pytest.raises(ValueError, match="shares its patient"):
        finetune("image", tiny_weights["image"], cases, tmp_path, steps=2, holdout=3, log=lambda m: None)


def test_cases_keep_the_phase_of_complex_stacks(tmp_path):
    """Complex stacks (``train --data RAW`` writes them) give their cases with their own phase;
    magnitude ones stay real, to get a synthetic phase like every magnitude source."""
    from ddugm_core.artifacts import series_from

    rng = np.random.default_rng(0)
    cplx = (rng.standard_normal((4, 3, 16, 16)) + 1j * rng.standard_normal((4, 3, 16, 16))).astype(np.complex64)
    np.savez(tmp_path / "scan.npz", cine=cplx)
    np.save(tmp_path / "mag.npy", np.abs(cplx[:, 0]))
    cases = {name: frames for name, frames, *_ in series_from([tmp_path / "scan.npz", tmp_path / "mag.npy"])}
    np.testing.assert_array_equal(cases["scan_z1"], cplx[:, 1])
    assert not np.iscomplexobj(cases["mag_z0"])
