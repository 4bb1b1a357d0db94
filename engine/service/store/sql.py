"""One SQL implementation of :class:`Store`, parameterised by a small :class:`Dialect`.

The queries are written once, portably (explicit id columns instead of ``rowid``, ``ON CONFLICT``
upserts, aggregation in Python instead of ``json_group_array``, ``?`` placeholders converted by
the dialect), so a PostgreSQL store is a dialect plus connection handling, not a second copy of
every query. Subclasses provide the connections (:meth:`SQLStore._reading`,
:meth:`SQLStore._writing`, :meth:`SQLStore._read_tx`), the maintenance hooks and the per-dialect
migrations.

This module is long because it holds every query of the matcher (the point of the store
package: no SQL anywhere else); :class:`SQLTx` is the write side, :class:`SQLStore` the reads.
"""
from __future__ import annotations

import functools
import json
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from typing import ClassVar

from ..audit import GENESIS, AuditEvent, AuditKey, AuditRow, ChainReport, next_entry, verify_chain
from ..clock import Clock
from .base import (
    HE_PREFIX,
    ConsentRow,
    DeviceRow,
    ExportView,
    FilingAlert,
    GalleryRow,
    GallerySummary,
    HEContextRow,
    HEContextSummary,
    HEEpoch,
    HESnapshotRow,
    ProcessingRecord,
    QuarantineRow,
    RequestRow,
    SampleRow,
    Store,
    StoreConflict,
    StoreCounts,
    StoreError,
    SubjectRow,
    SubjectSummary,
    TemplateIndexRow,
    TemplateKey,
    TemplateRow,
    WipeCounts,
    WriteTx,
    subject_hash,
)
from .measures import OffDeviceConsentRow  # pg2: the export view reads them
from .measures_sql import MeasuresSQLReads, MeasuresSQLTx, measures_schema  # measures (issue 15)

SCHEMA_VERSION = 2
PRIVATE_SPACE = 3            # policy.PRIVATE_SPACE (mirrors veilface.v1.LocationClass)
_HE = f"substr(scheme, 1, {len(HE_PREFIX)}) = '{HE_PREFIX}'"   # SQL predicate: an ``he`` template


@dataclass(frozen=True)
class Dialect:
    """What differs between SQL engines, and nothing else."""

    name: str
    placeholder: str = "?"          # "?" (sqlite3) or "%s" (psycopg)
    blob: str = "BLOB"              # "BYTEA"
    real: str = "REAL"              # a float64 column: "DOUBLE PRECISION" (PostgreSQL REAL is float32)
    bigint: str = "INTEGER"         # "BIGINT"
    auto_id: str = "INTEGER PRIMARY KEY AUTOINCREMENT"   # never-reused id: "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    for_update: str = ""            # row lock on the audit head: " FOR UPDATE" (SQLite locks the file)
    extra_ddl: tuple[str, ...] = ()  # e.g. the audit log's append-only triggers
    integrity_errors: tuple[type, ...] = ()   # the driver's unique-violation errors -> StoreConflict
    array_params: bool = False      # "col = ANY(?)" with one array parameter (PostgreSQL)

    def any_of(self, column: str, values: Sequence) -> Iterator[tuple[str, list]]:
        """``(condition, args)`` pairs that together select ``column`` in ``values``: one
        ``= ANY(?)`` with an array (PostgreSQL: one statement, one plan, however many values), or
        ``IN (?, ...)`` lists of at most 500 (SQLite's parameter limit)."""
        values = list(dict.fromkeys(values))
        if self.array_params:
            if values:
                yield f"{column} = ANY(?)", [values]
            return
        for part in _chunks(values):
            yield f"{column} IN {_in(len(part))}", list(part)

    def sql(self, text: str) -> str:
        """``text`` with ``?`` placeholders in this dialect's style (the queries hold no literal '?')."""
        return _convert(self.placeholder, text)

    def upsert(self, table: str, columns: tuple[str, ...], key: tuple[str, ...], update: tuple[str, ...]) -> str:
        """INSERT of ``columns`` that updates ``update`` on a conflict of ``key``."""
        sets = ", ".join(f"{c} = excluded.{c}" for c in update)
        return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}")


@functools.lru_cache(maxsize=1024)
def _convert(placeholder: str, text: str) -> str:
    return text if placeholder == "?" else text.replace("?", placeholder)


META_DDL = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


@dataclass(frozen=True)
class AddColumn:
    """A named, additive schema step: ``table`` gains ``column`` (``ddl`` = its type and default,
    dialect fields as in :func:`schema`, e.g. ``"{real} NOT NULL DEFAULT 0"``).

    New tables need no step (:func:`schema` creates them with ``IF NOT EXISTS``); a new column of an
    existing table goes into its ``CREATE TABLE`` in :func:`schema` (fresh stores) **and** into
    :data:`COLUMN_STEPS` (stores made before it). Steps are recorded by name in ``meta``, so
    features developed in parallel each append their own step without renumbering anything.
    """

    name: str
    table: str
    column: str
    ddl: str

    def statement(self, d: Dialect) -> str:
        return (f"ALTER TABLE {self.table} ADD COLUMN {self.column} "
                + self.ddl.format(real=d.real, blob=d.blob, bigint=d.bigint))

    def apply(self, conn, d: Dialect) -> None:
        conn.execute(self.statement(d))


@dataclass(frozen=True)
class TableStep:
    """A named schema step that is more than one added column (``fn(conn, dialect)``), recorded
    in ``meta`` like :class:`AddColumn`; ``fn`` must leave a store that already has the change as is."""

    name: str
    table: str
    fn: Callable

    def apply(self, conn, d: Dialect) -> None:
        self.fn(conn, d)


# api: templates gain ``gallery`` and ``sample_id`` (named galleries, several samples per subject), and
# the uniqueness of a template moves from (tenant, subject, purpose, scheme) to that plus the two.
_SAMPLE_UNIQUE = "UNIQUE (tenant, subject, purpose, scheme, gallery, sample_id)"


def _templates_gallery_sample(conn, d: Dialect) -> None:
    if d.name != "sqlite":
        cols = {r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns "
                                           "WHERE table_name = 'templates'").fetchall()}
        if "sample_id" in cols:
            return
        conn.execute("ALTER TABLE templates ADD COLUMN gallery TEXT NOT NULL DEFAULT ''")
        conn.execute("ALTER TABLE templates ADD COLUMN sample_id TEXT NOT NULL DEFAULT ''")
        conn.execute("ALTER TABLE templates DROP CONSTRAINT IF EXISTS templates_tenant_subject_purpose_scheme_key")
        conn.execute(f"ALTER TABLE templates ADD CONSTRAINT templates_sample_key {_SAMPLE_UNIQUE}")
        return
    # SQLite cannot drop a UNIQUE constraint: rebuild the table from its own columns (whatever steps
    # added them), keeping every id and the id counter (HE snapshots record ids)
    info = conn.execute("PRAGMA table_info(templates)").fetchall()     # cid, name, type, notnull, dflt, pk
    names = [r[1] for r in info]
    if "sample_id" in names:
        return
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'templates'").fetchone()
    issued = int(row[0]) if row else 0
    defs = [f"id {d.auto_id}" if name == "id" else
            f"{name} {typ}" + (" NOT NULL" if notnull else "") + (f" DEFAULT {dflt}" if dflt is not None else "")
            for _, name, typ, notnull, dflt, _ in info]
    defs += ["gallery TEXT NOT NULL DEFAULT ''", "sample_id TEXT NOT NULL DEFAULT ''", _SAMPLE_UNIQUE]
    conn.execute("DROP INDEX IF EXISTS templates_expiry")
    conn.execute("ALTER TABLE templates RENAME TO templates_before_samples")
    conn.execute(f"CREATE TABLE templates ({', '.join(defs)})")
    cols = ", ".join(names)
    conn.execute(f"INSERT INTO templates ({cols}) SELECT {cols} FROM templates_before_samples ORDER BY id")
    conn.execute("DROP TABLE templates_before_samples")
    if conn.execute("SELECT 1 FROM sqlite_sequence WHERE name = 'templates'").fetchone():
        conn.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'templates'", (issued,))
    else:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('templates', ?)", (issued,))


