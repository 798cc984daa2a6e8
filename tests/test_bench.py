"""``ddugm bench`` and the stage timer behind it."""
import json
import time

import pytest

from ddugm_core.cli import main
from ddugm_core.profiling import StageTimer, stage


def test_stage_is_free_when_no_timer_is_active():
    with stage("network", 3):
        pass  # nothing recorded, nothing raised


def test_nested_stages_are_charged_once():
    with StageTimer() as t:
        with stage("outer"):
            time.sleep(0.02)
            with stage("inner", 5):
                time.sleep(0.03)
        time.sleep(0.01)
    s = t.summary()
    assert 0.015 < s["stages_s"]["outer"] < 0.03 and 0.025 < s["stages_s"]["inner"] < 0.05
    assert s["stages_s"]["other"] >= 0.005
    assert abs(sum(s["stages_s"].values()) - s["total_s"]) < 1e-6
    assert s["calls"] == {"outer": 1, "inner": 1} and s["items"]["inner"] == 5
    with pytest.raises(RuntimeError):
        with StageTimer(), StageTimer():
            pass


def test_bench_writes_json(tmp_path, tiny_weights, monkeypatch):
    from ddugm_core import bench

    monkeypatch.setattr(bench, "CASES", {"paper": (3, (16, 16), 1), "cine8": (4, (16, 12), 3)})
    monkeypatch.setattr(bench, "ACCEL", 2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"recon:\n  lowrank_iters: 2\n  image_weights: {tiny_weights['image']}\n"
                   f"  kspace_weights: {tiny_weights['kspace']}\n  xt_weights: {tiny_weights['xt']}\n")
    out = tmp_path / "b.json"
    assert main(["bench", "--device", "cpu", "--steps", "3", "--config", str(cfg), "--json", str(out),
                 "--repeat", "2", "--preset", "dual"]) == 0
    res = json.loads(out.read_text())
    assert res["info"]["steps"] == 3 and [r["case"] for r in res["results"]] == ["paper", "cine8"]
    for r in res["results"]:
        assert r["network_calls"] == 2 * 3  # dual preset: k-space and image predictor per step, no correctors
        assert r["network_frames"] == 2 * 3 * r["frames"]
        assert set(r["stages_s"]) == {"network", "data consistency", "low-rank", "other"}
        assert abs(sum(r["stages_s"].values()) - r["instrumented_s"]) < 1e-6
        assert 1 <= r["coils_reconstructed"] <= r["coils"]  # after coil compression
        assert len(r["runs"]) == 2 and r["seconds_per_slice"] > 0 and r["process_max_rss_gb"] > 0


def test_bench_repeat_zero_times_the_instrumented_run(tmp_path, tiny_weights, monkeypatch):
    from ddugm_core import bench

    monkeypatch.setattr(bench, "CASES", {"paper": (3, (16, 16), 1)})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"recon:\n  image_weights: {tiny_weights['image']}\n  kspace_weights: {tiny_weights['kspace']}\n"
                   f"  xt_weights: {tiny_weights['xt']}\n")
    out = tmp_path / "b.json"
    assert main(["bench", "--device", "cpu", "--method", "low_rank", "--config", str(cfg), "--json", str(out),
                 "--repeat", "0", "--no-warmup"]) == 0
    r = json.loads(out.read_text())["results"][0]
    assert r["runs"] == [r["instrumented_s"]] and r["network_calls"] == 0 and r["stages_s"]["low-rank"] > 0


def test_bench_json_keeps_the_cases_measured_before_a_failure(tmp_path, tiny_weights, monkeypatch):
    """The JSON is written after every case, so a bench cut short (the GPU script time-boxes it)
    keeps what it measured; it used to be written only at the end."""
    from ddugm_core import bench, phantom

    monkeypatch.setattr(bench, "CASES", {"paper": (3, (16, 16), 1), "cine8": (4, (16, 12), 3)})
    real, calls = phantom.simulate_kspace, []

    def second_fails(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cut short")
        return real(*a, **kw)

    monkeypatch.setattr(phantom, "simulate_kspace", second_fails)
    out = tmp_path / "b.json"
    with pytest.raises(RuntimeError, match="cut short"):
        bench.run(bench_args(out, cases="paper,cine8", method="low_rank", repeat=0, no_warmup=True))
    assert [r["case"] for r in json.loads(out.read_text())["results"]] == ["paper"]
    assert not list(tmp_path.glob("*.part"))


def bench_args(out, **kw):
    import argparse

    args = dict(cases="paper", preset="default", method="ddugm", steps=None, device="cpu", config=None, json=str(out),
                seed=0, repeat=0, no_warmup=True)
    return argparse.Namespace(**{**args, **kw})


def test_bench_rejects_unknown_case(tmp_path, capsys):
    assert main(["bench", "--cases", "huge", "--json", str(tmp_path / "x.json")]) == 2
    assert "unknown case" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_on_cuda(tmp_path, tiny_weights, monkeypatch):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ddugm_core import bench

    monkeypatch.setattr(bench, "CASES", {"cine8": (4, (32, 32), 3)})
    monkeypatch.setattr(bench, "ACCEL", 2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"recon:\n  image_weights: {tiny_weights['image']}\n  kspace_weights: {tiny_weights['kspace']}\n"
                   f"  xt_weights: {tiny_weights['xt']}\n")
    out = tmp_path / "b.json"
    assert main(["bench", "--device", "cuda", "--steps", "3", "--config", str(cfg), "--json", str(out)]) == 0
    r = json.loads(out.read_text())["results"][0]
    assert r["cuda_max_allocated_gb"] > 0 and r["network_calls"] == 6 and r["psnr_db"] > 10
