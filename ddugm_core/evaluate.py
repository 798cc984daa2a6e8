"""``ddugm evaluate``: reconstruct simulated multi-coil cine from real images with every
method at several accelerations and write a Markdown report.

For each series (one slice of a cine, all frames) the ground truth is the magnitude image
(divided by the 99th percentile of its time average) times a smooth random phase; it is
multiplied by simulated coil sensitivities, Fourier transformed, given complex Gaussian
noise of a stated standard deviation and undersampled with per-frame variable-density
Cartesian masks. Every method sees the same k-space; no method sees the truth. Metrics
are computed per frame against the truth (the series' peak as the data range) and
summarised as mean and standard deviation over all frames of all series. Everything is
deterministic for a given seed.

With ``--data RAW.h5`` (through the ``ddugm`` command, whose gadgets package reads ISMRMRD) the
series are instead the slices of the user's own fully sampled raw acquisitions: real coils, real
noise and real phase. The truth is their coil combination with maps estimated from all of the
data; the methods get the same data undersampled by the same masks, and estimate their own maps.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cli import finite_float
from .metrics import hfen, psnr, ssim

DEFAULT_DATA = "../shared/data/acdc_cine"
SIM_COILS, SIM_NOISE = 8, 0.005  # the simulation's defaults (--coils, --noise)
#: what the report calls each method; "ddugm_<preset>" is DD-UGM with that preset.
METHOD_NAMES = {"zero_filled": "zero-filled", "low_rank": "low-rank only", "l_plus_s": "L+S",
                "llr_ttv": "LLR + temporal TV",
                "ddugm": "DD-UGM (default)", "ddugm_pnp": "DD-UGM (pnp)", "ddugm_dual": "DD-UGM (dual)",
                "ddugm_paper": "DD-UGM (paper)"}
ALL_METHODS = tuple(METHOD_NAMES)
MASKS = ("random", "lattice", "equispaced")  # --mask: case_mask


RAW_SUFFIXES = (".h5", ".hdf5", ".mrd")  # ISMRMRD raw files (read by gadgets.rawcine)


@dataclass
class Case:
    """One acquisition: truth ``[T, y, x]``, k-space ``[coil, T, ky, kx]``, mask ``[T, ky]`` or
    ``[T, ky, kx]``; ``full``: the samples a fully sampled acquisition has (None: the mask's size)."""

    name: str
    truth: np.ndarray
    kspace: np.ndarray
    mask: np.ndarray
    maps: np.ndarray | None
    accel: float
    full: int | None = None
    noise_std: float | None = None  # the k-space noise std where known (what a noise scan tells), else None

    @property
    def measured_accel(self) -> float:
        return float((self.full or self.mask.size) / max(1, int(self.mask.sum())))


@dataclass
class RawSeries:
    """A fully sampled multi-coil acquisition: k-space ``[coil, T, ky, kx]`` and truth
    ``[T, y, x]``, both divided by the truth's robust scale; ``sampled`` ``[ky, kx]``: the
    locations acquired (all but partial-Fourier lines and the asymmetric echo's missing part)."""

    name: str
    kspace: np.ndarray
    truth: np.ndarray
    sampled: np.ndarray
    noise_std: float | None = None  # the data's own noise (per real component, normalised) where known


# ---------------------------------------------------------------------- data
def select_series(source, split: str = "val", slices: str = "mid", max_series: int = 0,
                  max_frames: int = 0) -> list[tuple[str, np.ndarray]]:
    """Series ``(name, frames [T, y, x])`` from a folder or file.

    split: ``validation`` (alias ``val``: where settings are chosen), ``test`` (reported only;
    ACDC's fixed test patients), ``train`` or ``all`` (:func:`~ddugm_core.data.split_of`).
    slices: ``mid`` (the middle slice of a multi-slice file) or ``all``.
    """
    from .data import list_series_files, read_array, series_of, split_of

    files = list_series_files(source)
    if split != "all":
        split = {"val": "validation"}.get(split, split)
        if split not in ("train", "validation", "test"):
            raise ValueError(f"split must be validation, test, train or all, got {split!r}")
        files = split_of(files, split)
        if not files:
            raise ValueError(f"no {split} files in {source} (validation needs at least 2 files, test the ACDC "
                             f"patient files; use --split all)")
    if slices not in ("mid", "all"):
        raise ValueError(f"slices must be mid or all, got {slices!r}")
    out = []
    for f in files:
        stack = series_of(read_array(f))
        picks = [len(stack) // 2] if slices == "mid" else range(len(stack))
        for z in picks:
            s = stack[z]
            if max_frames:
                s = s[:max_frames]
            if s.shape[0] < 2:
                raise ValueError(f"{f.name}: a cine series needs at least 2 frames, got {s.shape[0]}")
            out.append((f"{f.stem}" + (f"_z{z}" if len(stack) > 1 else ""), s))
            if max_series and len(out) >= max_series:
                return out
    return out


def is_raw_source(source) -> bool:
    """An ISMRMRD raw file, or a folder of them. A folder with both raw files and image stacks
    (.npz / .npy) is ambiguous: ValueError naming both."""
    p = Path(source)
    if p.is_file():
        return p.suffix.lower() in RAW_SUFFIXES
    if p.is_dir():
        suffixes = {f.suffix.lower() for f in p.iterdir() if f.is_file()}
        raw, images = suffixes & set(RAW_SUFFIXES), suffixes & {".npz", ".npy"}
        if raw and images:
            raise ValueError(f"{source} holds both ISMRMRD raw files ({', '.join(sorted(raw))}) and image stacks "
                             f"({', '.join(sorted(images))}); put them in separate folders or name one file")
        return bool(raw)
    return False


def raw_series(items, max_series: int = 0, max_frames: int = 0) -> list[RawSeries]:
    """:class:`RawSeries` from ``(name, kspace [coil, T, ky, kx], sampled [ky, kx][, noise std])``
    (what ``gadgets.rawcine.read_raw_cines`` returns; the noise std where a noise scan told it). The
    truth is the coil combination sum_c conj(S_c) x_c with Walsh maps S estimated from all of the
    data (one coil: the image)."""
    import torch

    from .coils import estimate_coil_maps
    from .data import robust_scale
    from .operators import ifft2c

    out = []
    for name, k, sampled, *known in items:
        noise = known[0] if known else None
        if max_frames:
            k = k[:, :max_frames]
        if k.shape[1] < 2:
            raise ValueError(f"{name}: a cine series needs at least 2 frames, got {k.shape[1]}")
        kt = torch.from_numpy(np.ascontiguousarray(k, dtype=np.complex64))
        coil_images = ifft2c(kt)
        if k.shape[0] > 1:
            m = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(sampled, k.shape[1:])))
            x = (estimate_coil_maps(kt, m).conj()[:, None] * coil_images).sum(0)
        else:
            x = coil_images[0]
        truth = x.numpy()
        scale = robust_scale(truth)
        if not np.isfinite(truth).all() or not scale > 0:
            raise ValueError(f"{name}: the fully sampled image is empty or not finite")
        out.append(RawSeries(name, (k / scale).astype(np.complex64), (truth / scale).astype(np.complex64),
                             np.asarray(sampled, bool), None if noise is None else float(noise) / scale))
        if max_series and len(out) >= max_series:
            break
    return out


