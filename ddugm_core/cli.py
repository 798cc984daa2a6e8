"""Command line of the library alone (no Gadgetron needed): ``python -m ddugm_core.cli train | pack | demo |
evaluate | bench``; the ``ddugm`` command adds the Gadgetron side."""
from __future__ import annotations

import argparse
import json
import math
import sys

from .networks import NetConfig


def finite_float(text: str) -> float:
    """argparse type of every number option: NaN and inf pass every range check and would end
    as NaN data or images, so they are refused here, naming the option."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _train_parser(sub):
    from .training import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a score model on 2D arrays: single frames (image or weighted "
                                     "k-space) or x-t / y-t planes of cine (xt)")
    p.add_argument("--domain", choices=["image", "kspace", "xt"], required=True)
    p.add_argument("--data", default=d.data, help="folder of ACDC .npz or .npy/.npz frame stacks, or (the ddugm command) fully "
                   "sampled ISMRMRD raw cine, a file or folder, whose images go to OUT/raw_images (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: runs/DOMAIN)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--size", type=int, default=d.size, help="training crop size in pixels (default: %(default)s)")
    p.add_argument("--frames", type=int, default=d.frames,
                   help="xt: cardiac phases per training plane (wraps around the cycle; default: %(default)s)")
    p.add_argument("--lr", type=finite_float, default=d.lr)
    p.add_argument("--ema", type=finite_float, default=d.ema)
    p.add_argument("--sigma-min", type=finite_float, default=d.sigma_min)
    p.add_argument("--sigma-max", type=finite_float, default=d.sigma_max)
    p.add_argument("--nf", type=int, default=d.net.nf, help="base width (published: 128)")
    p.add_argument("--ch-mult", type=_ints, default=d.net.ch_mult, help="e.g. 1,2,2,2 (published: 1,1,2,2,2,2,2)")
    p.add_argument("--res-blocks", type=int, default=d.net.num_res_blocks)
    p.add_argument("--attn", type=_ints, default=d.net.attn_resolutions, help="attention resolutions, e.g. 12 or '' for none")
    p.add_argument("--paper-net", action="store_true", help="use the published nf=128 network")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--init", default="", help="start from these weights (.safetensors)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing state in --out")
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--minutes", type=finite_float, default=d.minutes,
                   help="stop after this much wall-clock time; the schedule then runs on time (0: all --steps)")
    p.add_argument("--save-minutes", type=finite_float, default=d.save_minutes, help="also save the state this often")
    p.add_argument("--warmup", type=int, default=d.warmup, help="learning-rate warm-up steps")
    p.add_argument("--schedule", choices=["cosine", "constant"], default=d.schedule)
    p.add_argument("--sigma-dist", choices=["loguniform", "lognormal"], default=d.sigma_dist,
                   help="training noise levels: log-uniform on [sigma-min, sigma-max] or log-normal (EDM) clipped to it")
    p.add_argument("--sigma-mean", type=finite_float, default=d.sigma_mean, help="lognormal: mean of ln sigma")
    p.add_argument("--sigma-std", type=finite_float, default=d.sigma_std, help="lognormal: std of ln sigma")
    p.add_argument("--val-data", default="", help="validation frames (folder, file, pack or raw as --data; "
                                                  "default: the validation patients of --data)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--objective", choices=["dsm", "artifacts"], default="dsm",
                   help="dsm: denoising score matching on Gaussian noise (training from scratch or --init); "
                        "artifacts: fine-tune --init (default: the shipped weights) on the default sampler's own "
                        "inputs on simulated training cases (image or xt; README)")
    p.add_argument("--collect-minutes", type=finite_float, default=10.0,
                   help="artifacts: minutes spent reconstructing training cases to learn from (default: %(default)s)")
    p.add_argument("--collect-cases", type=int, default=0, help="artifacts: at most this many cases (0: no limit)")
    p.add_argument("--holdout-cases", type=int, default=8,
                   help="artifacts: the last N collected cases (and their patients) are kept out of the fine-tuning "
                        "to measure it (default: %(default)s)")


def _pack_parser(sub):
    p = sub.add_parser("pack", help="write the training patients' frames into one small file for a machine "
                                    "without the data folder (and the validation patients into another)")
    p.add_argument("out", help="output folder: train.npz (training patients' frames), cycles.npz (training "
                               "patients' whole cardiac cycles, for the xt prior), art.npz (their middle slices at "
                               "full size, for --objective artifacts), val.npz and val_cycles.npz (validation "
                               "patients)")
    p.add_argument("--data", default="../shared/data/acdc_cine", help="folder of ACDC files or frame stacks")
    p.add_argument("--max-mb", type=finite_float, default=21.0, help="size limit of train.npz in MiB (default: %(default)s)")
    p.add_argument("--cycles-mb", type=finite_float, default=12.0,
                   help="size limit of cycles.npz in MiB (0: none written; default: %(default)s)")
    p.add_argument("--cycles-crop", type=int, default=64,
                   help="cycles.npz keeps the central N x N pixels of every phase (default: %(default)s)")
    p.add_argument("--art-mb", type=finite_float, default=14.0,
                   help="size limit of art.npz (training patients' middle slices, whole cycles at full size: the "
                        "cases of `train --objective artifacts`; 0: none written; default: %(default)s)")
    p.add_argument("--stride", type=int, default=0, help="keep every N-th cardiac phase (0: the smallest that fits)")
    p.add_argument("--val-series", type=int, default=3, help="validation cines kept whole for evaluation (default: 3)")


def train_out(a) -> str:
    """``ddugm train``'s output folder: ``--out``, else ``runs/DOMAIN`` (``runs/DOMAIN_artifacts``
    for ``--objective artifacts``)."""
    return a.out or (f"runs/{a.domain}_artifacts" if a.objective == "artifacts" else f"runs/{a.domain}")


def _refuse_raw(source, command: str) -> None:
    """The library alone reads no ISMRMRD: raw data given to ``train`` or ``pack`` are named."""
    from .evaluate import is_raw_source

    if source and is_raw_source(source):
        raise ValueError(f"{source}: ISMRMRD raw data are read by the `ddugm` command (its gadgets package needs "
                         f"ismrmrd), {command}")


def _run_pack(a) -> int:
    from pathlib import Path

    import numpy as np

    from .data import list_series_files, read_array, robust_scale, series_of, split_files, write_pack

    _refuse_raw(a.data, "as `ddugm train --data RAW`, which writes their images to OUT/raw_images/data: pack "
                "that folder")

    if not a.max_mb > 0 or a.cycles_mb < 0 or a.art_mb < 0 or a.cycles_crop < 0 or a.stride < 0 or a.val_series < 0:
        raise ValueError("need --max-mb > 0, and --cycles-mb, --art-mb, --cycles-crop, --stride, --val-series >= 0")
    out = Path(a.out)
    if Path(a.data).is_dir() and out.is_dir() and out.resolve() == Path(a.data).resolve():
        raise ValueError(f"{a.out} is the data folder: the packs would be read as patients next time; "
                         "choose another output folder")
    train, val = split_files(list_series_files(a.data))
    if not val:
        raise ValueError(f"{a.data}: need at least 2 files to keep validation patients out of the pack")
    info = {"train": write_pack(train, out / "train.npz", a.max_mb, a.stride),
            "val": write_pack(val, out / "val.npz", 3.0, 0)}
    if a.cycles_mb > 0:
        info["cycles"] = write_pack(train, out / "cycles.npz", a.cycles_mb, whole_cycles=True, crop=a.cycles_crop)
        info["val_cycles"] = write_pack(val, out / "val_cycles.npz", 2.0, whole_cycles=True, crop=a.cycles_crop)
    if a.art_mb > 0:
        info["art"] = write_pack(train, out / "art.npz", a.art_mb, whole_cycles=True, slices=(0,))
    cines, names = [], []
    for f in val[:a.val_series]:  # mid slice, first 12 phases, float16: the GPU run's reconstruction check
        stack = series_of(read_array(f))
        s = np.abs(stack[len(stack) // 2][:12]).astype(np.float32)
        cines.append((s / robust_scale(s)).astype(np.float16))
        names.append(f.stem)
    if cines:
        with np.load(out / "val.npz") as z:
            data = dict(z)
        tmp = out / "val.tmp.npz"
        np.savez_compressed(tmp, **data, cines=np.stack(cines), cine_names=np.asarray(names))
        tmp.replace(out / "val.npz")
    info["val"]["cines"] = names
    info["val"]["mib"] = round((out / "val.npz").stat().st_size / 2**20, 2)
    (out / "pack.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return 0


def _run_train(a) -> int:
    from .training import TrainConfig, train

    if a.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {a.threads}")
    for source in (a.data, a.val_data):
        _refuse_raw(source, "not by python -m ddugm_core.cli train (`ddugm train --data RAW` writes their images to "
                    "OUT/raw_images/data, which this command can read)")
    if a.objective == "artifacts":
        from .artifacts import train_artifacts

        if a.lr == TrainConfig().lr:  # not set: fine-tuning takes a smaller step
            a.lr = 1e-4
        if a.batch == TrainConfig().batch:  # not set: 8 planes or frames of one case per step
            a.batch = 8
        if not a.minutes and a.steps == TrainConfig().steps:
            a.steps = 0
            a.minutes = 9.0
        print(json.dumps(train_artifacts(a)))
        return 0

    net = NetConfig.paper() if a.paper_net else NetConfig(nf=a.nf, ch_mult=a.ch_mult, num_res_blocks=a.res_blocks,
                                                         attn_resolutions=a.attn, image_size=a.size)
    cfg = TrainConfig(domain=a.domain, data=a.data, out=train_out(a), steps=a.steps, batch=a.batch,
                      size=a.size, frames=a.frames, lr=a.lr, ema=a.ema, sigma_min=a.sigma_min, sigma_max=a.sigma_max, seed=a.seed,
                      device=a.device, amp=not a.no_amp, init=a.init, resume=not a.no_resume,
                      save_every=a.save_every, log_every=a.log_every, threads=a.threads, net=net,
                      minutes=a.minutes, save_minutes=a.save_minutes, warmup=a.warmup, schedule=a.schedule,
                      sigma_dist=a.sigma_dist, sigma_mean=a.sigma_mean, sigma_std=a.sigma_std, val_data=a.val_data)
    result = train(cfg, progress=not a.quiet)
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ddugm", description="DD-UGM score-based cine MRI reconstruction")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    _pack_parser(sub)
    from . import bench as _bench
    from . import demo as _demo
    from . import evaluate as _evaluate

    mods = {"demo": _demo, "evaluate": _evaluate, "bench": _bench}
    for mod in mods.values():
        mod.add_parser(sub)
    a = parser.parse_args(argv)
    try:
        if a.cmd == "train":
            return _run_train(a)
        if a.cmd == "pack":
            return _run_pack(a)
        return mods[a.cmd].run(a)
    except (ValueError, OSError) as e:  # bad input, and paths that cannot be used (a folder named as a file, ...)
        print(f"ddugm {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
