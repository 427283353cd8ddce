"""Progress of q8convert's long steps on stderr: a bar on a terminal, lines in a log.

Without a terminal (a batch job, `nohup`, a pipe) a redrawn bar is noise, and no output at
all looks like a hang: there a line is printed every 5 seconds, or after 10% more of the
work (at most one a second), and one when the step ends. `-q` silences both.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

__all__ = ["LineProgress", "fmt_bytes", "progress"]


def fmt_bytes(n: float) -> str:
    """1234567 -> "1.2 MB" (decimal units, as q8convert's report)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


class LineProgress:
    """A tqdm-like counter that prints `q8convert: <desc>: 45% (1.2 GB of 2.7 GB), 12 s`
    lines: one `interval` seconds after the last, or once `step` percent more is done and
    `gap` seconds have passed (a fast step prints only its end)."""

    def __init__(
        self, total: int, desc: str, file: TextIO, interval: float = 5.0, step: float = 10.0, gap: float = 1.0
    ) -> None:
        self.total, self.desc, self.file = total, desc, file
        self.interval, self.step, self.gap = interval, step, gap
        self.n, self.start = 0, time.monotonic()
        self._last_time, self._last_percent = self.start, 0.0
        self._item = ""

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        percent = 100 * self.n / self.total if self.total else 100.0
        since = now - self._last_time
        if since >= self.interval or (since >= self.gap and percent - self._last_percent >= self.step):
            self._print(f"{percent:.0f}% ({fmt_bytes(self.n)} of {fmt_bytes(self.total)}){self._item}", now)
            self._last_time, self._last_percent = now, percent

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self._item = f", {text}" if text else ""

    def _print(self, what: str, now: float) -> None:
        print(f"q8convert: {self.desc}: {what}, {now - self.start:.0f} s", file=self.file, flush=True)

    def close(self) -> None:
        self._print(f"done ({fmt_bytes(self.n)})", time.monotonic())

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()


def progress(total: int, desc: str, quiet: bool, file: TextIO | None = None) -> tqdm | LineProgress:
    """A bar (terminal), lines (no terminal) or nothing (`quiet`) for `total` bytes of work."""
    file = file or sys.stderr
    if quiet:
        return tqdm(total=total, disable=True)
    if file.isatty():
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False, file=file)
    return LineProgress(total, desc, file)
