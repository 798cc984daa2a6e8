"""Optional per-stage timing of a reconstruction (used by ``ddugm bench``).

The sampler and the baselines mark their stages with ``with stage("network"):`` etc.
Nothing is measured, and nothing synchronises the device, unless a :class:`StageTimer`
is active (``with StageTimer(sync) as timer:``). Time is charged to the innermost open
stage only, so nested stages are not counted twice; what no stage claims is "other".
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Optional

_active: Optional["StageTimer"] = None


class StageTimer:
    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self.sync = sync or (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.items: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._mark = 0.0
        self._start = 0.0
        self.total = 0.0

    def __enter__(self):
        global _active
        if _active is not None:
            raise RuntimeError("a StageTimer is already active")
        self.sync()
        self._start = self._mark = time.perf_counter()
        _active = self
        return self

    def __exit__(self, *exc):
        global _active
        self.sync()
        self.total = time.perf_counter() - self._start
        _active = None
        return False

    def _charge(self):
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._mark
        self._mark = now

    def enter(self, name: str, items: int):
        self.sync()
        self._charge()
        self._stack.append(name)
        self.calls[name] += 1
        self.items[name] += items

    def exit(self):
        self.sync()
        self._charge()
        self._stack.pop()

    def summary(self) -> dict:
        staged = sum(self.seconds.values())
        return {"total_s": self.total, "stages_s": {**dict(self.seconds), "other": max(0.0, self.total - staged)},
                "calls": dict(self.calls), "items": dict(self.items)}


@contextmanager
def stage(name: str, items: int = 0):
    """Mark a stage; ``items`` counts work units (e.g. frames through a network)."""
    timer = _active
    if timer is None:
        yield
        return
    timer.enter(name, items)
    try:
        yield
    finally:
        timer.exit()