def raw_case(rs: RawSeries, accel: float, noise: float, seed: int, mask: str = "random",
             acs: int | None = None) -> Case:
    """Retrospective undersampling of a fully sampled acquisition by the masks of
    :func:`simulate_case`, with optional extra complex Gaussian noise (std ``noise`` per real
    component, normalised units) on top of the data's own."""
    _, t, ny, _ = rs.kspace.shape
    lines = case_mask(mask, t, ny, accel, _case_seed(seed, accel), acs)
    mask = lines[:, :, None] & rs.sampled[None]
    k = rs.kspace
    if noise:
        rng = np.random.default_rng(_case_seed(seed, accel))
        k = k + noise * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    own = rs.noise_std
    return Case(rs.name, rs.truth, (k * mask[None]).astype(np.complex64), mask, None, accel,
                full=t * int(rs.sampled.sum()), noise_std=None if own is None else math.hypot(own, noise))


PHASES = ("random", "none")  # --phase: what phase magnitude series are given


def make_truth(frames: np.ndarray, seed: int, phase: str = "random") -> np.ndarray:
    """Normalised complex truth: magnitude (or the complex data) / robust scale, with a smooth
    random phase (shared by all frames) added to magnitude data (``phase`` ``random``), or
    none (``none``: a real-valued object, as after a phase correction)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    import torch

    from .data import robust_scale, smooth_phase

    x = frames.astype(np.complex64) if np.iscomplexobj(frames) else frames.astype(np.float32)
    scale = robust_scale(x)
    if not np.isfinite(x).all() or not scale > 0:
        raise ValueError("series is empty or not finite")
    x = x / scale
    if not np.iscomplexobj(frames) and phase == "random":
        ny, nx = x.shape[-2:]
        g = torch.Generator().manual_seed(int(seed))
        ph = smooth_phase(1, max(ny, nx), g, "cpu")[0, :ny, :nx].numpy()
        x = np.abs(x) * np.exp(1j * ph)
    return x.astype(np.complex64)


def _case_seed(seed: int, accel: float) -> int:
    """The seed of a series' mask and noise at R = ``accel`` (simulated and raw alike)."""
    return seed + int(round(accel * 100))


