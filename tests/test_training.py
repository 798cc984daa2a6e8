import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddugm_core.cli import main
from ddugm_core.data import FrameSampler, load_frames, split_files

ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc_cine"
TINY = ["--steps", "4", "--batch", "2", "--size", "16", "--nf", "8", "--ch-mult", "1,2", "--attn", "",
        "--log-every", "2", "--save-every", "2", "--quiet", "--threads", "1"]


@pytest.fixture
def frames_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "frames"
    d.mkdir()
    for i in range(3):  # magnitude [T, H, W] and complex [T, H, W] stacks
        np.save(d / f"mag{i}.npy", rng.random((5, 20, 18)).astype(np.float32))
    cplx = rng.standard_normal((4, 20, 18)) + 1j * rng.standard_normal((4, 20, 18))
    np.savez(d / "cplx.npz", frames=cplx.astype(np.complex64))
    return d


@pytest.mark.parametrize("domain", ["image", "kspace"])
def test_train_writes_weights_settings_and_resumes(frames_dir, tmp_path, domain):
    out = tmp_path / domain
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # --threads 1 holds for the training only: the caller's thread count is left as it was
        assert main(["train", "--domain", domain, "--data", str(frames_dir), "--out", str(out), *TINY]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert (out / f"{domain}.safetensors").is_file() and (out / "state.safetensors").is_file()
    settings = json.loads((out / "settings.json").read_text())
    assert settings["domain"] == domain and settings["net"]["nf"] == 8 and settings["val_files"]
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert [r["step"] for r in rows] == ["2", "4"] and all(np.isfinite(float(r["train_loss"])) for r in rows)
    # resume: continue to step 6 from the saved state
    args = [*TINY]
    args[args.index("--steps") + 1] = "6"
    assert main(["train", "--domain", domain, "--data", str(frames_dir), "--out", str(out), *args]) == 0
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert [r["step"] for r in rows] == ["2", "4", "6"]


def test_train_rejects_bad_settings(frames_dir, tmp_path, capsys):
    assert main(["train", "--domain", "image", "--data", str(frames_dir), "--out", str(tmp_path), "--size", "18",
                 "--ch-mult", "1,2,2", "--quiet"]) == 2
    assert "multiple of 4" in capsys.readouterr().err
    assert main(["train", "--domain", "image", "--data", str(tmp_path / "missing"), "--quiet"]) == 2
    base = ["train", "--domain", "image", "--data", str(frames_dir), "--out", str(tmp_path / "o"), "--steps", "1",
            "--quiet"]
    for extra, message in [(["--warmup", "-5"], "warmup >= 0"), (["--lr", "0"], "need lr > 0"),
                           (["--sigma-std", "-1"], "sigma_std must be > 0, got -1.0"),
                           (["--objective", "artifacts", "--holdout-cases", "0"], "--holdout-cases >= 1"),
                           (["--objective", "artifacts", "--collect-minutes", "-1"], "--collect-minutes > 0"),
                           (["--nf", "0"], "need nf, num_res_blocks"), (["--res-blocks", "-1"], "num_res_blocks"),
                           (["--ch-mult", "0,1"], "ch_mult needs at least one level"),
                           (["--threads", "-1"], "--threads must be >= 0")]:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was written
    assert main(["pack", str(tmp_path / "p"), "--data", str(frames_dir), "--max-mb", "0"]) == 2
    assert "--max-mb > 0" in capsys.readouterr().err


def test_ddp_two_processes_gloo(frames_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ddugm_core.cli", "train", "--domain", "image", "--data", str(frames_dir), "--out", str(out),
           "--device", "cpu", *TINY]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "settings.json").read_text())["world_size"] == 2
    assert (out / "image.safetensors").is_file()


