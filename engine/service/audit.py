"""Append-only, hash-chained audit log (who, what, purpose, result -- never biometric data).

Each entry's hash is ``SHA-256(prev_hash || canonical JSON of the entry)``; the newest
``(seq, hash)`` is also kept in a one-row head table updated in the same transaction.
:func:`verify_chain` therefore detects an edited entry (hash mismatch), a deleted or
reordered one (sequence gap / broken ``prev_hash`` link) and a truncated tail (head
mismatch). SQLite triggers additionally refuse UPDATE and DELETE on the table.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, field

GENESIS = "0" * 64
FIELDS = ("seq", "ts", "actor_role", "actor", "action", "tenant", "subject", "purpose",
          "device", "result", "reason", "details")
# keys that could carry biometric payloads or score vectors are refused outright
FORBIDDEN_DETAIL_KEYS = {"template", "templates", "probe", "embedding", "embeddings", "score",
                         "scores", "key", "keys", "codes", "token", "image"}
MAX_DETAIL_STRING = 200

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    actor_role TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    tenant TEXT NOT NULL,
    subject TEXT NOT NULL,
    purpose TEXT NOT NULL,
    device TEXT NOT NULL,
    result TEXT NOT NULL,
    reason TEXT NOT NULL,
    details TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE INDEX IF NOT EXISTS audit_action ON audit(action);
"""


@dataclass
class AuditEvent:
    """What the servicer fills in while handling a call."""

    action: str
    actor_role: str = ""
    actor: str = ""
    tenant: str = ""
    subject: str = ""
    purpose: str = ""
    device: str = ""
    details: dict = field(default_factory=dict)


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


def entry_hash(prev_hash: str, row: dict) -> str:
    body = json.dumps({k: row[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + "\n" + body).encode()).hexdigest()


def read_head(conn: sqlite3.Connection) -> tuple[int, str]:
    row = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))


def append(conn: sqlite3.Connection, head: tuple[int, str], ts: float, ev: AuditEvent,
           result: str, reason: str = "") -> tuple[int, str]:
    """Append one entry inside the caller's transaction; returns the new head."""
    seq, prev = head[0] + 1, head[1]
    row = {"seq": seq, "ts": float(ts), "actor_role": ev.actor_role or "", "actor": ev.actor or "",
           "action": ev.action, "tenant": ev.tenant or "", "subject": ev.subject or "",
           "purpose": ev.purpose or "", "device": ev.device or "", "result": result,
           "reason": reason or "", "details": clean_details(ev.details)}
    h = entry_hash(prev, row)
    conn.execute(f"INSERT INTO audit ({', '.join(FIELDS)}, prev_hash, hash) VALUES "
                 f"({', '.join('?' * len(FIELDS))}, ?, ?)", [row[k] for k in FIELDS] + [prev, h])
    conn.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
                 "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash", (seq, h))
    return seq, h


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


def verify_chain(conn: sqlite3.Connection) -> ChainReport:
    """Walk the whole log; any edit, deletion, insertion or reordering is reported."""
    prev, expected_seq, n = GENESIS, 1, 0
    cur = conn.execute(f"SELECT {', '.join(FIELDS)}, prev_hash, hash FROM audit ORDER BY seq")
    for rec in cur:
        row = dict(zip(FIELDS + ("prev_hash", "hash"), rec))
        seq = row["seq"]
        if seq != expected_seq:
            return ChainReport(False, n, prev, expected_seq,
                               f"sequence gap: expected {expected_seq}, found {seq} (entries deleted or reordered)")
        if row["prev_hash"] != prev:
            return ChainReport(False, n, prev, seq, "prev_hash does not link to the previous entry")
        if entry_hash(prev, row) != row["hash"]:
            return ChainReport(False, n, prev, seq, "entry content does not match its hash (edited)")
        prev, expected_seq, n = row["hash"], seq + 1, n + 1
    head_seq, head_hash = read_head(conn)
    if (head_seq, head_hash) != (n, prev):
        return ChainReport(False, n, prev, n + 1 if head_seq > n else head_seq,
                           f"head record says {head_seq} entries ending {head_hash[:16]}..., "
                           f"log has {n} ending {prev[:16]}... (tail deleted or head edited)")
    return ChainReport(True, n, prev)