def case_mask(kind: str, frames: int, ny: int, accel: float, seed: int, acs: int | None = None) -> np.ndarray:
    """The lines ``[frame, ky]`` of one case: ``random``, a variable-density random set per frame
    with the centre lines always sampled (``acs`` of them; None: about 4 % of the lines);
    ``lattice``, every R-th line shifted by one line per frame (k-t SENSE, TGRAPPA; ``acs`` centre
    lines in every frame, None: 0); ``equispaced``, every R-th line, the same in every frame, with
    ``acs`` calibration lines (None: :func:`default_acs`), as clinical cine with GRAPPA or SENSE."""
    from .masks import equispaced_mask, lattice_mask, variable_density_mask

    if kind == "random":
        return variable_density_mask(frames, ny, accel, center_lines=acs, seed=seed)
    if kind == "lattice":
        return lattice_mask(frames, ny, int(accel), center_lines=acs or 0)
    if kind == "equispaced":
        return equispaced_mask(frames, ny, int(accel), default_acs(ny) if acs is None else acs)
    raise ValueError(f"unknown mask {kind!r}; choose from {', '.join(MASKS)}")


def default_acs(ny: int) -> int:
    """The calibration lines of an ``equispaced`` case: an eighth of the lines, even (24 of a
    192-line scan, a scanner's usual GRAPPA reference)."""
    return max(2, 2 * round(ny / 16))


def simulate_case(name: str, truth: np.ndarray, accel: float, coils: int, noise: float, seed: int,
                  mask: str = "random", acs: int | None = None) -> Case:
    from .phantom import coil_maps, simulate_kspace

    t, ny, nx = truth.shape
    maps = coil_maps(coils, (ny, nx), seed=seed) if coils > 1 else None
    mask = case_mask(mask, t, ny, accel, _case_seed(seed, accel), acs)
    k = simulate_kspace(truth, maps, mask, noise=noise, seed=_case_seed(seed, accel))
    return Case(name, truth, k, mask, maps, accel, noise_std=noise)  # known, as a noise scan tells it


# ---------------------------------------------------------------------- metrics
def frame_metrics(ref: np.ndarray, x: np.ndarray) -> dict[str, list[float]]:
    """PSNR, SSIM and HFEN of each frame, with the series' peak |ref| as the data range."""
    peak = float(np.abs(ref).max())
    out = {"psnr": [], "ssim": [], "hfen": []}
    for r, v in zip(ref, x):
        out["psnr"].append(psnr(r, v, data_range=peak))
        out["ssim"].append(ssim(r, v, data_range=peak))
        out["hfen"].append(hfen(r, v))
    return out


def summarise(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std())