def test_unusable_series_are_said_not_dropped_silently(frames_dir, tmp_path, capsys):
    """A series with NaN (or all zero) is left out of training and packs, and stderr names its file."""
    from ddugm_core.data import list_series_files, load_series, write_pack

    bad = np.random.default_rng(1).random((5, 20, 18)).astype(np.float32)
    bad[2, 3, 4] = np.nan
    np.save(frames_dir / "broken.npy", bad)
    np.save(frames_dir / "empty.npy", np.zeros((5, 20, 18), np.float32))
    files = list_series_files(frames_dir)
    assert len(load_series(files)) == 4
    err = capsys.readouterr().err
    assert "2 series left out (non-finite values or all zero): broken.npy, empty.npy" in err
    write_pack(files, tmp_path / "p.npz", stride=1)
    assert "broken.npy" in capsys.readouterr().err


def test_splits_are_whole_files():
    from ddugm_core.data import split_of

    files = [Path(f"patient{i:03d}.npz") for i in range(1, 101) if i % 10]  # the 90 shared patients
    train, val = split_files(files)
    test = split_of(files, "test")
    assert (len(train), len(val), len(test)) == (72, 9, 9)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert [f.stem for f in val][:2] == ["patient011", "patient022"]  # the earlier held-out patients, unchanged
    other = [Path(f"series{i}.npy") for i in range(20)]  # other sources: every 10th file, no test split
    t, v = split_files(other)
    assert len(v) == 2 and len(t) == 18 and split_of(other, "test") == []


def test_sampler_batches_are_normalised_and_augmented(frames_dir):
    frames = load_frames(sorted(frames_dir.glob("mag*.npy")))
    assert frames.dtype == torch.complex64 and frames.shape[1:] == (20, 18)
    s = FrameSampler(frames, 16, "image")
    b = s.batch(8, torch.Generator().manual_seed(0))
    assert b.shape == (8, 16, 16) and (b.imag.abs() > 0).any()  # magnitude data get a smooth phase
    k = FrameSampler(frames, 16, "kspace").batch(4, torch.Generator().manual_seed(0))
    assert k[:, 8, 8].abs().max() == 0  # weighted k-space: zero at the centre


@pytest.mark.skipif(not ACDC.is_dir(), reason="ACDC data not present (../shared/data/acdc_cine)")
def test_acdc_files_load():
    frames = load_frames(sorted(ACDC.glob("patient*.npz"))[:1])
    assert frames.shape[1:] == (100, 95)
    assert float(frames.abs().max()) > 0.5 and torch.isfinite(torch.view_as_real(frames)).all()


def test_pack_keeps_validation_patients_out_and_fits(frames_dir, tmp_path):
    from ddugm_core.data import is_pack, read_pack

    out = tmp_path / "pack"
    assert main(["pack", str(out), "--data", str(frames_dir), "--max-mb", "1"]) == 0
    info = json.loads((out / "pack.json").read_text())
    z = np.load(out / "train.npz")
    v = np.load(out / "val.npz")
    assert is_pack(out / "train.npz") and z["frames"].dtype == (np.int8 if info["train"]["complex"] else np.uint8)
    assert not set(z["patients"]) & set(v["patients"])  # whole patients, never both
    assert info["train"]["mib"] <= 1 and info["train"]["quantisation_rms"] < 0.01
    frames = read_pack(out / "train.npz")
    assert frames.shape[0] == info["train"]["frames"] and float(frames.abs().max()) > 0.5


