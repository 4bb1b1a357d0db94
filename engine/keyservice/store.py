"""The key service's store: the only SQL of :mod:`engine.keyservice` (SQLite, its own file).

Tables: ``secrets`` (wrapped key material: tenant master secrets, HE secret contexts, the signing
key -- each row AES-256-GCM ciphertext under the KEK, see :mod:`.keystore`; shredded rows keep
their identity and fingerprint, never their bytes), ``group_versions`` (the current group-key
version of each fast-mode purpose), ``decisions`` (tickets, grants and result hashes already
decided, for replay checks) and the hash-chained audit log (``audit`` + ``audit_head``, the chain
of :mod:`engine.service.audit`; UPDATE / DELETE refused by triggers).

The audit chain is keyed (HMAC-SHA256, :class:`engine.service.audit.AuditKey`) with a key derived
from the KEK (:func:`audit_key`): whoever can write the database but not read the KEK cannot edit an
entry and recompute the chain.

``PRAGMA secure_delete`` is on, so a shredded secret's pages are overwritten with zeros, not just
unlinked; WAL with ``synchronous=FULL``: what is acknowledged is on disk.
"""
from __future__ import annotations

import hashlib
import hmac
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..service.audit import GENESIS, AuditEvent, AuditKey, AuditRow, ChainReport, next_entry, verify_chain
from ..service.clock import Clock, SystemClock

DB_NAME = "keyservice.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS secrets (
    kind TEXT NOT NULL, tenant TEXT NOT NULL, purpose TEXT NOT NULL, mode TEXT NOT NULL,
    dim INTEGER NOT NULL, version INTEGER NOT NULL, state TEXT NOT NULL, fingerprint TEXT NOT NULL,
    nonce BLOB, wrapped BLOB, created_at REAL NOT NULL, shredded_at REAL,
    PRIMARY KEY (kind, tenant, purpose, mode, dim, version));
CREATE TABLE IF NOT EXISTS group_versions (
    tenant TEXT NOT NULL, purpose TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (tenant, purpose));
CREATE TABLE IF NOT EXISTS decisions (
    ticket TEXT PRIMARY KEY, grant_id TEXT NOT NULL UNIQUE, result_sha256 TEXT NOT NULL UNIQUE, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS decisions_at ON decisions (at);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, ts REAL NOT NULL, actor_role TEXT NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, tenant TEXT NOT NULL, subject TEXT NOT NULL, purpose TEXT NOT NULL,
    device TEXT NOT NULL, result TEXT NOT NULL, reason TEXT NOT NULL, details TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

_AUDIT_COLS = "seq, ts, actor_role, actor, action, tenant, subject, purpose, device, result, reason, details, prev_hash, hash"


@dataclass(frozen=True)
class SecretRow:
    """One wrapped secret (``wrapped``/``nonce`` are None once shredded)."""

    kind: str          # "master" | "he" | "signing"
    tenant: str
    purpose: str
    mode: str
    dim: int
    version: int
    state: str         # "current" | "retired" | "shredded"
    fingerprint: str
    nonce: bytes | None
    wrapped: bytes | None
    created_at: float
    shredded_at: float | None


def audit_key(kek: bytes) -> AuditKey:
    """The key of the key service's audit chain, derived from its KEK (never stored)."""
    return AuditKey(hmac.new(kek, b"veilface/keyservice/audit-chain", hashlib.sha256).digest())


class Tx:
    """Writes inside one transaction (see :meth:`KeyServiceStore.transaction`)."""

    def __init__(self, conn: sqlite3.Connection, now: float, key: AuditKey | None = None) -> None:
        self.conn, self.now, self.key = conn, now, key

    def insert_secret(self, row: SecretRow) -> None:
        self.conn.execute(
            "INSERT INTO secrets (kind, tenant, purpose, mode, dim, version, state, fingerprint, nonce, wrapped, "
            "created_at, shredded_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (row.kind, row.tenant, row.purpose, row.mode, row.dim, row.version, row.state, row.fingerprint,
             row.nonce, row.wrapped, row.created_at, row.shredded_at))

    def shred(self, kind: str, tenant: str, purpose: str, mode: str, dim: int, version: int) -> bool:
        """Overwrite then drop the wrapped bytes of one secret (identity + fingerprint stay)."""
        ident = (kind, tenant, purpose, mode, dim, version)
        cur = self.conn.execute("SELECT length(wrapped) FROM secrets WHERE kind=? AND tenant=? AND purpose=? AND "
                                "mode=? AND dim=? AND version=? AND wrapped IS NOT NULL", ident)
        got = cur.fetchone()
        if got is None:
            return False
        self.conn.execute("UPDATE secrets SET wrapped = zeroblob(?), nonce = zeroblob(12) WHERE kind=? AND tenant=? "
                          "AND purpose=? AND mode=? AND dim=? AND version=?", (int(got[0]), *ident))
        self.conn.execute("UPDATE secrets SET wrapped = NULL, nonce = NULL, state = 'shredded', shredded_at = ? "
                          "WHERE kind=? AND tenant=? AND purpose=? AND mode=? AND dim=? AND version=?",
                          (self.now, *ident))
        return True

    def set_group_version(self, tenant: str, purpose: str, version: int) -> None:
        self.conn.execute("INSERT INTO group_versions (tenant, purpose, version) VALUES (?,?,?) "
                          "ON CONFLICT (tenant, purpose) DO UPDATE SET version = excluded.version",
                          (tenant, purpose, int(version)))

    def record_decision(self, ticket: str, grant: str, result_sha256: str) -> bool:
        """False when the ticket, the grant or the result was decided before (a replay)."""
        try:
            self.conn.execute("INSERT INTO decisions (ticket, grant_id, result_sha256, at) VALUES (?,?,?,?)",
                              (ticket, grant, result_sha256, self.now))
        except sqlite3.IntegrityError:
            return False
        return True

    def audit(self, ev: AuditEvent, result: str = "OK", reason: str = "") -> AuditRow:
        head = self.conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone() or (0, GENESIS)
        row = next_entry((int(head[0]), str(head[1])), self.now, ev, result, reason, self.key)
        self.conn.execute(f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                          (row.seq, row.ts, row.actor_role, row.actor, row.action, row.tenant, row.subject,
                           row.purpose, row.device, row.result, row.reason, row.details, row.prev_hash, row.hash))
        self.conn.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE "
                          "SET seq = excluded.seq, hash = excluded.hash", (row.seq, row.hash))
        ev.written = True
        return row


