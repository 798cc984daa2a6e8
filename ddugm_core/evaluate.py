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
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .metrics import hfen, psnr, ssim

DEFAULT_DATA = "../shared/data/acdc_cine"
#: what the report calls each method; "ddugm_<preset>" is DD-UGM with that preset.
METHOD_NAMES = {"zero_filled": "zero-filled", "low_rank": "low-rank only", "l_plus_s": "L+S",
                "llr_ttv": "LLR + temporal TV",
                "ddugm": "DD-UGM (default)", "ddugm_pnp": "DD-UGM (pnp)", "ddugm_dual": "DD-UGM (dual)",
                "ddugm_paper": "DD-UGM (paper)"}
ALL_METHODS = tuple(METHOD_NAMES)


@dataclass
class Case:
    """One simulated acquisition: truth ``[T, y, x]``, k-space ``[coil, T, ky, kx]``, mask ``[T, ky]``."""

    name: str
    truth: np.ndarray
    kspace: np.ndarray
    mask: np.ndarray
    maps: np.ndarray | None
    accel: float


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


def make_truth(frames: np.ndarray, seed: int) -> np.ndarray:
    """Normalised complex truth: magnitude (or the complex data) / robust scale, with a smooth
    random phase (shared by all frames) added to magnitude data."""
    import torch

    from .data import robust_scale, smooth_phase

    x = frames.astype(np.complex64) if np.iscomplexobj(frames) else frames.astype(np.float32)
    scale = robust_scale(x)
    if not np.isfinite(x).all() or not scale > 0:
        raise ValueError("series is empty or not finite")
    x = x / scale
    if not np.iscomplexobj(frames):
        ny, nx = x.shape[-2:]
        g = torch.Generator().manual_seed(int(seed))
        ph = smooth_phase(1, max(ny, nx), g, "cpu")[0, :ny, :nx].numpy()
        x = np.abs(x) * np.exp(1j * ph)
    return x.astype(np.complex64)


