"""The store methods of issue 10 against every store implementation (``tests.support.stores``):
quarantine (moved, listed, deleted like templates) and the keyed audit chain."""
from __future__ import annotations

import pytest

from engine.service.audit import AuditEvent, AuditKey
from engine.service.clock import ManualClock
from engine.service.store import HEContextRow, TemplateRow
from tests.support.stores import STORES

T0 = 1_000.0
BIO = 'biohash/v1:{"bits":256,"dim":128}'
HE = 'he/v1:{"dim":128,"mode":"verify"}'


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path):
    s = STORES[request.param](tmp_path, ManualClock(T0))
    yield s
    s.close()


def template(subject: str, expires: float = T0 + 100) -> TemplateRow:
    return TemplateRow("t", subject, "p", BIO, 1, b"\x01\x02", T0, expires, "c1", "gate-1")


def test_quarantine_moves_a_template(store):
    with store.transaction() as tx:
        tid = tx.insert_template(template("s1"))
        tx.insert_template(template("s2"))
    with store.transaction() as tx:
        q = tx.quarantine_template(tid, "TEMPLATE_OUT_OF_RANGE", "norm 1e31", T0 + 1)
        assert tx.quarantine_template(tid, "X", "", T0) is None           # gone from templates
    assert (q.kind, q.subject, q.source_id, q.reason) == ("template", "s1", tid, "TEMPLATE_OUT_OF_RANGE")
    assert [r.subject for r in store.template_index()] == ["s2"]
    assert [(r.id, r.detail, r.expires_at) for r in store.quarantined()] == [(q.id, "norm 1e31", T0 + 100)]


def test_quarantined_rows_go_with_withdrawal_retention_and_wipe(store):
    with store.transaction() as tx:
        ids = [tx.insert_template(template(s, T0 + 10 * (i + 1))) for i, s in enumerate(("a", "b", "c"))]
        for tid in ids:
            tx.quarantine_template(tid, "R", "", T0)
    with store.transaction() as tx:
        tx.delete_subject_templates("t", "a")
    assert [r.subject for r in store.quarantined()] == ["b", "c"]
    with store.transaction() as tx:
        tx.delete_expired(T0 + 20)
    assert [r.subject for r in store.quarantined()] == ["c"]
    with store.transaction() as tx:
        tx.wipe()
    assert store.quarantined() == []


def test_quarantine_moves_an_he_context(store):
    with store.transaction() as tx:
        tx.insert_he_context(HEContextRow("t", "p", HE, 1, "verify", 128, "f" * 32, False, b"ctx", T0))
        q = tx.quarantine_he_context("t", "p", HE, 1, "HE_MALFORMED", "bad", T0)
    assert q.kind == "he_context" and q.key_version == 1
    assert store.current_he_contexts() == []
    with store.transaction() as tx:
        assert tx.current_he_epoch("t", "p", HE) is None


def test_a_keyed_chain(store):
    store.audit(AuditEvent("Legacy", "system", "x"))
    assert store.audit_key_id() is None
    key = AuditKey(b"k" * 32, keyed_from=2)
    store.set_audit_key(key)
    assert store.audit_key_id() == key.key_id
    store.audit(AuditEvent("Keyed", "system", "x"))
    r = store.verify_audit()
    assert r.ok and r.entries == 2
    with pytest.raises(Exception) as ei:
        store.set_audit_key(AuditKey(b"j" * 32, keyed_from=2))
    assert getattr(ei.value, "reason", "") == "AUDIT_KEY_MISMATCH"
