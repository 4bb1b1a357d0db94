"""Intrusion detection: bursts of failed verifications against one subject, and 1:N
enumeration (too many identifications, or too many no-match identifications, from one
caller) are throttled with RESOURCE_EXHAUSTED; the first hit raises an alert that the
matching use case writes to the audit log.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from .clock import Clock
from .status import Throttled


@dataclass
class Alert:
    kind: str          # "VERIFY_BURST" | "IDENTIFY_RATE" | "IDENTIFY_ENUMERATION"
    key: str
    count: int
    window_s: float
    locked_until: float


class _Bucket:
    __slots__ = ("events", "locked_until", "misses")

    def __init__(self) -> None:
        self.events: deque = deque()
        self.locked_until = 0.0
        self.misses = 0


class IntrusionDetector:
    """Sliding-window counters with lock-outs, on an injectable clock (thread-safe)."""

    def __init__(self, clock: Clock, verify_fail_limit: int = 5, verify_fail_window_s: float = 60.0,
                 verify_lockout_s: float = 300.0, identify_limit: int = 120,
                 identify_nomatch_limit: int = 30, identify_window_s: float = 60.0,
                 identify_lockout_s: float = 300.0) -> None:
        self.clock = clock
        self.vf_limit, self.vf_window, self.vf_lock = verify_fail_limit, verify_fail_window_s, verify_lockout_s
        self.id_limit, self.id_nomatch = identify_limit, identify_nomatch_limit
        self.id_window, self.id_lock = identify_window_s, identify_lockout_s
        self._verify: dict[str, _Bucket] = {}
        self._identify: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._ops = 0

    @classmethod
    def from_config(cls, clock: Clock, cfg) -> IntrusionDetector:
        return cls(clock, cfg.verify_fail_limit, cfg.verify_fail_window_s, cfg.verify_lockout_s,
                   cfg.identify_limit, cfg.identify_nomatch_limit, cfg.identify_window_s,
                   cfg.identify_lockout_s)

    @staticmethod
    def _prune(b: _Bucket, now: float, window: float) -> None:
        while b.events and b.events[0][0] <= now - window:
            if not b.events.popleft()[1]:
                b.misses -= 1

    def _sweep(self, now: float) -> None:
        self._ops += 1
        if self._ops % 4096:
            return
        for table, window in ((self._verify, self.vf_window), (self._identify, self.id_window)):
            for k in [k for k, b in table.items() if b.locked_until <= now
                      and (not b.events or b.events[-1][0] <= now - window)]:
                del table[k]

    # -- 1:1 ---------------------------------------------------------------------------
    def check_verify(self, key: str) -> None:
        now = self.clock.now()
        with self._lock:
            b = self._verify.get(key)
            if b is not None and b.locked_until > now:
                raise Throttled(f"too many failed verifications for this subject; retry in "
                                f"{b.locked_until - now:.0f} s", reason="VERIFY_BURST")

    def record_verify(self, key: str, matched: bool) -> Alert | None:
        now = self.clock.now()
        with self._lock:
            self._sweep(now)
            if matched:
                self._verify.pop(key, None)
                return None
            b = self._verify.setdefault(key, _Bucket())
            b.events.append((now, False))
            self._prune(b, now, self.vf_window)
            if len(b.events) >= self.vf_limit:
                b.locked_until = now + self.vf_lock
                n = len(b.events)
                b.events.clear()
                return Alert("VERIFY_BURST", key, n, self.vf_window, b.locked_until)
        return None

    # -- 1:N ---------------------------------------------------------------------------
    def check_identify(self, caller: str) -> Alert | None:
        """Raise Throttled when ``caller`` is locked out. Returns an Alert (and locks) when
        this call exceeds the rate; the caller audits it and then refuses the call."""
        now = self.clock.now()
        with self._lock:
            self._sweep(now)
            b = self._identify.setdefault(caller, _Bucket())
            if b.locked_until > now:
                raise Throttled(f"1:N search rate limit; retry in {b.locked_until - now:.0f} s",
                                reason="IDENTIFY_THROTTLED")
            self._prune(b, now, self.id_window)
            if len(b.events) >= self.id_limit:
                b.locked_until = now + self.id_lock
                n = len(b.events)
                b.events.clear()
                b.misses = 0
                return Alert("IDENTIFY_RATE", caller, n, self.id_window, b.locked_until)
        return None

    def identify_hit(self, caller: str) -> None:
        """An encrypted 1:N search recorded as a no-match turned out to match (the decider said so):
        turn the latest pending miss of ``caller`` into a hit."""
        now = self.clock.now()
        with self._lock:
            b = self._identify.get(caller)
            if b is None:
                return
            self._prune(b, now, self.id_window)
            for i in range(len(b.events) - 1, -1, -1):
                if not b.events[i][1]:
                    b.events[i] = (b.events[i][0], True)
                    b.misses -= 1
                    return

    def record_identify(self, caller: str, matched: bool) -> Alert | None:
        now = self.clock.now()
        with self._lock:
            b = self._identify.setdefault(caller, _Bucket())
            b.events.append((now, matched))
            b.misses += 0 if matched else 1
            self._prune(b, now, self.id_window)
            misses = b.misses
            if misses >= self.id_nomatch:
                b.locked_until = now + self.id_lock
                b.events.clear()
                b.misses = 0
                return Alert("IDENTIFY_ENUMERATION", caller, misses, self.id_window, b.locked_until)
        return None
