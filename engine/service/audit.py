"""Append-only, hash-chained audit log (who, what, purpose, result -- never biometric data).

Each entry's hash is ``SHA-256(prev_hash || canonical JSON of the entry)``; the newest
``(seq, hash)`` is also kept in a one-row head record updated in the same transaction.
:func:`verify_chain` therefore detects an edited entry (hash mismatch), a deleted or
reordered one (sequence gap / broken ``prev_hash`` link) and a truncated tail (head
mismatch). The store additionally refuses UPDATE and DELETE on the table (SQLite triggers).

This module is pure: the rows come from and go to :mod:`engine.service.store`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from .request_context import current_request_id

GENESIS = "0" * 64
FIELDS = ("seq", "ts", "actor_role", "actor", "action", "tenant", "subject", "purpose",
          "device", "result", "reason", "details")
# keys that could carry biometric payloads or score vectors are refused outright
FORBIDDEN_DETAIL_KEYS = {"template", "templates", "probe", "embedding", "embeddings", "score",
                         "scores", "key", "keys", "codes", "token", "image"}
MAX_DETAIL_STRING = 200


@dataclass
class AuditEvent:
    """What a use case fills in while handling a call (written once, by the store)."""

    action: str
    actor_role: str = ""
    actor: str = ""
    tenant: str = ""
    subject: str = ""
    purpose: str = ""
    device: str = ""
    details: dict = field(default_factory=dict)
    written: bool = False      # set by the store once the entry is in a transaction
    # api: the id of the request being served (x-request-id or generated), stored as details["request_id"]
    request_id: str = field(default_factory=current_request_id)


@dataclass(frozen=True)
class AuditRow:
    """One stored entry: the :data:`FIELDS` plus the chain links."""

    seq: int
    ts: float
    actor_role: str
    actor: str
    action: str
    tenant: str
    subject: str
    purpose: str
    device: str
    result: str
    reason: str
    details: str
    prev_hash: str
    hash: str


def clean_details(details: dict) -> str:
    """Canonical JSON of a small, flat details dict; refuses biometric-looking content."""
    out = {}
    for k, v in (details or {}).items():
        if str(k).lower() in FORBIDDEN_DETAIL_KEYS:
            raise ValueError(f"audit details may not contain {k!r}")
        if isinstance(v, (bytes, bytearray, memoryview, list, tuple, dict, set)):
            raise ValueError(f"audit detail {k!r} must be a scalar")
        if isinstance(v, str) and len(v) > MAX_DETAIL_STRING:
            v = v[:MAX_DETAIL_STRING]
        if v is not None and not isinstance(v, (str, int, float, bool)):
            v = str(v)[:MAX_DETAIL_STRING]
        out[str(k)] = v
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def entry_hash(prev_hash: str, row: Mapping) -> str:
    body = json.dumps({k: row[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + "\n" + body).encode()).hexdigest()


def next_entry(head: tuple[int, str], ts: float, ev: AuditEvent, result: str, reason: str = "") -> AuditRow:
    """The entry that follows ``head`` = (seq, hash); the store inserts it and moves the head."""
    seq, prev = head[0] + 1, head[1]
    row = {"seq": seq, "ts": float(ts), "actor_role": ev.actor_role or "", "actor": ev.actor or "",
           "action": ev.action, "tenant": ev.tenant or "", "subject": ev.subject or "",
           "purpose": ev.purpose or "", "device": ev.device or "", "result": result,
           "reason": reason or "",
           "details": clean_details({**ev.details, "request_id": ev.request_id} if ev.request_id else ev.details)}
    return AuditRow(**row, prev_hash=prev, hash=entry_hash(prev, row))


@dataclass
class ChainReport:
    ok: bool
    entries: int
    head_hash: str
    first_bad_seq: int = 0
    problem: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"audit chain OK: {self.entries} entries, head {self.head_hash[:16]}..."
        return f"audit chain BROKEN at seq {self.first_bad_seq}: {self.problem}"


def verify_chain(rows: Iterable[AuditRow], head: tuple[int, str]) -> ChainReport:
    """Walk the whole log (``rows`` in ``seq`` order) against the stored ``head``; any edit,
    deletion, insertion or reordering is reported."""
    prev, expected_seq, n = GENESIS, 1, 0
    for rec in rows:
        row = asdict(rec)
        seq = row["seq"]
        if seq != expected_seq:
            return ChainReport(False, n, prev, expected_seq,
                               f"sequence gap: expected {expected_seq}, found {seq} (entries deleted or reordered)")
        if row["prev_hash"] != prev:
            return ChainReport(False, n, prev, seq, "prev_hash does not link to the previous entry")
        if entry_hash(prev, row) != row["hash"]:
            return ChainReport(False, n, prev, seq, "entry content does not match its hash (edited)")
        prev, expected_seq, n = row["hash"], seq + 1, n + 1
    head_seq, head_hash = head
    if (head_seq, head_hash) != (n, prev):
        return ChainReport(False, n, prev, n + 1 if head_seq > n else head_seq,
                           f"head record says {head_seq} entries ending {head_hash[:16]}..., "
                           f"log has {n} ending {prev[:16]}... (tail deleted or head edited)")
    return ChainReport(True, n, prev)
