"""Artifact-aware fine-tuning of a committed prior (``ddugm train --objective artifacts``).

The default sampler (``pnp``) asks its priors to denoise its own iterates, whose error is not
Gaussian noise but the residual aliasing and temporal blur of the reconstruction. A prior trained
by denoising score matching on Gaussian noise removes little of it: on 3 validation series at
R = 8, its denoised frames were as far from the truth as its input, or farther (README,
"Where the targets stand"). Here the network is fine-tuned on what it is actually given:

1. **collect**: simulated multi-coil cases of the *training* patients (8 coils, noise 0.005,
   R drawn from ``accels``, the same simulation as ``ddugm evaluate``) are reconstructed with
   the default preset; at each noise level the sampler's input ``x`` (through the ``trace``
   hook) is kept with the truth as ``x`` shows it (its scale and smooth phase: the estimated
   maps' phase reference is not the simulation's; fitted against the truth, as training may).
2. **fine-tune**: ``E | sigma score(x, sigma) + (x - truth) / sigma |^2`` (denoising score
   matching with the artifact as the noise, so that the Tweedie denoiser maps ``x`` to the
   truth), plus a share ``dsm_share`` of plain score matching on the truth frames, so the
   network stays a prior of images. ``xt`` trains on the x-t and y-t planes of the same cines.

Nothing of the validation or test patients is used; the truth never enters a reconstruction.
"""
from __future__ import annotations

import copy
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import DEFAULT_WEIGHTS, load_model, save_model
from .networks import complex_score, cycle_pad
from .sampler import _turn

DOMAINS = ("image", "xt")


