"""Gadget settings: the chain's ``<configuration>`` properties over ``config/recon.yaml``.

Precedence (later wins): built-in defaults < the YAML file (``recon:`` and ``gadget:``
sections; the file is the ``config`` property, else ``$DDUGM_CONFIG``, else the
``config/recon.yaml`` shipped with the package) < the chain's properties. A property may
name any reconstruction setting (``preset``, ``steps``, ``device``, ...) or a gadget
setting below. Unknown names and invalid values raise ValueError naming them.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from ddugm_core.reconstruction import ReconConfig

OUTPUTS = ("magnitude", "complex")
SENDS = ("auto", "images", "image_array")


@dataclass
class GadgetSettings:
    output: str = "magnitude"  # magnitude | complex
    send: str = "auto"  # auto (ImageArray for ReconData input, images for acquisitions) | images | image_array
    fallback: bool = True  # a failed score-based reconstruction falls back to low-rank (warning in meta)
    seed: int = 0  # sampler seed (reconstructions are deterministic for a seed)
    series_index: int = 1  # image_series_index of the images sent
    debug_dir: str = ""  # if set: save each slice's k-space, mask and images there (.npz)
    log_level: str = "INFO"  # DEBUG | INFO | WARNING | ERROR

    def validate(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.send not in SENDS:
            raise ValueError(f"send must be one of {SENDS}, got {self.send!r}")
        if not 0 <= self.series_index < 65536:
            raise ValueError(f"series_index must be in [0, 65535], got {self.series_index}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")


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


def load_settings(properties: dict | None = None, yaml_path=None) -> tuple[ReconConfig, GadgetSettings]:
    """Merge defaults, YAML and properties; validate both objects."""
    props = dict(properties or {})
    path = props.pop("config", None) or yaml_path or default_yaml()
    recon, gadget = {}, {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping with 'recon:' and 'gadget:' sections")
        if "recon" in data or "gadget" in data:
            extra = sorted(set(data) - {"recon", "gadget"})
            if extra:
                raise ValueError(f"{p}: unknown section(s) {extra}; expected 'recon' and 'gadget'")
            recon, gadget = dict(data.get("recon") or {}), dict(data.get("gadget") or {})
        else:
            recon = data
        unknown = sorted(set(gadget) - set(GADGET_KEYS))
        if unknown:
            raise ValueError(f"{p}: unknown gadget setting(s) {unknown}; known: {', '.join(GADGET_KEYS)}")
    for name, value in props.items():
        if name in GADGET_KEYS:
            gadget[name] = parse_scalar(name, value, GADGET_KEYS[name].type)
        elif name in RECON_KEYS:
            recon[name] = parse_scalar(name, value, RECON_KEYS[name].type)
        else:
            raise ValueError(f"unknown setting {name!r}; known: config, {', '.join(GADGET_KEYS)}, {', '.join(RECON_KEYS)}")
    cfg = ReconConfig.from_dict({k: v for k, v in recon.items()})
    try:
        gs = GadgetSettings(**{k: _check_type(k, v) for k, v in gadget.items()})
    except TypeError as e:
        raise ValueError(str(e)) from None
    gs.validate()
    return cfg, gs


def _check_type(key, value):
    typ = str(GADGET_KEYS[key].type)
    want = bool if "bool" in typ else int if "int" in typ else str
    if want is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if not isinstance(value, want):
        raise ValueError(f"{key} must be {want.__name__}, got {value!r}")
    return value


def describe(cfg: ReconConfig, gs: GadgetSettings) -> dict:
    return {"recon": cfg.to_dict(), "gadget": dataclasses.asdict(gs)}
