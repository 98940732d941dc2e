"""A dependency-free progress bar (uses ``tqdm`` when it is installed).

``enable=None`` shows the bar only when standard error is a terminal, so logs and tests stay clean.
"""

from __future__ import annotations

import sys
import time

__all__ = ["progress"]


class _Bar:
    def __init__(self, total, desc, stream):
        self.total, self.desc, self.stream = total, desc, stream
        self.n = 0
        self._last = 0.0
        self._start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= 0.1 or (self.total is not None and self.n >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now):
        elapsed = now - self._start
        if self.total:
            frac = min(self.n / self.total, 1.0)
            filled = int(24 * frac)
            bar = "#" * filled + "-" * (24 - filled)
            text = f"\r{self.desc}: [{bar}] {self.n}/{self.total} {elapsed:5.1f}s"
        else:
            text = f"\r{self.desc}: {self.n} {elapsed:5.1f}s"
        self.stream.write(text)
        self.stream.flush()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.n:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


class _Null:
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int | None = None, desc: str = "", enable: bool | None = None):
    """Return a bar with ``update(n)``, ``set_description(s)`` and ``close()``."""
    stream = sys.stderr
    if enable is None:
        enable = hasattr(stream, "isatty") and stream.isatty()
    if not enable:
        return _Null()
    try:
        from tqdm.auto import tqdm  # optional
        return tqdm(total=total, desc=desc, leave=False, file=stream)
    except ImportError:
        return _Bar(total, desc, stream)