#: every additive schema step, in the order they were introduced (append only; names never reused)
COLUMN_STEPS: tuple[AddColumn | TableStep, ...] = (
    # pg: the subject's shard hash (base.subject_hash), so a gallery shard selects its rows in SQL;
    # NULL in rows stored before it (a shard then filters those in Python)
    AddColumn("pg_shard_hash", "templates", "shard_hash", "{bigint}"),
    TableStep("api_templates_gallery_sample", "templates", _templates_gallery_sample),
)


def schema(d: Dialect) -> list[str]:
    """The current schema (version :data:`SCHEMA_VERSION`), idempotent (``IF NOT EXISTS``)."""
    r, b, big, aid = d.real, d.blob, d.bigint, d.auto_id
    return [
        META_DDL,
        f"CREATE TABLE IF NOT EXISTS devices (tenant TEXT NOT NULL, device_id TEXT NOT NULL, "
        f"location_class INTEGER NOT NULL, location_kind TEXT NOT NULL, signage INTEGER NOT NULL, "
        f"registered_at {r} NOT NULL, PRIMARY KEY (tenant, device_id))",
        f"CREATE TABLE IF NOT EXISTS consents (consent_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
        f"subject TEXT NOT NULL, purpose TEXT NOT NULL, notice_version TEXT NOT NULL, consented_at {r} NOT NULL, "
        f"age INTEGER NOT NULL, minor INTEGER NOT NULL, guardian_ref TEXT NOT NULL, "
        f"guardian_relationship TEXT NOT NULL, guardian_at {r} NOT NULL, device TEXT NOT NULL, withdrawn_at {r})",
        "CREATE INDEX IF NOT EXISTS consents_subject ON consents(tenant, subject)",
        f"CREATE TABLE IF NOT EXISTS subjects (tenant TEXT NOT NULL, subject TEXT NOT NULL, "
        f"key_version INTEGER NOT NULL, revoked_upto INTEGER NOT NULL, updated_at {r} NOT NULL, "
        f"PRIMARY KEY (tenant, subject))",
        TEMPLATES_DDL.replace("UNIQUE (", f"shard_hash {big}, UNIQUE (").format(table="templates", auto_id=aid,
                                                                                real=r, blob=b),
        "CREATE INDEX IF NOT EXISTS templates_expiry ON templates(expires_at)",
        f"CREATE TABLE IF NOT EXISTS requests (tenant TEXT NOT NULL, request_id TEXT NOT NULL, method TEXT NOT NULL, "
        f"principal TEXT NOT NULL, request_hash TEXT NOT NULL, response {b} NOT NULL, created_at {r} NOT NULL, "
        f"PRIMARY KEY (tenant, method, request_id))",
        f"CREATE TABLE IF NOT EXISTS he_contexts (tenant TEXT NOT NULL, purpose TEXT NOT NULL, scheme TEXT NOT NULL, "
        f"epoch INTEGER NOT NULL, mode TEXT NOT NULL, dim INTEGER NOT NULL, fingerprint TEXT NOT NULL, "
        f"eval_keys INTEGER NOT NULL, context {b} NOT NULL, registered_at {r} NOT NULL, retired_at {r}, "
        f"PRIMARY KEY (tenant, purpose, scheme, epoch))",
        f"CREATE TABLE IF NOT EXISTS alerts (id {aid}, kind TEXT NOT NULL, raised_at {r} NOT NULL, data TEXT NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS he_snapshots (tenant TEXT NOT NULL, purpose TEXT NOT NULL, scheme TEXT NOT NULL, "
        f"epoch INTEGER NOT NULL, fingerprint TEXT NOT NULL, seq {big} NOT NULL, subjects TEXT NOT NULL, "
        f"snapshot {b} NOT NULL, created_at {r} NOT NULL, PRIMARY KEY (tenant, purpose, scheme, epoch))",
        f"CREATE TABLE IF NOT EXISTS audit (seq {big} PRIMARY KEY, ts {r} NOT NULL, actor_role TEXT NOT NULL, "
        f"actor TEXT NOT NULL, action TEXT NOT NULL, tenant TEXT NOT NULL, subject TEXT NOT NULL, "
        f"purpose TEXT NOT NULL, device TEXT NOT NULL, result TEXT NOT NULL, reason TEXT NOT NULL, "
        f"details TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS audit_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq {big} NOT NULL, "
        f"hash TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS audit_action ON audit(action)",
        *measures_schema(d),   # measures: assessments, off-device consents, oversight, terminations
        # harden: rows that failed validation at startup (kept for the operator, deleted like templates)
        f"CREATE TABLE IF NOT EXISTS quarantine (id {aid}, kind TEXT NOT NULL, tenant TEXT NOT NULL, "
        f"subject TEXT NOT NULL, purpose TEXT NOT NULL, scheme TEXT NOT NULL, key_version {big} NOT NULL, "
        f"source_id {big} NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, blob {b} NOT NULL, "
        f"quarantined_at {r} NOT NULL, expires_at {r} NOT NULL)",
        # api: named galleries (their samples are templates rows with gallery and sample_id set)
        f"CREATE TABLE IF NOT EXISTS galleries (tenant TEXT NOT NULL, name TEXT NOT NULL, purpose TEXT NOT NULL, "
        f"scheme TEXT NOT NULL, description TEXT NOT NULL, created_at {r} NOT NULL, created_by TEXT NOT NULL, "
        f"PRIMARY KEY (tenant, name))",
        "CREATE INDEX IF NOT EXISTS templates_gallery ON templates(tenant, gallery, subject)",
        *d.extra_ddl,
    ]


# TEMPLATES_DDL is the schema-2 shape (the SQLite 1 -> 2 migration makes it); columns added since are
# spliced in by schema() and added to older stores by COLUMN_STEPS.
# templates.id: a never-reused id per stored template; an HE identify gallery snapshot records the
# id of each template it holds, so a restart expands only the rows whose id is not in it
TEMPLATES_DDL = (
    "CREATE TABLE IF NOT EXISTS {table} (id {auto_id}, tenant TEXT NOT NULL, subject TEXT NOT NULL, "
    "purpose TEXT NOT NULL, scheme TEXT NOT NULL, key_version INTEGER NOT NULL, template {blob} NOT NULL, "
    "enrolled_at {real} NOT NULL, expires_at {real} NOT NULL, consent_id TEXT NOT NULL, device TEXT NOT NULL, "
    "gallery TEXT NOT NULL DEFAULT '', sample_id TEXT NOT NULL DEFAULT '', " + _SAMPLE_UNIQUE + ")")

