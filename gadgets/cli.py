"""The ``ddugm`` command: ``train``, ``demo``, ``evaluate`` and ``bench`` (from ddugm_core) plus the Gadgetron side,
``serve``, ``recon`` and ``simulate``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ddugm_core import bench as core_bench
from ddugm_core import cli as core_cli
from ddugm_core import demo as core_demo
from ddugm_core import evaluate as core_evaluate

from . import mrd2, replay, server, simulate

COMMANDS = {"demo": core_demo, "evaluate": core_evaluate, "bench": core_bench,
            "serve": server, "recon": replay, "simulate": simulate, "stream": mrd2}


def _raw_training_data(a) -> None:
    """``train --data RAW`` (and ``--val-data RAW``): fully sampled ISMRMRD raw files, a file or a
    folder of them, become complex image stacks in ``OUT/raw_images/data`` (``val_data``), which the
    training then reads. They are kept: the record of what the weights saw, and data that ``ddugm
    pack`` or ``python -m ddugm_core.cli train`` can read on a machine without ismrmrd."""
    from ddugm_core.evaluate import is_raw_source

    from .rawcine import raw_training_stacks

    for name in ("data", "val_data"):
        source = getattr(a, name)
        if source and is_raw_source(source):
            info = raw_training_stacks(source, Path(core_cli.train_out(a)) / "raw_images" / name)
            print(json.dumps({f"raw_{name}": str(source), **info}))
            setattr(a, name, info["folder"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ddugm", description="DD-UGM score-based cine MRI reconstruction for Gadgetron")
    sub = parser.add_subparsers(dest="cmd", required=True)
    core_cli._train_parser(sub)
    core_cli._pack_parser(sub)
    for mod in COMMANDS.values():
        mod.add_parser(sub)
    a = parser.parse_args(argv)
    try:
        if a.cmd == "train":
            _raw_training_data(a)
            return core_cli._run_train(a)
        if a.cmd == "pack":
            return core_cli._run_pack(a)
        if a.cmd == "evaluate" and a.free_running:  # simulated raw acquisitions through the gadgets
            from .freerun import run as run_free_running

            return run_free_running(a)
        if a.cmd == "evaluate":  # the library alone reads no ISMRMRD: raw data come through the gadgets' reader
            from .rawcine import read_raw_cines

            return core_evaluate.run(a, raw_reader=read_raw_cines)
        return COMMANDS[a.cmd].run(a)
    except (ValueError, OSError) as e:  # bad input, and paths that cannot be used (a folder named as a file, ...)
        print(f"ddugm {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
