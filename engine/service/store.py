"""Embedded SQLite store of the matcher (WAL, ``synchronous=FULL``, ``secure_delete``).

Holds protected templates (``Template.to_bytes()``, one row per tenant/subject/purpose/scheme
with its key version and expiry; for ``he`` the ciphertext blob, key version = HE epoch), the
*public* HE contexts per tenant/purpose/epoch (retired epochs keep only their fingerprint),
consent records, the device registry, subject key-version
state, idempotency records, alerts and the hash-chained audit log. No names, images, raw
embeddings or keys: subjects are pseudonymous ids.

Writes go through one connection under a lock (``with store.write() as tx``); a transaction
is committed -- and fsynced -- before the caller acknowledges anything. Reads use one
connection per thread (WAL readers never block the writer).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import audit as audit_mod
from .audit import AuditEvent
from .clock import Clock, SystemClock

DB_NAME = "veilface.db"
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    tenant TEXT NOT NULL, device_id TEXT NOT NULL, location_class INTEGER NOT NULL,
    location_kind TEXT NOT NULL, signage INTEGER NOT NULL, registered_at REAL NOT NULL,
    PRIMARY KEY (tenant, device_id));
CREATE TABLE IF NOT EXISTS consents (
    consent_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, subject TEXT NOT NULL,
    purpose TEXT NOT NULL, notice_version TEXT NOT NULL, consented_at REAL NOT NULL,
    age INTEGER NOT NULL, minor INTEGER NOT NULL, guardian_ref TEXT NOT NULL,
    guardian_relationship TEXT NOT NULL, guardian_at REAL NOT NULL, device TEXT NOT NULL,
    withdrawn_at REAL);
CREATE INDEX IF NOT EXISTS consents_subject ON consents(tenant, subject);
CREATE TABLE IF NOT EXISTS subjects (
    tenant TEXT NOT NULL, subject TEXT NOT NULL, key_version INTEGER NOT NULL,
    revoked_upto INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, subject));
CREATE TABLE IF NOT EXISTS templates (
    tenant TEXT NOT NULL, subject TEXT NOT NULL, purpose TEXT NOT NULL, scheme TEXT NOT NULL,
    key_version INTEGER NOT NULL, template BLOB NOT NULL, enrolled_at REAL NOT NULL,
    expires_at REAL NOT NULL, consent_id TEXT NOT NULL, device TEXT NOT NULL,
    PRIMARY KEY (tenant, subject, purpose, scheme));
CREATE INDEX IF NOT EXISTS templates_expiry ON templates(expires_at);
CREATE TABLE IF NOT EXISTS requests (
    tenant TEXT NOT NULL, request_id TEXT NOT NULL, method TEXT NOT NULL,
    principal TEXT NOT NULL, request_hash TEXT NOT NULL, response BLOB NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (tenant, method, request_id));
CREATE TABLE IF NOT EXISTS he_contexts (
    tenant TEXT NOT NULL, purpose TEXT NOT NULL, scheme TEXT NOT NULL, epoch INTEGER NOT NULL,
    mode TEXT NOT NULL, dim INTEGER NOT NULL, fingerprint TEXT NOT NULL, eval_keys INTEGER NOT NULL,
    context BLOB NOT NULL, registered_at REAL NOT NULL, retired_at REAL,
    PRIMARY KEY (tenant, purpose, scheme, epoch));
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, raised_at REAL NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS template_seq (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, subject TEXT NOT NULL,
    purpose TEXT NOT NULL, scheme TEXT NOT NULL, UNIQUE (tenant, subject, purpose, scheme));
CREATE TRIGGER IF NOT EXISTS templates_seq_insert AFTER INSERT ON templates BEGIN
    INSERT OR REPLACE INTO template_seq (tenant, subject, purpose, scheme)
    VALUES (NEW.tenant, NEW.subject, NEW.purpose, NEW.scheme); END;
CREATE TRIGGER IF NOT EXISTS templates_seq_update AFTER UPDATE ON templates BEGIN
    DELETE FROM template_seq WHERE tenant = OLD.tenant AND subject = OLD.subject AND
        purpose = OLD.purpose AND scheme = OLD.scheme;
    INSERT OR REPLACE INTO template_seq (tenant, subject, purpose, scheme)
    VALUES (NEW.tenant, NEW.subject, NEW.purpose, NEW.scheme); END;
CREATE TRIGGER IF NOT EXISTS templates_seq_delete AFTER DELETE ON templates BEGIN
    DELETE FROM template_seq WHERE tenant = OLD.tenant AND subject = OLD.subject AND
        purpose = OLD.purpose AND scheme = OLD.scheme; END;
CREATE TABLE IF NOT EXISTS he_snapshots (
    tenant TEXT NOT NULL, purpose TEXT NOT NULL, scheme TEXT NOT NULL, epoch INTEGER NOT NULL,
    fingerprint TEXT NOT NULL, seq INTEGER NOT NULL, subjects TEXT NOT NULL, snapshot BLOB NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (tenant, purpose, scheme, epoch));
"""
# template_seq: a never-reused sequence number per stored template row (SQLite AUTOINCREMENT),
# kept by triggers so that every writer (service, CLI, older code paths) maintains it. An HE
# identify gallery snapshot records the sequence number of each template it holds; on start only
# the rows whose number is not in the snapshot are expanded again (engine/service/README.md).
# he_snapshots: packed ciphertext state of an HE identify gallery (public data only: ciphertexts
# + slot tables; no key material), one row per (tenant, purpose, scheme, epoch).


