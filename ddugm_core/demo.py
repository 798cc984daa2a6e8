"""``ddugm demo``: the built-in phantom, undersampled, reconstructed three ways, compared.

This is a thin runner: it owns the progress bars, timing, printing and files; the
reconstruction itself goes through :class:`~ddugm_core.Reconstructor` like every user.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .cli import finite_float

METHOD_NAMES = {"zero_filled": "zero-filled", "low_rank": "low-rank only", "llr_ttv": "LLR + temp. TV",
                "ddugm": "DD-UGM"}


def add_parser(sub):
    p = sub.add_parser("demo", help="reconstruct the built-in cine phantom (no data needed) and compare methods")
    p.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--accel", type=finite_float, default=8.0, help="acceleration R (default: %(default)s)")
    p.add_argument("--coils", type=int, default=8, help="receive coils; 1 = single coil (default: %(default)s)")
    p.add_argument("--frames", type=int, default=12, help="cardiac phases (default: %(default)s)")
    p.add_argument("--size", type=int, default=80, help="matrix size (default: %(default)s)")
    p.add_argument("--mask", choices=["random", "lattice"], default="random",
                   help="variable-density random lines per frame, or the paper's shifted lattice")
    p.add_argument("--noise", type=finite_float, default=0.002, help="k-space noise std, phantom units (default: %(default)s)")
    p.add_argument("--config", default=None, help="reconstruction settings YAML (ReconConfig)")
    p.add_argument("--preset", default=None, help="sampling preset: default (= pnp), pnp, dual or paper")
    p.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(a) -> int:
    import torch

    from .masks import lattice_mask, variable_density_mask
    from .metrics import all_metrics
    from .phantom import cine_phantom, coil_maps, simulate_kspace
    from .reconstruction import ReconConfig, Reconstructor

    if a.coils < 1 or a.frames < 2 or a.size < 16 or a.accel < 1:
        raise ValueError("need --coils >= 1, --frames >= 2, --size >= 16, --accel >= 1")
    cfg = ReconConfig.from_yaml(a.config) if a.config else ReconConfig()
    overrides = {k: v for k, v in (("preset", a.preset), ("steps", a.steps)) if v is not None}
    if a.device != "auto":
        overrides["device"] = a.device
    cfg = ReconConfig.from_dict({**cfg.to_dict(), **overrides})
    rec = Reconstructor(cfg)

    truth = cine_phantom(a.frames, a.size, seed=a.seed)
    maps = coil_maps(a.coils, a.size, seed=a.seed) if a.coils > 1 else None
    if a.mask == "random":
        mask = variable_density_mask(a.frames, a.size, a.accel, seed=a.seed + 1)
    else:
        mask = lattice_mask(a.frames, a.size, int(round(a.accel)), center_lines=2)
    kspace = simulate_kspace(truth, maps, mask, noise=a.noise, seed=a.seed)
    print(f"phantom {a.frames} frames x {a.size} x {a.size}, {a.coils} coil(s), R = {a.size / mask.sum(1).mean():.1f} "
          f"({a.mask} lines), device {rec.device}, preset {cfg.preset} ({cfg.sampler_settings().steps} steps)")

    results, seconds, images = {}, {}, {}
    for method in METHOD_NAMES:
        bar = _bar(METHOD_NAMES[method], a.quiet) if method != "zero_filled" else None
        t0 = time.perf_counter()
        img = rec.recon(kspace, seed=a.seed, method=method, callback=bar)
        if rec.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        images[method], results[method] = img, all_metrics(truth, img)
        if method != "zero_filled":
            seconds[method] = dt

    print(f"\n{'method':<16}{'PSNR dB':>9}{'SSIM':>8}{'HFEN':>8}{'seconds':>9}")
    for m, r in results.items():
        print(f"{METHOD_NAMES[m]:<16}{r['psnr']:>9.2f}{r['ssim']:>8.4f}{r['hfen']:>8.4f}{seconds.get(m, 0.0):>9.1f}")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({**results, "seconds": seconds}, indent=2))
    (out / "settings.json").write_text(json.dumps({"demo": vars(a), "recon": cfg.to_dict(),
                                                   "device": str(rec.device)}, indent=2, default=str))
    _save_grid(out / "frames.png", truth, images)
    _save_gif(out / "cine.gif", truth, images)
    print(f"\nwrote {out / 'metrics.json'}, {out / 'frames.png'}, {out / 'cine.gif'}")
    return 0


def _bar(desc: str, quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    class Bar:
        def __init__(self):
            self.t = None

        def __call__(self, i, n):
            if self.t is None:
                self.t = tqdm(total=n, desc=f"{desc:<14}", dynamic_ncols=True, leave=False)
            self.t.update(i - self.t.n)

        def close(self):
            if self.t is not None:
                self.t.close()

    return Bar()


def _to_u8(x: np.ndarray, vmax: float) -> np.ndarray:
    return (np.clip(np.abs(x) / vmax, 0, 1) * 255).astype(np.uint8)


def save_grid(path: Path, rows: list, columns: int = 4, title: str | None = None, label_w: int = 110, zoom: int = 2):
    """A labelled image grid: one row per ``(label, uint8 frames [T, y, x])``, columns are
    ``columns`` frames spread over the cycle, an optional title line on top."""
    from PIL import Image, ImageDraw

    t = rows[0][1].shape[0]
    cols = np.linspace(0, t - 1, min(columns, t)).round().astype(int)
    tiles = [np.concatenate([im[c] for c in cols], axis=1) for _, im in rows]
    h, w = tiles[0].shape
    top = 14 if title else 0
    canvas = Image.new("L", (label_w + w, top + h * len(tiles)), 0)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=255)
    for r, ((name, _), tile) in enumerate(zip(rows, tiles)):
        canvas.paste(Image.fromarray(tile), (label_w, top + r * h))
        draw.text((4, top + r * h + h // 2 - 5), name, fill=255)
    if zoom > 1:
        canvas = canvas.resize((canvas.width * zoom, canvas.height * zoom), Image.NEAREST)
    canvas.save(path)


def _save_grid(path: Path, truth, images, columns: int = 4):
    """Rows: reference, each method, and DD-UGM's error x5; columns: frames across the cycle."""
    vmax = float(np.abs(truth).max())
    rows = [("reference", truth)] + [(METHOD_NAMES[m], im) for m, im in images.items()]
    rows.append(("DD-UGM error x5", 5 * (np.abs(images["ddugm"]) - np.abs(truth))))
    save_grid(path, [(name, _to_u8(im, vmax)) for name, im in rows], columns)


def _save_gif(path: Path, truth, images):
    """Animated cine: reference | zero-filled | low-rank | DD-UGM."""
    from PIL import Image

    vmax = float(np.abs(truth).max())
    seq = [truth] + list(images.values())
    frames = [Image.fromarray(np.concatenate([_to_u8(s[t], vmax) for s in seq], axis=1)).resize(
        (truth.shape[2] * len(seq) * 2, truth.shape[1] * 2), Image.NEAREST) for t in range(truth.shape[0])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)
