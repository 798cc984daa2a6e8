"""Training frames: loading, normalisation, whole-patient splits, augmentation.

Sources: the ACDC cine files (``patientNNN.npz`` with ``cine`` int16 ``[T, Z, H, W]``)
or plain ``.npy``/``.npz`` stacks ``[T, H, W]``, ``[T, Z, H, W]`` or ``[H, W]``, complex or
magnitude. Each series (one slice, all frames) is divided by the 99th percentile of the
magnitude of its time average, the same normalisation the reconstruction applies, so one
set of weights serves any scanner's units. Magnitude frames get a random smooth phase.
"""
from __future__ import annotations

import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .operators import fft2c, kspace_weight

SUFFIXES = (".npz", ".npy")


def list_series_files(source) -> list[Path]:
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"training data not found: {source}")
    files = sorted(p for p in source.iterdir() if p.suffix in SUFFIXES)
    if not files:
        raise ValueError(f"no .npz/.npy files in {source}")
    packs = [p.name for p in files if is_pack(p)]
    if packs:  # read as series they would change the folder's split and mix patients of every split
        raise ValueError(f"{source} holds training packs ({', '.join(packs[:3])}{', ...' if len(packs) > 3 else ''}) "
                         "written by `ddugm pack`: name a pack file itself, not its folder, and keep packs out of "
                         "data folders")
    return files


#: Fixed whole-patient splits of the 90 shared ACDC patients (``patientNNN.npz``; 010, 020, ...,
#: 100 are withheld from the shared data altogether). Validation: every choice and threshold is
#: made on it (the held-out patients of every earlier training run). Test: reported only, never
#: looked at while choosing. Train: the other 72. Weights trained before these lists existed
#: (the CPU-trained shipped pair) saw the test patients; everything trained since does not.
ACDC_VALIDATION = tuple(f"patient{n:03d}" for n in (11, 22, 33, 44, 55, 66, 77, 88, 99))
ACDC_TEST = tuple(f"patient{n:03d}" for n in (5, 15, 25, 35, 45, 65, 75, 85, 95))
SPLITS = ("train", "validation", "test")


def _is_acdc(files: list[Path]) -> bool:
    return bool(files) and all(f.stem.startswith("patient") and f.stem[7:].isdigit() for f in files)


