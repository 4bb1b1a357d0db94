"""Progress reporting for long work (embedding a folder, model build, evaluation, bulk import).

On a terminal this is a tqdm bar. Off a terminal (CI logs, ``nohup``, a pipe) a bar is
invisible or garbles the log, so the same call prints a plain line to stderr at most every
``interval_s`` seconds and once at the end: ``veilface: embed 120/500 (24%) 9.8/s``.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Lines:
    """Periodic progress lines for streams that are not terminals."""

    def __init__(self, desc: str, total: int | None, unit: str, interval_s: float, stream: IO[str]) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.interval, self.stream = float(interval_s), stream
        self.n = 0
        self.t0 = self._last = time.monotonic()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(now)

    def close(self) -> None:
        self._emit(time.monotonic(), done=True)

    def _emit(self, now: float, done: bool = False) -> None:
        rate = self.n / max(now - self.t0, 1e-9)
        if self.total:
            where = f"{self.n}/{self.total} ({100.0 * self.n / self.total:.0f}%)"
        else:
            where = str(self.n)
        tail = f" done in {now - self.t0:.1f} s" if done else ""
        print(f"veilface: {self.desc} {where} {rate:.1f} {self.unit}/s{tail}", file=self.stream, flush=True)


class Progress:
    """A progress reporter: ``update(k)`` and ``close()``; also a context manager.

    ``enabled=None`` (default) reports on a terminal as a bar and elsewhere as periodic lines;
    ``False`` is silent; ``True`` always reports.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", *, enabled: bool | None = None,
                 interval_s: float = 10.0, stream: IO[str] | None = None) -> None:
        stream = stream or sys.stderr
        self._impl: object | None = None
        if enabled is False:
            return
        if _is_tty(stream):
            from tqdm.auto import tqdm
            self._impl = tqdm(total=total, desc=desc, unit=unit, leave=False, file=stream)
        else:
            self._impl = _Lines(desc, total, unit, interval_s, stream)

    def update(self, k: int = 1) -> None:
        if self._impl is not None:
            self._impl.update(k)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._impl is not None:
            self._impl.close()  # type: ignore[attr-defined]
            self._impl = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", *,
             enabled: bool | None = None, interval_s: float = 10.0, stream: IO[str] | None = None) -> Iterator[T]:
    """Iterate ``items`` while reporting progress (see :class:`Progress`)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(desc, total, unit, enabled=enabled, interval_s=interval_s, stream=stream) as bar:
        for item in items:
            yield item
            bar.update()
