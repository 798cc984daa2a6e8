"""Denoising score matching on 2D arrays: single frames (image or weighted k-space domain) or
spatio-temporal planes of a cine (``xt``: one row or column through consecutive phases).

``train(TrainConfig)`` is the whole loop: data, VE-SDE noise (log-uniform or log-normal
noise levels), NCSN++ network, Adam (fused on CUDA, foreach elsewhere) with warm-up, cosine
decay and gradient clipping, EMA (one foreach lerp), bf16 autocast on CUDA, resumable
safetensors state, a loss log (``loss.csv``) and the resolved settings (``settings.json``)
beside the weights. ``minutes`` stops on wall-clock time (the schedule then runs on time, not
steps) and state is saved atomically every ``save_minutes``, so a run that is killed loses
at most that much. At the end the EMA model's one-step (Tweedie) denoising PSNR at sigma 0.02 /
0.05 / 0.1 on validation frames is reported (:func:`denoise_psnr`).
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
from .data import FrameSampler, PlaneSampler, list_series_files, load_frames, load_series, split_files
from .networks import NCSNpp, NetConfig
from .sde import VESDE

DOMAINS = ("image", "kspace", "xt")


def make_sampler(files, domain: str, size: int, frames: int, device):
    """The batch source of a domain: single frames (image, kspace) or x-t / y-t planes (xt)."""
    if domain == "xt":
        return PlaneSampler(load_series(files), frames, size, device)
    return FrameSampler(load_frames(files), size, domain, device)


@dataclass
class TrainConfig:
    domain: str = "image"
    data: str = "../shared/data/acdc_cine"
    out: str = "runs/image"
    steps: int = 2000
    batch: int = 16
    size: int = 64
    frames: int = 32        # xt: cardiac phases per training plane (the time axis wraps around the cycle)
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
    minutes: float = 0.0    # stop after this much wall-clock time (0: run all steps)
    save_minutes: float = 1.0  # also save the state this often (atomic files)
    schedule: str = "cosine"  # learning rate after warm-up: cosine (to lr_min_ratio x lr) | constant
    lr_min_ratio: float = 0.05
    sigma_dist: str = "loguniform"  # training noise levels: loguniform on [min, max] | lognormal (EDM), clipped to it
    sigma_mean: float = -2.0  # lognormal: mean of ln sigma
    sigma_std: float = 1.5    # lognormal: std of ln sigma
    val_data: str = ""      # validation frames (a folder, file or pack); "" = every val_every_file-th file of data
    net: NetConfig = field(default_factory=lambda: NetConfig(nf=16, attn_resolutions=(12,)))

    def validate(self) -> None:
        self.net.validate()
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        for name in ("steps", "batch", "size", "frames"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.size % self.net.divisor:
            raise ValueError(f"size {self.size} must be a multiple of {self.net.divisor} for ch_mult {self.net.ch_mult}")
        if self.domain == "xt" and self.frames % self.net.divisor:
            raise ValueError(f"frames {self.frames} must be a multiple of {self.net.divisor} for ch_mult {self.net.ch_mult}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")
        if not 0 <= self.ema < 1:
            raise ValueError("ema must be in [0, 1)")
        if self.minutes < 0 or self.save_minutes <= 0:
            raise ValueError("minutes must be >= 0 and save_minutes > 0")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.sigma_dist not in ("loguniform", "lognormal"):
            raise ValueError(f"sigma_dist must be loguniform or lognormal, got {self.sigma_dist!r}")
        if self.sigma_std <= 0:
            raise ValueError(f"sigma_std must be > 0, got {self.sigma_std}")
        if not self.lr > 0 or self.warmup < 0 or self.log_every < 1 or self.save_every < 1:
            raise ValueError(f"need lr > 0, warmup >= 0, log_every >= 1 and save_every >= 1, got {self.lr}, "
                             f"{self.warmup}, {self.log_every}, {self.save_every}")

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


def sample_sigmas(cfg: TrainConfig, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Training noise levels: log-uniform on [sigma_min, sigma_max], or log-normal (EDM's
    ln sigma ~ N(mean, std)) clipped to that range."""
    if cfg.sigma_dist == "loguniform":
        return VESDE(cfg.sigma_min, cfg.sigma_max).sample_sigma(n, generator, device)
    z = torch.randn(n, generator=generator, device=device)
    return torch.exp(cfg.sigma_mean + cfg.sigma_std * z).clamp(cfg.sigma_min, cfg.sigma_max)


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``lr_min_ratio`` of ``lr``
    over ``progress`` in [0, 1] (steps, or wall-clock time with ``minutes``)."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.schedule == "constant":
        return cfg.lr * warm
    p = min(max(progress, 0.0), 1.0)
    return cfg.lr * warm * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def denoise_psnr(net, frames, domain: str, sigmas=(0.02, 0.05, 0.1), n: int = 64, size: int = 0,
                 seed: int = 0) -> dict:
    """One-step (Tweedie) denoising of validation frames, ``x_hat = y + sigma^2 s(y, sigma)``:
    PSNR (dB) of the noisy input and of the denoised frame against the clean one, per sigma,
    peak = max |clean| of the batch. ``frames``: normalised complex ``[N, H, W]`` or a sampler
    (:class:`FrameSampler`, :class:`PlaneSampler`); the k-space model is measured in its own
    (weighted k-space) domain, the xt model on planes."""
    device = next(net.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    if isinstance(frames, (FrameSampler, PlaneSampler)):
        sampler = frames
    else:
        size = size or min(frames.shape[-2:]) // net.config.divisor * net.config.divisor
        sampler = FrameSampler(frames, size, domain, device)
    x = sampler.batch(min(n, max(len(sampler), 1)), g)
    out = {}
    for sigma in sigmas:
        z = VESDE.noise(x.shape, g, device)
        y = x + sigma * z
        s = torch.full((x.shape[0],), float(sigma), device=device)
        yr = torch.view_as_real(y).permute(0, 3, 1, 2).contiguous()
        score = net(yr, s).float()
        xh = y + sigma ** 2 * torch.complex(score[:, 0], score[:, 1])
        out[f"{sigma:g}"] = {"noisy_db": round(_psnr(y, x), 2), "denoised_db": round(_psnr(xh, x), 2)}
    return out


def _psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.abs().max() ** 2 / (a - ref).abs().pow(2).mean()))


