"""One command for a short GPU window: ``python -m ddugm_core.gpu_run OUT [--minutes 9] [--train image_art,xt_art]``.

Made for a machine that has PyTorch with CUDA, numpy, scipy, safetensors, tqdm and pyyaml,
but neither the data folder, nor gadgetron / ismrmrd, nor a network: it needs only this
tree and a training pack (``ddugm pack runs/pack``: ``train.npz``, ``cycles.npz`` and
``art.npz`` with the training patients, ``val.npz`` and ``val_cycles.npz`` with the validation
patients; carry ``runs/pack`` along).

Stages, each time-boxed and independent of the others' failure (a stage that fails or runs
out of time is recorded as such and the next one runs):

a. ``env``: GPU name, torch and CUDA versions; ``pytest -m gpu`` on the test files that do
   not need gadgetron;
b. ``bench``: ``bench --device cuda`` on the three standard cases (eager); ``bench_global``: the
   paper and cine16 cases again with ``attention: global`` (the default's tiles against it);
   ``bench_fp32``: the same with ``amp: false`` (float32 networks: bf16's PSNR against it);
c. ``train``: the trainings side by side on the one GPU (small networks are launch-bound,
   so they share it well) for the time left: the image prior continued from the committed
   weights (``image``), a wider image prior (nf 48) from scratch (``image_wide``), the k-space
   prior continued (``kspace``), the spatio-temporal plane prior (``xt``; continued where one
   is committed) where the pack has ``cycles.npz``, and the artifact fine-tuning of the
   committed image and plane priors (``image_art``, ``xt_art``: ``train --objective
   artifacts`` on cases reconstructed from the pack's ``art.npz``, 45 % of the time collecting,
   40 % fine-tuning);
d. ``outputs`` (right after training, so that a run cut short still brings the weights back):
   the new weights as float16 safetensors with their settings in the metadata, their loss
   curves in ``summary.json``;
e. ``compare``: one-step denoising PSNR at sigma 0.02 / 0.05 / 0.1 and validation DSM loss of
   every new and committed network; DD-UGM PSNR on 3 validation cines at R = 8 with the
   default preset (image prior blended with the plane prior): the committed priors, each new
   prior in place of its committed one, the best new image prior with the best new plane
   prior (``best_pair``); with the dual preset (image + k-space priors): the committed pair,
   the new k-space prior alone and with the best new image prior (``new``). Runs that would
   leave the stage under a minute are skipped, and say so;
f. ``compile``: ``bench --device cuda`` with ``compile: true`` (last: it may be long).

OUT gets at most 8 files of at most 16 MiB: ``summary.json`` (every stage's status, times,
results, loss curves), ``log.txt`` and the new weights. The training's time is what is left
after the stages chosen to follow it (``--stages``) have their budgets.

``--dry-run`` runs the same stages on the CPU with tiny networks, a tiny budget and small
bench cases: the test suite does that, so the script cannot rot between GPU windows.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = Path(__file__).resolve().parent / "weights"
MAX_FILES, MAX_BYTES = 8, 16 << 20


class Run:
    def __init__(self, out: Path, minutes: float, dry: bool, device: str, pack: Path):
        self.out, self.dry, self.device, self.pack = out, dry, device, pack
        self.t0 = time.time()
        self.end = self.t0 + minutes * 60
        self.work = out.parent / (out.name + "_work")
        self.summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "minutes": minutes, "dry_run": dry,
                              "device": device, "stages": {}}
        self.log = []

    def left(self) -> float:
        return self.end - time.time()

    def note(self, text: str) -> None:
        line = f"[{time.time() - self.t0:7.1f} s] {text}"
        print(line, flush=True)
        self.log.append(line)

    def sh(self, name: str, cmd: list, timeout: float, env: dict | None = None) -> dict:
        """Run one command, time-boxed; its output goes to the log (tail)."""
        timeout = max(5.0, min(timeout, self.left() - 5))
        self.note(f"{name}: {' '.join(map(str, cmd))} (at most {timeout:.0f} s)")
        t = time.time()
        try:
            p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                               env={**os.environ, **(env or {})})
            status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
            output = p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            status = "timeout"
            output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace") \
                if isinstance(e.stdout, bytes) else (e.stdout or "") + (e.stderr or "")
        result = {"status": status, "seconds": round(time.time() - t, 1)}
        self.log.append(f"--- {name}: {status} in {result['seconds']} s; last lines:")
        self.log += output.strip().splitlines()[-40:]
        self.note(f"{name}: {status} in {result['seconds']} s")
        return result

    def stage(self, name: str, fn) -> None:
        t = time.time()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - one stage's failure must not cost the others
            result = {"status": f"error: {type(e).__name__}: {e}"}
            self.note(f"{name}: {result['status']}")
        result.setdefault("status", "ok")
        result["stage_seconds"] = round(time.time() - t, 1)
        self.summary["stages"][name] = result
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.summary["elapsed_s"] = round(time.time() - self.t0, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))
        (self.out / "log.txt").write_text("\n".join(self.log)[-(4 << 20):] + "\n")


# ---------------------------------------------------------------------- stages
def stage_env(run: Run) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    files = [f"tests/{p.name}" for p in sorted((ROOT / "tests").glob("test_*.py"))
             if "gadget" not in p.read_text(encoding="utf-8")]
    info["pytest_gpu"] = run.sh("pytest -m gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p",
                                                  "no:cacheprovider", *files], 120 if not run.dry else 360)
    tail = [ln for ln in run.log[-40:] if " passed" in ln or " failed" in ln or " skipped" in ln]
    info["pytest_gpu"]["result"] = tail[-1] if tail else None
    return info


def bench_cmd(run: Run, json_path: Path, config: Path | None, cases: str = "") -> list:
    cmd = [sys.executable, "-m", "ddugm_core.cli", "bench", "--device", run.device, "--json", json_path]
    if run.dry:
        cmd += ["--cases", "paper", "--steps", "1", "--repeat", "0", "--no-warmup"]
    else:
        cmd += ["--repeat", "3"] + (["--cases", cases] if cases else [])
    if config is not None:
        cmd += ["--config", config]
    return cmd


def stage_bench(run: Run, compile_: bool, budget: float, fp32: bool = False, attention_global: bool = False) -> dict:
    """``bench``: eager (bf16 network calls where bf16 is fast), with ``compile: true``, eager
    in float32 (``amp: false``: the reference that bf16's PSNR is held against), or with
    ``attention: global`` on the two cases of large frames (the default's tiles against it)."""
    run.work.mkdir(parents=True, exist_ok=True)
    config = None
    tag = "compile" if compile_ else "fp32" if fp32 else "global" if attention_global else ""
    if tag or run.dry:
        config = run.work / f"{tag or 'dry'}.yaml"
        text = "recon:\n" + ("  compile: true\n" if compile_ else "") + ("  amp: false\n" if fp32 else "") + \
            ("  attention: global\n" if attention_global else "")
        if run.dry:  # the plumbing, without minutes of CPU work
            text += "  method: zero_filled\n" if compile_ else "  ls_iters: 3\n"
        config.write_text(text)
    path = run.work / (f"bench_{tag}.json" if tag else "bench.json")
    cases = "paper,cine16" if attention_global else ""
    result = run.sh("bench" + (f" {tag}" if tag else ""), bench_cmd(run, path, config, cases), budget)
    if path.is_file():
        data = json.loads(path.read_text())
        result["results"] = [{k: r.get(k) for k in ("case", "seconds_per_slice", "instrumented_s", "stages_s",
                                                    "network_calls", "cuda_max_allocated_gb", "peak_rss_gb",
                                                    "psnr_db")} for r in data.get("results", [])]
        result["info"] = data.get("info")
    return result


def domain_of(name: str) -> str:
    """The domain of a training run or candidate, from its name (kspace..., xt..., else image)."""
    return "kspace" if name.startswith("kspace") else "xt" if name.startswith("xt") else "image"


def _xt_job(run: Run) -> dict:
    """The plane prior's training, where the pack has whole cardiac cycles (``cycles.npz``)."""
    cycles, val = run.pack / "cycles.npz", run.pack / "val_cycles.npz"
    if not cycles.is_file():
        return {}
    data = ["--data", cycles, *(["--val-data", val] if val.is_file() else [])]
    if run.dry:
        return {"xt": ("xt", [*data, "--nf", "8", "--ch-mult", "1,2", "--attn", "", "--size", "16", "--frames", "8",
                              "--batch", "4", "--threads", "1", "--sigma-min", "0.003", "--sigma-max", "0.5"])}
    init = ["--init", WEIGHTS / "xt.safetensors", "--warmup", "50"] if (WEIGHTS / "xt.safetensors").is_file() \
        else ["--warmup", "200"]
    return {"xt": ("xt", [*data, "--nf", "16", "--ch-mult", "1,2,2,2", "--attn", "16", "--size", "64", "--frames",
                          "32", "--batch", "64", "--lr", "3e-4", "--sigma-min", "0.003", "--sigma-max", "0.5",
                          *init])}


TRAININGS = ("image", "image_wide", "kspace", "xt", "image_art", "xt_art")
ART_SHARE = (0.45, 0.4)  # an artifact job's time: collecting cases, then fine-tuning (the rest: loading, measuring)


def _art_jobs(run: Run) -> dict:
    """The artifact fine-tuning (``train --objective artifacts``) of the committed image and plane
    priors on cases reconstructed from the pack's ``art.npz`` (training patients' middle slices at
    full size; ``cycles.npz``'s 64 x 64 crops where an older pack has no ``art.npz``)."""
    data = run.pack / "art.npz" if (run.pack / "art.npz").is_file() else run.pack / "cycles.npz"
    if not data.is_file():
        return {}
    common = ["--objective", "artifacts", "--data", data]
    if run.dry:  # the shipped networks on a few tiny cases: the plumbing
        common += ["--collect-cases", "3", "--collect-minutes", "1", "--holdout-cases", "1", "--threads", "1"]
    else:
        common += ["--batch", "32"]
    return {f"{d}_art": (d, [*common, "--init", WEIGHTS / f"{d}.safetensors"]) for d in ("image", "xt")
            if (WEIGHTS / f"{d}.safetensors").is_file()}


def _train_jobs(run: Run) -> dict:
    """name -> (domain, arguments): continue the committed nets, a wider image net, the plane prior,
    and the artifact fine-tuning of the image and plane priors (``image_art``, ``xt_art``)."""
    data = ["--data", run.pack / "train.npz", "--val-data", run.pack / "val.npz"]
    if run.dry:
        tiny = ["--nf", "8", "--ch-mult", "1,2", "--attn", "", "--size", "16", "--batch", "4", "--threads", "1"]
        return {"image": ("image", [*data, *tiny, "--sigma-dist", "lognormal", "--sigma-mean", "-3.0"]),
                "image_wide": ("image", [*data, *tiny[:1], "12", *tiny[2:], "--sigma-dist", "lognormal",
                                         "--sigma-mean", "-3.0"]),
                "kspace": ("kspace", [*data, *tiny, "--sigma-min", "0.0005", "--sigma-dist", "lognormal",
                                      "--sigma-mean", "-4.6"]),
                **_xt_job(run), **_art_jobs(run)}
    image_net = ["--nf", "16", "--ch-mult", "1,2,2,2", "--attn", "16", "--size", "64"]
    return {**_xt_job(run), **_art_jobs(run),
        # the committed image prior, continued; noise levels weighted towards those the default preset uses
        "image": ("image", [*data, *image_net, "--init", WEIGHTS / "image.safetensors", "--batch", "64", "--lr",
                            "2e-4", "--warmup", "50", "--sigma-dist", "lognormal", "--sigma-mean", "-3.0"]),
        # a wider image prior from scratch (3.9 M parameters, 8 MB in float16)
        "image_wide": ("image", [*data, "--nf", "48", "--ch-mult", "1,2,2,2", "--attn", "16", "--size", "64",
                                 "--batch", "64", "--lr", "3e-4", "--warmup", "200", "--sigma-dist", "lognormal",
                                 "--sigma-mean", "-3.0"]),
        # the committed k-space prior, continued, down to the scale of weighted k-space at reconstruction
        "kspace": ("kspace", [*data, "--nf", "16", "--ch-mult", "1,2,2,2", "--attn", "12", "--size", "96",
                              "--init", WEIGHTS / "kspace.safetensors", "--batch", "32", "--lr", "2e-4",
                              "--warmup", "50", "--sigma-min", "0.0005", "--sigma-dist", "lognormal",
                              "--sigma-mean", "-4.6"]),
    }


def stage_train(run: Run, budget: float, only: list | None = None) -> dict:
    """The trainings side by side, each stopping on time (``--minutes``), saving every minute;
    ``only``: the names of the trainings to run (default: all)."""
    jobs = _train_jobs(run)
    if only:
        jobs = {k: v for k, v in jobs.items() if k in only}
    run.work.mkdir(parents=True, exist_ok=True)
    minutes = max(0.1, (budget - 20) / 60)
    procs = {}
    for name, (domain, args) in jobs.items():
        out = run.work / f"train_{name}"
        if out.exists():
            shutil.rmtree(out)
        if "artifacts" in args:  # collect, then fine-tune, in the same time
            timing = ["--collect-minutes", f"{ART_SHARE[0] * minutes:.3f}", "--minutes", f"{ART_SHARE[1] * minutes:.3f}"]
        else:
            timing = ["--minutes", f"{minutes:.3f}"]
        cmd = [sys.executable, "-m", "ddugm_core.cli", "train", "--domain", domain, "--out", out, *timing,
               "--steps", "10000000", "--log-every", "10" if run.dry else "100",
               "--save-minutes", "1", "--device", run.device, "--quiet", "--no-resume", *args]
        run.note(f"train {name}: {' '.join(map(str, cmd))}")
        log = open(run.work / f"train_{name}.log", "w")
        procs[name] = (subprocess.Popen(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log, out)
    result = {"minutes_each": round(minutes, 2), "runs": {}}
    hard = time.time() + budget + (240 if run.dry else 60)  # start-up on a loaded CPU takes long in a dry run
    for name, (p, log, out) in procs.items():
        try:
            p.wait(max(1.0, hard - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
        text = (run.work / f"train_{name}.log").read_text(errors="replace")
        run.log.append(f"--- train {name}: exit {p.returncode}; last lines:")
        run.log += text.strip().splitlines()[-15:]
        r = {"exit": p.returncode}
        try:
            r.update(json.loads(text.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            pass
        if "steps" in r and "step" not in r:  # the artifact objective's summary
            r["step"] = r["steps"]
        r["weights"] = str(out / f"{jobs[name][0]}.safetensors") if (out / f"{jobs[name][0]}.safetensors").is_file() \
            else None
        result["runs"][name] = r
        run.note(f"train {name}: exit {p.returncode}, step {r.get('step')}, val {r.get('val_loss')}")
    return result


def _val_frames(run: Run):
    import torch

    from .data import read_pack

    return read_pack(run.pack / "val.npz").to(torch.complex64)


def stage_compare(run: Run, trained: dict) -> dict:
    import numpy as np
    import torch

    from .checkpoints import load_model
    from .data import FrameSampler, PlaneSampler, load_series
    from .evaluate import frame_metrics, make_truth, simulate_case
    from .reconstruction import ReconConfig, Reconstructor
    from .sde import VESDE
    from .training import denoise_psnr, dsm_loss

    device = torch.device(run.device)
    frames = _val_frames(run)
    candidates = {"image_committed": ("image", WEIGHTS / "image.safetensors"),
                  "kspace_committed": ("kspace", WEIGHTS / "kspace.safetensors")}
    if (WEIGHTS / "xt.safetensors").is_file():
        candidates["xt_committed"] = ("xt", WEIGHTS / "xt.safetensors")
    for name, r in (trained.get("runs") or {}).items():
        if r.get("weights"):
            candidates[name] = (domain_of(name), Path(r["weights"]))
    cycles = run.pack / "val_cycles.npz"
    result = {"denoise": {}, "val_dsm_loss": {}}
    g = torch.Generator(device).manual_seed(1)
    for name, (domain, path) in candidates.items():
        if domain == "xt" and not cycles.is_file():
            continue
        net = load_model(path, device, expect_domain=domain)
        size = 16 if run.dry else (64 if domain == "image" else 96)
        if domain == "xt":
            sampler = PlaneSampler(load_series([cycles]), 8 if run.dry else 32, 16 if run.dry else 64, device)
        else:
            sampler = FrameSampler(frames, size, domain, device)
        result["denoise"][name] = denoise_psnr(net, sampler, domain)
        x = sampler.batch(64, g)
        sig = torch.exp(torch.linspace(np.log(0.005), np.log(5.0), 64, device=device))
        with torch.no_grad():
            result["val_dsm_loss"][name] = round(float(dsm_loss(net, x, sig, VESDE.noise(x.shape, g, device))), 5)

    def score(name):  # mean denoised PSNR over the three sigmas
        return float(np.mean([v["denoised_db"] for v in result["denoise"][name].values()]))

    with np.load(run.pack / "val.npz") as z:
        cines = [(str(n), np.asarray(c, np.float32)) for n, c in zip(z["cine_names"], z["cines"])]
    if run.dry:
        cines = [(n, c[:4, :32, :32]) for n, c in cines[:1]]
    small = {"steps": 2, "ls_iters": 3, "llr_iters": 3, "pnp_inner": 1} if run.dry else {}
    committed_xt = candidates.get("xt_committed", (None, ""))[1]

    def psnr_r8(preset, image, second):
        """DD-UGM PSNR at R = 8 on the validation cines; ``second``: the plane prior (default preset)
        or the k-space prior (dual preset)."""
        extra = {}
        if preset == "default":
            extra = {"xt_weights": str(candidates[second][1]) if second else str(committed_xt)}
            second = "kspace_committed"
        cfg = ReconConfig(image_weights=str(candidates[image][1]), kspace_weights=str(candidates[second][1]),
                          device=run.device, preset=preset, **small, **extra)
        rec = Reconstructor(cfg)
        values = []
        for i, (name, cine) in enumerate(cines):
            case = simulate_case(name, make_truth(cine, seed=i), 8.0, 2 if run.dry else 8, 0.005, seed=i)
            values += frame_metrics(case.truth, rec.recon(case.kspace, case.mask, None, seed=0))["psnr"]
        return round(float(np.mean(values)), 3)

    # the default preset (pnp: the image prior, blended with the plane prior where one is committed): the
    # committed priors, then each new prior in place of its committed one, then the best new image prior
    # with the best new plane prior; the dual preset (image + k-space priors) measures the k-space prior
    new_images = [n for n in candidates if domain_of(n) == "image" and n != "image_committed"]
    new_xts = [n for n in candidates if domain_of(n) == "xt" and n != "xt_committed"]
    runs = [("default", "committed", "image_committed", None)]
    runs += [("default", n, n, None) for n in new_images] + [("default", n, "image_committed", n) for n in new_xts]
    psnrs, psnrs_dual = {}, {}
    for preset, label, image, second in runs:
        if run.left() < 60 and label != "committed":  # leave the compile bench and the summary their time
            run.note(f"compare: {label} skipped (time)")
            continue
        psnrs[label] = psnr_r8(preset, image, second)
        run.note(f"compare: DD-UGM (default preset) R=8 on {len(cines)} validation cines, {label}: {psnrs[label]} dB")
        run.save()
    best_image = max((n for n in new_images if n in psnrs), key=psnrs.get, default=None)
    best_xt = max((n for n in new_xts if n in psnrs), key=psnrs.get, default=None)
    result["best_new_image"], result["best_new_xt"] = best_image, best_xt
    pairs = [("default", "best_pair", best_image, best_xt)] if best_image and best_xt else []
    pairs.append(("dual", "committed", "image_committed", "kspace_committed"))
    if "kspace" in candidates:
        pairs.append(("dual", "new_kspace_only", "image_committed", "kspace"))
        if best_image:
            pairs.append(("dual", "new", best_image, "kspace"))
    for preset, label, image, second in pairs:
        if run.left() < 60:
            run.note(f"compare: {preset} {label} skipped (time)")
            continue
        table = psnrs if preset == "default" else psnrs_dual
        table[label] = psnr_r8(preset, image, second)
        run.note(f"compare: DD-UGM ({preset} preset) R=8 on {len(cines)} validation cines, {label}: {table[label]} dB")
        run.save()
    result["ddugm_psnr_r8"] = psnrs
    result["ddugm_dual_psnr_r8"] = psnrs_dual
    result["cines"] = [n for n, _ in cines]
    return result


def stage_outputs(run: Run) -> dict:
    """Weights (float16), loss curves; everything else is already in summary.json / log.txt."""
    import torch

    from .checkpoints import load_model, read_metadata, save_model

    written, losses = [], {}
    runs = (run.summary["stages"].get("train") or {}).get("runs") or {}
    for name, r in runs.items():
        w = r.get("weights")
        if not w:
            continue
        domain = domain_of(name)
        settings = json.loads(read_metadata(w).get("settings", "{}"))
        net = load_model(w, "cpu", expect_domain=domain)
        dst = run.out / f"{name}.safetensors"
        save_model(dst, net, domain, settings, dtype=torch.float16)
        written.append(dst.name)
        csv_path = Path(w).parent / (f"{domain}_loss.csv" if settings.get("objective") == "artifacts" else "loss.csv")
        if csv_path.is_file():
            losses[name] = list(csv.DictReader(open(csv_path)))
        den = Path(w).parent / "denoise.json"
        if den.is_file():
            losses[f"{name}_denoise"] = json.loads(den.read_text())
    run.summary["losses"] = losses  # in summary.json: six trainings' weights + summary + log = 8 files
    return {"files": written}


def check_outputs(out: Path) -> list:
    problems = []
    files = [p for p in out.iterdir() if p.is_file()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES})")
    problems += [f"{p.name}: {p.stat().st_size} bytes" for p in files if p.stat().st_size > MAX_BYTES]
    return problems


def main(argv=None) -> int:
    from .cli import finite_float

    ap = argparse.ArgumentParser(prog="python -m ddugm_core.gpu_run", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder (at most 8 files, each at most 16 MiB)")
    ap.add_argument("--minutes", type=finite_float, default=9.0,
                    help="wall-clock budget of the whole run (default 9: a device call may run 10 minutes)")
    ap.add_argument("--pack", default="runs/pack", help="folder with train.npz and val.npz (ddugm pack)")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    ap.add_argument("--dry-run", action="store_true", help="tiny networks and cases: checks the script on a CPU")
    ap.add_argument("--train", default="",
                    help=f"which trainings to run (comma-separated among {', '.join(TRAININGS)}; default: all): "
                         "fewer share the GPU for more steps each")
    ap.add_argument("--stages", default="env,bench,bench_global,bench_fp32,train,outputs,compare,compile",
                    help="which stages to run, in their fixed order (default: all); e.g. compare alone measures "
                         "the committed weights, env,train,outputs,compare gives the training the benches' time")
    a = ap.parse_args(argv)
    if not a.minutes > 0:
        print(f"gpu_run: --minutes must be > 0, got {a.minutes}", file=sys.stderr)
        return 2
    out = Path(a.out)
    if out.exists():
        # only an earlier run's output is replaced: never a folder that merely shares the name
        if not out.is_dir() or (any(out.iterdir()) and not (out / "summary.json").is_file()):
            print(f"gpu_run: {out} exists and is not an earlier gpu_run output (no summary.json); "
                  "choose a new folder", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    pack = Path(a.pack)
    if not (pack / "train.npz").is_file() or not (pack / "val.npz").is_file():
        print(f"gpu_run: {pack}/train.npz and val.npz are needed: run `ddugm pack {pack}` where the data are",
              file=sys.stderr)
        return 2
    device = "cpu" if a.dry_run and a.device == "cuda" else a.device
    run = Run(out, a.minutes, a.dry_run, device, pack)
    total = a.minutes * 60
    budgets = {"env": min(120, 0.12 * total), "bench": min(120, 0.15 * total), "bench_global": min(60, 0.08 * total),
               "bench_fp32": min(60, 0.1 * total),
               "compare": min(90, 0.12 * total), "compile": min(150, 0.2 * total)}
    # training gets whatever the stages before it left over, less what the stages after it may take
    train_budget = max(30.0, total - sum(budgets.values()) - 30)
    if a.dry_run:  # fixed, generous stage limits, 15 s of training; --minutes caps it all. A CPU shared with other
        # torch processes runs these 4 to 10 times slower (their threads oversubscribe it): the float32 bench's
        # 14 s took 63 s beside one evaluate run, and 90 s limits expired
        budgets, train_budget = {"env": 120, "bench": 240, "bench_global": 240, "bench_fp32": 240, "compare": 180,
                                 "compile": 30}, 15.0
    run.summary["budgets_s"] = {**budgets, "train": train_budget}
    stages = {
        "env": lambda: stage_env(run),
        "bench": lambda: stage_bench(run, False, budgets["bench"]),
        "bench_global": lambda: stage_bench(run, False, budgets["bench_global"], attention_global=True),
        "bench_fp32": lambda: stage_bench(run, False, budgets["bench_fp32"], fp32=True),
        "train": lambda: stage_train(run, train_budget if a.dry_run else
                                     max(30.0, run.left() - sum(budgets[k] for k in ("compare", "compile")
                                                                if k in chosen) - 20),
                                     [x.strip() for x in a.train.split(",") if x.strip()]),
        "outputs": lambda: stage_outputs(run),  # the weights first: a run cut short still brings them back
        "compare": lambda: stage_compare(run, run.summary["stages"].get("train") or {}),
        "compile": lambda: stage_bench(run, True, min(budgets["compile"], run.left() - 20)),
    }
    chosen = [x.strip() for x in a.stages.split(",") if x.strip()]
    unknown = sorted(set(chosen) - set(stages))
    if unknown:
        print(f"gpu_run: unknown stage(s) {unknown}; choose from {', '.join(stages)}", file=sys.stderr)
        return 2
    unknown = sorted({x.strip() for x in a.train.split(",") if x.strip()} - set(TRAININGS))
    if unknown:
        print(f"gpu_run: unknown training(s) {unknown}; choose from {', '.join(TRAININGS)}", file=sys.stderr)
        return 2
    for name, fn in stages.items():
        if name in chosen:
            run.stage(name, fn)
    problems = check_outputs(out)
    run.summary["output_problems"] = problems
    run.note(f"done in {time.time() - run.t0:.0f} s; outputs: {sorted(p.name for p in out.iterdir())}")
    run.save()
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
