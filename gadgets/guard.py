"""Our reads from the first byte when Gadgetron starts ``python -m gadgetron PORT gadgets.external ...``.

Gadgetron 4.7 starts an external Python gadget as ``python -m gadgetron PORT MODULE TARGET``.
The gadgetron package's ``__main__`` connects and reads the configuration and the header in
``Connection.__init__`` *before* it imports MODULE, with a reader that spins at full CPU
forever when Gadgetron vanishes (``recv`` returning no bytes in a loop), that allocates
whatever length a message claims, and that ends with a bare ``AssertionError`` (no error
message to Gadgetron) on a wrong first message or a header that is not XML.

The package installs ``ddugm_gadgetron_guard.pth`` into site-packages (``setup.py``). At
interpreter start it calls :func:`install`, which only registers an import hook: nothing
else is imported. When ``gadgetron.external.connection`` is imported, the hook wraps
``Connection.__init__``; when the process is ``python -m gadgetron`` for one of *our* modules
(``sys.argv[2]`` starts with ``gadgets.``), the wrapper calls :func:`gadgets.external.startup`, which reads
the start of the stream with the checked readers of :mod:`gadgets.protocol` and answers any
failure with an error message (id 8) and a close. Other modules, and every other Python
program, are left alone. ``DDUGM_GADGETRON_GUARD=0`` turns the hook off.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

TARGET = "gadgetron.external.connection"
PTH_NAME = "ddugm_gadgetron_guard.pth"
#: the .pth line: an import line, failing silently if the package was removed
PTH_LINE = "import sys; exec('try:\\n import gadgets.guard as g\\n g.install()\\nexcept Exception:\\n pass')\n"


def started_for_us(argv=None) -> bool:
    """Is this process ``python -m gadgetron PORT gadgets.<module> ...``?"""
    argv = sys.argv if argv is None else argv
    if len(argv) < 3:
        return False
    main = str(argv[0]).replace("\\", "/")
    return main.endswith("gadgetron/__main__.py") and str(argv[2]).split(".")[0] == "gadgets"


def patch(module) -> None:
    """Wrap ``Connection.__init__`` of the gadgetron package: our start-up reader when the
    process was started for one of our modules (decided at the call: ``import gadgetron``
    already imports the connection module before ``runpy`` sets ``sys.argv[0]``), the
    package's own otherwise."""
    conn_cls = getattr(module, "Connection", None)
    if conn_cls is None or getattr(conn_cls, "_ddugm_guarded", False):
        return
    original = conn_cls.__init__

    def __init__(self, sock):
        if not started_for_us():
            return original(self, sock)
        from gadgets.external import startup

        startup(self, sock)

    conn_cls.__init__ = __init__
    conn_cls._ddugm_guarded = True


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register the import hook (cheap; called for every interpreter by the .pth file)."""
    if os.environ.get("DDUGM_GADGETRON_GUARD", "1") == "0":
        return
    if not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


def active() -> bool:
    return any(isinstance(f, _Hook) for f in sys.meta_path)