def simulate_case(name: str, truth: np.ndarray, accel: float, coils: int, noise: float, seed: int) -> Case:
    from .masks import variable_density_mask
    from .phantom import coil_maps, simulate_kspace

    t, ny, nx = truth.shape
    maps = coil_maps(coils, (ny, nx), seed=seed) if coils > 1 else None
    mask = variable_density_mask(t, ny, accel, seed=seed + int(round(accel * 100)))
    k = simulate_kspace(truth, maps, mask, noise=noise, seed=seed + int(round(accel * 100)))
    return Case(name, truth, k, mask, maps, accel)


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
                                        "multi-coil cine "
                                        "from real images; writes a Markdown report")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="folder (or file) of ACDC .npz or complex/magnitude .npy/.npz cine stacks (default: %(default)s)")
    p.add_argument("--split", default="validation", choices=["validation", "val", "test", "train", "all"],
                   help="which files: validation (default; where settings are chosen), test (ACDC's fixed test "
                        "patients: report only), train, or all")
    p.add_argument("--slices", default="mid", choices=["mid", "all"], help="slices per multi-slice file (default: mid)")
    p.add_argument("--max-series", type=int, default=0, help="use at most this many series (0: all)")
    p.add_argument("--max-frames", type=int, default=0, help="use at most this many frames per series (0: all)")
    p.add_argument("--accels", default="4,8,12", help="accelerations R, comma separated (default: %(default)s)")
    p.add_argument("--coils", type=int, default=8, help="simulated receive coils (default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.005,
                   help="complex k-space noise std per real component, in units of the normalised image "
                        "(99th percentile of the time average = 1) (default: %(default)s)")
    p.add_argument("--maps", default="estimated", choices=["estimated", "true"],
                   help="coil maps given to every method: estimated from the data (default) or the simulated ones")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parse_list(text: str, conv, name: str) -> list:
    try:
        vals = [conv(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name}: expected a comma-separated list, got {text!r}") from None
    if not vals:
        raise ValueError(f"--{name} is empty")
    return vals


def run(a) -> int:
    import torch

    from .reconstruction import PRESETS, ReconConfig, Reconstructor

    accels = _parse_list(a.accels, float, "accels")
    methods = _parse_list(a.methods, str, "methods")
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}")
    if any(r < 1 for r in accels) or a.coils < 1 or a.noise < 0:
        raise ValueError("need accelerations >= 1, --coils >= 1 and --noise >= 0")
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

    series = select_series(a.data, a.split, a.slices, a.max_series, a.max_frames)
    if a.tune_l_plus_s:
        return tune_l_plus_s(series, base, rec.device, accels[0], a)
    if a.trace:
        return trace_noise(series, rec, accels, a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    def runs(i: int, m: str) -> bool:  # the paper preset only on the first --paper-series series
        return not (m == "ddugm_paper" and a.paper_series and i >= a.paper_series)

    jobs = [(i, r, m) for i in range(len(series)) for r in accels for m in methods if runs(i, m)]
    print(f"{len(series)} series, R = {', '.join(f'{r:g}' for r in accels)}, {a.coils} coil(s), noise {a.noise}, "
          f"maps {a.maps}, device {rec.device}; {len(jobs)} reconstructions")
    bar = None
    if not a.quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="evaluate", dynamic_ncols=True)

    settings = {"evaluate": {k: v for k, v in vars(a).items() if k != "func"}, "series": [n for n, _ in series],
                "recon_default": cfg_default.to_dict(), "recon_paper": cfg_paper.to_dict(), "device": str(rec.device),
                "torch": torch.__version__, "threads": torch.get_num_threads()}
    results: list[dict] = []
    failures: list[dict] = []
    figure_case = None

    def save(complete: bool):  # after every series, so a long run that stops keeps what it has
        (out / "results.json").write_text(json.dumps({"settings": settings, "complete": complete, "results": results,
                                                      "failures": failures}, indent=2, default=str))

    for i, (name, frames) in enumerate(series):
        try:
            truth = make_truth(frames, a.seed * 1000 + i)
        except ValueError as e:
            failures.append({"series": name, "accel": None, "method": None, "error": str(e)})
            if bar is not None:
                bar.update(sum(1 for j in jobs if j[0] == i))
            continue
        for r in accels:
            case = simulate_case(name, truth, r, a.coils, a.noise, a.seed * 1000 + i)
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
                    x = engine.recon(case.kspace, case.mask, maps, seed=a.seed, method=method)
                    if rec.device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                except (ValueError, RuntimeError) as e:  # one bad case must not lose the others
                    failures.append({"series": name, "accel": r, "method": m, "error": f"{type(e).__name__}: {e}"})
                    print(f"evaluate: {name} R={r:g} {m} failed: {e}", file=sys.stderr)
                else:
                    fm = frame_metrics(case.truth, x)
                    results.append({"series": name, "frames": int(case.truth.shape[0]), "accel": r,
                                    "measured_accel": float(case.mask.size / case.mask.sum()), "method": m,
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


def tune_l_plus_s(series, base, device, accel: float, a) -> int:
    """Mean PSNR of L+S for every threshold pair of :data:`LS_GRID`; prints the best pair."""
    from .reconstruction import ReconConfig, Reconstructor

    cases = [simulate_case(name, make_truth(frames, a.seed * 1000 + i), accel, a.coils, a.noise, a.seed * 1000 + i)
             for i, (name, frames) in enumerate(series)]
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
        truth = make_truth(frames, a.seed * 1000 + i)
        for r in accels:
            case = simulate_case(name, truth, r, a.coils, a.noise, a.seed * 1000 + i)
            ref = torch.from_numpy(case.truth).to(rec.device)

            def record(rec_, r=r, ref=ref):
                from .operators import fft2c

                t = ref / rec_["scale"]
                rms = lambda d: float(torch.sqrt(torch.mean(d.real ** 2 + d.imag ** 2) / 2))  # noqa: E731
                row = table.setdefault((r, rec_["step"]), {"sigma": rec_["sigma"], "kspace_sigma": rec_.get("kspace_sigma"),
                                                           "image": [], "kspace": []})
                row["image"].append(rms(rec_["image_input"] - t))
                if "kspace_input" in rec_:  # the pnp sampler has no k-space network
                    w = rec_["weight"].weight
                    row["kspace"].append(rms((rec_["kspace_input"] - rec_["weight"](fft2c(t)))[..., w > 0]))

            rec.recon(case.kspace, case.mask, case.maps, seed=a.seed, method="ddugm", trace=record)
    rows = [{"accel": r, "step": st, "sigma": v["sigma"], "image_rms": float(np.mean(v["image"])),
             "kspace_sigma": v["kspace_sigma"], "kspace_rms": float(np.mean(v["kspace"])) if v["kspace"] else None}
            for (r, st), v in sorted(table.items())]
    (out / "trace.json").write_text(json.dumps({"settings": {k: v for k, v in vars(a).items() if k != "func"},
                                                "series": [n for n, _ in series], "rows": rows}, indent=2))
    print(f"noise model of the sampler on {len(series)} series (RMS per real component, normalised units)")
    print("| R | step | sigma (image) | image input error | sigma (k-space) | weighted k-space input error |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ks = "– | –" if row["kspace_rms"] is None else f"{row['kspace_sigma']:.4f} | {row['kspace_rms']:.4f}"
        print(f"| {row['accel']:g} | {row['step']} | {row['sigma']:.4f} | {row['image_rms']:.4f} | {ks} |")
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
                   "seconds": summarise([e["seconds"] for e in sel])}
            for key in ("psnr", "ssim", "hfen"):
                row[key] = summarise([v for e in sel for v in e[key]])
            rows.append(row)
    return rows


def render_table(rows: list[dict]) -> str:
    lines = ["| R | method | series | PSNR (dB) | SSIM | HFEN | s / slice |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['accel']:g} | {METHOD_NAMES[row['method']]} | {row['series']} | "
                     f"{row['psnr'][0]:.2f} ± {row['psnr'][1]:.2f} | {row['ssim'][0]:.4f} ± {row['ssim'][1]:.4f} | "
                     f"{row['hfen'][0]:.3f} ± {row['hfen'][1]:.3f} | {row['seconds'][0]:.1f} |")
    return "\n".join(lines)


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
        "- Truth: each series divided by the 99th percentile of its time-averaged magnitude; magnitude-only data "
        "(such as ACDC's clinical reconstructions) get a smooth random phase, the same for all frames. The coil "
        "sensitivities and the noise are always simulated, so these numbers are not those of a real raw acquisition.",
        f"- Acquisition: {e['coils']} simulated coil(s) (smooth ring sensitivities, normalised), complex Gaussian "
        f"k-space noise std {e['noise']} per real component (normalised image units, orthonormal FFT), one "
        "variable-density random Cartesian mask per frame with the centre lines always sampled.",
        f"- Coil maps given to the methods: {e['maps']}"
        + (" from the time-averaged data of all frames (Walsh)." if e["maps"] == "estimated" else " (the simulated ones)."),
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
