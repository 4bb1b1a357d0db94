"""The hash-chained audit log detects any edit, deletion or reordering."""
from __future__ import annotations

import sqlite3

import pytest

from engine.service.audit import AuditEvent, clean_details
from engine.service.clock import ManualClock
from engine.service.store import SQLiteStore


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path, ManualClock())
    for i in range(10):
        s.audit(AuditEvent("Verify", "device", "dev-1", "default", f"s{i}", "access_control", "gate-1",
                           {"matched": i % 2 == 0}))
    yield s
    s.close()


def raw(store) -> sqlite3.Connection:
    """An attacker with file access: drops the append-only triggers first."""
    c = sqlite3.connect(store.path, isolation_level=None)
    c.execute("DROP TRIGGER audit_no_update")
    c.execute("DROP TRIGGER audit_no_delete")
    return c


def test_intact_chain_verifies(store):
    r = store.verify_audit()
    assert r.ok and r.entries == 10 and len(r.head_hash) == 64


def test_triggers_make_the_table_append_only(store):
    c = sqlite3.connect(store.path, isolation_level=None)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        c.execute("UPDATE audit SET result = 'OK' WHERE seq = 3")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        c.execute("DELETE FROM audit WHERE seq = 3")


def test_edit_detected(store):
    raw(store).execute("UPDATE audit SET result = 'DENIED' WHERE seq = 4")
    r = store.verify_audit()
    assert not r.ok and r.first_bad_seq == 4 and "edited" in r.problem


def test_edit_with_rehash_of_that_entry_detected(store):
    from engine.service.audit import FIELDS, entry_hash
    c = raw(store)
    row = dict(zip(FIELDS + ("prev_hash",), c.execute(
        f"SELECT {', '.join(FIELDS)}, prev_hash FROM audit WHERE seq = 4").fetchone()))
    row["subject"] = "someone-else"
    c.execute("UPDATE audit SET subject = ?, hash = ? WHERE seq = 4", (row["subject"], entry_hash(row["prev_hash"], row)))
    r = store.verify_audit()
    assert not r.ok and r.first_bad_seq == 5       # the next link breaks


def test_deletion_detected(store):
    raw(store).execute("DELETE FROM audit WHERE seq = 6")
    r = store.verify_audit()
    assert not r.ok and r.first_bad_seq == 6 and "gap" in r.problem


def test_tail_truncation_detected(store):
    raw(store).execute("DELETE FROM audit WHERE seq = 10")
    r = store.verify_audit()
    assert not r.ok and "tail" in r.problem


def test_reordering_detected(store):
    c = raw(store)
    a = c.execute("SELECT subject FROM audit WHERE seq = 2").fetchone()[0]
    b = c.execute("SELECT subject FROM audit WHERE seq = 7").fetchone()[0]
    c.execute("UPDATE audit SET subject = ? WHERE seq = 2", (b,))
    c.execute("UPDATE audit SET subject = ? WHERE seq = 7", (a,))
    assert not store.verify_audit().ok
    # swapping whole rows (hashes included) breaks the prev_hash links
    c.execute("UPDATE audit SET seq = 100 WHERE seq = 3")
    c.execute("UPDATE audit SET seq = 3 WHERE seq = 4")
    c.execute("UPDATE audit SET seq = 4 WHERE seq = 100")
    assert not store.verify_audit().ok


def test_chain_continues_across_reopen(tmp_path, store):
    store.close()
    s2 = SQLiteStore(store.path, ManualClock())
    s2.audit(AuditEvent("Enroll", "device", "dev-1"))
    assert s2.verify_audit().ok and s2.verify_audit().entries == 11
    s2.close()


def test_rolled_back_transaction_leaves_no_entry(tmp_path):
    s = SQLiteStore(tmp_path, ManualClock())
    with pytest.raises(RuntimeError):
        with s.transaction() as tx:
            tx.audit(AuditEvent("Enroll", "device", "d"))
            raise RuntimeError("boom")
    s.audit(AuditEvent("Enroll", "device", "d"))
    assert s.verify_audit().ok and s.verify_audit().entries == 1
    s.close()


def test_details_never_carry_biometrics():
    for bad in ({"template": "x"}, {"score": 0.9}, {"scores": 1}, {"probe": "x"}, {"embedding": 1},
                {"anything": b"raw bytes"}, {"anything": [0.1, 0.2]}):
        with pytest.raises(ValueError):
            clean_details(bad)
    assert clean_details({"matched": True, "k": 3}) == '{"k":3,"matched":true}'
    assert len(clean_details({"note": "x" * 1000})) < 250