_AUDIT_COLS = tuple(f.name for f in fields(AuditRow))
_CONSENT_COLS = tuple(f.name for f in fields(ConsentRow))
_DEVICE_COLS = tuple(f.name for f in fields(DeviceRow))
_TEMPLATE_COLS = tuple(f.name for f in fields(TemplateRow) if f.name != "id")
_TEMPLATE_INSERT_COLS = (*_TEMPLATE_COLS, "shard_hash")
_HE_CONTEXT_COLS = tuple(f.name for f in fields(HEContextRow))
_REQUEST_COLS = tuple(f.name for f in fields(RequestRow))
_SNAPSHOT_COLS = tuple(f.name for f in fields(HESnapshotRow))
_WIPED = ("templates", "subjects", "consents", "requests", "he_contexts", "he_snapshots", "galleries")
_QUARANTINE_COLS = ("id", "kind", "tenant", "subject", "purpose", "scheme", "key_version", "source_id", "reason",
                    "detail", "quarantined_at", "expires_at")
# harden: meta keys of the keyed audit chain
_AUDIT_KEY_ID, _AUDIT_SWITCH = "audit_key_id", "audit_keyed_from"
NO_EXPIRY = 253_402_300_799.0        # 9999-12-31: a quarantined context has no retention of its own
_GALLERY_COLS = tuple(f.name for f in fields(GalleryRow))


def _consent(r) -> ConsentRow:
    return ConsentRow(r[0], r[1], r[2], r[3], r[4], float(r[5]), int(r[6]), bool(r[7]), r[8], r[9], float(r[10]),
                      r[11], None if r[12] is None else float(r[12]))


def _template_values(row: TemplateRow) -> list:
    return [*(getattr(row, c) for c in _TEMPLATE_COLS), subject_hash(row.tenant, row.subject)]


def _in(n: int) -> str:
    """``(?, ?, ...)`` for an IN list of ``n`` values."""
    return "(" + ", ".join("?" * n) + ")"


def _chunks(items: Sequence, n: int = 500) -> Iterator[Sequence]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _template(r) -> TemplateRow:
    return TemplateRow(r[1], r[2], r[3], r[4], int(r[5]), bytes(r[6]), float(r[7]), float(r[8]), r[9], r[10], int(r[0]),
                       r[11], r[12])


def _gallery(r) -> GalleryRow:
    return GalleryRow(r[0], r[1], r[2], r[3], r[4], float(r[5]), r[6])


