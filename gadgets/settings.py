"""Gadget settings: the chain's ``<configuration>`` properties over ``config/recon.yaml``.

Precedence (later wins): built-in defaults < the operator's YAML file (``recon:`` and
``gadget:`` sections; ``--config``, else ``$DDUGM_CONFIG``, else the ``config/recon.yaml``
shipped with the package) < a client-named YAML (the ``config`` property) < the operator's
command-line overrides < the client's properties. A property may name any reconstruction
setting (``preset``, ``steps``, ``device``, ...) or a gadget setting below. Unknown names
and invalid values raise ValueError naming them.

Two kinds of source. The *operator* (the YAML files the server or Gadgetron is started with,
the command line) is trusted. A *client* (a chain's properties, an MRD client's config text)
is not: settings that name server files (``config``, ``debug_dir``, ``image_weights``,
``kspace_weights``, ``xt_weights``) are refused unless they lie inside a folder the operator allows
(``server: allowed_dirs``), resolved without following symbolic links; errors about a
client-named file never repeat its content. The YAML's ``server:`` section (:class:`Limits`)
holds the operator's limits, which every stream is checked against before anything is
allocated; a client can never set it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import stat
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ddugm_core.reconstruction import ReconConfig

log = logging.getLogger("ddugm.settings")

OUTPUTS = ("magnitude", "complex", "int16")
#: settings that name files or folders on the server: operator-only unless inside allowed_dirs
#: (every ``*_weights`` key of ReconConfig, so that a new prior's weights file can never slip past)
PATH_KEYS = ("config", "debug_dir") + tuple(f.name for f in fields(ReconConfig) if f.name.endswith("_weights"))
MAX_YAML_BYTES = 1 << 20
MAX_TIMEOUT_S = 1e6  # server timeouts: about 11.6 days at most (an infinite one overflows the socket layer)
SENDS = ("auto", "images", "image_array")
FRAME_AXES = ("auto", "phase", "repetition", "ecg")
CALIBRATION_LINES = ("auto", "data", "reference")


@dataclass
class GadgetSettings:
    output: str = "magnitude"  # magnitude | complex | int16 (12-bit magnitude with window meta, as FIRE sends)
    send: str = "auto"  # auto (ImageArray for ReconData input, images for acquisitions) | images | image_array
    fallback: bool = True  # a failed score-based reconstruction falls back to LLR + temporal TV (warning in meta)
    seed: int = 0  # sampler seed (reconstructions are deterministic for a seed)
    series_index: int = 1  # image_series_index of the images sent
    debug_dir: str = ""  # if set: save each slice's k-space, mask and images there (.npz)
    log_level: str = "INFO"  # DEBUG | INFO | WARNING | ERROR
    frame_axis: str = "auto"  # the acquisitions' counter that numbers the frames: phase (cine) | repetition (real-time) | auto
    # | ecg (retrospective binning: every line of a slice to a cardiac phase by its ECG trigger time)
    cardiac_phases: int = 0  # frame_axis ecg (or auto, binning an unlabelled gated cine): cardiac phases to bin into
    #                          (0: the header's phase count if above 1, else 20)
    arrhythmia_rejection: float = 0.0  # frame_axis ecg: leave out beats whose RR is this fraction off the median (0: none)
    realtime_block: int = 0  # real-time series: repetitions per reconstruction (0: all, or even blocks within the limits)
    # calibration-only lines (ACQ_IS_PARALLEL_CALIBRATION): reference (coil maps only, as Gadgetron's own
    # recons) | data (also measured data of their frame) | auto (data where the header's
    # parallelImaging calibrationMode is embedded: acquired within the frames, else reference)
    calibration_lines: str = "auto"

    def validate(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.send not in SENDS:
            raise ValueError(f"send must be one of {SENDS}, got {self.send!r}")
        if not 0 <= self.series_index < 65536:
            raise ValueError(f"series_index must be in [0, 65535], got {self.series_index}")
        if self.calibration_lines not in CALIBRATION_LINES:
            raise ValueError(f"calibration_lines must be one of {CALIBRATION_LINES}, got {self.calibration_lines!r}")
        if self.frame_axis not in FRAME_AXES:
            raise ValueError(f"frame_axis must be one of {FRAME_AXES}, got {self.frame_axis!r}")
        if not 0 <= self.arrhythmia_rejection < 1:
            raise ValueError(f"arrhythmia_rejection must be 0 (off) or a fraction below 1 of the median RR, got "
                             f"{self.arrhythmia_rejection}")
        if self.cardiac_phases != 0 and not 2 <= self.cardiac_phases <= 1024:
            raise ValueError(f"cardiac_phases must be 0 (the header's, else 20) or 2 to 1024 (frame_axis ecg), got "
                             f"{self.cardiac_phases}")
        if self.realtime_block < 0 or self.realtime_block == 1:
            raise ValueError(f"realtime_block must be 0 (the whole series) or at least 2 repetitions, got "
                             f"{self.realtime_block}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")


@dataclass
class Limits:
    """The operator's limits (``server:`` section of the operator's YAML; ``ddugm serve``
    flags override). Every stream is checked against them before anything is allocated."""

    allowed_dirs: list = field(default_factory=list)  # folders clients may name files in (config, debug_dir, weights)
    max_matrix: int = 1024  # encoded and recon matrix along x and y; a readout may have 4x this many samples
    max_frames: int = 512  # cardiac phases of one slice
    max_coils: int = 128  # receiver channels
    max_slice_elements: int = 1 << 27  # coils x frames x ny x nx of one slice (1 GiB of complex64)
    max_slice_pixels: int = 1 << 23  # frames x ny x nx of one slice: what the reconstruction's memory follows
    max_stream_elements: int = 1 << 28  # k-space samples one stream may buffer (2 GiB of complex64)
    max_message_mb: int = 1024  # one data message (acquisition, image, ReconData, ImageArray, waveform)
    max_text_kb: int = 4096  # configuration, header and text messages
    max_steps: int = 1000  # sampler steps a stream may ask for (the paper preset needs 1000)
    max_iterations: int = 1000  # every *_iters setting and pnp_inner
    max_window: int = 12  # Hankel window (memory grows with its fourth power)
    allow_compile: bool = False  # may a client turn on torch.compile (minutes of compiling, per frame size)
    max_connections: int = 16  # open connections of ddugm serve; more are refused with an error
    max_cached: int = 4  # distinct settings whose reconstructors (and models) stay loaded
    handshake_timeout: float = 30.0  # seconds to send the configuration and header after connecting
    idle_timeout: float = 3600.0  # seconds a client may stay silent mid-stream
    shutdown_grace: float = 30.0  # seconds running reconstructions get to stop on SIGINT / SIGTERM
    max_job_seconds: float = 3600.0  # ddugm serve, FIRE: wall-clock seconds one slice's reconstruction may run (0: no limit)
    gpu_memory_gb: float = 0.0  # GPU memory this process may allocate (torch's cap; 0: the whole card)

    def validate(self):
        if not isinstance(self.allowed_dirs, list) or not all(isinstance(d, str) and d for d in self.allowed_dirs):
            raise ValueError("server setting allowed_dirs must be a list of folder paths")
        for name in ("max_matrix", "max_frames", "max_coils", "max_slice_elements", "max_slice_pixels",
                     "max_stream_elements",
                     "max_message_mb", "max_text_kb", "max_steps", "max_iterations", "max_window",
                     "max_connections", "max_cached"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"server setting {name} must be a positive integer, got {v!r}")
        for name in ("handshake_timeout", "idle_timeout", "shutdown_grace"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= MAX_TIMEOUT_S:
                raise ValueError(f"server setting {name} must be a positive number of seconds, at most "
                                 f"{MAX_TIMEOUT_S:g} (socket timeouts are finite), got {v!r}")
        v = self.max_job_seconds
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_TIMEOUT_S:
            raise ValueError(f"server setting max_job_seconds must be 0 (no limit) or a positive number of seconds, "
                             f"at most {MAX_TIMEOUT_S:g}, got {v!r}")
        v = self.gpu_memory_gb
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e6:
            raise ValueError(f"server setting gpu_memory_gb must be 0 (the whole card) or a positive number of GiB, "
                             f"got {v!r}")
        if not isinstance(self.allow_compile, bool):
            raise ValueError(f"server setting allow_compile must be true or false, got {self.allow_compile!r}")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb << 20

    @property
    def max_text_bytes(self) -> int:
        return self.max_text_kb << 10

    def check_recon(self, cfg: ReconConfig) -> None:
        """Settings that would let one stream monopolise the device."""
        s = cfg.sampler_settings()
        if s.steps > self.max_steps:
            raise ValueError(f"steps = {s.steps} exceeds the server's limit max_steps = {self.max_steps}")
        for name in ITERATION_KEYS:
            if getattr(cfg, name) > self.max_iterations:
                raise ValueError(f"{name} = {getattr(cfg, name)} exceeds the server's limit "
                                 f"max_iterations = {self.max_iterations}")
        # the coil-map refinement: rounds of ADMM iterations, so its total is what is capped
        # (the round count has no "_iters" name and was not capped: coil_refine 10^9 held the queue)
        # (each round: its ADMM iterations, and with coil_refine_mode fit its conjugate-gradient steps)
        per_round = (cfg.coil_refine_iters or cfg.llr_iters) + (cfg.coil_fit_iters if cfg.coil_refine_mode == "fit" else 0)
        for name in ("coil_refine", "coil_refine_static"):  # (the latter: cines with the same lines in every frame)
            rounds = getattr(cfg, name) * per_round
            if rounds > self.max_iterations:
                raise ValueError(f"{name} = {getattr(cfg, name)} rounds of {per_round} iterations ({rounds} in all) "
                                 f"exceed the server's limit max_iterations = {self.max_iterations}")
        if cfg.window > self.max_window:
            raise ValueError(f"window = {cfg.window} exceeds the server's limit max_window = {self.max_window}")


LIMIT_KEYS = {f.name: f for f in fields(Limits)}
#: the loop counts a stream may set, each capped by max_iterations (every ``*_iters`` setting,
#: so that a new one cannot slip past the limit, the pnp sampler's inner iterations and the
#: LLR + TV iterations that continue the coil-map refinement; its rounds are capped in total)
ITERATION_KEYS = tuple(f.name for f in fields(ReconConfig)
                       if f.name.endswith("_iters") or f.name in ("pnp_inner", "coil_refine_continue"))
GADGET_KEYS = {f.name: f for f in fields(GadgetSettings)}
RECON_KEYS = {f.name: f for f in fields(ReconConfig)}


def default_yaml() -> Path | None:
    """``$DDUGM_CONFIG``, else config/recon.yaml beside the package (source or editable
    install), else ``<prefix>/share/ddugm/config/recon.yaml`` (wheel install)."""
    env = os.environ.get("DDUGM_CONFIG")
    if env:
        return Path(env)
    for p in (Path(__file__).resolve().parent.parent / "config" / "recon.yaml",
              Path(sys.prefix) / "share" / "ddugm" / "config" / "recon.yaml"):
        if p.is_file():
            return p
    return None


def parse_scalar(key: str, text, typ) -> object:
    """A property's string as the setting's type; ValueError naming the key."""
    if not isinstance(text, str):
        return text
    s = text.strip()
    t = str(typ)
    if s.lower() in ("", "null", "none") and "Optional" in t:
        return None
    if "bool" in t:
        low = s.lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{key} must be true or false, got {text!r}")
    if "int" in t:
        try:
            return int(s)
        except ValueError:
            raise ValueError(f"{key} must be an integer, got {text!r}") from None
    if "float" in t:
        try:
            return float(s)
        except ValueError:
            raise ValueError(f"{key} must be a number, got {text!r}") from None
    return s


def properties_from_xml(config) -> dict:
    """``<property name=.. value=..>`` (or legacy ``<name>/<value>`` children) anywhere in a
    ``<configuration>`` document; bytes, str, an Element or None."""
    if config is None:
        return {}
    if isinstance(config, (bytes, str)):
        text = config.decode("utf-8", "replace") if isinstance(config, bytes) else config
        text = text.strip().rstrip("\x00")
        if not text:
            return {}
        try:
            root = ET.fromstring(text)
        except ET.ParseError as e:
            if "<" not in text.replace("<?xml", "", 1):
                return {}  # an empty document (Gadgetron sends only the declaration)
            raise ValueError(f"configuration is not valid XML: {e}") from None
    else:
        root = config
    props = {}
    for p in root.iter():
        if p.tag.split("}")[-1] != "property":
            continue
        name = p.get("name")
        value = p.get("value")
        if name is None:
            name = (p.findtext("name") or "").strip()
            value = p.findtext("value")
        if not name:
            raise ValueError("configuration: a <property> without a name")
        props[name] = "" if value is None else value
    return props


def _yaml_error(e: yaml.YAMLError) -> str:
    """Where a YAML file is broken, without quoting its content."""
    mark = getattr(e, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unreadable"


def read_yaml(path, client: bool = False) -> dict:
    """The sections of a settings file: ``{"recon": {...}, "gadget": {...}, "server": {...}}``.
    A client-named file may not hold a ``server:`` section, and no error about it quotes it."""
    p = Path(path)
    who = "client-named settings file" if client else "config file"
    if not p.is_file():
        raise ValueError(f"{who} {str(p)!r} not found")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"{who} {str(p)!r} is larger than {MAX_YAML_BYTES} bytes: not a settings file")
    try:
        data = yaml.safe_load(_read_text(p, nofollow=client)) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        detail = _yaml_error(e) if isinstance(e, yaml.YAMLError) else "not UTF-8 text"
        raise ValueError(f"{who} {str(p)!r} is not valid YAML ({detail})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{who} {str(p)!r}: expected a mapping with 'recon:' and 'gadget:' sections")
    sections = ("recon", "gadget") if client else ("recon", "gadget", "server")
    if any(k in data for k in ("recon", "gadget", "server")):
        extra = sorted(str(k) for k in set(data) - set(sections))
        if extra:
            if client:
                raise ValueError(f"{who} {str(p)!r}: only 'recon:' and 'gadget:' sections are allowed "
                                 f"(the server's limits are the operator's)")
            raise ValueError(f"{p}: unknown section(s) {extra}; expected {', '.join(sections)}")
        out = {k: data.get(k) or {} for k in sections}
    else:
        out = {"recon": data, "gadget": {}, "server": {}}
    for k, v in out.items():
        if not isinstance(v, dict):
            raise ValueError(f"{who} {str(p)!r}: section '{k}' must be a mapping")
    unknown = sorted(str(k) for k in set(out["gadget"]) - set(GADGET_KEYS))
    if unknown:
        if client:
            raise ValueError(f"{who} {str(p)!r}: unknown gadget setting(s)")
        raise ValueError(f"{p}: unknown gadget setting(s) {unknown}; known: {', '.join(GADGET_KEYS)}")
    unknown = sorted(str(k) for k in set(out.get("server", {})) - set(LIMIT_KEYS))
    if unknown:
        raise ValueError(f"{p}: unknown server setting(s) {unknown}; known: {', '.join(LIMIT_KEYS)}")
    return out


def _read_text(p: Path, nofollow: bool) -> str:
    flags = os.O_RDONLY | (getattr(os, "O_NOFOLLOW", 0) if nofollow else 0)
    fd = os.open(p, flags)
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_YAML_BYTES + 1).decode("utf-8")


def load_limits(yaml_path=None, overrides: dict | None = None) -> Limits:
    """The operator's limits: defaults < the operator YAML's ``server:`` section < ``overrides``."""
    path = yaml_path or default_yaml()
    values = dict(read_yaml(path)["server"]) if path else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(LIMIT_KEYS))
    if unknown:
        raise ValueError(f"unknown server setting(s) {unknown}; known: {', '.join(LIMIT_KEYS)}")
    limits = Limits(**values)
    limits.validate()
    return limits


def confined_path(key: str, value: str, allowed_dirs, kind: str = "file", create: bool = False) -> str:
    """A client-named path, accepted only inside one of the operator's ``allowed_dirs``.

    Decided on the name alone first (absolute or relative to the first allowed folder, no
    ``..``), then walked component by component from the allowed folder with ``lstat``: a
    symbolic link anywhere below it is refused. ``kind`` is ``file`` (must exist) or ``dir``
    (created when ``create``). Returns the absolute path. The errors never depend on files
    outside the allowed folders."""
    if not allowed_dirs:
        raise ValueError(f"setting {key!r} names a file on the server, which a client may not set; the operator "
                         f"sets it in the server's YAML or on its command line, or allows folders for it "
                         f"(server setting allowed_dirs)")
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ValueError(f"setting {key!r}: not a path")
    parts = value.replace("\\", "/").split("/")
    if ".." in parts:
        raise ValueError(f"setting {key!r}: '..' is not allowed in a client-named path")
    roots = [os.path.realpath(d) for d in allowed_dirs]
    if os.path.isabs(value):
        norm = os.path.normpath(value)
        base = next((r for r in roots if norm == r or norm.startswith(r.rstrip(os.sep) + os.sep)), None)
        if base is None:
            raise ValueError(f"setting {key!r}: {value!r} is not inside a folder the operator allows "
                             f"for client paths (server setting allowed_dirs)")
        rel = os.path.relpath(norm, base)
    else:
        base, rel = roots[0], os.path.normpath(value)
    comps = [c for c in rel.split(os.sep) if c not in ("", ".")]
    cur = base
    for i, comp in enumerate(comps):
        cur = os.path.join(cur, comp)
        last = i == len(comps) - 1
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            if kind == "dir" and create:
                os.mkdir(cur, 0o750)
                st = os.lstat(cur)
            else:
                raise ValueError(f"setting {key!r}: {value!r} not found in the allowed folder") from None
        if stat.S_ISLNK(st.st_mode):
            raise ValueError(f"setting {key!r}: {value!r} passes through a symbolic link, which client paths may not")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"setting {key!r}: {value!r} is not a path below the allowed folder")
    st = os.lstat(cur)
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        raise ValueError(f"setting {key!r}: {value!r} is not a regular file")
    if kind == "dir" and not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"setting {key!r}: {value!r} is not a folder")
    return cur


def json_parameters(params: dict) -> tuple[dict, list]:
    """A FIRE-style client's JSON ``parameters`` (python-ismrmrd-server's ``configAdditional``):
    ``(settings, ignored keys)``. Keys that name one of our settings become client properties
    (strings, checked later like every client setting); FIRE's ``config`` / ``customconfig`` name a
    server-side configuration and, like any other key, are ignored."""
    keys = (set(GADGET_KEYS) | set(RECON_KEYS)) - {"config"}
    out, ignored = {}, []
    for k, v in params.items():
        if k not in keys:
            ignored.append(str(k))
            continue
        if isinstance(v, (dict, list)):
            raise ValueError(f"JSON parameter {k!r} must be a single value")
        out[k] = "" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
    return out, sorted(ignored)


def load_settings(properties: dict | None = None, yaml_path=None, *, operator: dict | None = None,
                  limits: Limits | None = None) -> tuple[ReconConfig, GadgetSettings]:
    """Merge defaults, the operator's YAML, a client-named YAML, the operator's overrides and the
    client's ``properties``; check paths and limits; validate both objects.

    ``properties`` come from a client (a chain, an MRD client): their path settings must lie in
    ``limits.allowed_dirs``, ``compile`` needs ``limits.allow_compile``. ``operator`` holds
    trusted overrides (a command line). ``limits`` default to the operator YAML's ``server:``."""
    props = {k: v for k, v in (properties or {}).items()}
    op = dict(operator or {})
    op_yaml = op.pop("config", None) or yaml_path or default_yaml()
    if limits is None:
        limits = load_limits(op_yaml)
    recon, gadget = {}, {}
    if op_yaml:
        data = read_yaml(op_yaml)
        recon, gadget = dict(data["recon"]), dict(data["gadget"])
    client_file = str(props.pop("config", "") or "").strip()
    client_recon, client_gadget = {}, {}
    if client_file:
        data = read_yaml(confined_path("config", client_file, limits.allowed_dirs), client=True)
        client_recon, client_gadget = data["recon"], data["gadget"]
    for source in (client_recon, client_gadget, props):  # everything a client said
        for key in PATH_KEYS[1:]:
            value = source.get(key)
            if isinstance(value, str) and value.strip():
                kind = "dir" if key == "debug_dir" else "file"
                source[key] = confined_path(key, value.strip(), limits.allowed_dirs, kind, create=kind == "dir")
        if "compile" in source and parse_scalar("compile", source["compile"], RECON_KEYS["compile"].type) is True \
                and not limits.allow_compile:
            raise ValueError("compile: a client may not turn on torch.compile on this server "
                             "(server setting allow_compile)")
    recon.update(client_recon)
    gadget.update(client_gadget)
    for source in (op, props):
        for name, value in source.items():
            if name in GADGET_KEYS:
                gadget[name] = parse_scalar(name, value, GADGET_KEYS[name].type)
            elif name in RECON_KEYS:
                recon[name] = parse_scalar(name, value, RECON_KEYS[name].type)
            else:
                raise ValueError(f"unknown setting {name!r}; known: config, {', '.join(GADGET_KEYS)}, "
                                 f"{', '.join(RECON_KEYS)}")
    cfg = ReconConfig.from_dict({k: v for k, v in recon.items()})
    try:
        gs = GadgetSettings(**{k: _check_type(k, v) for k, v in gadget.items()})
    except TypeError as e:
        raise ValueError(str(e)) from None
    gs.validate()
    limits.check_recon(cfg)
    return cfg, gs


def _check_type(key, value):
    typ = str(GADGET_KEYS[key].type)
    want = bool if "bool" in typ else int if "int" in typ else float if "float" in typ else str
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if want is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if not isinstance(value, want):
        raise ValueError(f"{key} must be {want.__name__}, got {value!r}")
    return value


def describe(cfg: ReconConfig, gs: GadgetSettings) -> dict:
    return {"recon": cfg.to_dict(), "gadget": dataclasses.asdict(gs)}