# ---------------------------------------------------------------------- running
def add_parser(sub):
    p = sub.add_parser("evaluate", help="compare zero-filled, low-rank, L+S, LLR + temporal TV and DD-UGM on simulated "
                                        "multi-coil cine from real images, or on your own fully sampled raw data "
                                        "undersampled retrospectively; writes a Markdown report")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="folder (or file) of ACDC .npz or complex/magnitude .npy/.npz cine stacks (default: %(default)s), "
                        "or fully sampled ISMRMRD raw cine (.h5, .mrd: a file or a folder of them; the ddugm command)")
    p.add_argument("--split", default=None, choices=["validation", "val", "test", "train", "all"],
                   help="which image files: validation (the default; where settings are chosen), test (ACDC's fixed "
                        "test patients: report only), train, or all; raw files are always evaluated whole")
    p.add_argument("--slices", default="mid", choices=["mid", "all"], help="slices per multi-slice file (default: mid)")
    p.add_argument("--max-series", type=int, default=0, help="use at most this many series (0: all)")
    p.add_argument("--max-frames", type=int, default=0, help="use at most this many frames per series (0: all)")
    p.add_argument("--accels", default="4,8,12", help="accelerations R, comma separated (default: %(default)s)")
    p.add_argument("--mask", default="random", choices=MASKS,
                   help="random: variable-density random lines, a new set per frame (default); lattice: every R-th "
                        "line shifted by one line per frame (k-t SENSE, TGRAPPA); equispaced: every R-th line, the "
                        "same in every frame, with --acs calibration lines (clinical cine with GRAPPA or SENSE)")
    p.add_argument("--acs", type=int, default=None,
                   help="centre lines sampled in every frame (default: random about 4 %% of the lines, lattice 0, "
                        "equispaced an eighth of them)")
    p.add_argument("--coils", type=int, default=None,
                   help=f"simulated receive coils (default: {SIM_COILS}; raw data bring their own)")
    p.add_argument("--noise", type=finite_float, default=None,
                   help="complex k-space noise std per real component, in units of the normalised image "
                        f"(99th percentile of the time average = 1) (default: {SIM_NOISE}; raw data: 0, their "
                        "own noise only, any value is added to it)")
    p.add_argument("--noise-known", default="yes", choices=["yes", "no"],
                   help="tell every method the noise, as a noise scan tells the gadgets (yes, the default), or not "
                        "(no: as in a Gadgetron chain that whitens upstream; noise_estimate may estimate it)")
    p.add_argument("--maps", default="estimated", choices=["estimated", "true"],
                   help="coil maps given to every method: estimated from the data (default) or the simulated ones")
    p.add_argument("--phase", default="random", choices=PHASES,
                   help="the phase simulated magnitude series get: a random smooth phase map (default), or none (a "
                        "real-valued object, as after a phase correction); complex series keep their own")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma separated, from {', '.join(ALL_METHODS)} (default: all)")
    p.add_argument("--paper-series", type=int, default=1,
                   help="run the paper preset (1000 steps) on only the first N series (default: %(default)s; 0: all)")
    p.add_argument("--config", default=None, help="reconstruction settings YAML (ReconConfig) for every method")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--out", default="eval_out", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune-l-plus-s", action="store_true",
                   help="instead of the report: grid-search the L+S thresholds on these series at the first "
                        "acceleration and print mean PSNR per pair (how the shipped defaults were chosen)")
    p.add_argument("--trace", action="store_true",
                   help="instead of the report: for DD-UGM on these series, print per sampler step the noise level "
                        "each network is told and the RMS error of its input against the truth (needs --maps true, "
                        "so that the image's phase convention is the truth's); writes trace.json")
    p.add_argument("--free-running", type=int, default=0, metavar="B",
                   help="instead: simulate each series as a free-running acquisition over B heartbeats (R per "
                        "real-time frame) and reconstruct it through the gadgets as --frame-axes say (the ddugm command)")
    p.add_argument("--frame-axes", default="ecg,repetition",
                   help="--free-running: ecg (binned into the cine's cardiac phases), repetition (the real-time "
                        "frames), or both (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parse_list(text: str, conv, name: str) -> list:
    try:
        vals = [conv(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name}: expected a comma-separated list, got {text!r}") from None
    if not vals:
        raise ValueError(f"--{name} is empty")
    return vals


def _resolve_source(a, raw_reader) -> bool:
    """Fill ``a.split``, ``a.coils`` and ``a.noise`` for the kind of data; True for raw data.
    Options that only make sense for simulated coils are refused with raw data, by name."""
    raw = is_raw_source(a.data)
    if not raw:
        a.split = a.split or "validation"
        a.coils = SIM_COILS if a.coils is None else a.coils
        a.noise = SIM_NOISE if a.noise is None else a.noise
        return False
    if raw_reader is None:
        raise ValueError(f"{a.data}: ISMRMRD raw data are read by the `ddugm` command (its gadgets package needs "
                         "ismrmrd), not by python -m ddugm_core.cli")
    if a.split not in (None, "all"):
        raise ValueError(f"--split {a.split} chooses ACDC / image-stack files; raw files are evaluated whole "
                         "(leave --split out)")
    if a.coils is not None:
        raise ValueError("--coils sets the simulated coils; raw data bring their own (leave --coils out)")
    if a.maps == "true" or a.trace:
        raise ValueError("--maps true and --trace need simulated coils (raw data have no true coil maps)")
    if getattr(a, "phase", "random") != "random":
        raise ValueError("--phase sets the phase of simulated magnitude series; raw data bring their own (leave "
                         "--phase out)")
    a.split, a.noise = "all", (a.noise or 0.0)
    return True


def run(a, raw_reader=None) -> int:
    """``ddugm evaluate``. ``raw_reader(source, slices)`` reads fully sampled ISMRMRD raw data as
    ``(name, kspace, sampled, noise std)`` (``gadgets.rawcine.read_raw_cines``, passed by the ``ddugm``
    command; the library alone has no ISMRMRD reader)."""
    import torch

    from .reconstruction import PRESETS, ReconConfig, Reconstructor

    if a.free_running:
        raise ValueError("--free-running simulates raw acquisitions and reconstructs them through the gadgets: the "
                         "`ddugm` command, not python -m ddugm_core.cli")
    accels = _parse_list(a.accels, float, "accels")
    methods = _parse_list(a.methods, str, "methods")
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}")
    negative = [f"--{k.replace('_', '-')} {getattr(a, k)}" for k in ("max_series", "max_frames", "paper_series")
                if getattr(a, k) < 0]
    if negative:  # (a negative --max-frames used to drop the last frame, --max-series -1 kept one series)
        raise ValueError(f"need --max-series, --max-frames and --paper-series >= 0 (0: all), got {', '.join(negative)}")
    raw = _resolve_source(a, raw_reader)
    if a.mask != "random" and any(r != int(r) for r in accels):
        raise ValueError(f"--mask {a.mask} samples every R-th line: it needs whole accelerations, got "
                         f"{', '.join(f'{r:g}' for r in accels)}")
    if a.acs is not None and a.acs < 0:
        raise ValueError(f"--acs must be >= 0, got {a.acs}")
    if any(not 1 <= r < math.inf for r in accels) or (a.coils is not None and a.coils < 1) or a.noise < 0:
        raise ValueError(f"need finite accelerations >= 1 (got {', '.join(f'{r:g}' for r in accels)}), --coils >= 1 "
                         "and --noise >= 0")
    base = ReconConfig.from_yaml(a.config) if a.config else ReconConfig()
    over = {} if a.device == "auto" else {"device": a.device}
    cfg_default = ReconConfig.from_dict({**base.to_dict(), **over, "method": "ddugm"})
    # the paper preset's own schedule: every key the preset sets is left to it
    cfg_paper = ReconConfig.from_dict({**base.to_dict(), **over, "method": "ddugm", "preset": "paper",
                                       **{k: None for k in PRESETS["paper"]}})
    rec = Reconstructor(cfg_default)
    rec_paper = Reconstructor(cfg_paper, device=rec.device)  # loads its (identical) models only if used
    engines = {"ddugm_paper": rec_paper}
    for m in methods:  # other presets, each with its own schedule (models loaded on first use)
        if m.startswith("ddugm_") and m not in engines:
            cfg_m = ReconConfig.from_dict({**base.to_dict(), **over, "method": "ddugm", "preset": m[6:],
                                           **{k: None for k in PRESETS[m[6:]]}})
            engines[m] = Reconstructor(cfg_m, device=rec.device)

    if raw:
        series = raw_series(raw_reader(a.data, a.slices), a.max_series, a.max_frames)
        names = [s.name for s in series]
    else:
        series = select_series(a.data, a.split, a.slices, a.max_series, a.max_frames)
        names = [n for n, _ in series]
    truths: dict[int, np.ndarray] = {}

    def truth_of(i: int) -> np.ndarray:
        """Series i's truth (computed once; ValueError if it cannot be)."""
        if raw:
            return series[i].truth
        if i not in truths:
            truths[i] = make_truth(series[i][1], a.seed * 1000 + i, a.phase)
        return truths[i]

    def case_of(i: int, r: float) -> Case:
        if raw:
            case = raw_case(series[i], r, a.noise, a.seed * 1000 + i, a.mask, a.acs)
        else:
            case = simulate_case(series[i][0], truth_of(i), r, a.coils, a.noise, a.seed * 1000 + i, a.mask, a.acs)
        if a.noise_known == "no":
            case.noise_std = None
        return case

    if a.tune_l_plus_s:
        return tune_l_plus_s(case_of, len(series), base, rec.device, accels[0], a)
    if a.trace:
        return trace_noise(series, rec, accels, a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    def runs(i: int, m: str) -> bool:  # the paper preset only on the first --paper-series series
        return not (m == "ddugm_paper" and a.paper_series and i >= a.paper_series)

    jobs = [(i, r, m) for i in range(len(series)) for r in accels for m in methods if runs(i, m)]
    what = (f"fully sampled raw data, their own coils, extra noise {a.noise}" if raw
            else f"{a.coils} simulated coil(s), noise {a.noise}")
    print(f"{len(series)} series, R = {', '.join(f'{r:g}' for r in accels)}, {what}, "
          f"maps {a.maps}, device {rec.device}; {len(jobs)} reconstructions")
    bar = None
    if not a.quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="evaluate", dynamic_ncols=True)

    settings = {"evaluate": {k: v for k, v in vars(a).items() if k != "func"}, "series": names,
                "source": "raw" if raw else "images",
                "recon_default": cfg_default.to_dict(), "recon_paper": cfg_paper.to_dict(), "device": str(rec.device),
                "torch": torch.__version__, "threads": torch.get_num_threads()}
    results: list[dict] = []
    failures: list[dict] = []
    figure_case = None

    def save(complete: bool):  # after every series, so a long run that stops keeps what it has
        (out / "results.json").write_text(json.dumps({"settings": settings, "complete": complete, "results": results,
                                                      "failures": failures}, indent=2, default=str))

    for i, name in enumerate(names):
        try:
            truth_of(i)
        except ValueError as e:
            failures.append({"series": name, "accel": None, "method": None, "error": str(e)})
            if bar is not None:
                bar.update(sum(1 for j in jobs if j[0] == i))
            continue
        for r in accels:
            case = case_of(i, r)
            maps = case.maps if a.maps == "true" else None
            images = {}
            for m in methods:
                if not runs(i, m):
                    continue
                engine = engines.get(m, rec)
                method = "ddugm" if m.startswith("ddugm") else m
                if bar is not None:
                    bar.set_postfix_str(f"{name} R={r:g} {m}")
                try:
                    t0 = time.perf_counter()
                    x = engine.recon(case.kspace, case.mask, maps, seed=a.seed, method=method,
                                     noise_std=case.noise_std)
                    if rec.device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                except (ValueError, RuntimeError) as e:  # one bad case must not lose the others
                    failures.append({"series": name, "accel": r, "method": m, "error": f"{type(e).__name__}: {e}"})
                    print(f"evaluate: {name} R={r:g} {m} failed: {e}", file=sys.stderr)
                else:
                    fm = frame_metrics(case.truth, x)
                    results.append({"series": name, "frames": int(case.truth.shape[0]), "accel": r,
                                    "measured_accel": case.measured_accel, "method": m,
                                    "seconds": dt, **fm})
                    images[m] = x
                if bar is not None:
                    bar.update(1)
            if figure_case is None and (r == 8 or r == accels[len(accels) // 2]) and len(images) == len(methods):
                figure_case = (name, r, case.truth, images)
        save(False)
    if bar is not None:
        bar.close()

    save(True)
    table = summary_table(results, methods, accels, failures)
    if figure_case is not None:
        save_figure(out / "figure.png", *figure_case)
    (out / "report.md").write_text(report_markdown(table, settings, figure_case is not None, len(series), failures))
    print(render_table(table))
    print(f"\nwrote {out / 'report.md'}, {out / 'results.json'}" + (f", {out / 'figure.png'}" if figure_case else ""))
    if failures:
        print(f"evaluate: {len(failures)} reconstruction(s) failed; listed in the report", file=sys.stderr)
        return 1
    return 0


LS_GRID = {"ls_lambda_l": (0.003, 0.01, 0.03, 0.1), "ls_lambda_s": (0.003, 0.01, 0.02, 0.05)}


def tune_l_plus_s(case_of, n: int, base, device, accel: float, a) -> int:
    """Mean PSNR of L+S for every threshold pair of :data:`LS_GRID` on the ``n`` series
    ``case_of(i, accel)``; prints the best pair."""
    from .reconstruction import ReconConfig, Reconstructor

    cases = [case_of(i, accel) for i in range(n)]
    print(f"L+S thresholds on {len(cases)} series at R = {accel:g}: mean PSNR (dB) over frames and series")
    print(f"{'lambda_L':>9}{'lambda_S':>9}{'PSNR':>8}")
    best = None
    for ll in LS_GRID["ls_lambda_l"]:
        for ls in LS_GRID["ls_lambda_s"]:
            cfg = ReconConfig.from_dict({**base.to_dict(), "ls_lambda_l": ll, "ls_lambda_s": ls, "device": str(device)})
            rec = Reconstructor(cfg)
            vals = [v for c in cases for v in frame_metrics(
                c.truth, rec.recon(c.kspace, c.mask, c.maps if a.maps == "true" else None, method="l_plus_s"))["psnr"]]
            score = float(np.mean(vals))
            print(f"{ll:>9g}{ls:>9g}{score:>8.2f}", flush=True)
            if best is None or score > best[0]:
                best = (score, ll, ls)
    print(f"best: ls_lambda_l {best[1]:g}, ls_lambda_s {best[2]:g} ({best[0]:.2f} dB)")
    return 0


def trace_noise(series, rec, accels: list[float], a) -> int:
    """Per sampler step: sigma told to each network against the RMS error (per real component)
    of its input, averaged over the series. The truth is used only to measure."""
    import torch

    if a.maps != "true":
        raise ValueError("--trace needs --maps true (estimated maps give the image another phase than the truth)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table: dict = {}
    for i, (name, frames) in enumerate(series):
        truth = make_truth(frames, a.seed * 1000 + i, a.phase)
        for r in accels:
            case = simulate_case(name, truth, r, a.coils, a.noise, a.seed * 1000 + i, a.mask, a.acs)
            ref = torch.from_numpy(case.truth).to(rec.device)

            def record(rec_, r=r, ref=ref):
                from .operators import fft2c

                t = ref / rec_["scale"]
                rms = lambda d: float(torch.sqrt(torch.mean(d.real ** 2 + d.imag ** 2) / 2))  # noqa: E731
                row = table.setdefault((r, rec_["step"]), {"sigma": rec_["sigma"], "kspace_sigma": rec_.get("kspace_sigma"),
                                                           "image": [], "kspace": [], "anchor": []})
                row["image"].append(rms(rec_["image_input"] - t))
                if rec_.get("anchor") is not None:  # pnp: the denoised frames that anchor the ADMM
                    row["anchor"].append(rms(rec_["anchor"] - t))
                if "kspace_input" in rec_:  # the pnp sampler has no k-space network
                    w = rec_["weight"].weight
                    row["kspace"].append(rms((rec_["kspace_input"] - rec_["weight"](fft2c(t)))[..., w > 0]))

            rec.recon(case.kspace, case.mask, case.maps, seed=a.seed, method="ddugm", trace=record)
    rows = [{"accel": r, "step": st, "sigma": v["sigma"], "image_rms": float(np.mean(v["image"])),
             "kspace_sigma": v["kspace_sigma"], "kspace_rms": float(np.mean(v["kspace"])) if v["kspace"] else None,
             "anchor_rms": float(np.mean(v["anchor"])) if v["anchor"] else None}
            for (r, st), v in sorted(table.items())]
    (out / "trace.json").write_text(json.dumps({"settings": {k: v for k, v in vars(a).items() if k != "func"},
                                                "series": [n for n, _ in series], "rows": rows}, indent=2))
    print(f"noise model of the sampler on {len(series)} series (RMS per real component, normalised units)")
    print("| R | step | sigma (image) | image input error | denoised (anchor) error | sigma (k-space) | "
          "weighted k-space input error |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ks = "– | –" if row["kspace_rms"] is None else f"{row['kspace_sigma']:.4f} | {row['kspace_rms']:.4f}"
        an = "–" if row["anchor_rms"] is None else f"{row['anchor_rms']:.4f}"
        print(f"| {row['accel']:g} | {row['step']} | {row['sigma']:.4f} | {row['image_rms']:.4f} | {an} | {ks} |")
    return 0


def summary_table(results: list[dict], methods: list[str], accels: list[float],
                  failures: list[dict] = ()) -> list[dict]:
    """One row per (R, method): mean and std over all frames of all series, seconds per slice.
    A (series, R) where any method failed is left out for every method, so that all rows
    are computed on the same cases."""
    failed = {(f["series"], f["accel"]) for f in failures} | {(f["series"], r) for f in failures if f["accel"] is None
                                                              for r in accels}
    rows = []
    for r in accels:
        for m in methods:
            sel = [e for e in results if e["accel"] == r and e["method"] == m and (e["series"], r) not in failed]
            if not sel:
                continue
            row = {"accel": r, "method": m, "series": len(sel), "frames": sum(e["frames"] for e in sel),
                   "seconds": summarise([e["seconds"] for e in sel]),
                   "net_accel": float(np.mean([e.get("measured_accel", r) for e in sel]))}
            for key in ("psnr", "ssim", "hfen"):
                row[key] = summarise([v for e in sel for v in e[key]])
            rows.append(row)
    return rows


def render_table(rows: list[dict], names=METHOD_NAMES.get) -> str:
    """The Markdown table of :func:`summary_table`'s rows (``names``: a method's name in it)."""
    lines = ["| R | method | series | PSNR (dB) | SSIM | HFEN | s / slice |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        net = row.get("net_accel", row["accel"])
        r = f"{row['accel']:g}" + (f" (net {net:.2f})" if abs(net / row["accel"] - 1) > 0.02 else "")
        lines.append(f"| {r} | {names(row['method'])} | {row['series']} | "
                     f"{row['psnr'][0]:.2f} ± {row['psnr'][1]:.2f} | {row['ssim'][0]:.4f} ± {row['ssim'][1]:.4f} | "
                     f"{row['hfen'][0]:.3f} ± {row['hfen'][1]:.3f} | {row['seconds'][0]:.1f} |")
    return "\n".join(lines)


def _simulated_text(e: dict) -> list[str]:
    return [
        "- Truth: each series divided by the 99th percentile of its time-averaged magnitude; magnitude-only data "
        "(such as ACDC's clinical reconstructions) "
        + ("stay real-valued (`--phase none`)" if e.get("phase") == "none"
           else "get a smooth random phase, the same for all frames")
        + ". The coil sensitivities and the noise are always simulated, so these numbers are not those of a real raw "
        "acquisition.",
        f"- Acquisition: {e['coils']} simulated coil(s) (smooth ring sensitivities, normalised), complex Gaussian "
        f"k-space noise std {e['noise']} per real component (normalised image units, orthonormal FFT), "
        f"{_mask_text(e)}."] + _withheld_text(e)


def _mask_text(e: dict) -> str:
    kind, acs = e.get("mask", "random"), e.get("acs")
    if kind == "lattice":
        return ("every R-th line, shifted by one line per frame (`--mask lattice`)"
                + (f", with {acs} centre lines in every frame" if acs else ""))
    if kind == "equispaced":
        return ("every R-th line, the same in every frame, through the centre line, with "
                + (f"{acs}" if acs is not None else "an eighth of the lines as") + " calibration lines in every frame "
                "(`--mask equispaced`: clinical cine with GRAPPA or SENSE); R is the lattice's step, the net "
                "acceleration (all lines over those sampled) is in the table")
    return ("one variable-density random Cartesian mask per frame with the centre lines always sampled"
            + (f" ({acs} of them)" if acs is not None else ""))


def _withheld_text(e: dict) -> list[str]:
    return (["- The noise is not told to the methods (`--noise-known no`): `noise_estimate` may estimate it."]
            if e.get("noise_known") == "no" else [])


def _raw_text(e: dict) -> list[str]:
    extra = f", plus complex Gaussian noise std {e['noise']} per real component (normalised units)" if e["noise"] else ""
    return [
        "- Truth: the fully sampled raw data (noise prewhitened from the file's noise scan where it has one, readout "
        "oversampling removed), coil-combined with Walsh maps estimated from all of it, divided by the 99th "
        "percentile of its time-averaged magnitude. Real coils, real noise and real phase; the truth keeps the "
        "data's own noise.",
        f"- Acquisition: the same data retrospectively undersampled{extra}: {_mask_text(e)}, within the lines and "
        "readout points the scan acquired (partial Fourier and asymmetric echoes stay as acquired; R counts all "
        "phase-encoding lines)."] + \
        _withheld_text(e)


def report_markdown(rows: list[dict], settings: dict, figure: bool, n_series: int, failures: list[dict] = ()) -> str:
    e = settings["evaluate"]
    rd, rp = settings["recon_default"], settings["recon_paper"]
    from .reconstruction import PRESETS

    def preset_text(cfg):
        p = PRESETS[cfg["preset"]]
        pick = lambda k: cfg[k] if cfg[k] is not None else p[k]  # noqa: E731
        return (f"{pick('steps')} steps, sigma {pick('sigma_max')} → {pick('sigma_min')}, k-space sigma scale "
                f"{pick('kspace_sigma_scale')}, start {pick('init')}, low-rank solver {pick('lowrank_solver')}, "
                f"Langevin correctors {'on' if pick('correctors') else 'off'}")

    parts = [
        "# DD-UGM evaluation report", "",
        f"- Data: {n_series} series from `{e['data']}` (split `{e['split']}`, slices `{e['slices']}`"
        + (f", first {e['max_frames']} frames" if e["max_frames"] else "") + "): "
        + ", ".join(settings["series"]) + ".",
        *(_raw_text(e) if settings.get("source") == "raw" else _simulated_text(e)),
        f"- Coil maps given to the methods: {e['maps']}"
        + (" from the time-averaged undersampled data of all frames (Walsh), refined from a first reconstruction "
           "(`coil_refine` rounds, for series of at least `coil_refine_min_frames` frames)."
           if e["maps"] == "estimated" else " (the simulated ones)."),
        f"- DD-UGM default preset: {preset_text(rd)}. Paper preset: {preset_text(rp)}"
        + (f", run on the first {e['paper_series']} series only" if e["paper_series"] else "") + ".",
        f"- L+S (Otazo 2015): at most {rd['ls_iters']} iterations, lambda_L {rd['ls_lambda_l']} (of the largest "
        f"singular value), lambda_S {rd['ls_lambda_s']}, tol {rd['ls_tol']}. Low-rank only: {rd['lowrank_iters']} "
        f"iterations, momentum {rd['lowrank_momentum']}, window {rd['window']}, "
        f"rank {rd['rank'] or int(1.5 * rd['window'] ** 2)}.",
        "- Metrics per frame against the truth in magnitude, data range = the series' peak; mean ± standard "
        "deviation over all frames of all series. HFEN: lower is better. Seconds per slice include everything "
        f"the reconstructor does. Device: {settings['device']} ({settings['threads']} threads), torch {settings['torch']}, "
        f"seed {e['seed']}.", "",
        render_table(rows), "",
    ]
    if failures:
        parts += ["**Failed reconstructions** (their series and R are left out of the table for every method):", ""]
        parts += [f"- {f['series']}" + (f", R = {f['accel']:g}" if f["accel"] is not None else "")
                  + (f", {METHOD_NAMES[f['method']]}" if f["method"] else "") + f": {f['error']}" for f in failures]
        parts.append("")
    if figure:
        parts += ["![frames and error maps](figure.png)", "",
                  "Figure: first series at the middle acceleration; columns are frames across the cycle; "
                  "rows are the truth, each method, then each method's (but zero-filled's) error |x| - |truth| times 5, "
                  "grey = 0.", ""]
    return "\n".join(parts)


def save_figure(path: Path, name: str, accel: float, truth: np.ndarray, images: dict, columns: int = 4):
    """Truth, each method, then each method's signed error x5 (grey = 0) for frames across the cycle."""
    from .demo import _to_u8, save_grid

    vmax = float(np.abs(truth).max())
    err = lambda x: (np.clip(0.5 + 5 * (np.abs(x) - np.abs(truth)) / vmax, 0, 1) * 255).astype(np.uint8)  # noqa: E731
    rows = [("truth", _to_u8(truth, vmax))] + [(METHOD_NAMES[m], _to_u8(x, vmax)) for m, x in images.items()]
    rows += [(f"{METHOD_NAMES[m]} err x5", err(x)) for m, x in images.items() if m != "zero_filled"]
    save_grid(path, rows, columns, title=f"{name}, R = {accel:g}", label_w=130, zoom=1)