def split_of(files: list[Path], split: str, val_every: int = 10) -> list[Path]:
    """The files of one split. ACDC files follow the fixed lists above; other sources: every
    ``val_every``-th file (sorted) is validation, there is no test split, the rest is train."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = sorted(files)
    if _is_acdc(files):
        val = [f for f in files if f.stem in ACDC_VALIDATION]
        test = [f for f in files if f.stem in ACDC_TEST]
        return {"validation": val, "test": test,
                "train": [f for f in files if f not in val and f not in test]}[split]
    if split == "test":
        return []
    if len(files) < 2 or val_every <= 0:
        return files if split == "train" else []
    val = files[val_every - 1::val_every] or files[-1:]
    return val if split == "validation" else [f for f in files if f not in val]


def split_files(files: list[Path], val_every: int = 10) -> tuple[list[Path], list[Path]]:
    """Whole-file (whole-patient) (train, validation) split; test patients are in neither."""
    return split_of(files, "train", val_every), split_of(files, "validation", val_every)


def read_named_array(path: Path, keys=("cine", "frames", "images", "x")) -> tuple:
    """``(name, array)`` of a ``.npz`` file (the first of ``keys`` it holds, else its first
    array), or ``(None, array)`` of a ``.npy`` file; a file that is not one (object arrays
    included: nothing is unpickled) is a ValueError naming it."""
    try:
        if Path(path).suffix == ".npy":
            return None, np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            for key in keys:
                if key in z.files:
                    return key, z[key]
            if not z.files:
                raise ValueError("it holds no array")
            return z.files[0], z[z.files[0]]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable numpy array file ({str(e).splitlines()[0][:120]})") from None


def read_array(path: Path) -> np.ndarray:
    """The frames of a ``.npy`` or ``.npz`` file (:func:`read_named_array`)."""
    return read_named_array(path)[1]


def series_of(arr: np.ndarray) -> list[np.ndarray]:
    """Split an array into series ``[T, H, W]`` (ACDC ``[T, Z, H, W]`` gives one per slice)."""
    if arr.ndim == 2:
        return [arr[None]]
    if arr.ndim == 3:
        return [arr]
    if arr.ndim == 4:
        return [arr[:, z] for z in range(arr.shape[1])]
    raise ValueError(f"expected frames [T,H,W], [T,Z,H,W] or [H,W], got shape {arr.shape}")


def robust_scale(series: np.ndarray | torch.Tensor, q: float = 99.0) -> float:
    """99th percentile of |time average|: the normalisation shared by training and recon."""
    if isinstance(series, torch.Tensor):
        m = series.mean(0).abs().flatten().float()
        s = float(torch.quantile(m, q / 100.0)) if m.numel() <= 2**24 else float(m.max())
    else:
        s = float(np.percentile(np.abs(series.mean(0)), q))
    return s


PACK_FORMAT = "ddugm-frame-pack/1"


def is_pack(path: Path) -> bool:
    """Whether ``path`` is a training pack (:func:`write_pack`); a file numpy cannot read is not
    one (its reader then names the problem)."""
    if Path(path).suffix != ".npz":
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return "format" in z.files and str(z["format"]) == PACK_FORMAT
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return False


def read_pack(path: Path) -> torch.Tensor:
    """The frames of a training pack (:func:`write_pack`), already normalised per series, as
    float32 ``[N, H, W]``, or complex64 for a pack of complex series (one with ``imag``)."""
    with np.load(path, allow_pickle=False) as z:
        scale = z["scale"].astype(np.float32)[:, None, None]
        frames = z["frames"].astype(np.float32) * scale
        if "imag" in z.files:
            frames = frames + 1j * (z["imag"].astype(np.float32) * scale)
    return torch.from_numpy(frames.astype(np.complex64) if np.iscomplexobj(frames) else frames)


def _quantise(x: np.ndarray) -> tuple:
    """One series to 8 bits with one scale: magnitude as uint8 (step max / 255); complex as int8
    real and imaginary parts (step max(|re|, |im|) / 127), which keeps its phase. Returns
    ``(frames, imag or None, scale, rms error)``, or None for an all-zero series."""
    if np.iscomplexobj(x):
        peak = float(max(np.abs(x.real).max(), np.abs(x.imag).max())) if x.size else 0.0
        if peak <= 0:
            return None
        re, im = (np.clip(np.round(v / peak * 127), -127, 127).astype(np.int8) for v in (x.real, x.imag))
        back = (re.astype(np.float32) + 1j * im.astype(np.float32)) * (peak / 127)
        return re, im, peak / 127, float(np.sqrt(np.mean(np.abs(back - x) ** 2)))
    peak = float(x.max()) if x.size else 0.0
    if peak <= 0:
        return None
    q = np.clip(np.round(x / peak * 255), 0, 255).astype(np.uint8)
    return q, None, peak / 255, float(np.sqrt(np.mean((q.astype(np.float32) * peak / 255 - x) ** 2)))


def write_pack(files: list[Path], out: Path, max_mb: float = 40.0, stride: int = 0, max_frames: int = 0,
               whole_cycles: bool = False, crop: int = 0, slices: tuple = ()) -> dict:
    """Frames of ``files`` (whole patients) in one compressed ``.npz`` of at most ``max_mb`` MiB
    for a machine without the data folder.

    Each series is normalised as :func:`load_frames` does (99th percentile of the time
    average), then stored as uint8 with one scale per series (``x = frames * scale``): the
    quantisation step is max / 255 of the series. Complex series (``train --data RAW``'s
    images, complex stacks) keep their phase: the pack then holds int8 real (``frames``) and
    imaginary (``imag``) parts, step max(|re|, |im|) / 127 (so do real series with negative
    values, which uint8 would clip), and a magnitude series in it gets a zero imaginary part (a
    synthetic phase in training, as from a magnitude pack). Every ``stride``-th cardiac phase is kept
    (neighbouring phases are nearly alike); with ``stride=0`` the smallest stride whose file
    fits ``max_mb`` is chosen. With ``whole_cycles`` (for the spatio-temporal plane prior,
    which needs every phase) every ``stride``-th series is kept instead, all its phases.
    ``crop`` > 0 keeps the central ``crop`` x ``crop`` pixels (where the heart is). ``slices``
    (offsets from the middle slice, e.g. ``(0,)``) keeps only those slices of each file. Returns
    what was written (frames, stride, size, quantisation error)."""
    series, skipped = [], []
    for path in files:
        stack = series_of(read_array(path))
        if slices:
            stack = [stack[z] for z in sorted({min(max(len(stack) // 2 + o, 0), len(stack) - 1) for o in slices})]
        for s in stack:
            s = s.astype(np.complex64) if np.iscomplexobj(s) and np.any(s.imag) else s.real.astype(np.float32)
            scale = robust_scale(s)
            if np.isfinite(s).all() and scale > 0:
                series.append((path.stem, s / scale))
            else:
                skipped.append(path.name)
    _report_skipped(skipped)
    if not series:
        raise ValueError("no usable series to pack")
    size = (crop, crop) if crop else series[0][1].shape[-2:]
    complex_pack = any(np.iscomplexobj(x) or bool((x < 0).any()) for _, x in series)  # signed: int8 parts
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for k in ([stride] if stride else range(1, 65)):
        frames, imags, scales, names, ids, err = [], [], [], [], [], []
        for i, (name, x) in enumerate(series):
            if whole_cycles and i % k:
                continue
            x = center_fit(torch.from_numpy(x if whole_cycles else x[::k]), size).numpy()
            q = _quantise(x.astype(np.complex64) if complex_pack else x)
            if q is None:
                continue
            frames.append(q[0])
            imags.append(q[1])
            scales += [q[2]] * len(q[0])
            err.append(q[3])
            ids += [i] * len(q[0])
            names.append(name)
        frames = np.concatenate(frames)
        extra = {"imag": np.concatenate(imags)} if complex_pack else {}
        if max_frames:
            frames, scales, ids = frames[:max_frames], scales[:max_frames], ids[:max_frames]
            extra = {key: v[:max_frames] for key, v in extra.items()}
        tmp = out.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, format=np.array(PACK_FORMAT), frames=frames, scale=np.asarray(scales, np.float32),
                            series=np.asarray(ids, np.int32), patients=np.asarray(sorted(set(names))), **extra)
        mb = tmp.stat().st_size / 2**20
        if mb <= max_mb or stride:
            tmp.replace(out)
            return {"file": str(out), "frames": int(len(frames)), "series": len(set(ids)),
                    "patients": len(set(names)), "stride": k, "whole_cycles": whole_cycles, "size": list(size),
                    "complex": complex_pack, "mib": round(mb, 2), "quantisation_rms": float(np.mean(err)),
                    "quantisation_rms_max": float(np.max(err))}
        tmp.unlink()
    raise ValueError(f"the frames do not fit {max_mb} MiB even keeping every 64th "
                     f"{'series' if whole_cycles else 'phase'}")


def _report_skipped(names: list) -> None:
    """Series left out of training (non-finite values, or all zero) are said, never dropped silently."""
    if names:
        shown = ", ".join(sorted(set(names))[:5]) + (", ..." if len(set(names)) > 5 else "")
        print(f"ddugm: {len(names)} series left out (non-finite values or all zero): {shown}", file=sys.stderr)


def load_frames(files: list[Path]) -> torch.Tensor:
    """All frames of ``files``, normalised per series, as complex64 ``[N, H, W]``.

    Frames of different sizes are centre-padded/cropped to the first series' size. A training
    pack (:func:`write_pack`) contributes its frames as stored (already normalised).
    """
    series = load_series(files)
    size = series[0].shape[-2:]
    return torch.cat([center_fit(t, size) for t in series])


def load_series(files: list[Path]) -> list[torch.Tensor]:
    """Every series of ``files`` (one slice, all cardiac phases), normalised as
    :func:`load_frames` does, as complex64 ``[T, H, W]`` tensors of their own sizes. A training
    pack contributes its series as stored (every ``stride``-th phase: see :func:`write_pack`)."""
    out, skipped = [], []
    for path in files:
        if is_pack(path):
            frames = read_pack(path)
            with np.load(path, allow_pickle=False) as z:
                ids = torch.from_numpy(z["series"].astype(np.int64))
            out += [frames[ids == i].to(torch.complex64) for i in torch.unique(ids).tolist()]
            continue
        for s in series_of(read_array(path)):
            s = s.astype(np.complex64) if np.iscomplexobj(s) else s.astype(np.float32)
            scale = robust_scale(s)
            if np.isfinite(s).all() and scale > 0:
                out.append(torch.from_numpy(s / scale).to(torch.complex64))
            else:
                skipped.append(path.name)
    _report_skipped(skipped)
    if not out:
        raise ValueError("no usable series (all empty or non-finite)")
    return out


def center_fit(x: torch.Tensor, size) -> torch.Tensor:
    """Centre-crop or zero-pad the last two axes to ``size``."""
    ny, nx = size
    h, w = x.shape[-2:]
    if h > ny:
        x = x[..., (h - ny) // 2:(h - ny) // 2 + ny, :]
    if w > nx:
        x = x[..., (w - nx) // 2:(w - nx) // 2 + nx]
    h, w = x.shape[-2:]
    if h < ny or w < nx:
        x = F.pad(x, ((nx - w) // 2, nx - w - (nx - w) // 2, (ny - h) // 2, ny - h - (ny - h) // 2))
    return x


def smooth_phase(n: int, size: int, generator: torch.Generator, device) -> torch.Tensor:
    """Random smooth phase maps ``[n, size, size]``: a low-order field plus a linear ramp."""
    coarse = torch.randn(n, 1, 4, 4, generator=generator, device=device)
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[:, 0]
    amp = torch.rand(n, 1, 1, generator=generator, device=device) * math.pi
    g = torch.linspace(-1, 1, size, device=device)
    ramp = (torch.randn(n, 2, 1, 1, generator=generator, device=device) * 0.5)
    return amp * field + ramp[:, 0] * g[:, None] + ramp[:, 1] * g[None, :]


def smooth_phase_1d(n: int, size: int, generator: torch.Generator, device) -> torch.Tensor:
    """Random smooth phase profiles ``[n, size]`` (a low-order field plus a linear ramp): the
    phase along one line of a frame, constant over the cardiac cycle."""
    coarse = torch.randn(n, 1, 4, generator=generator, device=device)
    field = F.interpolate(coarse, size=size, mode="linear", align_corners=True)[:, 0]
    amp = torch.rand(n, 1, generator=generator, device=device) * math.pi
    ramp = torch.randn(n, 1, generator=generator, device=device) * 0.5
    return amp * field + ramp * torch.linspace(-1, 1, size, device=device)


class PlaneSampler:
    """Draws augmented training batches of 2D spatio-temporal planes ``[n, frames, size]``: one
    line of a cine (a row: x-t, or a column: y-t) through ``frames`` consecutive cardiac phases.

    The cycle is periodic, so the time window wraps around (a series with fewer phases than
    ``frames`` repeats its cycle, which is also how the sampler pads). Augmentation: every
    second phase at random (a coarser temporal resolution), time reversal, random position
    along the line on a zero-padded canvas, flip, intensity jitter, and a random smooth phase
    that is constant over time for magnitude data. Lines are drawn from the central 70 % of
    the field of view (where the heart is) three times in four, otherwise anywhere.
    """

    domain = "xt"

    def __init__(self, series: list[torch.Tensor], frames: int, size: int, device="cpu"):
        if not series:
            raise ValueError("no series to draw planes from")
        self.series = [s.to(device) for s in series]
        self.is_complex = any(bool((s.imag != 0).any()) for s in self.series)
        self.frames, self.size, self.device = frames, size, torch.device(device)
        self.shape = (frames, size)

    def __len__(self) -> int:
        return sum(s.shape[0] for s in self.series)

    def _plane(self, rng: np.random.Generator) -> torch.Tensor:
        """One plane; every random choice is drawn on the host (``rng``), so that drawing a batch
        on a GPU costs kernel launches only, never a synchronisation per choice."""
        s = self.series[int(rng.integers(len(self.series)))]
        t_all, h, w = s.shape
        axis = int(rng.integers(2))  # 0: a row (x-t plane), 1: a column (y-t plane)
        across = h if axis == 0 else w
        central = rng.integers(4) != 0
        lo, span = (int(0.15 * across), max(1, int(0.7 * across))) if central else (0, across)
        pos = lo + int(rng.integers(span))
        line = s[:, pos, :] if axis == 0 else s[:, :, pos]  # [T, L]
        stride = 2 if (t_all >= 2 * 8 and rng.integers(10) < 3) else 1
        t0 = int(rng.integers(t_all))
        idx = (t0 + stride * np.arange(self.frames)) % t_all
        if rng.integers(2):
            idx = idx[::-1]
        plane = line[torch.as_tensor(idx.copy(), device=self.device)]
        length = plane.shape[1]
        if length < self.size:
            pad = self.size - length
            left = int(rng.integers(pad + 1))
            plane = F.pad(plane, (left, pad - left))
        else:
            o = int(rng.integers(length - self.size + 1))
            plane = plane[:, o:o + self.size]
        if rng.integers(2):
            plane = plane.flip(1)
        return plane

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Complex training planes ``[n, frames, size]``."""
        # one draw from the (possibly device) generator seeds the host choices: one synchronisation
        # per batch instead of a dozen per plane (which starved training on a shared GPU)
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        rng = np.random.default_rng(seed)
        x = torch.stack([self._plane(rng) for _ in range(n)])
        gain = torch.exp((torch.rand(n, 1, 1, generator=generator, device=self.device) - 0.5) * 0.45)
        x = x * gain
        if not self.is_complex:
            x = x.real * torch.exp(1j * smooth_phase_1d(n, self.size, generator, self.device))[:, None, :]
        return x.to(torch.complex64)