@dataclass
class TemplateRow:
    tenant: str
    subject: str
    purpose: str
    scheme: str
    key_version: int
    template: bytes
    enrolled_at: float
    expires_at: float


class Tx:
    """An open write transaction: the connection plus an audit appender."""

    def __init__(self, store: Store, conn: sqlite3.Connection) -> None:
        self.store, self.conn = store, conn
        self.execute = conn.execute

    def audit(self, ev: AuditEvent, result: str = "OK", reason: str = "") -> int:
        self.store._head = audit_mod.append(self.conn, self.store._head, self.store.clock.now(),
                                            ev, result, reason)
        return self.store._head[0]


class Store:
    """The SQLite store. ``path`` is a directory (``veilface.db`` inside) or a ``.db`` file."""

    def __init__(self, path: str | os.PathLike, clock: Clock | None = None) -> None:
        path = Path(path)
        if path.suffix != ".db":
            path.mkdir(parents=True, exist_ok=True)
            path = path / DB_NAME
        self.path = path
        self.clock = clock or SystemClock()
        self._wlock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._wconn = self._connect()
        with self._wlock:
            self._wconn.executescript(SCHEMA + audit_mod.SCHEMA)
            self._wconn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                (str(SCHEMA_VERSION),))
            # databases made before template_seq existed: number their templates once, in row order
            self._wconn.execute("INSERT OR IGNORE INTO template_seq (tenant, subject, purpose, scheme) "
                                "SELECT tenant, subject, purpose, scheme FROM templates ORDER BY rowid")
            self._head = audit_mod.read_head(self._wconn)
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")      # a commit is on disk before we acknowledge
        conn.execute("PRAGMA secure_delete=ON")      # deleted templates are overwritten
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    # -- transactions ------------------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[Tx]:
        with self._wlock:
            conn = self._wconn
            head = self._head
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self, conn)
            except BaseException:
                conn.execute("ROLLBACK")
                self._head = head
                raise
            else:
                conn.execute("COMMIT")

    def read(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._wlock:
                self._readers.append(conn)
        return conn

    def audit(self, ev: AuditEvent, result: str = "OK", reason: str = "") -> int:
        """Append one audit entry in its own (durable) transaction."""
        with self.write() as tx:
            return tx.audit(ev, result, reason)

    def checkpoint(self) -> None:
        """Fold the WAL into the database and truncate it (so deleted pages leave the WAL)."""
        with self._wlock:
            self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def vacuum(self) -> None:
        with self._wlock:
            self._wconn.execute("VACUUM")
            self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._wlock:
            for c in self._readers:
                try:
                    c.close()
                except sqlite3.Error:
                    pass
            self._readers.clear()
            self._wconn.close()

    # -- meta ----------------------------------------------------------------------------
    def get_meta(self, key: str, default: str = "") -> str:
        row = self.read().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    @staticmethod
    def set_meta(tx: Tx, key: str, value: str) -> None:
        tx.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                   (key, str(value)))

    def decommissioned(self) -> bool:
        return self.get_meta("decommissioned") == "1"

    # -- loading -------------------------------------------------------------------------
    def iter_templates(self, now: float | None = None) -> Iterator[TemplateRow]:
        """Every stored template (not yet expired at ``now`` if given), in enrolment order."""
        sql = ("SELECT tenant, subject, purpose, scheme, key_version, template, enrolled_at, "
               "expires_at FROM templates")
        args: tuple = ()
        if now is not None:
            sql += " WHERE expires_at > ?"
            args = (now,)
        for r in self.read().execute(sql + " ORDER BY rowid", args):
            yield TemplateRow(r[0], r[1], r[2], r[3], int(r[4]), bytes(r[5]), r[6], r[7])

    def template_index(self) -> list[tuple]:
        """``(rowid, tenant, subject, purpose, scheme, key_version, expires_at, seq, template)``
        of every stored template in enrolment order; ``template`` is None for HE templates (fetch
        those with :meth:`template_blob` only when needed: ~262 KB each in identify mode)."""
        return self.read().execute(
            "SELECT t.rowid, t.tenant, t.subject, t.purpose, t.scheme, t.key_version, t.expires_at, q.seq, "
            "CASE WHEN substr(t.scheme, 1, 3) = 'he/' THEN NULL ELSE t.template END FROM templates t "
            "LEFT JOIN template_seq q ON q.tenant = t.tenant AND q.subject = t.subject AND "
            "q.purpose = t.purpose AND q.scheme = t.scheme ORDER BY t.rowid").fetchall()

    def template_blob(self, rowid: int) -> bytes | None:
        row = self.read().execute("SELECT template FROM templates WHERE rowid = ?", (rowid,)).fetchone()
        return None if row is None else bytes(row[0])

    def he_snapshot(self, tenant: str, purpose: str, scheme: str, epoch: int) -> tuple | None:
        """``(fingerprint, seq, {subject: seq}, snapshot bytes)`` of a stored HE gallery snapshot."""
        row = self.read().execute("SELECT fingerprint, seq, subjects, snapshot FROM he_snapshots WHERE "
                                  "tenant = ? AND purpose = ? AND scheme = ? AND epoch = ?",
                                  (tenant, purpose, scheme, epoch)).fetchone()
        if row is None:
            return None
        return row[0], int(row[1]), json.loads(row[2]), bytes(row[3])

    def subject_versions(self) -> dict[tuple[str, str], tuple[int, int]]:
        """``{(tenant, subject): (key_version, revoked_upto)}``."""
        return {(t, s): (int(k), int(r)) for t, s, k, r in
                self.read().execute("SELECT tenant, subject, key_version, revoked_upto FROM subjects")}

    # -- audit ---------------------------------------------------------------------------
    def verify_audit(self) -> audit_mod.ChainReport:
        return audit_mod.verify_chain(self.read())

    def audit_entries(self, after_seq: int = 0, limit: int = 100, action: str = "",
                      subject: str = "") -> list[dict]:
        sql = (f"SELECT {', '.join(audit_mod.FIELDS)}, prev_hash, hash FROM audit WHERE seq > ?")
        args: list = [after_seq]
        if action:
            sql += " AND action = ?"
            args.append(action)
        if subject:
            sql += " AND subject = ?"
            args.append(subject)
        sql += " ORDER BY seq LIMIT ?"
        args.append(int(limit))
        cols = audit_mod.FIELDS + ("prev_hash", "hash")
        return [dict(zip(cols, r)) for r in self.read().execute(sql, args)]

    def audit_head(self) -> tuple[int, str]:
        return audit_mod.read_head(self.read())

    # -- retention -----------------------------------------------------------------------
    def next_expiry(self) -> float | None:
        row = self.read().execute("SELECT MIN(expires_at) FROM templates").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def purge_expired(self, now: float, actor: tuple[str, str] = ("system", "retention")) -> list[tuple]:
        """Delete every template whose expiry has passed; one audit entry per subject.

        Returns the purged ``(tenant, subject, purpose, scheme)`` keys.
        """
        with self.write() as tx:
            rows = tx.execute("SELECT tenant, subject, purpose, scheme FROM templates "
                              "WHERE expires_at <= ?", (now,)).fetchall()
            if not rows:
                return []
            tx.execute("DELETE FROM templates WHERE expires_at <= ?", (now,))
            per_subject: dict[tuple[str, str], int] = {}
            for t, s, _, _ in rows:
                per_subject[(t, s)] = per_subject.get((t, s), 0) + 1
            for (t, s), n in per_subject.items():
                tx.audit(AuditEvent("RETENTION_PURGE", actor[0], actor[1], t, s,
                                    details={"templates_purged": n}))
            total = int(self.get_meta_tx(tx, "purged_total", "0")) + len(rows)
            self.set_meta(tx, "purged_total", str(total))
        return [tuple(r) for r in rows]

    @staticmethod
    def get_meta_tx(tx: Tx, key: str, default: str = "") -> str:
        row = tx.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def purge_requests(self, older_than: float) -> int:
        with self.write() as tx:
            return tx.execute("DELETE FROM requests WHERE created_at < ?", (older_than,)).rowcount

    # -- reporting -----------------------------------------------------------------------
    def counts(self) -> dict:
        c = self.read()
        one = lambda sql, *a: c.execute(sql, a).fetchone()[0] or 0  # noqa: E731
        return {
            "persons_stored": one("SELECT COUNT(*) FROM (SELECT DISTINCT tenant, subject FROM templates)"),
            "templates_stored": one("SELECT COUNT(*) FROM templates"),
            "devices": one("SELECT COUNT(*) FROM devices"),
            "private_space_devices": one("SELECT COUNT(*) FROM devices WHERE location_class = 3"),
            "consents_active": one("SELECT COUNT(*) FROM consents WHERE withdrawn_at IS NULL"),
            "alerts": one("SELECT COUNT(*) FROM audit WHERE action = 'INTRUSION_ALERT'"),
            "purged_total": int(self.get_meta("purged_total", "0")),
        }

    def expired_pending(self, now: float) -> int:
        return self.read().execute("SELECT COUNT(*) FROM templates WHERE expires_at <= ?",
                                   (now,)).fetchone()[0]

    def processing_records(self) -> list[dict]:
        c = self.read()
        out: dict[str, dict] = {}
        for purpose, subjects, templates in c.execute(
                "SELECT purpose, COUNT(DISTINCT tenant || '/' || subject), COUNT(*) FROM templates GROUP BY purpose"):
            out.setdefault(purpose, {})["subjects"] = subjects
            out[purpose]["templates"] = templates
        names = {"Enroll": "enrolments", "Verify": "verifications", "Identify": "identifications",
                 "Withdraw": "withdrawals"}
        for action, purpose, n in c.execute(
                "SELECT action, purpose, COUNT(*) FROM audit WHERE result = 'OK' AND action IN "
                "('Enroll', 'Verify', 'Identify', 'Withdraw') AND purpose != '' GROUP BY action, purpose"):
            out.setdefault(purpose, {})[names[action]] = n
        # withdrawals are per subject, not per purpose: count them under every purpose of the subject
        return [{"purpose": p, **{k: v.get(k, 0) for k in ("subjects", "templates", "enrolments",
                                                           "verifications", "identifications", "withdrawals")}}
                for p, v in sorted(out.items())]

    def filing_alert(self) -> dict | None:
        row = self.read().execute("SELECT raised_at, data FROM alerts WHERE kind = 'filing' "
                                  "ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return None
        return {"raised_at": row[0], **json.loads(row[1])}
