"""Append-only, hash-chained audit log (who, what, purpose, result -- never biometric data).

Each entry's hash is ``HMAC-SHA256(audit key, prev_hash || canonical JSON of the entry)``; the
newest ``(seq, hash)`` is also kept in a one-row head record updated in the same transaction.
:func:`verify_chain` therefore detects an edited entry (hash mismatch), a deleted or
reordered one (sequence gap / broken ``prev_hash`` link) and a truncated tail (head
mismatch). The store additionally refuses UPDATE and DELETE on the table (SQLite triggers).

The chain is *keyed*: the audit key lives outside the database (:mod:`.audit_keys`: a 0600 file
next to the config, or given by config / environment), so someone who can write the database
but not read the key cannot edit an entry and recompute the chain -- ``veilface audit verify``
(which has the key) reports the first entry whose HMAC does not match.

Migration from the unkeyed chain (entries hashed ``SHA-256(prev_hash || body)``): when a key is
first attached to a store that already has entries, the store records the *switch point* -- the
first keyed sequence number -- authenticated with the key (``seq.HMAC(key, seq)`` in ``meta``).
Entries before it keep verifying as SHA-256, entries from it on as HMAC; moving the switch point
(to pass off rewritten entries as unkeyed ones) breaks its MAC and is reported.

This module is pure: the rows come from and go to :mod:`engine.service.store`.
"""
from __future__ import annotations

import hashlib
import hmac
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


@dataclass(frozen=True)
class AuditKey:
    """The secret that keys the chain, and the first sequence number it keys (``keyed_from``;
    entries before it are the legacy unkeyed chain)."""

    key: bytes
    keyed_from: int = 1

    @property
    def key_id(self) -> str:
        """A non-secret name of the key (which key a store was switched to)."""
        return hmac.new(self.key, b"veilface/audit-key-id", hashlib.sha256).hexdigest()[:16]

    def keys(self, seq: int) -> bool:
        return seq >= self.keyed_from

    def switch_record(self) -> str:
        """The authenticated switch point stored in the database: ``"<seq>.<mac>"``."""
        return f"{self.keyed_from}.{self._switch_mac(self.keyed_from)}"

    def _switch_mac(self, seq: int) -> str:
        return hmac.new(self.key, f"veilface/audit-switch/{int(seq)}".encode(), hashlib.sha256).hexdigest()[:32]

    def read_switch(self, record: str | None) -> int | None:
        """The switch point of a stored record, or None if the record is missing or forged."""
        seq, _, mac = (record or "").partition(".")
        if not seq.isdigit() or len(seq) > 19 or not hmac.compare_digest(mac, self._switch_mac(int(seq))):
            return None
        return int(seq)

    def derive(self, purpose: str) -> bytes:
        """A sub-key for another use (e.g. page tokens), independent of the chain key."""
        return hmac.new(self.key, f"veilface/derive/{purpose}".encode(), hashlib.sha256).digest()


def entry_hash(prev_hash: str, row: Mapping, key: AuditKey | None = None) -> str:
    """SHA-256 (legacy, or no key) or HMAC-SHA256 (from the key's switch point on) of an entry."""
    body = json.dumps({k: row[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"))
    msg = (prev_hash + "\n" + body).encode()
    if key is not None and key.keys(int(row["seq"])):
        return hmac.new(key.key, msg, hashlib.sha256).hexdigest()
    return hashlib.sha256(msg).hexdigest()


def next_entry(head: tuple[int, str], ts: float, ev: AuditEvent, result: str, reason: str = "",
               key: AuditKey | None = None) -> AuditRow:
    """The entry that follows ``head`` = (seq, hash); the store inserts it and moves the head."""
    seq, prev = head[0] + 1, head[1]
    row = {"seq": seq, "ts": float(ts), "actor_role": ev.actor_role or "", "actor": ev.actor or "",
           "action": ev.action, "tenant": ev.tenant or "", "subject": ev.subject or "",
           "purpose": ev.purpose or "", "device": ev.device or "", "result": result,
           "reason": reason or "",
           "details": clean_details({**ev.details, "request_id": ev.request_id} if ev.request_id else ev.details)}
    return AuditRow(**row, prev_hash=prev, hash=entry_hash(prev, row, key))


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


def verify_chain(rows: Iterable[AuditRow], head: tuple[int, str], key: AuditKey | None = None) -> ChainReport:
    """Walk the whole log (``rows`` in ``seq`` order) against the stored ``head``; any edit,
    deletion, insertion or reordering is reported. With ``key`` the entries from its switch
    point on must carry its HMAC (a chain recomputed without the key fails there)."""
    prev, expected_seq, n = GENESIS, 1, 0
    for rec in rows:
        row = asdict(rec)
        seq = row["seq"]
        if seq != expected_seq:
            return ChainReport(False, n, prev, expected_seq,
                               f"sequence gap: expected {expected_seq}, found {seq} (entries deleted or reordered)")
        if row["prev_hash"] != prev:
            return ChainReport(False, n, prev, seq, "prev_hash does not link to the previous entry")
        if not hmac.compare_digest(entry_hash(prev, row, key), str(row["hash"])):
            keyed = key is not None and key.keys(seq)
            return ChainReport(False, n, prev, seq, "entry content does not match its " +
                               ("HMAC (edited, or the chain was recomputed without the audit key)" if keyed
                                else "hash (edited)"))
        prev, expected_seq, n = row["hash"], seq + 1, n + 1
    head_seq, head_hash = head
    if (head_seq, head_hash) != (n, prev):
        return ChainReport(False, n, prev, n + 1 if head_seq > n else head_seq,
                           f"head record says {head_seq} entries ending {head_hash[:16]}..., "
                           f"log has {n} ending {prev[:16]}... (tail deleted or head edited)")
    return ChainReport(True, n, prev)