class KeyServiceStore:
    """SQLite store of the key service (one connection, serialised by a lock: the key service's
    load is a few calls per match, not the matcher's)."""

    def __init__(self, data_dir: str | Path, clock: Clock | None = None, key: AuditKey | None = None) -> None:
        self.key = key
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.dir.chmod(0o700)
        except OSError:
            pass
        self.path = self.dir / DB_NAME
        self.clock = clock or SystemClock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        for pragma in ("journal_mode = WAL", "synchronous = FULL", "secure_delete = ON", "foreign_keys = ON"):
            self._conn.execute(f"PRAGMA {pragma}")
        self._conn.executescript(_SCHEMA)
        try:
            self.path.chmod(0o600)
        except OSError:
            pass

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self._conn, self.clock.now(), self.key)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- reads -------------------------------------------------------------------------------------
    def _secret(self, sql: str, args: tuple) -> list[SecretRow]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT kind, tenant, purpose, mode, dim, version, state, fingerprint, nonce, wrapped, created_at, "
                "shredded_at FROM secrets " + sql, args).fetchall()
        return [SecretRow(*r) for r in rows]

    def current_secret(self, kind: str, tenant: str, purpose: str = "", mode: str = "", dim: int = 0) -> SecretRow | None:
        rows = self._secret("WHERE kind=? AND tenant=? AND purpose=? AND mode=? AND dim=? AND state='current' "
                            "ORDER BY version DESC LIMIT 1", (kind, tenant, purpose, mode, int(dim)))
        return rows[0] if rows else None

    def secret(self, kind: str, tenant: str, purpose: str, mode: str, dim: int, version: int) -> SecretRow | None:
        rows = self._secret("WHERE kind=? AND tenant=? AND purpose=? AND mode=? AND dim=? AND version=?",
                            (kind, tenant, purpose, mode, int(dim), int(version)))
        return rows[0] if rows else None

    def max_version(self, kind: str, tenant: str, purpose: str = "", mode: str = "", dim: int = 0) -> int:
        with self._lock:
            got = self._conn.execute("SELECT MAX(version) FROM secrets WHERE kind=? AND tenant=? AND purpose=? AND "
                                     "mode=? AND dim=?", (kind, tenant, purpose, mode, int(dim))).fetchone()
        return int(got[0] or 0)

    def group_version(self, tenant: str, purpose: str) -> int:
        with self._lock:
            got = self._conn.execute("SELECT version FROM group_versions WHERE tenant=? AND purpose=?",
                                     (tenant, purpose)).fetchone()
        return int(got[0]) if got else 0

    def prune_decisions(self, older_than: float) -> int:
        with self._lock:
            return self._conn.execute("DELETE FROM decisions WHERE at < ?", (older_than,)).rowcount

    # -- audit ---------------------------------------------------------------------------------------
    def audit(self, ev: AuditEvent, result: str = "OK", reason: str = "") -> AuditRow:
        with self.transaction() as tx:
            return tx.audit(ev, result, reason)

    def audit_head(self) -> tuple[int, str]:
        with self._lock:
            got = self._conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        return (int(got[0]), str(got[1])) if got else (0, GENESIS)

    def audit_entries(self, after_seq: int = 0, limit: int = 100, action: str = "") -> list[AuditRow]:
        sql = f"SELECT {_AUDIT_COLS} FROM audit WHERE seq > ?"
        args: list = [int(after_seq)]
        if action:
            sql += " AND action = ?"
            args.append(action)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY seq LIMIT ?", (*args, int(limit))).fetchall()
        return [AuditRow(*r) for r in rows]

    def verify_audit(self) -> ChainReport:
        with self._lock:
            rows = self._conn.execute(f"SELECT {_AUDIT_COLS} FROM audit ORDER BY seq").fetchall()
        return verify_chain((AuditRow(*r) for r in rows), self.audit_head(), self.key)

    def raw_bytes(self) -> bytes:
        """The database file and its WAL as stored on disk (tests look for leaked key bytes)."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        out = b""
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            if p.exists():
                out += p.read_bytes()
        return out

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._conn.close()


__all__ = ["DB_NAME", "SecretRow", "KeyServiceStore", "Tx", "audit_key"]
