"""Denoising score matching on single 2D frames (image or weighted k-space domain).

``train(TrainConfig)`` is the whole loop: data, VE-SDE noise, NCSN++ network, Adam with
warm-up and gradient clipping, EMA, bf16 autocast on CUDA, resumable safetensors state,
a loss log (``loss.csv``) and the resolved settings (``settings.json``) beside the weights.
Multi-GPU / multi-node: launch with ``torchrun``; each process trains on its own random
batches and DistributedDataParallel averages the gradients (NCCL on CUDA, gloo on CPU).
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .checkpoints import load_model, load_training_state, save_model, save_training_state
from .data import FrameSampler, list_series_files, load_frames, split_files
from .networks import NCSNpp, NetConfig
from .sde import VESDE


@dataclass
class TrainConfig:
    domain: str = "image"
    data: str = "../shared/data/acdc_cine"
    out: str = "runs/image"
    steps: int = 2000
    batch: int = 16
    size: int = 64
    lr: float = 2e-4
    warmup: int = 100
    grad_clip: float = 1.0
    ema: float = 0.999
    sigma_min: float = 0.005
    sigma_max: float = 5.0
    val_every_file: int = 10
    log_every: int = 50
    save_every: int = 500
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    init: str = ""          # start from these weights (a model .safetensors)
    resume: bool = True     # continue from out/state.safetensors if present
    threads: int = 0        # CPU threads (0: torch default)
    net: NetConfig = field(default_factory=lambda: NetConfig(nf=16, attn_resolutions=(12,)))

    def validate(self) -> None:
        if self.domain not in ("image", "kspace"):
            raise ValueError(f"domain must be 'image' or 'kspace', got {self.domain!r}")
        for name in ("steps", "batch", "size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.size % self.net.divisor:
            raise ValueError(f"size {self.size} must be a multiple of {self.net.divisor} for ch_mult {self.net.ch_mult}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")
        if not 0 <= self.ema < 1:
            raise ValueError("ema must be in [0, 1)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["net"] = self.net.to_dict()
        return d


def dsm_loss(net, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Denoising score matching: E || sigma * s(x + sigma z, sigma) + z ||^2 (per-pixel mean)."""
    xr = torch.view_as_real(x).permute(0, 3, 1, 2)
    zr = torch.view_as_real(noise).permute(0, 3, 1, 2)
    score = net(xr + sigma[:, None, None, None] * zr, sigma)
    return ((score.float() * sigma[:, None, None, None] + zr) ** 2).mean()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(cfg: TrainConfig, progress: bool = True, on_log: Callable[[dict], None] | None = None) -> dict:
    """Train one score model; returns ``{"step", "train_loss", "val_loss", "seconds"}``."""
    cfg.validate()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = _device(cfg.device)
    rank, world = 0, 1
    if distributed:
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    try:
        train_files, val_files = split_files(list_series_files(cfg.data), cfg.val_every_file)
        sampler = FrameSampler(load_frames(train_files), cfg.size, cfg.domain, device)
        val_sampler = FrameSampler(load_frames(val_files), cfg.size, cfg.domain, device) if val_files else None

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        net = NCSNpp(cfg.net)
        if cfg.init:
            net.load_state_dict(load_model(cfg.init, expect_domain=cfg.domain).state_dict())
        # channels-last: the (real, imaginary) view of complex frames already has that layout
        net = net.to(device, memory_format=torch.channels_last)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        step = 0
        if cfg.resume and (out / "state.safetensors").is_file():
            step = load_training_state(out, net, ema, opt)
        model = torch.nn.parallel.DistributedDataParallel(net) if distributed else net
        sde = VESDE(cfg.sigma_min, cfg.sigma_max)
        gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank + 7919 * step)
        amp = cfg.amp and device.type == "cuda"
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "settings.json").write_text(json.dumps(
                {**cfg.to_dict(), "world_size": world, "train_files": [f.name for f in train_files],
                 "val_files": [f.name for f in val_files], "train_frames": len(sampler)}, indent=2))

        val_batch = None
        if val_sampler is not None:
            vg = torch.Generator(device).manual_seed(12345)
            val_sigmas = torch.exp(torch.linspace(math.log(cfg.sigma_min), math.log(cfg.sigma_max), 64, device=device))
            val_batch = (val_sampler.batch(64, vg), val_sigmas, VESDE.noise((64, cfg.size, cfg.size), vg, device))

        bar = None
        if progress and rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.domain}", dynamic_ncols=True)
        t0, last = time.time(), {}
        log_path = out / "loss.csv"
        while step < cfg.steps:
            x = sampler.batch(cfg.batch, gen)
            sigma = sde.sample_sigma(cfg.batch, gen, device)
            noise = VESDE.noise(x.shape, gen, device)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = dsm_loss(model, x, sigma, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1.0 - cfg.ema)
            step += 1
            if bar is not None:
                bar.update(1)
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                val = None
                if val_batch is not None:
                    with torch.no_grad():
                        val = float(dsm_loss(ema, *val_batch))
                last = {"step": step, "train_loss": float(loss.detach()), "val_loss": val, "seconds": time.time() - t0}
                new = not log_path.exists()
                with open(log_path, "a", newline="") as fh:
                    w = csv.writer(fh)
                    if new:
                        w.writerow(["step", "train_loss", "val_loss", "seconds"])
                    w.writerow([step, f"{last['train_loss']:.5f}", "" if val is None else f"{val:.5f}", f"{last['seconds']:.1f}"])
                if bar is not None:
                    bar.set_postfix(loss=f"{last['train_loss']:.4f}", val=None if val is None else f"{val:.4f}")
                if on_log:
                    on_log(last)
            if rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps):
                save_training_state(out, net, ema, opt, step, cfg.to_dict())
                save_model(out / f"{cfg.domain}.safetensors", ema, cfg.domain, cfg.to_dict())
        if bar is not None:
            bar.close()
        return last or {"step": step, "train_loss": None, "val_loss": None, "seconds": time.time() - t0}
    finally:
        if distributed:
            dist.destroy_process_group()
