"""Weights and training state as safetensors (loading never executes code).

A model file holds the network tensors and, in its metadata, the network settings
(``net_config``), the domain (``image``, ``kspace`` or ``xt``) and the training settings, so a
file alone is enough to rebuild the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .networks import NCSNpp, NetConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = {"image": WEIGHTS_DIR / "image.safetensors", "kspace": WEIGHTS_DIR / "kspace.safetensors",
                   "xt": WEIGHTS_DIR / "xt.safetensors"}


def save_model(path, net: NCSNpp, domain: str, settings: dict | None = None, dtype=torch.float32) -> None:
    """Save network weights (cast to ``dtype``) with the settings needed to rebuild it."""
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in net.state_dict().items()}
    meta = {"format": "ddugm-score-model/1", "domain": domain,
            "net_config": json.dumps(net.config.to_dict()), "settings": json.dumps(settings or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # safetensors creates 0600 files; weights are meant to be read by a server's user
    tmp.replace(path)  # atomic: a run killed while saving leaves the previous file whole


def read_metadata(path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a file of another kind
        raise ValueError(f"{path} is not a safetensors file ({str(e).splitlines()[0][:100]})") from None
    if meta.get("format") != "ddugm-score-model/1":
        raise ValueError(f"{path} is not a DD-UGM score model file (metadata format={meta.get('format')!r})")
    return meta


#: a model file larger than this, or a network with more parameters, is refused before loading
MAX_MODEL_BYTES = 2 << 30
MAX_PARAMETERS = 300_000_000


def load_model(path, device="cpu", expect_domain: str | None = None) -> NCSNpp:
    """Rebuild a network from a model file; checks its domain when ``expect_domain`` is given.

    Nothing is allocated before the file is checked: its size, the network its metadata
    describes (built on the ``meta`` device: no memory) and that every tensor in the file has
    the shape that network expects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"score model weights not found: {path}")
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is larger than a score model file may be ({MAX_MODEL_BYTES})")
    meta = read_metadata(path)
    if expect_domain is not None and meta.get("domain") != expect_domain:
        raise ValueError(f"{path} holds a {meta.get('domain')!r} model, expected {expect_domain!r}")
    try:
        config = NetConfig.from_dict(json.loads(meta["net_config"]))
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in NCSNpp(config).state_dict().items()}
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the network settings in the file are not valid ({type(e).__name__})") from None
    count = sum(int(torch.Size(s).numel()) for s in shapes.values())
    if count > MAX_PARAMETERS:
        raise ValueError(f"{path}: the network has {count} parameters, more than {MAX_PARAMETERS}")
    with safe_open(str(path), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if stored != shapes:
        bad = sorted(set(stored) ^ set(shapes)) or sorted(k for k in shapes if stored[k] != shapes[k])
        raise ValueError(f"{path}: the tensors do not match the network its settings describe (first: {bad[0]!r})")
    net = NCSNpp(config)
    state = load_file(str(path), device="cpu")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state)
    return net.to(device).eval()


# --------------------------------------------------------------------------- training state
def save_training_state(directory, net, ema, optimizer, step: int, settings: dict) -> None:
    """Resumable state: weights, EMA weights and Adam moments in one safetensors file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                val = val.detach().cpu()
                tensors[f"opt.{pid}.{name}"] = val.reshape(-1) if val.dim() == 0 else val.contiguous()
    info = {"step": step, "settings": settings, "param_groups": opt["param_groups"]}
    tmp = directory / "state.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"info": json.dumps(info)})
    tmp.replace(directory / "state.safetensors")


def load_training_state(directory, net, ema, optimizer) -> int:
    """Restore what :func:`save_training_state` wrote; returns the step to continue from."""
    path = Path(directory) / "state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["info"])
    tensors = load_file(str(path))
    try:
        net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    except RuntimeError:  # missing / unexpected keys or shapes: another network's state
        raise ValueError(f"{path} holds the state of a network with other settings than this run's (width, "
                         "levels, attention, domain): pass --no-resume to start afresh there, or another --out") from None
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v.reshape(()) if name == "step" else v
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return int(info["step"])
