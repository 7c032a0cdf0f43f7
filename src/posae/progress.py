"""Progress of long loops: a live bar where someone watches, one summary line where nobody can.

In a terminal or an interactive notebook a tqdm bar refreshes in place. A notebook executed by
papermill saves every refresh as output, so there each loop prints one line when it ends (what it
counted, how long, the rate, the last postfix). `POSAE_PROGRESS` chooses: ``bar``, ``summary`` or
``off``; unset, a kernel started by papermill gets ``summary`` (the driver sets it for its kernels).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

MODES = ("bar", "summary", "off")


def mode() -> str:
    chosen = os.environ.get("POSAE_PROGRESS", "").strip().lower()
    if chosen in MODES:
        return chosen
    return "summary" if _under_papermill() else "bar"


def _under_papermill() -> bool:
    """A kernel whose parent process is the papermill command (the kernel cannot see papermill otherwise)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        cmdline = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name == "papermill" for arg in cmdline[:3])


def bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
        initial: float = 0, unit_scale: bool = False, enabled: bool = True) -> Any:
    """A tqdm-like bar (`update`, `set_postfix`, `close`, iteration, context manager) for the current mode."""
    how = mode() if enabled else "off"
    if how == "bar":
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale,
                    mininterval=1.0, file=sys.stderr, dynamic_ncols=True)
    return Summary(iterable, total=total, desc=desc, unit=unit, initial=initial, quiet=how == "off")


class Summary:
    """Counts like tqdm and prints one line on close: ``desc: 1,024 tok in 3.2 s (320 tok/s), loss=5.7``."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", initial: float = 0, quiet: bool = False):
        self.iterable, self.total, self.desc, self.unit, self.quiet = iterable, total, desc, unit, quiet
        self.n = self._start = initial
        self.postfix = ""
        self._t0 = time.perf_counter()
        self._closed = False

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def __iter__(self):
        try:
            for item in self.iterable or ():
                yield item
                self.n += 1
        finally:
            self.close()

    def line(self) -> str:
        seconds = time.perf_counter() - self._t0
        done = self.n - self._start
        rate = f", {_si(done / seconds)} {self.unit}/s" if seconds > 0 and done else ""
        of = "" if self.total is None or self.n == self.total else f" of {_si(self.total)}"
        tail = f"; {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {_si(self.n)}{of} {self.unit} in {seconds:.1f} s{rate}{tail}"

    def close(self) -> None:
        if not self._closed and not self.quiet:
            print(self.line(), file=sys.stderr, flush=True)
        self._closed = True

    def __enter__(self) -> "Summary":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _si(x: float) -> str:
    """1234 -> '1,234', 1_540_000 -> '1.54M': counts readable at a glance."""
    for div, suffix in ((1e9, "G"), (1e6, "M")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:,.0f}" if abs(x) >= 10 or float(x).is_integer() else f"{x:.2g}"


def progress_iter(items, enabled: bool, desc: str, total: int | None = None):
    """`items` (a list, or an iterator of `total` items), with one progress line over the runs when `enabled`."""
    if not enabled:
        return items
    return bar(items, total=len(items) if total is None else total, desc=desc, unit="runs")
