"""Benchmarks: one script per question, each printing a markdown section (a `## title` line and a table).

`python -m benchmarks` runs every `benchmarks/bench_*.py` as its own process and gathers their sections into
`benchmarks/RESULTS.md`. This module holds only standard-library helpers, because it is also imported by the
retro-pytorch half of `bench_retro_pytorch`, which runs in a separate environment without the project installed.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; `|` inside a cell is escaped so a message cannot break the row."""
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 3) -> str:
    """`x` with `digits` significant figures and never in scientific notation (0.000123, 12.3, 12346)."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    exponent = math.floor(math.log10(abs(x)))
    return f"{x:.{max(0, digits - 1 - exponent)}f}"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f}"


class PeakSampler:
    """This process's RSS sampled every few ms while the `with` block runs: the peak of the timed work alone.
    (psutil is imported on entry, so the retro-pytorch environment, which does not use this, need not have it.)"""

    def __init__(self, every_s: float = 0.005):
        self._every, self.peak = every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._every)

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