def test_packs_never_mix_into_a_data_folder(frames_dir, tmp_path, capsys):
    """`ddugm pack DATA --data DATA` wrote its packs among the patients: the next read took them
    for series, and the changed file names switched the folder's split (validation and test
    patients into training) without a word. Now the pack refuses its data folder, and a folder
    holding a pack is refused by name wherever series are listed (train, pack, evaluate)."""
    from ddugm_core.data import list_series_files

    before = sorted(p.name for p in frames_dir.iterdir())
    assert main(["pack", str(frames_dir), "--data", str(frames_dir), "--max-mb", "1"]) == 2
    assert "is the data folder" in capsys.readouterr().err
    assert sorted(p.name for p in frames_dir.iterdir()) == before
    out = tmp_path / "pack"
    assert main(["pack", str(out), "--data", str(frames_dir), "--max-mb", "1", "--cycles-mb", "0", "--art-mb", "0"]) == 0
    (out / "train.npz").rename(frames_dir / "train.npz")
    with pytest.raises(ValueError, match=r"holds training packs \(train.npz\) written by `ddugm pack`"):
        list_series_files(frames_dir)
    assert main(["train", "--domain", "image", "--data", str(frames_dir), "--out", str(tmp_path / "t"), *TINY]) == 2
    assert "holds training packs" in capsys.readouterr().err
    assert len(list_series_files(frames_dir / "train.npz")) == 1  # the pack itself stays a valid source
    (frames_dir / "broken.npz").write_bytes(b"not a zip")  # not a pack: its reader names it later
    with pytest.raises(ValueError, match="holds training packs"):
        list_series_files(frames_dir)


def test_cycles_pack_keeps_every_phase_for_the_plane_prior(frames_dir, tmp_path):
    """cycles.npz: training patients only, whole cardiac cycles (every phase) of a central crop,
    read back series by series; the xt prior trains from it."""
    from ddugm_core.data import load_series

    out = tmp_path / "pack"
    assert main(["pack", str(out), "--data", str(frames_dir), "--max-mb", "1", "--cycles-crop", "16"]) == 0
    info = json.loads((out / "pack.json").read_text())["cycles"]
    assert info["whole_cycles"] and info["size"] == [16, 16] and info["stride"] == 1
    series = load_series([out / "cycles.npz"])
    train = {p.stem for p in split_files(sorted(frames_dir.iterdir()))[0]}
    assert set(np.load(out / "cycles.npz")["patients"]) == train
    assert len(series) == len(train) and all(s.shape in ((5, 16, 16), (4, 16, 16)) for s in series)
    raw = np.load(frames_dir / "mag0.npy")
    if "mag0" in train:  # the stored cycle is the normalised centre crop, to 8-bit precision
        s0 = series[sorted(train).index("mag0")].abs().numpy()
        ref = raw[:, 2:18, 1:17] / np.percentile(raw.mean(0), 99)
        assert np.abs(s0 - ref).max() < ref.max() / (127 if info["complex"] else 255)  # int8 beside cplx.npz
    xt = tmp_path / "xt"
    assert main(["train", "--domain", "xt", "--frames", "8", "--data", str(out / "cycles.npz"), "--val-data",
                 str(out / "val.npz"), "--out", str(xt), *TINY]) == 0


def test_art_pack_keeps_each_patients_middle_slice_whole(tmp_path):
    """art.npz (the cases of --objective artifacts on a GPU machine): of each training patient the
    middle slice, every phase, at full size; the validation patients stay out."""
    from ddugm_core.data import load_series

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # ACDC-like [T, Z, H, W]; slice z holds the value z + 1
        cine = (np.arange(5)[None, :, None, None] + 1) * (0.5 + rng.random((6, 5, 20, 18)))
        np.savez(data / f"case{i}.npz", cine=cine.astype(np.float32))
    out = tmp_path / "pack"
    assert main(["pack", str(out), "--data", str(data), "--cycles-crop", "8"]) == 0
    info = json.loads((out / "pack.json").read_text())["art"]
    assert info["size"] == [20, 18] and info["stride"] == 1 and info["whole_cycles"]
    train = {p.stem for p in split_files(sorted(data.iterdir()))[0]}
    assert set(np.load(out / "art.npz")["patients"]) == train and info["series"] == len(train)
    for s in load_series([out / "art.npz"]):
        assert s.shape == (6, 20, 18)
    raw = np.load(data / f"{sorted(train)[0]}.npz")["cine"][:, 2]  # the middle slice
    ref = raw / np.percentile(raw.mean(0), 99)
    assert np.abs(load_series([out / "art.npz"])[0].abs().numpy() - ref).max() < ref.max() / 255 + 1e-6
    assert main(["pack", str(tmp_path / "none"), "--data", str(data), "--art-mb", "0"]) == 0
    assert not (tmp_path / "none" / "art.npz").exists()