def aligned_truth(x: torch.Tensor, truth: torch.Tensor, box: int = 9) -> torch.Tensor:
    """The truth as the iterate ``x`` shows it: ``x``'s scale and smooth phase (the phase of
    the time-averaged ``x * conj(truth)`` over a ``box``-pixel window)."""
    w = (x * truth.conj()).mean(0)
    k = torch.ones(1, 1, box, box, dtype=torch.float32, device=x.device) / box ** 2
    re = F.conv2d(w.real[None, None], k, padding=box // 2)[0, 0]
    im = F.conv2d(w.imag[None, None], k, padding=box // 2)[0, 0]
    phase = torch.polar(torch.ones_like(re), torch.atan2(im, re))
    scale = (x.abs() * truth.abs()).sum() / (truth.abs() ** 2).sum().clamp_min(1e-30)
    return scale * truth * phase


def series_from(files, pack_rounds: int = 8):
    """``(name, frames [T, y, x], key, group)`` of ``files`` (complex stacks, such as ``train --data RAW``
    writes, keep their phase; magnitude ones get a synthetic phase in the case): of each file its middle slice, then
    (a second and third round) the slices two below and two above; a training pack
    (``ddugm pack``'s ``art.npz`` or ``cycles.npz``: whole cardiac cycles) gives each of its
    series once per round, up to ``pack_rounds`` rounds (another mask, coils and noise each
    round: a GPU collects faster than a small pack lasts). ``key`` numbers the cases for their seeds;
    ``group``: the file (patient) or the pack's series, so that held-out cases share nothing with
    the training cases."""
    from .data import is_pack, load_series, read_array, series_of

    packs = [f for f in files if is_pack(f)]
    for f in packs:
        series = load_series([f])
        for r in range(pack_rounds):
            for i, s in enumerate(series):  # a complex pack's series keep their phase
                frames = s.numpy() if bool((s.imag != 0).any()) else s.abs().numpy()
                yield (f"{Path(f).stem}_{i}" + (f"_r{r}" if r else ""), frames, 10_000 + r * len(series) + i,
                       f"{Path(f).stem}_{i}")
    others = [f for f in files if f not in packs]
    for offset in (0, -2, 2):
        for j, f in enumerate(others):
            stack = series_of(read_array(f))
            z = min(max(len(stack) // 2 + offset, 0), len(stack) - 1)
            yield f"{Path(f).stem}_z{z}", stack[z], 1000 * (offset + 2) + j, Path(f).stem


def collect(files, minutes: float, accels=(6.0, 8.0, 10.0), coils: int = 8, noise: float = 0.005, seed: int = 0,
            config=None, device: str = "cpu", max_cases: int = 0, log=print) -> list[dict]:
    """Reconstruct simulated cases of ``files`` (:func:`series_from`) with the default preset until
    ``minutes`` or ``max_cases``; return per case its pairs ``(x, truth as x shows it, sigma)``,
    both turned as the priors see them (``pnp_phase: mean``)."""
    from .evaluate import make_truth, simulate_case
    from .reconstruction import ReconConfig, Reconstructor

    rec = Reconstructor(config or ReconConfig(device=device), device=device)
    rng = np.random.default_rng(seed)
    out, t0 = [], time.perf_counter()
    for name, frames, key, group in series_from(files):
        if time.perf_counter() - t0 > minutes * 60 or (max_cases and len(out) >= max_cases):
            return out
        if frames.shape[0] < 2:
            continue
        accel = float(rng.choice(accels))
        case_seed = seed * 100_000 + key
        truth = make_truth(frames, case_seed)
        case = simulate_case(name, truth, accel, coils, noise, case_seed)
        t = torch.from_numpy(truth).to(torch.complex64)
        pairs = []

        def keep(e, pairs=pairs, t=t):
            x = e["image_input"].detach().to("cpu", torch.complex64)
            turn = _turn(x).conj()
            pairs.append((x * turn, aligned_truth(x, t) * turn, float(e["sigma"])))

        rec.recon(case.kspace, case.mask, seed=0, trace=keep)
        out.append({"name": case.name, "group": group, "accel": accel, "pairs": pairs})
        log(f"collected {len(out)}: {case.name}, R = {accel:g}, {len(pairs)} levels, "
            f"{time.perf_counter() - t0:.0f} s")
    return out


def _planes(x, ta, domain: str, which: int, divisor: int):
    """Frames ``[T, y, x]`` -> the network's 2D inputs: frames (image), x-t planes (which 0) or
    y-t planes (which 1), the time axis continued around the cycle to a multiple of ``divisor``."""
    if domain == "image":
        return x, ta
    x, ta = cycle_pad(x, divisor), cycle_pad(ta, divisor)
    dims = (1, 0, 2) if which == 0 else (2, 0, 1)
    return x.permute(*dims), ta.permute(*dims)


def _score(net, x, sigma, amp: bool):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        return complex_score(net, x, sigma, net.config.divisor)


def denoiser_error_ratio(net, cases, domain: str, amp: bool = False) -> dict:
    """Mean over ``cases`` of |D(x) - truth|^2 / |x - truth|^2 per noise level told (below 1:
    the denoiser moves the sampler's input towards the truth)."""
    by: dict[float, list] = {}
    with torch.no_grad():
        for c in cases:
            for x, ta, sigma in c["pairs"]:
                xs, ts = _planes(x, ta, domain, 0, net.config.divisor)
                s = _score(net, xs, torch.full((xs.shape[0],), sigma, device=xs.device), amp)
                d = xs + sigma ** 2 * torch.view_as_complex(s.permute(0, 2, 3, 1).contiguous())
                by.setdefault(round(sigma, 4), []).append(float((d - ts).abs().pow(2).mean()
                                                                 / (xs - ts).abs().pow(2).mean().clamp_min(1e-30)))
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(by.items())}


def finetune(domain: str, init, cases: list[dict], out, minutes: float = 0.0, steps: int = 0, lr: float = 1e-4,
             batch: int = 8, dsm_share: float = 0.2, ema: float = 0.998, holdout: int = 8, seed: int = 0,
             amp: bool | None = None, settings: dict | None = None, device: str = "cpu", save_minutes: float = 0.0,
             log=print) -> dict:
    """Fine-tune the network in ``init`` on ``cases`` (:func:`collect`) for ``minutes`` of wall
    clock or ``steps``; write ``out/DOMAIN.safetensors`` (the EMA weights), ``DOMAIN_loss.csv``
    and ``DOMAIN_settings.json``; return a summary with the denoiser's error ratio on the last
    ``holdout`` cases before and after (cases of the same patient or series as a held-out one,
    ``group``, are left out of the fine-tuning too).
    ``save_minutes`` > 0 also writes the weights (atomically) that often, so a run killed from
    outside (a time box) keeps most of its work."""
    if domain not in DOMAINS:
        raise ValueError(f"--objective artifacts trains the priors the default sampler uses: domain image or xt, "
                         f"not {domain!r}")
    if not minutes and not steps:
        raise ValueError("give --minutes or --steps")
    cases = [c for c in cases if c["pairs"]]
    if len(cases) <= holdout:
        raise ValueError(f"{len(cases)} collected cases: need more than the {holdout} held out (collect longer)")
    hold = cases[-holdout:]
    held = {c.get("group", c["name"]) for c in hold}
    train = [c for c in cases[:-holdout] if c.get("group", c["name"]) not in held]
    if not train:
        raise ValueError(f"every collected case shares its patient with one of the {holdout} held out (collect longer)")
    torch.manual_seed(seed)
    dev = torch.device(device)
    net = load_model(init, dev, expect_domain=domain).train().to(memory_format=torch.channels_last)
    amp = bool(amp) if amp is not None else dev.type == "cuda"
    hold = [{**c, "pairs": [(x.to(dev), ta.to(dev), s) for x, ta, s in c["pairs"]]} for c in hold]
    avg = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, foreach=True)
    before = denoiser_error_ratio(avg, hold, domain, amp)
    log(f"held-out error ratio |D(x) - truth|^2 / |x - truth|^2 by sigma, before: {before}")
    g = torch.Generator().manual_seed(seed)
    curve, step, t0 = [], 0, time.perf_counter()
    out = Path(out)
    info = {"objective": "artifacts", "domain": domain, "init": str(init), "lr": lr, "batch": batch,
            "dsm_share": dsm_share, "ema": ema, "seed": seed, "cases": len(train), "holdout_cases": len(hold),
            "holdout_error_ratio_before": before, **(settings or {})}
    saved = t0
    lo, hi = np.log(0.005), np.log(0.3)
    while (not steps or step < steps) and (not minutes or time.perf_counter() - t0 < minutes * 60):
        c = train[int(torch.randint(len(train), (1,), generator=g))]
        x, ta, sigma = c["pairs"][int(torch.randint(len(c["pairs"]), (1,), generator=g))]
        x, ta = _planes(x, ta, domain, int(torch.randint(2, (1,), generator=g)), net.config.divisor)
        pick = torch.randperm(x.shape[0], generator=g)[:batch]
        x, ta = x[pick].to(dev), ta[pick].to(dev)
        if torch.rand(1, generator=g) < 0.5:
            x, ta = x.flip(-1), ta.flip(-1)
        z = torch.view_as_real((x - ta) / sigma).permute(0, 3, 1, 2)
        art = ((_score(net, x, torch.full((x.shape[0],), sigma, device=dev), amp) * sigma + z) ** 2).mean()
        loss = art
        if dsm_share > 0:
            ds = torch.exp(torch.empty(x.shape[0]).uniform_(lo, hi, generator=g)).to(dev)
            zz = torch.randn(ta.shape + (2,), generator=g).to(dev)
            s2 = _score(net, ta + ds[:, None, None] * torch.view_as_complex(zz), ds, amp)
            loss = (1 - dsm_share) * art + dsm_share * ((s2 * ds[:, None, None, None] + zz.permute(0, 3, 1, 2)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(avg.parameters()), list(net.parameters()), 1.0 - ema)
        step += 1
        curve.append((step, round(time.perf_counter() - t0, 1), float(art.detach()), float(loss.detach())))
        if step % 100 == 0:
            log(f"step {step}: artifact loss {np.mean([r[2] for r in curve[-100:]]):.4f}, "
                f"{time.perf_counter() - t0:.0f} s")
        if save_minutes and time.perf_counter() - saved > save_minutes * 60:
            save_model(out / f"{domain}.safetensors", avg, domain, {**info, "steps": step, "partial": True})
            saved = time.perf_counter()
    after = denoiser_error_ratio(avg, hold, domain, amp)
    log(f"after {step} steps: {after}")
    info = {**info, "steps": step, "holdout_error_ratio_after": after}
    save_model(out / f"{domain}.safetensors", avg, domain, info)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{domain}_loss.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "seconds", "artifact_loss", "loss"])
        w.writerows(curve)
    (out / f"{domain}_settings.json").write_text(json.dumps(info, indent=1))
    return info


def train_artifacts(a) -> dict:
    """``ddugm train --objective artifacts``: :func:`collect` on the training split of ``--data``
    for ``--collect-minutes`` (or ``--collect-cases``), then :func:`finetune` ``--init`` (default:
    the shipped weights of the domain) for ``--minutes`` / ``--steps``."""
    from .data import is_pack, list_series_files, split_of

    if a.domain not in DOMAINS:  # before minutes of collecting
        raise ValueError(f"--objective artifacts trains the priors the default sampler uses: --domain image or xt, "
                         f"not {a.domain!r}")
    if a.collect_minutes <= 0 or a.collect_cases < 0 or a.holdout_cases < 1:
        raise ValueError(f"need --collect-minutes > 0, --collect-cases >= 0 and --holdout-cases >= 1, got "
                         f"{a.collect_minutes}, {a.collect_cases}, {a.holdout_cases}")
    if Path(a.data).is_file() and is_pack(Path(a.data)):  # a pack holds training patients only (ddugm pack)
        files = [Path(a.data)]
    else:
        files = split_of(list_series_files(a.data), "train")
    if not files:
        raise ValueError(f"no training files in {a.data}")
    threads = torch.get_num_threads()  # restored on leaving, as by train()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return _collect_and_finetune(a, files)
    finally:
        torch.set_num_threads(threads)


def _collect_and_finetune(a, files) -> dict:
    from .cli import train_out

    log = (lambda m: None) if a.quiet else (lambda m: print(m, flush=True))
    from .reconstruction import ReconConfig

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    init = a.init or DEFAULT_WEIGHTS[a.domain]
    config = ReconConfig(device=device, **{f"{a.domain}_weights": str(init)})  # the sampler runs with the prior trained
    cases = collect(files, a.collect_minutes, seed=a.seed, config=config, device=device, max_cases=a.collect_cases,
                    log=log)
    return finetune(a.domain, init, cases, train_out(a), minutes=a.minutes, steps=a.steps,
                    lr=a.lr, batch=a.batch, holdout=a.holdout_cases, seed=a.seed, device=device,
                    save_minutes=a.save_minutes, log=log,
                    settings={"data": str(a.data), "collect_minutes": a.collect_minutes,
                              "collect_cases": a.collect_cases, "accels": [6, 8, 10], "coils": 8, "noise": 0.005})
