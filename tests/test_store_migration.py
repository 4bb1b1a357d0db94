"""A data dir written by the schema-1 code (template_seq table + triggers, no template id) opens,
upgrades to the current schema and keeps working: ids = the old sequence numbers (so stored HE
snapshots stay valid), the id counter continues after every number ever issued, the audit chain
verifies and continues, and a server on it serves the enrolled subjects."""
from __future__ import annotations

import sqlite3

import pytest

from engine.client import LocationClass
from engine.keys import KeyDeriver
from engine.schemes import make_scheme
from engine.service.audit import GENESIS, AuditEvent, next_entry
from engine.service.clock import ManualClock
from engine.service.store import SCHEMA_VERSION, SQLiteStore, StoreError, TemplateRow
from tests.support import NOTICE, PURPOSE, capture, faces, running_server

# the schema-1 DDL, verbatim from engine/service/store.py and audit.py before the store package
V1_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, ts REAL NOT NULL, actor_role TEXT NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, tenant TEXT NOT NULL, subject TEXT NOT NULL, purpose TEXT NOT NULL,
    device TEXT NOT NULL, result TEXT NOT NULL, reason TEXT NOT NULL, details TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE INDEX IF NOT EXISTS audit_action ON audit(action);
INSERT OR IGNORE INTO meta VALUES ('schema_version', '1');
"""
SCHEME = "biohash:bits=256,dim=128"
T0 = 1_750_000_000.0


def write_v1(data_dir, n: int = 4) -> list:
    """A schema-1 data dir: ``n`` enrolled subjects (s0 withdrawn and re-enrolled, so its number
    is not its insertion rank and a number was issued and dropped), a device, an audit chain and an
    HE snapshot row recording template numbers. Returns the embeddings."""
    data_dir.mkdir(parents=True)
    con = sqlite3.connect(data_dir / "veilface.db", isolation_level=None)
    con.executescript(V1_SCHEMA)
    scheme = make_scheme(SCHEME)
    key = KeyDeriver(bytes(range(32)), "default").derive(f"group.{PURPOSE}", 1, scheme.spec)
    x = faces(n, seed=3)
    con.execute("INSERT INTO devices VALUES ('default', 'gate-1', 1, 'lobby', 1, ?)", (T0,))

    def enrol(i: int, n_consent: int = 0) -> None:
        cid = f"c{i}-{n_consent}"
        blob = scheme.protect(key, x[i], key_version=1).to_bytes()
        con.execute("INSERT INTO consents VALUES (?, 'default', ?, ?, ?, ?, 30, 0, '', '', 0, 'gate-1', NULL)",
                    (cid, f"s{i}", PURPOSE, NOTICE, T0))
        con.execute("INSERT INTO templates VALUES ('default', ?, ?, ?, 1, ?, ?, ?, ?, 'gate-1')",
                    (f"s{i}", PURPOSE, scheme.spec.key(), blob, T0, T0 + 400 * 86400.0, cid))
        con.execute("INSERT OR REPLACE INTO subjects VALUES ('default', ?, 1, 0, ?)", (f"s{i}", T0))

    for i in range(n):
        enrol(i)
    con.execute("DELETE FROM templates WHERE subject = 's0'")     # number 1 dropped
    enrol(0, 1)                                                     # s0 again: number n + 1
    con.execute("INSERT INTO he_snapshots VALUES ('default', 'p', 'he/v1:{}', 1, 'fp', 3, '{\"a\":2,\"b\":3}', "
                "x'00', ?)", (T0,))
    head = (0, GENESIS)
    for i in range(3):
        e = next_entry(head, T0 + i, AuditEvent("Enroll", "device", "device-1", "default", f"s{i}", PURPOSE), "OK")
        con.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (e.seq, e.ts, e.actor_role, e.actor, e.action, e.tenant, e.subject, e.purpose, e.device,
                     e.result, e.reason, e.details, e.prev_hash, e.hash))
        head = (e.seq, e.hash)
    con.execute("INSERT INTO audit_head VALUES (1, ?, ?)", head)
    con.close()
    return x


def test_v1_store_upgrades_and_keeps_template_numbers(tmp_path):
    write_v1(tmp_path / "d")
    old = sqlite3.connect(tmp_path / "d" / "veilface.db")
    seqs = dict(old.execute("SELECT subject, seq FROM template_seq"))
    old.close()
    assert seqs == {"s1": 2, "s2": 3, "s3": 4, "s0": 5}
    store = SQLiteStore(tmp_path / "d", ManualClock(T0))
    try:
        assert store.schema_version() == SCHEMA_VERSION == 2
        assert {r.subject: r.id for r in store.template_index()} == seqs
        assert store.he_snapshot("default", "p", "he/v1:{}", 1).subjects == {"a": 2, "b": 3}
        assert store.verify_audit().ok and store.audit_head()[0] == 3
        with store.transaction() as tx:     # the counter continues after every number ever issued
            new_id = tx.insert_template(TemplateRow("default", "s9", PURPOSE, "x", 1, b"\0", T0, T0 + 1, "c", "d"))
            tx.audit(AuditEvent("Enroll", "device", "device-1"))
        assert new_id == 6
        assert store.verify_audit().ok and store.audit_head()[0] == 4
    finally:
        store.close()
    con = sqlite3.connect(tmp_path / "d" / "veilface.db")
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    con.close()
    assert "template_seq" not in names and "templates_seq_insert" not in names and "templates_v1" not in names
    assert {"templates_expiry", "audit_no_update", "audit_no_delete"} <= names


def test_v1_data_dir_serves_after_upgrade(tmp_path, rng):
    x = write_v1(tmp_path / "d")
    with running_server(tmp_path / "d", ManualClock(T0 + 60)) as s:
        assert s.app.loaded["templates"] == 4
        dev = s.device(scheme=SCHEME)
        for i in range(4):
            assert dev.verify(f"s{i}", capture(x[i], rng)).matched
        assert dev.identify(capture(x[2], rng))[0][0] == "s2"
        c = dev.record_consent("s9", NOTICE, 30)
        dev.enroll("s9", faces(10, seed=9)[9], c.consent_id)
        assert dev.withdraw("s1").templates_deleted == 1
        s.client("admin").register_device("gate-2", LocationClass.PUBLIC_PLACE, "hall", True)
        assert s.client("auditor").verify_audit_chain().ok


def test_newer_schema_is_refused(tmp_path):
    SQLiteStore(tmp_path).close()
    con = sqlite3.connect(tmp_path / "veilface.db", isolation_level=None)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StoreError) as ei:
        SQLiteStore(tmp_path)
    assert ei.value.reason == "STORE_VERSION"


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(2)


def test_column_steps_apply_once_to_old_stores_and_never_to_fresh_ones(tmp_path, monkeypatch):
    """A named AddColumn step adds its column to a store made before it, exactly once; a fresh store
    gets the column from schema() and records the step as done."""
    from engine.service.store import sql as sqlmod

    old = tmp_path / "old"
    SQLiteStore(old).close()                         # made before the step existed
    step = sqlmod.AddColumn("test_note", "devices", "note", "TEXT NOT NULL DEFAULT ''")
    monkeypatch.setattr(sqlmod, "COLUMN_STEPS", (step,))
    real_schema = sqlmod.schema

    def schema_with_note(d):
        return [s.replace(f"registered_at {d.real} NOT NULL, PRIMARY",
                          f"registered_at {d.real} NOT NULL, note TEXT NOT NULL DEFAULT '', PRIMARY")
                for s in real_schema(d)]
    monkeypatch.setattr(sqlmod, "schema", schema_with_note)
    for _ in range(2):                               # the second open must not add it again
        store = SQLiteStore(old)
        store.close()
    con = sqlite3.connect(old / "veilface.db")
    cols = [r[1] for r in con.execute("PRAGMA table_info(devices)")]
    assert cols.count("note") == 1
    assert con.execute("SELECT value FROM meta WHERE key = 'column_step:test_note'").fetchone() == ("1",)
    fresh = tmp_path / "fresh"
    SQLiteStore(fresh).close()
    con = sqlite3.connect(fresh / "veilface.db")
    assert [r[1] for r in con.execute("PRAGMA table_info(devices)")].count("note") == 1
    assert con.execute("SELECT value FROM meta WHERE key = 'column_step:test_note'").fetchone() == ("1",)
