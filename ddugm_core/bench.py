"""``ddugm bench``: time the reconstruction of standard cine cases, stage by stage.

Cases (phantom data, R = 8 variable-density lines, no download needed):
paper (16 x 192 x 192, 1 coil: the published case), cine8 (25 x 128 x 128, 8 coils),
cine16 (30 x 256 x 208, 16 coils). For each: seconds per slice (the median of
``--repeat`` plain runs, after one warm-up run), then one instrumented run that
synchronises the device around every stage to split the time into networks, data
consistency, low-rank and other; network calls and frames through the networks; peak
memory (CUDA: the allocator's peak; CPU: the process's peak resident size so far); PSNR
against the phantom. Writes everything to a JSON file.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

ACCEL = 8
CASES = {"paper": (16, (192, 192), 1), "cine8": (25, (128, 128), 8), "cine16": (30, (256, 208), 16)}


def add_parser(sub):
    p = sub.add_parser("bench", help="time reconstructions of standard cine cases (per stage, NFEs, peak memory); "
                                     "writes JSON")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--preset", default="default", help="sampling preset: default, pnp, dual or paper (default: %(default)s)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma separated from {', '.join(CASES)} (default: all)")
    p.add_argument("--method", default="ddugm", help="ddugm, low_rank, l_plus_s, llr_ttv or zero_filled (default: ddugm)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    p.add_argument("--repeat", type=int, default=1,
                   help="plain timed runs per case after the warm-up (default: 1); 0: time only the instrumented run "
                        "(fine on a CPU, where it adds no synchronisation)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed first run")
    p.add_argument("--config", default=None, help="reconstruction settings YAML (ReconConfig)")
    p.add_argument("--json", default="bench.json", help="output file (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)


def _peak_memory(device) -> tuple[str, float]:
    import torch

    if device.type == "cuda":
        return "cuda_max_allocated_gb", torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "process_max_rss_gb", kb / 2**20 if platform.system() != "Darwin" else kb / 2**30


def run(a) -> int:
    import torch

    from .masks import variable_density_mask
    from .metrics import psnr
    from .phantom import cine_phantom, coil_maps, simulate_kspace
    from .profiling import StageTimer
    from .reconstruction import ReconConfig, Reconstructor

    names = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in names if c not in CASES]
    if bad or not names:
        raise ValueError(f"unknown case(s) {bad}; choose from {', '.join(CASES)}")
    if a.repeat < 0:
        raise ValueError("--repeat must be >= 0")
    if Path(a.json).is_dir():  # before minutes of measuring
        raise IsADirectoryError(f"--json {a.json} is a folder; name a file")
    base = ReconConfig.from_yaml(a.config) if a.config else ReconConfig()
    over = {"preset": a.preset, "method": a.method}
    if a.steps is not None:
        over["steps"] = a.steps
    if a.device != "auto":
        over["device"] = a.device
    cfg = ReconConfig.from_dict({**base.to_dict(), **over})
    rec = Reconstructor(cfg)
    dev = rec.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    if a.method == "ddugm":
        rec.load_models()
    info = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
            or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "preset": cfg.preset, "method": a.method, "steps": cfg.sampler_settings().steps, "recon": cfg.to_dict()}
    print(f"device {info['device']} ({info['device_name']}, {info['threads']} threads), method {a.method}, "
          f"preset {cfg.preset} ({info['steps']} steps)")
    results = []
    for name in names:
        frames, size, coils = CASES[name]
        truth = cine_phantom(frames, size, seed=a.seed)
        maps = coil_maps(coils, size, seed=a.seed) if coils > 1 else None
        mask = variable_density_mask(frames, size[0], ACCEL, seed=a.seed + 1)
        k = torch.from_numpy(simulate_kspace(truth, maps, mask, noise=0.002, seed=a.seed)).to(dev)
        m = torch.from_numpy(mask).to(dev)

        def once(k=k, m=m):
            x = rec.recon(k, m, seed=a.seed)
            if sync:
                sync()
            return x

        if not a.no_warmup:
            once()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            x = once()
            times.append(time.perf_counter() - t0)
        with StageTimer(sync) as timer:
            xi = once()
        mem_key, mem = _peak_memory(dev)
        st = timer.summary()
        if not times:
            x, times = xi, [st["total_s"]]
        row = {"case": name, "frames": frames, "size": list(size), "coils": coils, "coils_reconstructed": rec.coils_used[1],
               "accel": float(mask.size / mask.sum()),
               "seconds_per_slice": statistics.median(times), "runs": times,
               "instrumented_s": st["total_s"], "stages_s": st["stages_s"],
               "network_calls": st["calls"].get("network", 0), "network_frames": st["items"].get("network", 0),
               mem_key: mem, "psnr_db": psnr(truth, x.cpu().numpy())}
        results.append(row)
        stages = ", ".join(f"{k} {v:.2f}" for k, v in st["stages_s"].items())
        vc = f" ({rec.coils_used[1]} virtual)" if 0 < rec.coils_used[1] < coils else ""
        print(f"{name:<7} {frames} x {size[0]} x {size[1]}, {coils:>2} coil(s){vc}: {row['seconds_per_slice']:.2f} s/slice; "
              f"stages (instrumented, {st['total_s']:.2f} s): {stages}; network calls {row['network_calls']} "
              f"({row['network_frames']} frames); peak {mem:.2f} GB ({mem_key}); PSNR {row['psnr_db']:.2f} dB", flush=True)
        _write(a.json, info, results)  # after every case: a run cut short by a time box keeps what it measured
    print(f"wrote {a.json}")
    return 0


def _write(path, info: dict, results: list) -> None:
    """The JSON so far, replaced atomically (a reader never sees half a file)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--json {path} is a folder; name a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps({"info": info, "results": results}, indent=2, default=str))
    tmp.replace(path)