def test_training_stops_on_wall_clock_time_and_saves(frames_dir, tmp_path):
    import time as _time

    out = tmp_path / "timed"
    args = [*TINY]
    args[args.index("--steps") + 1] = "1000000"
    t0 = _time.perf_counter()
    assert main(["train", "--domain", "image", "--data", str(frames_dir), "--out", str(out), *args,
                 "--minutes", "0.05", "--sigma-dist", "lognormal"]) == 0
    assert _time.perf_counter() - t0 < 40
    assert (out / "image.safetensors").is_file() and (out / "state.safetensors").is_file()
    den = json.loads((out / "denoise.json").read_text())
    assert set(den) == {"0.02", "0.05", "0.1"} and all(np.isfinite(v["denoised_db"]) for v in den.values())


def test_learning_rate_warms_up_then_decays():
    from ddugm_core.training import TrainConfig, learning_rate

    cfg = TrainConfig(lr=1e-3, warmup=10)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 50, 0.0) == pytest.approx(1e-3)
    assert learning_rate(cfg, 50, 1.0) == pytest.approx(1e-3 * cfg.lr_min_ratio)
    assert learning_rate(cfg, 50, 0.5) < learning_rate(cfg, 50, 0.25)


def test_gpu_run_never_deletes_a_folder_that_is_not_its_output(tmp_path, capsys):
    """OUT is replaced only where it holds an earlier run (summary.json): a mistyped OUT naming a
    folder of one's own is refused, untouched; so is a budget that is not positive."""
    from ddugm_core.gpu_run import main as gpu_main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert gpu_main([str(mine), "--pack", str(tmp_path / "nopack")]) == 2
    assert "not an earlier gpu_run output" in capsys.readouterr().err and (mine / "notes.txt").is_file()
    assert gpu_main([str(tmp_path / "new"), "--minutes", "0"]) == 2
    assert "--minutes must be > 0" in capsys.readouterr().err
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "summary.json").write_text("{}")
    assert gpu_main([str(earlier), "--pack", str(tmp_path / "nopack")]) == 2  # no pack: stops after clearing it
    assert "train.npz and val.npz are needed" in capsys.readouterr().err and not earlier.exists()


def test_gpu_run_script_dry_run(tmp_path):
    """The GPU window's one command, on the CPU with tiny networks: every stage runs, the outputs
    fit what the device tool brings back (at most 8 files of at most 16 MiB) and the weights load."""
    from ddugm_core.checkpoints import load_model
    from ddugm_core.phantom import cine_phantom

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        np.save(data / f"p{i}.npy", np.abs(cine_phantom(6, 40, seed=i)).astype(np.float32))
    assert main(["pack", str(tmp_path / "pack"), "--data", str(data)]) == 0
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ddugm_core.gpu_run", str(out), "--minutes", "12", "--pack",
                        str(tmp_path / "pack"), "--dry-run"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.stat().st_size <= 16 << 20 for f in files)
    s = json.loads((out / "summary.json").read_text())
    assert set(s["stages"]) == {"env", "bench", "bench_global", "bench_fp32", "train", "compare", "compile", "outputs"}
    assert s["stages"]["bench_global"]["status"] == "ok" and s["stages"]["bench_global"]["results"]
    assert s["stages"]["env"]["pytest_gpu"]["status"] == "ok" and s["stages"]["bench"]["status"] == "ok"
    assert s["stages"]["bench_fp32"]["status"] == "ok" and s["stages"]["bench_fp32"]["results"]
    assert all(r["exit"] == 0 and r["step"] > 0 for r in s["stages"]["train"]["runs"].values())
    trainings = {"image": "image", "image_wide": "image", "kspace": "kspace", "xt": "xt", "image_art": "image",
                 "xt_art": "xt"}
    assert set(s["stages"]["train"]["runs"]) == set(trainings)
    art = s["stages"]["train"]["runs"]["xt_art"]
    assert art["objective"] == "artifacts" and art["cases"] >= 1 and art["holdout_cases"] == 1
    psnr = s["stages"]["compare"]["ddugm_psnr_r8"]  # each new prior in place of its committed one, the best pair
    assert set(psnr) == {"committed", "best_pair"} | set(trainings) - {"kspace"}
    assert s["stages"]["compare"]["best_new_xt"] in {"xt", "xt_art"}
    assert set(s["stages"]["compare"]["ddugm_dual_psnr_r8"]) == {"committed", "new", "new_kspace_only"}
    assert all(np.isfinite(v) for v in psnr.values())
    assert set(s["stages"]["compare"]["denoise"]) >= set(trainings)
    for name, domain in trainings.items():
        load_model(out / f"{name}.safetensors", expect_domain=domain)
    assert set(s["losses"]) >= set(trainings) and len(s["losses"]["xt_art"]) == art["steps"]
    assert not s["output_problems"]


