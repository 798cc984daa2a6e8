"""Command line: ``ddugm train | demo | evaluate``."""
from __future__ import annotations

import argparse
import json
import sys

from .networks import NetConfig


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _train_parser(sub):
    from .training import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a score model (image or weighted k-space) on single 2D frames")
    p.add_argument("--domain", choices=["image", "kspace"], required=True)
    p.add_argument("--data", default=d.data, help="folder of ACDC .npz or .npy/.npz frame stacks (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: runs/DOMAIN)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--size", type=int, default=d.size, help="training crop size in pixels (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ema", type=float, default=d.ema)
    p.add_argument("--sigma-min", type=float, default=d.sigma_min)
    p.add_argument("--sigma-max", type=float, default=d.sigma_max)
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_train(a) -> int:
    from .training import TrainConfig, train

    net = NetConfig.paper() if a.paper_net else NetConfig(nf=a.nf, ch_mult=a.ch_mult, num_res_blocks=a.res_blocks,
                                                         attn_resolutions=a.attn, image_size=a.size)
    cfg = TrainConfig(domain=a.domain, data=a.data, out=a.out or f"runs/{a.domain}", steps=a.steps, batch=a.batch,
                      size=a.size, lr=a.lr, ema=a.ema, sigma_min=a.sigma_min, sigma_max=a.sigma_max, seed=a.seed,
                      device=a.device, amp=not a.no_amp, init=a.init, resume=not a.no_resume,
                      save_every=a.save_every, log_every=a.log_every, threads=a.threads, net=net)
    result = train(cfg, progress=not a.quiet)
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ddugm", description="DD-UGM score-based cine MRI reconstruction")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    try:
        from . import demo as _demo
        from . import evaluate as _evaluate
        _demo.add_parser(sub)
        _evaluate.add_parser(sub)
    except ImportError:  # pragma: no cover - during bootstrap
        _demo = _evaluate = None
    a = parser.parse_args(argv)
    try:
        if a.cmd == "train":
            return _run_train(a)
        return (_evaluate if a.cmd == "evaluate" else _demo).run(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"ddugm {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