class FrameSampler:
    """Draws augmented training batches of single frames in the image or weighted k-space domain.

    Augmentation: random position on a zero-padded canvas, flips, transposition, intensity
    jitter (x0.8-1.25), and a random smooth phase for magnitude data.
    """

    def __init__(self, frames: torch.Tensor, size: int, domain: str, device="cpu"):
        if domain not in ("image", "kspace"):
            raise ValueError(f"domain must be 'image' or 'kspace', got {domain!r}")
        h, w = frames.shape[-2:]
        canvas = (max(h, size), max(w, size))
        self.frames = center_fit(frames, canvas).to(device)
        self.is_complex = bool((frames.imag != 0).any())
        self.size, self.domain, self.device = size, domain, torch.device(device)
        self.weight = kspace_weight(size, size, device=device) if domain == "kspace" else None
        self.shape = (size, size)

    def __len__(self) -> int:
        return self.frames.shape[0]

    def images(self, n: int, generator: torch.Generator) -> torch.Tensor:
        dev, s = self.device, self.size
        idx = torch.randint(len(self), (n,), generator=generator, device=dev)
        hc, wc = self.frames.shape[-2:]
        oy = torch.randint(hc - s + 1, (n,), generator=generator, device=dev)
        ox = torch.randint(wc - s + 1, (n,), generator=generator, device=dev)
        ar = torch.arange(s, device=dev)
        x = self.frames[idx[:, None, None], (oy[:, None] + ar)[:, :, None], (ox[:, None] + ar)[:, None, :]]
        flips = torch.rand(n, 3, generator=generator, device=dev) < 0.5
        x = torch.where(flips[:, 0, None, None], x.flip(-1), x)
        x = torch.where(flips[:, 1, None, None], x.flip(-2), x)
        x = torch.where(flips[:, 2, None, None], x.transpose(-1, -2), x)
        gain = torch.exp((torch.rand(n, 1, 1, generator=generator, device=dev) - 0.5) * 0.45)
        x = x * gain
        if not self.is_complex:
            x = x.real * torch.exp(1j * smooth_phase(n, s, generator, dev))
        return x.to(torch.complex64)

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Complex training samples ``[n, size, size]`` in this sampler's domain."""
        x = self.images(n, generator)
        if self.domain == "kspace":
            x = fft2c(x) * self.weight
        return x