def _out_of_time(deadline: float, distributed: bool, device) -> bool:
    """Rank 0's clock decides for every rank (they must stop at the same step)."""
    stop = time.time() >= deadline
    if distributed:
        flag = torch.tensor([1.0 if stop else 0.0], device=device)
        dist.broadcast(flag, 0)
        stop = bool(flag.item())
    return stop


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
    threads = torch.get_num_threads()  # restored on leaving: a library call leaves its caller's thread count
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    try:
        train_files, val_files = split_files(list_series_files(cfg.data), cfg.val_every_file)
        if cfg.val_data:
            train_files, val_files = list_series_files(cfg.data), list_series_files(cfg.val_data)
        sampler = make_sampler(train_files, cfg.domain, cfg.size, cfg.frames, device)
        val_sampler = make_sampler(val_files, cfg.domain, cfg.size, cfg.frames, device) if val_files else None

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        net = NCSNpp(cfg.net)
        if cfg.init:
            net.load_state_dict(load_model(cfg.init, expect_domain=cfg.domain).state_dict())
        # channels-last: the (real, imaginary) view of complex frames already has that layout
        net = net.to(device, memory_format=torch.channels_last)
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        fused = device.type == "cuda"
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, **({"fused": True} if fused else {"foreach": True}))
        step = 0
        if cfg.resume and (out / "state.safetensors").is_file():
            step = load_training_state(out, net, ema, opt)
        model = torch.nn.parallel.DistributedDataParallel(net) if distributed else net
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
            val_batch = (val_sampler.batch(64, vg), val_sigmas, VESDE.noise((64, *val_sampler.shape), vg, device))

        bar = None
        if progress and rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.domain}", dynamic_ncols=True)
        t0, last = time.time(), {}
        first_step, last_save, saved_step = step, time.time(), step
        log_path = out / "loss.csv"
        ema_params, net_params = list(ema.parameters()), list(net.parameters())
        deadline = t0 + cfg.minutes * 60 if cfg.minutes else None
        while step < cfg.steps:
            if deadline is not None and step > first_step and _out_of_time(deadline, distributed, device):
                break  # (at least one step: a run on a loaded machine still leaves usable weights)
            x = sampler.batch(cfg.batch, gen)
            sigma = sample_sigmas(cfg, cfg.batch, gen, device)
            noise = VESDE.noise(x.shape, gen, device)
            progress = ((time.time() - t0) / (cfg.minutes * 60)) if cfg.minutes else step / cfg.steps
            for g in opt.param_groups:
                g["lr"] = learning_rate(cfg, step - first_step if cfg.minutes else step, progress)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = dsm_loss(model, x, sigma, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, net_params, 1.0 - cfg.ema)
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
            if rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps
                              or time.time() - last_save >= cfg.save_minutes * 60):
                save_training_state(out, net, ema, opt, step, cfg.to_dict())
                save_model(out / f"{cfg.domain}.safetensors", ema, cfg.domain, cfg.to_dict())
                last_save, saved_step = time.time(), step
        if bar is not None:
            bar.close()
        result = last or {"step": step, "train_loss": None, "val_loss": None, "seconds": time.time() - t0}
        if rank == 0:
            if not last or last["step"] != step:  # stopped on time between two log lines
                with torch.no_grad():
                    val = float(dsm_loss(ema, *val_batch)) if val_batch is not None else None
                result = {"step": step, "train_loss": None, "val_loss": val, "seconds": time.time() - t0}
            if saved_step != step:
                save_training_state(out, net, ema, opt, step, cfg.to_dict())
                save_model(out / f"{cfg.domain}.safetensors", ema, cfg.domain, cfg.to_dict())
            if val_sampler is not None:
                result["denoise"] = denoise_psnr(ema, val_sampler, cfg.domain, size=cfg.size)
                (out / "denoise.json").write_text(json.dumps(result["denoise"], indent=2))
        return result
    finally:
        torch.set_num_threads(threads)
        if distributed:
            dist.destroy_process_group()
