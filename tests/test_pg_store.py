"""PostgreSQL-specific guarantees of the store (the shared contract is tests/test_store_suite.py):
an append-only audit log enforced by the database, ONE hash chain when several store instances
(replicas) append concurrently, subject locks across instances, idempotency rows shared, additive
column steps on PostgreSQL, and typed errors when the server cannot be reached."""
from __future__ import annotations

import threading

import pytest

from engine.service.audit import AuditEvent
from engine.service.clock import ManualClock
from engine.service.store import RequestRow, StoreConflict, StoreUnavailable
from tests.support.services import drop_schema, fresh_schema, pg_dsn

psycopg = pytest.importorskip("psycopg")


@pytest.fixture
def schema_dsn():
    dsn, name = fresh_schema()
    yield dsn
    drop_schema(name)


def _store(dsn, **kw):
    from engine.service.store.postgres import PostgresStore
    return PostgresStore(dsn, ManualClock(1000.0), **kw)


def test_audit_log_is_append_only_in_the_database(schema_dsn):
    s = _store(schema_dsn)
    try:
        s.audit(AuditEvent("Enroll", "device", "d1", "t", "s1"))
        for sql in ("UPDATE audit SET result = 'X'", "DELETE FROM audit", "TRUNCATE audit"):
            with psycopg.connect(schema_dsn) as conn, pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(sql)
        assert s.verify_audit().ok and s.audit_head()[0] == 1
    finally:
        s.close()


def test_two_instances_append_one_chain_concurrently(schema_dsn):
    a, b = _store(schema_dsn), _store(schema_dsn)
    try:
        def writer(store, name):
            for i in range(40):
                with store.transaction() as tx:
                    tx.audit(AuditEvent("Verify", "device", name, "t", f"s{i}"))
        threads = [threading.Thread(target=writer, args=(st, n)) for st, n in ((a, "A"), (b, "B"), (a, "A2"), (b, "B2"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rep = b.verify_audit()
        assert rep.ok and rep.entries == 160 and a.audit_head() == b.audit_head()
    finally:
        a.close()
        b.close()


def test_subject_lock_excludes_other_instances(schema_dsn):
    a, b = _store(schema_dsn), _store(schema_dsn)
    inside, order = threading.Event(), []
    try:
        def second():
            inside.wait()
            with b.subject_lock("t", "s1"):
                order.append("b")
        t = threading.Thread(target=second)
        t.start()
        with a.subject_lock("t", "s1"):
            inside.set()
            with b.subject_lock("t", "other"):   # another subject is not blocked
                order.append("b-other")
            t.join(0.5)                           # b is still waiting for s1
            order.append("a")
        t.join()
        assert order == ["b-other", "a", "b"]
    finally:
        a.close()
        b.close()


def test_request_row_seen_by_the_other_instance(schema_dsn):
    a, b = _store(schema_dsn), _store(schema_dsn)
    try:
        row = RequestRow("t", "r1", "Enroll", "dev", "h", b"reply", 1000.0)
        with a.transaction() as tx:
            tx.insert_request(row)
        with b.transaction() as tx:
            assert tx.request("t", "Enroll", "r1") == row
            with pytest.raises(StoreConflict):
                tx.insert_request(row)
    finally:
        a.close()
        b.close()


def test_column_step_added_to_an_older_postgres_store(schema_dsn):
    s = _store(schema_dsn)
    s.close()
    with psycopg.connect(schema_dsn, autocommit=True) as conn:   # as a store made before the step
        conn.execute("ALTER TABLE templates DROP COLUMN shard_hash")
        conn.execute("DELETE FROM meta WHERE key = 'column_step:pg_shard_hash'")
    s = _store(schema_dsn)
    try:
        with psycopg.connect(schema_dsn) as conn:
            cols = {r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns "
                                               "WHERE table_name = 'templates' AND table_schema = current_schema()")}
        assert "shard_hash" in cols
    finally:
        s.close()


def test_unreachable_server_is_unavailable_and_dsn_is_redacted():
    from engine.service.store.postgres import PostgresStore, redact
    pg_dsn()   # only meaningful where psycopg is installed
    with pytest.raises(StoreUnavailable):
        PostgresStore("postgresql://nobody:secret@127.0.0.1:1/none?connect_timeout=1", ManualClock(0.0), timeout=2.0)
    assert "secret" not in redact("postgresql://u:secret@h:5432/db") and "secret" not in redact("password=secret host=h")