def test_plane_sampler_draws_wrapped_spatiotemporal_planes():
    """x-t / y-t planes: the requested shape whatever the series' frame count (the time axis
    wraps around the cycle), a synthetic phase constant over time for magnitude data, and
    every plane one line of one series through consecutive phases."""
    from ddugm_core.data import PlaneSampler

    t, h, w = 5, 20, 18
    ramp = torch.arange(t, dtype=torch.float32)[:, None, None] + 1  # frame index + 1, constant in space
    series = [(ramp * torch.ones(t, h, w)).to(torch.complex64)]
    s = PlaneSampler(series, 8, 16)
    g = torch.Generator().manual_seed(0)
    x = s.batch(40, g)
    assert x.shape == (40, 8, 16) and x.dtype == torch.complex64 and s.shape == (8, 16)
    mag = x.abs()
    for p in mag:
        col = p[:, (p > 0).all(0)][:, 0]  # one pixel inside the field of view, over the 8 frames
        v = torch.round(col / col.min())  # the frame values 1..5 (the gain divided out)
        assert torch.allclose(col / col.min(), v, atol=1e-4) and set(v.tolist()) == {1, 2, 3, 4, 5}
        step = set(((v[1:] - v[:-1]) % t).tolist())
        assert step in ({1.0}, {t - 1.0})  # consecutive phases (forwards or reversed), wrapping around
    ph = torch.angle(x)
    both = (mag[:, 0] > 0) & (mag[:, 3] > 0)
    assert torch.allclose(ph[:, 0][both], ph[:, 3][both], atol=1e-5)  # phase constant over time
    assert not torch.allclose(ph[0], ph[1])  # but differs between planes
    again = PlaneSampler(series, 8, 16).batch(40, torch.Generator().manual_seed(0))
    assert torch.equal(again, x)


def test_train_xt_prior_and_load_it(frames_dir, tmp_path):
    from ddugm_core.checkpoints import load_model

    out = tmp_path / "xt"
    assert main(["train", "--domain", "xt", "--frames", "8", "--data", str(frames_dir), "--out", str(out), *TINY]) == 0
    net = load_model(out / "xt.safetensors", expect_domain="xt")
    assert net.config.nf == 8
    denoise = json.loads((out / "denoise.json").read_text())
    assert set(denoise) == {"0.02", "0.05", "0.1"}
    with pytest.raises(ValueError, match="expected 'image'"):
        load_model(out / "xt.safetensors", expect_domain="image")
    assert main(["train", "--domain", "xt", "--frames", "7", "--data", str(frames_dir), "--out", str(out), *TINY,
                 "--no-resume"]) == 2  # 7 frames is not a multiple of the network's divisor (2)


