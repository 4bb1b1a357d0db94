"""Intrusion detection: bursts of failed verifications against one subject, and 1:N
enumeration (too many identifications, or too many no-match identifications, from one
caller) are throttled with RESOURCE_EXHAUSTED; the first hit raises an alert that the
matching use case writes to the audit log.

Callers are *authenticated principals* (``tenant/token name#token id``, :attr:`Scope.caller`),
never a client-chosen device id. Probing who is enrolled (Verify answering NOT_ENROLLED over
and over to one caller) is throttled as enumeration too. A lock-out ends only when its time
is up or an operator / admin clears it (``ResetLockout``, audited): a successful match -- or a
key holder's report of one -- never lifts it. :class:`AuthFailures` counts failed
authentications per peer address, throttles them, and decides which of them are audited
(bounded: one entry per peer and window plus one when the peer is throttled).
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
                 identify_lockout_s: float = 300.0, verify_unknown_limit: int = 20) -> None:
        self.clock = clock
        self.vf_limit, self.vf_window, self.vf_lock = verify_fail_limit, verify_fail_window_s, verify_lockout_s
        self.id_limit, self.id_nomatch = identify_limit, identify_nomatch_limit
        self.id_window, self.id_lock = identify_window_s, identify_lockout_s
        self._verify: dict[str, _Bucket] = {}
        self._identify: dict[str, _Bucket] = {}
        self._unknown: dict[str, _Bucket] = {}    # NOT_ENROLLED answers per caller (enrolment probing)
        self.unknown_limit = int(verify_unknown_limit)
        self._lock = threading.Lock()
        self._ops = 0

    @classmethod
    def from_config(cls, clock: Clock, cfg) -> IntrusionDetector:
        return cls(clock, cfg.verify_fail_limit, cfg.verify_fail_window_s, cfg.verify_lockout_s,
                   cfg.identify_limit, cfg.identify_nomatch_limit, cfg.identify_window_s,
                   cfg.identify_lockout_s, cfg.verify_unknown_limit)

    @staticmethod
    def _prune(b: _Bucket, now: float, window: float) -> None:
        while b.events and b.events[0][0] <= now - window:
            if not b.events.popleft()[1]:
                b.misses -= 1

    def _sweep(self, now: float) -> None:
        self._ops += 1
        if self._ops % 4096:
            return
        for table, window in ((self._verify, self.vf_window), (self._identify, self.id_window),
                              (self._unknown, self.vf_window)):
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
            if matched:       # forget the failures, never the lock-out (only time or ResetLockout lift it)
                b = self._verify.get(key)
                if b is not None:
                    b.events.clear()
                    if b.locked_until <= now:
                        del self._verify[key]
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

    # -- enrolment probing (Verify answering NOT_ENROLLED) -------------------------------------
    def check_unknown(self, caller: str) -> None:
        """Raise Throttled while ``caller`` is locked out for probing enrolments."""
        now = self.clock.now()
        with self._lock:
            b = self._unknown.get(caller)
            if b is not None and b.locked_until > now:
                raise Throttled(f"too many verifications of subjects that are not enrolled; retry in "
                                f"{b.locked_until - now:.0f} s", reason="VERIFY_ENUMERATION")

    def record_unknown(self, caller: str) -> Alert | None:
        """One NOT_ENROLLED answer to ``caller``; locks it out (and alerts) at ``unknown_limit``."""
        now = self.clock.now()
        with self._lock:
            self._sweep(now)
            b = self._unknown.setdefault(caller, _Bucket())
            b.events.append((now, False))
            self._prune(b, now, self.vf_window)
            if len(b.events) >= self.unknown_limit:
                b.locked_until = now + self.vf_lock
                n = len(b.events)
                b.events.clear()
                return Alert("VERIFY_ENUMERATION", caller, n, self.vf_window, b.locked_until)
        return None

    # -- operator action -------------------------------------------------------------------------
    def reset(self, subject_key: str = "", caller_prefix: str = "") -> int:
        """Lift lock-outs (the ``ResetLockout`` use case audits it): the verify-burst lock of
        ``subject_key`` (``tenant/subject``) and every identify / probing lock of callers starting
        with ``caller_prefix`` (``tenant/name#``). Returns how many were active."""
        now = self.clock.now()
        n = 0
        with self._lock:
            if subject_key:
                b = self._verify.pop(subject_key, None)
                n += int(b is not None and b.locked_until > now)
            if caller_prefix:
                for table in (self._identify, self._unknown):
                    for k in [k for k in table if k.startswith(caller_prefix)]:
                        n += int(table.pop(k).locked_until > now)
        return n


class AuthFailures:
    """Failed authentications per peer address (the IP, not the port): after ``limit`` within
    ``window_s`` the peer is throttled for ``lockout_s``. :meth:`record` also says whether this
    failure gets an audit entry of its own: the first of each peer and window, and the one that
    throttles it; the rest are counted and reported in the next audited entry (``suppressed``).
    At most ``max_peers`` peers are tracked (oldest forgotten first)."""

    def __init__(self, clock: Clock, limit: int = 20, window_s: float = 60.0, lockout_s: float = 300.0,
                 max_peers: int = 10_000, max_audited_per_window: int = 100) -> None:
        self.clock, self.limit, self.window, self.lockout = clock, int(limit), float(window_s), float(lockout_s)
        self.max_peers, self.max_audited = int(max_peers), int(max_audited_per_window)
        self._peers: dict[str, list] = {}     # peer -> [window start, count, locked_until, suppressed]
        self._audited = [0.0, 0]               # window start, audited entries (all peers)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, clock: Clock, cfg) -> AuthFailures:
        return cls(clock, cfg.auth_fail_limit, cfg.auth_fail_window_s, cfg.auth_lockout_s)

    @staticmethod
    def peer_address(peer: str) -> str:
        """``ipv4:1.2.3.4:567`` -> ``ipv4:1.2.3.4``; ``ipv6:[::1]:5`` -> ``ipv6:[::1]`` (bounded length)."""
        peer = (peer or "unknown")[:128]
        if peer.startswith(("ipv4:", "ipv6:")):
            peer = peer.rsplit(":", 1)[0]
        return peer

    def throttled(self, peer: str) -> bool:
        now = self.clock.now()
        with self._lock:
            st = self._peers.get(peer)
            return st is not None and st[2] > now

    def record(self, peer: str) -> tuple[bool, bool, int]:
        """One failure from ``peer``: ``(throttled, audit_this_one, suppressed_since_last_audited)``."""
        now = self.clock.now()
        with self._lock:
            if now - self._audited[0] >= self.window:
                self._audited = [now, 0]
            st = self._peers.get(peer)
            if st is None:
                if len(self._peers) >= self.max_peers:
                    self._peers.pop(next(iter(self._peers)))
                st = self._peers[peer] = [now, 0, 0.0, 0]
            if st[2] > now:                                   # throttled: count only
                st[3] += 1
                return True, False, 0
            if st[2] or now - st[0] >= self.window:          # a lock-out that ended starts a new window
                st[0], st[1], st[2] = now, 0, 0.0
            st[1] += 1
            throttle = st[1] > self.limit
            if throttle:
                st[2] = now + self.lockout
            audit = (st[1] == 1 or throttle) and self._audited[1] < self.max_audited
            if audit:
                self._audited[1] += 1
                suppressed, st[3] = st[3], 0
                return throttle, True, suppressed
            st[3] += 1
            return throttle, False, 0
