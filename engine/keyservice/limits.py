"""Rate limits of the key service: per device, per tenant, and distinct subjects per device.

Every key release and decision grant counts against the device (``device_limit`` per
``device_window_s``) and its tenant (``tenant_limit`` per ``tenant_window_s``); every decision
against the tenant. A device that asks for the keys of more than ``device_subject_limit`` distinct
subjects within ``device_subject_window_s`` (key harvesting: what a stolen device token does) is
locked out for ``lockout_s``. The first refusal of a burst returns an alert, which the caller
writes to the audit log. Counters are in memory, on an injectable clock (thread-safe).
"""
from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

from ..service.clock import Clock
from ..service.status import Throttled


@dataclass(frozen=True)
class Alert:
    kind: str            # "DEVICE_RATE" | "TENANT_RATE" | "KEY_HARVESTING"
    key: str
    count: int
    window_s: float
    locked_until: float


class _Window:
    """Event times of one key within a sliding window (+ distinct labels when asked)."""

    __slots__ = ("events", "labels", "locked_until")

    def __init__(self) -> None:
        self.events: deque = deque()
        self.labels: OrderedDict = OrderedDict()   # label -> last time seen
        self.locked_until = 0.0


class KeyServiceLimits:
    def __init__(self, clock: Clock, cfg) -> None:
        self.clock, self.cfg = clock, cfg
        self._dev: dict[str, _Window] = {}
        self._ten: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def _check_lock(self, w: _Window | None, now: float, what: str, reason: str) -> None:
        if w is not None and w.locked_until > now:
            raise Throttled(f"{what} is locked out; retry in {w.locked_until - now:.0f} s", reason=reason)

    @staticmethod
    def _prune(w: _Window, now: float, window: float) -> None:
        while w.events and w.events[0] <= now - window:
            w.events.popleft()

    def admit(self, tenant: str, device: str = "", subject: str | None = None) -> Alert | None:
        """Count one call of ``device`` (if any) in ``tenant``; ``subject``: a subject whose key is
        released (harvesting check). Raises :class:`Throttled` when a limit is exceeded (and
        returns nothing); returns an :class:`Alert` when *this* call crossed a limit -- the caller
        audits it and then refuses the call with :meth:`refuse`."""
        c, now = self.cfg, self.clock.now()
        with self._lock:
            t = self._ten.setdefault(tenant, _Window())
            self._check_lock(t, now, "this tenant", "TENANT_THROTTLED")
            d = None
            if device:
                d = self._dev.setdefault(f"{tenant}/{device}", _Window())
                self._check_lock(d, now, "this device", "DEVICE_THROTTLED")
            self._prune(t, now, c.tenant_window_s)
            if len(t.events) >= c.tenant_limit:
                t.locked_until = now + min(c.lockout_s, c.tenant_window_s)
                return Alert("TENANT_RATE", tenant, len(t.events), c.tenant_window_s, t.locked_until)
            if d is not None:
                self._prune(d, now, c.device_window_s)
                if len(d.events) >= c.device_limit:
                    d.locked_until = now + c.lockout_s
                    return Alert("DEVICE_RATE", f"{tenant}/{device}", len(d.events), c.device_window_s,
                                 d.locked_until)
                if subject is not None:
                    while d.labels and next(iter(d.labels.values())) <= now - c.device_subject_window_s:
                        d.labels.popitem(last=False)
                    if subject not in d.labels and len(d.labels) >= c.device_subject_limit:
                        d.locked_until = now + c.lockout_s
                        return Alert("KEY_HARVESTING", f"{tenant}/{device}", len(d.labels) + 1,
                                     c.device_subject_window_s, d.locked_until)
                    d.labels.pop(subject, None)
                    d.labels[subject] = now
                d.events.append(now)
            t.events.append(now)
        return None

    @staticmethod
    def refuse(alert: Alert) -> Throttled:
        reason = {"TENANT_RATE": "TENANT_THROTTLED", "DEVICE_RATE": "DEVICE_THROTTLED",
                  "KEY_HARVESTING": "KEY_HARVESTING"}[alert.kind]
        return Throttled(f"rate limit of the key service ({alert.kind}); locked out until {alert.locked_until:.0f}",
                         reason=reason)

    def reset(self) -> None:
        with self._lock:
            self._dev.clear()
            self._ten.clear()


__all__ = ["Alert", "KeyServiceLimits"]