def test_resuming_another_networks_state_is_a_clear_error(frames_dir, tmp_path, capsys):
    """An --out holding the state of a network with other settings used to end in a
    load_state_dict traceback; now an error that says what to do (nothing is overwritten)."""
    out = tmp_path / "o"
    assert main(["train", "--domain", "image", "--data", str(frames_dir), "--out", str(out), *TINY]) == 0
    state = (out / "state.safetensors").read_bytes()
    wider = [*TINY]
    wider[wider.index("--nf") + 1] = "12"
    assert main(["train", "--domain", "image", "--data", str(frames_dir), "--out", str(out), *wider]) == 2
    assert "holds the state of a network with other settings" in capsys.readouterr().err
    assert (out / "state.safetensors").read_bytes() == state
    assert main(["train", "--domain", "image", "--data", str(frames_dir), "--out", str(out), *wider,
                 "--no-resume"]) == 0


def test_unreadable_array_files_are_named(tmp_path):
    """An object array (nothing is unpickled), a broken or empty .npz: a ValueError naming the
    file, from the training / evaluation reader and from ``simulate --images`` alike."""
    from ddugm_core.data import read_array
    from gadgets.simulate import load_images

    files = {"obj.npy": lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
             "broken.npz": lambda p: p.write_bytes(b"PK not a zip"), "empty.npz": lambda p: np.savez(p)}
    for name, make in files.items():
        p = tmp_path / name
        make(p)
        with pytest.raises(ValueError, match=f"{name}: (not a readable numpy array file|.*holds no array)"):
            read_array(p)
        with pytest.raises(ValueError, match=f"{name}: (not a readable numpy array file|empty .npz)"):
            load_images(str(p), 4, 16, 1, 0)


def test_complex_stacks_pack_with_their_phase(tmp_path):
    """Complex series (`train --data RAW`'s images) keep their phase in a pack: int8 real and
    imaginary parts, read back complex, so training from the pack adds no synthetic phase and the
    artifact cases use the real one. A magnitude pack stays uint8 (unchanged)."""
    from ddugm_core.artifacts import series_from
    from ddugm_core.data import FrameSampler, load_series, read_pack, robust_scale, write_pack

    rng = np.random.default_rng(3)
    files = []
    for i in range(3):
        mag = 0.5 + rng.random((4, 2, 20, 18))
        phase = np.linspace(-2.5, 2.5, 18)[None, None, None, :] + i  # a steep phase ramp: wrapped around
        f = tmp_path / f"scan{i}.npz"
        np.savez(f, cine=(mag * np.exp(1j * phase)).astype(np.complex64))
        files.append(f)
    info = write_pack(files, tmp_path / "p.npz", stride=1)
    z = np.load(tmp_path / "p.npz")
    assert info["complex"] and z["frames"].dtype == np.int8 and z["imag"].dtype == np.int8
    frames = read_pack(tmp_path / "p.npz")
    assert frames.dtype == torch.complex64 and frames.shape == (24, 20, 18)
    ref = np.load(files[0])["cine"][:, 0]
    ref = ref / robust_scale(ref)
    got = frames[:4].numpy()
    assert np.abs(got - ref).max() < 2 * np.abs(ref).max() / 127  # phase included, to int8 precision
    assert 0 < info["quantisation_rms"] < 0.01
    series = load_series([tmp_path / "p.npz"])
    assert len(series) == 6 and FrameSampler(frames, 16, "image").is_complex  # no synthetic phase added
    case = next(series_from([tmp_path / "p.npz"]))[1]
    assert np.iscomplexobj(case) and np.allclose(case, series[0].numpy())
    mag = write_pack([tmp_path / "m.npy"], tmp_path / "m.npz", stride=1) if np.save(
        tmp_path / "m.npy", np.abs(ref).astype(np.float32)) is None else None
    assert not mag["complex"] and np.load(tmp_path / "m.npz")["frames"].dtype == np.uint8
    assert read_pack(tmp_path / "m.npz").dtype == torch.float32