# -- writes ------------------------------------------------------------------------------------------
class SQLTx(MeasuresSQLTx, WriteTx):
    """A write transaction on one connection (opened and committed by :meth:`SQLStore.transaction`)."""

    def __init__(self, conn, dialect: Dialect, clock: Clock, audit_key: AuditKey | None = None,
                 keyed: bool = False) -> None:
        self.conn, self.d, self.clock = conn, dialect, clock
        self._head: tuple[int, str] | None = None
        self.audit_key, self._keyed = audit_key, keyed     # harden: keyed audit chain

    def _x(self, sql: str, args=()):
        try:
            return self.conn.execute(self.d.sql(sql), tuple(args))
        except self.d.integrity_errors as exc:
            raise StoreConflict(str(exc)) from None

    def _one(self, sql: str, args=()):
        return self._x(sql, args).fetchone()

    def _meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self._x(self.d.upsert("meta", ("key", "value"), ("key",), ("value",)), (key, str(value)))

    # meta
    def decommissioned(self) -> bool:
        return self._meta("decommissioned") == "1"

    def mark_decommissioned(self) -> None:
        self.set_meta("decommissioned", "1")

    def add_purged(self, n: int) -> None:
        self._x("INSERT INTO meta (key, value) VALUES ('purged_total', ?) ON CONFLICT (key) DO UPDATE SET "
                "value = CAST(CAST(meta.value AS BIGINT) + CAST(excluded.value AS BIGINT) AS TEXT)", (str(int(n)),))

    # devices
    def insert_device(self, row: DeviceRow) -> bool:
        cur = self._x(f"INSERT INTO devices ({', '.join(_DEVICE_COLS)}) VALUES ({', '.join('?' * len(_DEVICE_COLS))}) "
                      f"ON CONFLICT (tenant, device_id) DO NOTHING",
                      (row.tenant, row.device_id, int(row.location_class), row.location_kind, int(row.signage),
                       row.registered_at))
        return cur.rowcount == 1

    # consents
    def insert_consent(self, row: ConsentRow) -> None:
        vals = [getattr(row, c) for c in _CONSENT_COLS]
        vals[_CONSENT_COLS.index("minor")] = int(row.minor)
        self._x(f"INSERT INTO consents ({', '.join(_CONSENT_COLS)}) VALUES ({', '.join('?' * len(_CONSENT_COLS))})", vals)

    def consent(self, consent_id: str) -> ConsentRow | None:
        r = self._one(f"SELECT {', '.join(_CONSENT_COLS)} FROM consents WHERE consent_id = ?", (consent_id,))
        return None if r is None else _consent(r)

    def withdraw_consents(self, tenant: str, subject: str, at: float) -> int:
        return self._x("UPDATE consents SET withdrawn_at = ? WHERE tenant = ? AND subject = ? AND withdrawn_at IS NULL",
                       (at, tenant, subject)).rowcount

    # subjects
    def subject(self, tenant: str, subject: str) -> SubjectRow | None:
        r = self._one("SELECT key_version, revoked_upto, updated_at FROM subjects WHERE tenant = ? AND subject = ?",
                      (tenant, subject))
        return None if r is None else SubjectRow(tenant, subject, int(r[0]), int(r[1]), float(r[2]))

    def put_subject(self, row: SubjectRow) -> None:
        self._x(self.d.upsert("subjects", ("tenant", "subject", "key_version", "revoked_upto", "updated_at"),
                              ("tenant", "subject"), ("key_version", "revoked_upto", "updated_at")),
                (row.tenant, row.subject, row.key_version, row.revoked_upto, row.updated_at))

    # templates
    def has_template(self, tenant: str, subject: str, purpose: str, scheme: str) -> bool:
        return self._one("SELECT 1 FROM templates WHERE tenant = ? AND subject = ? AND purpose = ? AND scheme = ? "
                         "AND gallery = ''", (tenant, subject, purpose, scheme)) is not None

    def insert_template(self, row: TemplateRow) -> int:
        return int(self._one(f"INSERT INTO templates ({', '.join(_TEMPLATE_INSERT_COLS)}) VALUES "
                             f"({', '.join('?' * len(_TEMPLATE_INSERT_COLS))}) RETURNING id", _template_values(row))[0])

    def delete_subject_templates(self, tenant: str, subject: str) -> int:
        self._x("DELETE FROM quarantine WHERE tenant = ? AND subject = ?", (tenant, subject))   # harden
        return self._x("DELETE FROM templates WHERE tenant = ? AND subject = ?", (tenant, subject)).rowcount

    def delete_he_templates(self, tenant: str, subject: str) -> int:
        return self._x(f"DELETE FROM templates WHERE tenant = ? AND subject = ? AND {_HE}", (tenant, subject)).rowcount

    def delete_templates_upto(self, tenant: str, subject: str, key_version: int) -> int:
        return self._x(f"DELETE FROM templates WHERE tenant = ? AND subject = ? AND key_version <= ? AND NOT {_HE}",
                       (tenant, subject, key_version)).rowcount

    def delete_epoch_templates(self, tenant: str, purpose: str, scheme: str, before_epoch: int) -> list[str]:
        where = "tenant = ? AND purpose = ? AND scheme = ? AND key_version < ?"
        args = (tenant, purpose, scheme, before_epoch)
        gone = [r[0] for r in self._x(f"SELECT subject FROM templates WHERE {where}", args).fetchall()]
        self._x(f"DELETE FROM templates WHERE {where}", args)
        return gone

    def expired_templates(self, now: float) -> list[TemplateKey]:
        return [TemplateKey(*r) for r in self._x(
            "SELECT tenant, subject, purpose, scheme, gallery, sample_id FROM templates WHERE expires_at <= ? ORDER BY id",
            (now,)).fetchall()]

    def delete_expired(self, now: float) -> int:
        self._x("DELETE FROM quarantine WHERE expires_at <= ?", (now,))        # harden: retention applies there too
        return self._x("DELETE FROM templates WHERE expires_at <= ?", (now,)).rowcount

    # idempotent requests
    def request(self, tenant: str, method: str, request_id: str) -> RequestRow | None:
        r = self._one(f"SELECT {', '.join(_REQUEST_COLS)} FROM requests WHERE tenant = ? AND method = ? AND request_id = ?",
                      (tenant, method, request_id))
        return None if r is None else RequestRow(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), float(r[6]))

    def insert_request(self, row: RequestRow) -> None:
        self._x(f"INSERT INTO requests ({', '.join(_REQUEST_COLS)}) VALUES ({', '.join('?' * len(_REQUEST_COLS))})",
                [getattr(row, c) for c in _REQUEST_COLS])

    # HE contexts
    def current_he_epoch(self, tenant: str, purpose: str, scheme: str) -> HEEpoch | None:
        r = self._one("SELECT epoch, fingerprint FROM he_contexts WHERE tenant = ? AND purpose = ? AND scheme = ? "
                      "AND retired_at IS NULL", (tenant, purpose, scheme))
        return None if r is None else HEEpoch(int(r[0]), r[1])

    def max_retired_he_epoch(self, tenant: str, purpose: str, scheme: str) -> int:
        return int(self._one("SELECT COALESCE(MAX(epoch), 0) FROM he_contexts WHERE tenant = ? AND purpose = ? AND "
                             "scheme = ? AND retired_at IS NOT NULL", (tenant, purpose, scheme))[0])

    def insert_he_context(self, row: HEContextRow) -> None:
        vals = [getattr(row, c) for c in _HE_CONTEXT_COLS]
        vals[_HE_CONTEXT_COLS.index("eval_keys")] = int(row.eval_keys)
        self._x(f"INSERT INTO he_contexts ({', '.join(_HE_CONTEXT_COLS)}) VALUES "
                f"({', '.join('?' * len(_HE_CONTEXT_COLS))})", vals)

    def retire_he_contexts(self, tenant: str, purpose: str, scheme: str, before_epoch: int, at: float) -> int:
        return self._x("UPDATE he_contexts SET context = ?, retired_at = ? WHERE tenant = ? AND purpose = ? AND "
                       "scheme = ? AND epoch < ? AND retired_at IS NULL",
                       (b"", at, tenant, purpose, scheme, before_epoch)).rowcount

    # HE snapshots
    def put_he_snapshot(self, row: HESnapshotRow) -> None:
        vals = [getattr(row, c) for c in _SNAPSHOT_COLS]
        vals[_SNAPSHOT_COLS.index("subjects")] = json.dumps(row.subjects, separators=(",", ":"))
        self._x(self.d.upsert("he_snapshots", _SNAPSHOT_COLS, ("tenant", "purpose", "scheme", "epoch"),
                              ("fingerprint", "seq", "subjects", "snapshot", "created_at")), vals)

    def delete_he_snapshots(self, tenant: str, purpose: str, scheme: str, before_epoch: int) -> int:
        return self._x("DELETE FROM he_snapshots WHERE tenant = ? AND purpose = ? AND scheme = ? AND epoch < ?",
                       (tenant, purpose, scheme, before_epoch)).rowcount

    def delete_he_snapshot(self, tenant: str, purpose: str, scheme: str, epoch: int) -> int:
        return self._x("DELETE FROM he_snapshots WHERE tenant = ? AND purpose = ? AND scheme = ? AND epoch = ?",
                       (tenant, purpose, scheme, epoch)).rowcount

    def delete_all_he_snapshots(self) -> int:
        return self._x("DELETE FROM he_snapshots").rowcount

    # alerts
    def insert_filing_alert(self, alert: FilingAlert) -> None:
        data = json.dumps({"deadline": alert.deadline, "persons": alert.persons, "threshold": alert.threshold})
        self._x("INSERT INTO alerts (kind, raised_at, data) VALUES ('filing', ?, ?)", (alert.raised_at, data))

    # audit
    def audit(self, ev: AuditEvent, result: str = "OK", reason: str = "") -> int:
        if self._head is None:   # read (and lock) the head once per transaction: other writers may share the store
            r = self._one("SELECT seq, hash FROM audit_head WHERE id = 1" + self.d.for_update)
            self._head = (0, GENESIS) if r is None else (int(r[0]), str(r[1]))
        if self._keyed and self.audit_key is None:
            raise StoreError("this store's audit chain is keyed: attach the audit key before writing to it",
                             reason="AUDIT_KEY_MISSING")
        row = next_entry(self._head, self.clock.now(), ev, result, reason, self.audit_key)
        self._x(f"INSERT INTO audit ({', '.join(_AUDIT_COLS)}) VALUES ({', '.join('?' * len(_AUDIT_COLS))})",
                [getattr(row, c) for c in _AUDIT_COLS])
        self._x(self.d.upsert("audit_head", ("id", "seq", "hash"), ("id",), ("seq", "hash")), (1, row.seq, row.hash))
        self._head = (row.seq, row.hash)
        ev.written = True
        return row.seq

    # pg: replicas and bulk enrolment
    def count_persons(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM (SELECT DISTINCT tenant, subject FROM templates) AS persons")[0])

    def filing_raised(self) -> bool:
        return self._one("SELECT 1 FROM alerts WHERE kind = 'filing' LIMIT 1") is not None

    def consents(self, consent_ids: Sequence[str]) -> dict[str, ConsentRow]:
        out: dict[str, ConsentRow] = {}
        for cond, args in self.d.any_of("consent_id", consent_ids):
            for r in self._x(f"SELECT {', '.join(_CONSENT_COLS)} FROM consents WHERE {cond}", args).fetchall():
                out[r[0]] = _consent(r)
        return out

    def subject_states(self, tenant: str, subjects: Sequence[str]) -> dict[str, SubjectRow]:
        out: dict[str, SubjectRow] = {}
        for cond, args in self.d.any_of("subject", subjects):
            for r in self._x(f"SELECT subject, key_version, revoked_upto, updated_at FROM subjects WHERE tenant = ? "
                             f"AND {cond}", [tenant, *args]).fetchall():
                out[r[0]] = SubjectRow(tenant, r[0], int(r[1]), int(r[2]), float(r[3]))
        return out

    def existing_templates(self, tenant: str, subjects: Sequence[str]) -> set[tuple[str, str, str]]:
        out: set[tuple[str, str, str]] = set()
        for cond, args in self.d.any_of("subject", subjects):
            out.update((r[0], r[1], r[2]) for r in self._x(
                f"SELECT subject, purpose, scheme FROM templates WHERE tenant = ? AND gallery = '' "   # api: default galleries
                f"AND {cond}", [tenant, *args]).fetchall())
        return out

    def insert_templates(self, rows: Sequence[TemplateRow]) -> None:
        """executemany in this transaction (the PostgreSQL store overrides this with COPY)."""
        try:
            self.conn.cursor().executemany(self.d.sql(f"INSERT INTO templates ({', '.join(_TEMPLATE_INSERT_COLS)}) VALUES "
                                             f"{_in(len(_TEMPLATE_INSERT_COLS))}"), [_template_values(r) for r in rows])
        except self.d.integrity_errors as exc:
            raise StoreConflict(str(exc)) from None

    def put_subjects(self, rows: Sequence[SubjectRow]) -> None:
        sql = self.d.sql(self.d.upsert("subjects", ("tenant", "subject", "key_version", "revoked_upto", "updated_at"),
                                       ("tenant", "subject"), ("key_version", "revoked_upto", "updated_at")))
        self.conn.cursor().executemany(sql, [(r.tenant, r.subject, r.key_version, r.revoked_upto, r.updated_at) for r in rows])

    # pg2: veilface import
    def stored_templates(self, tenant: str, subjects: Sequence[str]) -> dict[tuple[str, str, str], bytes]:
        out: dict[tuple[str, str, str], bytes] = {}
        for cond, args in self.d.any_of("subject", subjects):
            for r in self._x(f"SELECT subject, purpose, scheme, template FROM templates WHERE tenant = ? "
                             f"AND {cond}", [tenant, *args]).fetchall():
                out[(r[0], r[1], r[2])] = bytes(r[3])
        return out

    # api: named galleries and samples
    def insert_gallery(self, row: GalleryRow) -> bool:
        cur = self._x(f"INSERT INTO galleries ({', '.join(_GALLERY_COLS)}) VALUES ({', '.join('?' * len(_GALLERY_COLS))}) "
                      f"ON CONFLICT (tenant, name) DO NOTHING", [getattr(row, c) for c in _GALLERY_COLS])
        return cur.rowcount == 1

    def gallery(self, tenant: str, name: str) -> GalleryRow | None:
        r = self._one(f"SELECT {', '.join(_GALLERY_COLS)} FROM galleries WHERE tenant = ? AND name = ?", (tenant, name))
        return None if r is None else _gallery(r)

    def delete_gallery(self, tenant: str, name: str) -> list[tuple[str, str]]:
        gone = [(r[0], r[1]) for r in self._x("SELECT subject, sample_id FROM templates WHERE tenant = ? AND gallery = ? "
                                              "ORDER BY subject, sample_id", (tenant, name)).fetchall()]
        self._x("DELETE FROM templates WHERE tenant = ? AND gallery = ?", (tenant, name))
        self._x("DELETE FROM galleries WHERE tenant = ? AND name = ?", (tenant, name))
        return gone

    def sample_ids(self, tenant: str, gallery: str, subject: str) -> list[str]:
        return [r[0] for r in self._x("SELECT sample_id FROM templates WHERE tenant = ? AND gallery = ? AND subject = ? "
                                      "ORDER BY id", (tenant, gallery, subject)).fetchall()]

    def delete_sample(self, tenant: str, gallery: str, subject: str, sample_id: str) -> bool:
        return self._x("DELETE FROM templates WHERE tenant = ? AND gallery = ? AND subject = ? AND sample_id = ?",
                       (tenant, gallery, subject, sample_id)).rowcount == 1

    # decommission
    def wipe(self) -> WipeCounts:
        self._x("DELETE FROM quarantine")                                      # harden
        return WipeCounts(*(self._x(f"DELETE FROM {t}").rowcount for t in _WIPED))

    # harden: quarantine
    def _quarantine(self, kind: str, key: tuple, blob: bytes, source_id: int, reason: str, detail: str, at: float,
                    expires_at: float) -> QuarantineRow:
        tenant, subject, purpose, scheme, key_version = key
        qid = int(self._one(
            "INSERT INTO quarantine (kind, tenant, subject, purpose, scheme, key_version, source_id, reason, detail, "
            "blob, quarantined_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (kind, tenant, subject, purpose, scheme, int(key_version), int(source_id), reason[:64], detail[:200],
             bytes(blob), at, expires_at))[0])
        return QuarantineRow(qid, kind, tenant, subject, purpose, scheme, int(key_version), int(source_id),
                             reason[:64], detail[:200], at, expires_at)

    def quarantine_template(self, template_id: int, reason: str, detail: str, at: float) -> QuarantineRow | None:
        r = self._one("SELECT tenant, subject, purpose, scheme, key_version, template, expires_at FROM templates "
                      "WHERE id = ?", (template_id,))
        if r is None:
            return None
        row = self._quarantine("template", tuple(r[:5]), r[5], template_id, reason, detail, at, float(r[6]))
        self._x("DELETE FROM templates WHERE id = ?", (template_id,))
        return row

    def quarantine_he_context(self, tenant: str, purpose: str, scheme: str, epoch: int, reason: str, detail: str,
                              at: float) -> QuarantineRow | None:
        where, args = "tenant = ? AND purpose = ? AND scheme = ? AND epoch = ?", (tenant, purpose, scheme, epoch)
        r = self._one(f"SELECT context FROM he_contexts WHERE {where}", args)
        if r is None:
            return None
        row = self._quarantine("he_context", (tenant, "", purpose, scheme, epoch), r[0], 0, reason, detail, at,
                               NO_EXPIRY)
        self._x(f"DELETE FROM he_contexts WHERE {where}", args)
        return row


# -- reads -------------------------------------------------------------------------------------------
class SQLStore(MeasuresSQLReads, Store):
    """Reads, transactions and schema versioning over DB-API connections of one :class:`Dialect`.

    Subclasses implement the connection hooks; ``migrations[v](conn)`` upgrades a store of schema
    version ``v`` to ``v + 1`` inside the opening transaction.
    """

    dialect: Dialect
    migrations: ClassVar[Mapping[int, Callable]] = {}

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._audit_key: AuditKey | None = None     # harden: keyed audit chain
        self._audit_keyed = False

    # connection hooks ------------------------------------------------------------------------------
    @abstractmethod
    def _reading(self) -> AbstractContextManager:
        """A connection for single-statement reads."""

    @abstractmethod
    def _writing(self) -> AbstractContextManager:
        """A connection inside an open write transaction, committed on normal exit."""

    @abstractmethod
    def _read_tx(self) -> AbstractContextManager:
        """A connection inside a read transaction (consistent across statements)."""

    def _open_schema(self) -> None:
        """Create or upgrade the schema (call once from the subclass constructor)."""
        with self._writing() as conn:
            tx = SQLTx(conn, self.dialect, self.clock)
            tx._x(META_DDL)
            found = tx._meta("schema_version")
            version = SCHEMA_VERSION if found is None else int(found)
            if version > SCHEMA_VERSION:
                raise StoreError(f"the store has schema version {version}; this code knows up to {SCHEMA_VERSION}: "
                                 "upgrade Veilface before opening it")
            fresh = found is None
            while version < SCHEMA_VERSION:
                self.migrations[version](conn)
                version += 1
            for step in COLUMN_STEPS:   # columns added since the store was made (fresh: in schema())
                key = f"column_step:{step.name}"
                if fresh or tx._meta(key) is not None:
                    continue
                if self._has_table(conn, step.table):
                    step.apply(conn, self.dialect)
                tx.set_meta(key, "1")
            for stmt in schema(self.dialect):
                conn.execute(stmt)
            if fresh:
                for step in COLUMN_STEPS:
                    tx.set_meta(f"column_step:{step.name}", "1")
            tx.set_meta("schema_version", str(SCHEMA_VERSION))
            # the chain head exists from the start, so every appender locks the same row (FOR UPDATE)
            tx._x("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, ?) ON CONFLICT (id) DO NOTHING", (GENESIS,))
            self._audit_keyed = tx._meta(_AUDIT_KEY_ID) is not None

    @abstractmethod
    def _has_table(self, conn, table: str) -> bool:
        """Whether ``table`` exists (for :data:`COLUMN_STEPS` on stores made before the table)."""

    @contextmanager
    def transaction(self) -> Iterator[SQLTx]:
        with self._writing() as conn:
            yield SQLTx(conn, self.dialect, self.clock, self._audit_key, self._audit_keyed)

    # harden: the audit key and quarantine
    def audit_key_id(self) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (_AUDIT_KEY_ID,))
        return None if row is None else str(row[0])

    def set_audit_key(self, key: AuditKey) -> None:
        with self.transaction() as tx:
            recorded = tx._meta(_AUDIT_KEY_ID)
            if recorded is not None and recorded != key.key_id:
                raise StoreError("the audit chain is keyed with another key", reason="AUDIT_KEY_MISMATCH")
            if recorded is None:
                tx.set_meta(_AUDIT_KEY_ID, key.key_id)
                tx.set_meta(_AUDIT_SWITCH, key.switch_record())
        self._audit_key, self._audit_keyed = key, True

    def quarantined(self) -> list[QuarantineRow]:
        return [QuarantineRow(int(r[0]), r[1], r[2], r[3], r[4], r[5], int(r[6]), int(r[7]), r[8], r[9], float(r[10]),
                              float(r[11]))
                for r in self._all(f"SELECT {', '.join(_QUARANTINE_COLS)} FROM quarantine ORDER BY id")]

    def _all(self, sql: str, args=()) -> list:
        with self._reading() as conn:
            return conn.execute(self.dialect.sql(sql), tuple(args)).fetchall()

    def _one(self, sql: str, args=()):
        with self._reading() as conn:
            return conn.execute(self.dialect.sql(sql), tuple(args)).fetchone()

    def _scalar(self, sql: str, args=()) -> int:
        row = self._one(sql, args)
        return int(row[0] or 0) if row is not None else 0

    def _meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else row[0]

    # meta
    def schema_version(self) -> int:
        return int(self._meta("schema_version") or 0)

    def decommissioned(self) -> bool:
        return self._meta("decommissioned") == "1"

    def purged_total(self) -> int:
        return int(self._meta("purged_total") or 0)

    # devices / subjects
    def devices(self) -> list[DeviceRow]:
        return [DeviceRow(r[0], r[1], int(r[2]), r[3], bool(r[4]), float(r[5]))
                for r in self._all(f"SELECT {', '.join(_DEVICE_COLS)} FROM devices")]

    def subjects(self) -> list[SubjectRow]:
        return [SubjectRow(r[0], r[1], int(r[2]), int(r[3]), float(r[4])) for r in
                self._all("SELECT tenant, subject, key_version, revoked_upto, updated_at FROM subjects")]

    # templates
    def template_index(self) -> list[TemplateIndexRow]:
        rows = self._all(f"SELECT id, tenant, subject, purpose, scheme, key_version, expires_at, "
                         f"CASE WHEN {_HE} THEN NULL ELSE template END, gallery, sample_id FROM templates ORDER BY id")
        return [TemplateIndexRow(int(r[0]), r[1], r[2], r[3], r[4], int(r[5]), float(r[6]),
                                 None if r[7] is None else bytes(r[7]), r[8], r[9]) for r in rows]

    def template_blob(self, template_id: int) -> bytes | None:
        row = self._one("SELECT template FROM templates WHERE id = ?", (template_id,))
        return None if row is None else bytes(row[0])

    def templates_of(self, tenant: str, subject: str) -> list[TemplateRow]:
        return [_template(r) for r in self._all(
            f"SELECT id, {', '.join(_TEMPLATE_COLS)} FROM templates WHERE tenant = ? AND subject = ? ORDER BY id",
            (tenant, subject))]

    def list_subjects(self, tenant: str, after: str, limit: int, purpose: str = "") -> list[SubjectSummary]:
        if purpose:
            page = "SELECT DISTINCT subject FROM templates WHERE tenant = ? AND subject > ? AND purpose = ?"
            rest, args = " AND t.purpose = ?", [tenant, after, purpose, int(limit), tenant, purpose]
        else:
            page = "SELECT DISTINCT subject FROM templates WHERE tenant = ? AND subject > ?"
            rest, args = "", [tenant, after, int(limit), tenant]
        rows = self._all(
            f"SELECT t.subject, t.key_version, t.scheme, t.purpose, t.enrolled_at, t.expires_at FROM templates t "
            f"JOIN ({page} ORDER BY subject LIMIT ?) page ON t.subject = page.subject WHERE t.tenant = ?{rest} "
            f"ORDER BY t.subject", args)
        out: dict[str, list] = {}
        for subject, kv, scheme, purp, enrolled, expires in rows:
            out.setdefault(subject, []).append((int(kv), scheme, purp, float(enrolled), float(expires)))
        return [SubjectSummary(s, max(r[0] for r in rs), sorted({r[1] for r in rs}), sorted({r[2] for r in rs}),
                               min(r[3] for r in rs), min(r[4] for r in rs)) for s, rs in out.items()]

    def count_subjects(self, tenant: str, purpose: str = "") -> int:
        if purpose:
            return self._scalar("SELECT COUNT(DISTINCT subject) FROM templates WHERE tenant = ? AND purpose = ?",
                                (tenant, purpose))
        return self._scalar("SELECT COUNT(DISTINCT subject) FROM templates WHERE tenant = ?", (tenant,))

    # HE contexts and snapshots
    def current_he_contexts(self) -> list[HEContextRow]:
        return [HEContextRow(r[0], r[1], r[2], int(r[3]), r[4], int(r[5]), r[6], bool(r[7]), bytes(r[8]),
                             float(r[9]), None)
                for r in self._all(f"SELECT {', '.join(_HE_CONTEXT_COLS)} FROM he_contexts WHERE retired_at IS NULL")]

    def he_context_registered_at(self, tenant: str, purpose: str, scheme: str, epoch: int) -> float | None:
        row = self._one("SELECT registered_at FROM he_contexts WHERE tenant = ? AND purpose = ? AND scheme = ? AND "
                        "epoch = ?", (tenant, purpose, scheme, epoch))
        return None if row is None else float(row[0])

    def list_he_contexts(self, tenant: str, purpose: str = "") -> list[HEContextSummary]:
        where, args = "c.tenant = ? AND c.retired_at IS NULL", [tenant]
        if purpose:
            where += " AND c.purpose = ?"
            args.append(purpose)
        rows = self._all(
            "SELECT c.purpose, c.scheme, c.mode, c.dim, c.epoch, c.fingerprint, c.eval_keys, c.registered_at, "
            "(SELECT COUNT(*) FROM templates t WHERE t.tenant = c.tenant AND t.purpose = c.purpose AND "
            "t.scheme = c.scheme AND t.key_version = c.epoch) FROM he_contexts c WHERE " + where +
            " ORDER BY c.purpose, c.scheme", args)
        return [HEContextSummary(r[0], r[1], r[2], int(r[3]), int(r[4]), r[5], bool(r[6]), float(r[7]), int(r[8]))
                for r in rows]

    def he_snapshot(self, tenant: str, purpose: str, scheme: str, epoch: int) -> HESnapshotRow | None:
        r = self._one(f"SELECT {', '.join(_SNAPSHOT_COLS)} FROM he_snapshots WHERE tenant = ? AND purpose = ? AND "
                      f"scheme = ? AND epoch = ?", (tenant, purpose, scheme, epoch))
        if r is None:
            return None
        return HESnapshotRow(r[0], r[1], r[2], int(r[3]), r[4], int(r[5]), {str(k): int(v) for k, v in json.loads(r[6]).items()},
                             bytes(r[7]), float(r[8]))

    def he_snapshot_keys(self) -> list[tuple[str, str, str, int]]:
        return [(r[0], r[1], r[2], int(r[3])) for r in self._all("SELECT tenant, purpose, scheme, epoch FROM he_snapshots")]

    # api: named galleries and samples
    def gallery(self, tenant: str, name: str) -> GalleryRow | None:
        r = self._one(f"SELECT {', '.join(_GALLERY_COLS)} FROM galleries WHERE tenant = ? AND name = ?", (tenant, name))
        return None if r is None else _gallery(r)

    def _gallery_counts(self, tenant: str, names: list[str]) -> dict[str, tuple[int, int]]:
        counts = {}
        for name, subjects, samples in self._all(
                "SELECT gallery, COUNT(DISTINCT subject), COUNT(*) FROM templates WHERE tenant = ? AND gallery != '' "
                "GROUP BY gallery", (tenant,)):
            counts[name] = (int(subjects), int(samples))
        return {n: counts.get(n, (0, 0)) for n in names}

    def galleries(self, tenant: str, purpose: str = "") -> list[GallerySummary]:
        sql, args = f"SELECT {', '.join(_GALLERY_COLS)} FROM galleries WHERE tenant = ?", [tenant]
        if purpose:
            sql += " AND purpose = ?"
            args.append(purpose)
        rows = [_gallery(r) for r in self._all(sql + " ORDER BY name", args)]
        counts = self._gallery_counts(tenant, [g.name for g in rows])
        return [GallerySummary(g, *counts[g.name]) for g in rows]

    def gallery_summary(self, tenant: str, name: str) -> GallerySummary | None:
        g = self.gallery(tenant, name)
        if g is None:
            return None
        r = self._one("SELECT COUNT(DISTINCT subject), COUNT(*) FROM templates WHERE tenant = ? AND gallery = ?",
                      (tenant, name))
        return GallerySummary(g, int(r[0] or 0), int(r[1] or 0))

    def samples(self, tenant: str, gallery: str, subject: str = "", after: tuple[str, str] = ("", ""),
                limit: int = 100) -> list[SampleRow]:
        sql = ("SELECT subject, sample_id, scheme, key_version, enrolled_at, expires_at FROM templates "
               "WHERE tenant = ? AND gallery = ? AND (subject > ? OR (subject = ? AND sample_id > ?))")
        args = [tenant, gallery, after[0], after[0], after[1]]
        if subject:
            sql += " AND subject = ?"
            args.append(subject)
        rows = self._all(sql + " ORDER BY subject, sample_id LIMIT ?", [*args, int(limit)])
        return [SampleRow(tenant, gallery, r[0], r[1], r[2], int(r[3]), float(r[4]), float(r[5])) for r in rows]

    def gallery_templates(self, tenant: str, gallery: str, subject: str) -> list[TemplateRow]:
        return [_template(r) for r in self._all(
            f"SELECT id, {', '.join(_TEMPLATE_COLS)} FROM templates WHERE tenant = ? AND gallery = ? AND subject = ? "
            f"ORDER BY id", (tenant, gallery, subject))]

    # audit
    def audit_head(self) -> tuple[int, str]:
        r = self._one("SELECT seq, hash FROM audit_head WHERE id = 1")
        return (0, GENESIS) if r is None else (int(r[0]), str(r[1]))

    def audit_entries(self, after_seq: int = 0, limit: int = 100, action: str = "", subject: str = "") -> list[AuditRow]:
        sql, args = f"SELECT {', '.join(_AUDIT_COLS)} FROM audit WHERE seq > ?", [after_seq]
        if action:
            sql += " AND action = ?"
            args.append(action)
        if subject:
            sql += " AND subject = ?"
            args.append(subject)
        return [AuditRow(*r) for r in self._all(sql + " ORDER BY seq LIMIT ?", [*args, int(limit)])]

    # api: observability
    def count_audit_action(self, action: str) -> int:
        return self._scalar("SELECT COUNT(*) FROM audit WHERE action = ?", (action,))

    def verify_audit(self) -> ChainReport:
        with self._read_tx() as conn:
            r = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            head = (0, GENESIS) if r is None else (int(r[0]), str(r[1]))
            key = self._audit_key
            if key is not None:      # harden: the switch point stored in the database must carry the key's MAC
                rec = conn.execute(self.dialect.sql("SELECT value FROM meta WHERE key = ?"), (_AUDIT_SWITCH,)).fetchone()
                switch = key.read_switch(None if rec is None else str(rec[0]))
                if switch != key.keyed_from:
                    return ChainReport(False, 0, GENESIS, 1, "the audit key's switch point recorded in the store is "
                                                             "missing or forged")
            elif self._audit_keyed:
                return ChainReport(False, 0, GENESIS, 1, "the audit chain is keyed: verifying it needs the audit key "
                                                         "(audit_key_file)")
            rows = (AuditRow(*rec) for rec in conn.execute(f"SELECT {', '.join(_AUDIT_COLS)} FROM audit ORDER BY seq"))
            return verify_chain(rows, head, key)

    # retention
    def next_expiry(self) -> float | None:
        row = self._one("SELECT MIN(expires_at) FROM templates")
        return None if row is None or row[0] is None else float(row[0])

    def expired_pending(self, now: float) -> int:
        return self._scalar("SELECT COUNT(*) FROM templates WHERE expires_at <= ?", (now,))

    def purge_requests(self, older_than: float) -> int:
        with self.transaction() as tx:
            return tx._x("DELETE FROM requests WHERE created_at < ?", (older_than,)).rowcount

    # reporting
    def counts(self) -> StoreCounts:
        one = self._scalar
        return StoreCounts(
            persons_stored=one("SELECT COUNT(*) FROM (SELECT DISTINCT tenant, subject FROM templates) AS persons"),
            templates_stored=one("SELECT COUNT(*) FROM templates"),
            devices=one("SELECT COUNT(*) FROM devices"),
            private_space_devices=one("SELECT COUNT(*) FROM devices WHERE location_class = ?", (PRIVATE_SPACE,)),
            consents_active=one("SELECT COUNT(*) FROM consents WHERE withdrawn_at IS NULL"),
            alerts=one("SELECT COUNT(*) FROM audit WHERE action = 'INTRUSION_ALERT'"),
            purged_total=self.purged_total())

    def processing_records(self) -> list[ProcessingRecord]:
        out: dict[str, dict] = {}
        for purpose, subjects, templates in self._all(
                "SELECT purpose, COUNT(DISTINCT tenant || '/' || subject), COUNT(*) FROM templates GROUP BY purpose"):
            out.setdefault(purpose, {}).update(subjects=int(subjects), templates=int(templates))
        names = {"Enroll": "enrolments", "Verify": "verifications", "Identify": "identifications",
                 "Withdraw": "withdrawals",
                 # api: the named-gallery calls are enrolments / verifications / identifications too
                 "AddSample": "enrolments", "GalleryVerify": "verifications", "GallerySearch": "identifications",
                 "SearchBySubject": "identifications"}
        actions = ", ".join(f"'{a}'" for a in names)
        for action, purpose, n in self._all(
                f"SELECT action, purpose, COUNT(*) FROM audit WHERE result = 'OK' AND action IN "
                f"({actions}) AND purpose != '' GROUP BY action, purpose"):
            rec = out.setdefault(purpose, {})
            rec[names[action]] = rec.get(names[action], 0) + int(n)
        return [ProcessingRecord(p, **v) for p, v in sorted(out.items())]

    def filing_alert(self) -> FilingAlert | None:
        row = self._one("SELECT raised_at, data FROM alerts WHERE kind = 'filing' ORDER BY id LIMIT 1")
        if row is None:
            return None
        data = json.loads(row[1])
        return FilingAlert(float(row[0]), data["deadline"], int(data["persons"]), int(data["threshold"]))

    # pg: replicas share a store
    def device(self, tenant: str, device_id: str) -> DeviceRow | None:
        r = self._one(f"SELECT {', '.join(_DEVICE_COLS)} FROM devices WHERE tenant = ? AND device_id = ?",
                      (tenant, device_id))
        return None if r is None else DeviceRow(r[0], r[1], int(r[2]), r[3], bool(r[4]), float(r[5]))

    def subject_row(self, tenant: str, subject: str) -> SubjectRow | None:
        r = self._one("SELECT key_version, revoked_upto, updated_at FROM subjects WHERE tenant = ? AND subject = ?",
                      (tenant, subject))
        return None if r is None else SubjectRow(tenant, subject, int(r[0]), int(r[1]), float(r[2]))

    def subject_index(self, tenant: str, subject: str) -> list[TemplateIndexRow]:
        return [TemplateIndexRow(int(r[0]), r[1], r[2], r[3], r[4], int(r[5]), float(r[6]), None, r[7], r[8])
                for r in self._all(
            "SELECT id, tenant, subject, purpose, scheme, key_version, expires_at, gallery, sample_id FROM templates "
            "WHERE tenant = ? AND subject = ? ORDER BY id", (tenant, subject))]

    def present_subjects(self, tenant: str, purpose: str, scheme: str, key_version: int,
                         subjects: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for cond, args in self.dialect.any_of("subject", subjects):
            out.update(r[0] for r in self._all(
                f"SELECT subject FROM templates WHERE tenant = ? AND purpose = ? AND scheme = ? AND key_version = ? "
                f"AND gallery = '' AND {cond}", [tenant, purpose, scheme, int(key_version), *args]))
        return out

    # api: named-gallery entries (subject/sample) of a 1:N result that are stored (replicas check shards)
    def present_samples(self, tenant: str, gallery: str, key_version: int,
                        pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        out: set[tuple[str, str]] = set()
        wanted = set(pairs)
        for cond, args in self.dialect.any_of("subject", [s for s, _ in pairs]):
            out.update(p for p in ((r[0], r[1]) for r in self._all(
                f"SELECT subject, sample_id FROM templates WHERE tenant = ? AND gallery = ? AND key_version = ? "
                f"AND {cond}", [tenant, gallery, int(key_version), *args])) if p in wanted)
        return out

    def shard_templates(self, shards: int, shard: int, after_id: int, limit: int) -> list[TemplateIndexRow]:
        # h - (h / n) * n: the remainder in integer arithmetic both engines spell the same way
        rows = self._all(
            "SELECT id, tenant, subject, purpose, scheme, key_version, expires_at, template, shard_hash, gallery, "
            "sample_id FROM templates "
            "WHERE id > ? AND (shard_hash IS NULL OR shard_hash - (shard_hash / ?) * ? = ?) ORDER BY id LIMIT ?",
            (int(after_id), int(shards), int(shards), int(shard), int(limit)))
        return [TemplateIndexRow(int(r[0]), r[1], r[2], r[3], r[4], int(r[5]), float(r[6]), bytes(r[7]), r[9], r[10])
                for r in rows if r[8] is not None or subject_hash(r[1], r[2]) % shards == shard]

    # pg2: store dumps
    @contextmanager
    def export_view(self) -> Iterator[SQLExportView]:
        with self._read_tx() as conn:
            yield SQLExportView(SQLTx(conn, self.dialect, self.clock))


class SQLExportView(ExportView):
    """:class:`ExportView` over a connection inside a read transaction (reuses the tx's reads)."""

    def __init__(self, tx: SQLTx) -> None:
        self.tx = tx

    def consents(self, consent_ids: Sequence[str]) -> dict[str, ConsentRow]:
        return self.tx.consents(consent_ids)

    def subject_states(self, tenant: str, subjects: Sequence[str]) -> dict[str, SubjectRow]:
        return self.tx.subject_states(tenant, subjects)

    def off_device_consents(self, consent_ids: Sequence[str]) -> dict[str, OffDeviceConsentRow]:
        return self.tx.off_device_consents(list(consent_ids))

    def devices(self) -> list[DeviceRow]:
        return [DeviceRow(r[0], r[1], int(r[2]), r[3], bool(r[4]), float(r[5]))
                for r in self.tx._x(f"SELECT {', '.join(_DEVICE_COLS)} FROM devices ORDER BY tenant, device_id")]

    def template_groups(self) -> list[tuple[str, str, int]]:
        return [(r[0], r[1], int(r[2])) for r in self.tx._x(
            "SELECT tenant, purpose, COUNT(*) FROM templates GROUP BY tenant, purpose ORDER BY tenant, purpose")]

    def templates(self, tenant: str, purpose: str, after_id: int, limit: int) -> list[TemplateRow]:
        return [_template(r) for r in self.tx._x(
            f"SELECT id, {', '.join(_TEMPLATE_COLS)} FROM templates WHERE tenant = ? AND purpose = ? AND id > ? "
            f"ORDER BY id LIMIT ?", (tenant, purpose, int(after_id), int(limit))).fetchall()]

    def audit_head(self) -> tuple[int, str]:
        r = self.tx._one("SELECT seq, hash FROM audit_head WHERE id = 1")
        return (0, GENESIS) if r is None else (int(r[0]), str(r[1]))
