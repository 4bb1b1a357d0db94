"""The store contract of the Measures records (assessments, off-device consents, oversight,
termination), run against each store of ``tests.support.stores.STORES``."""
from __future__ import annotations

import pytest

from engine.service.audit import AuditEvent
from engine.service.clock import ManualClock
from engine.service.store import (
    AssessmentRow,
    OffDeviceConsentRow,
    OutboxRow,
    OversightBundleRow,
    OversightKeyRow,
    StoreConflict,
    TemplateRow,
    TerminationRow,
)
from tests.support.stores import STORES

T0 = 1_000.0
BIO = 'biohash/v1:{"bits":256,"dim":128}'


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path):
    s = STORES[request.param](tmp_path, ManualClock(T0))
    yield s
    s.close()


def assessment(version: int = 1, purpose: str = "p", sha: str = "a" * 64) -> AssessmentRow:
    return AssessmentRow("t", purpose, version, sha, '{"x":1}', "2025-01-01", "2026-01-01", T0, "op", 7)


def bundle(seq: int, device: str = "d1", digest: str = "") -> OversightBundleRow:
    return OversightBundleRow("t", device, seq, digest or f"{seq:064x}", seq, seq, "0" * 64, "1" * 64, 1, 2, 3,
                              "{}", T0, T0 + 1, b"body", b"s" * 64)


def test_assessments_are_versioned_and_the_newest_is_current(store):
    with store.transaction() as tx:
        assert tx.current_assessment("t", "p") is None
        a = tx.insert_assessment(assessment(1))
        b = tx.insert_assessment(assessment(2, sha="b" * 64))
        tx.insert_assessment(assessment(1, purpose="q"))
        assert tx.current_assessment("t", "p").version == 2 and b > a
    rows = store.assessments("t")
    assert [(r.purpose, r.version) for r in rows] == [("p", 1), ("p", 2), ("q", 1)] and rows[0].id == a
    assert store.assessments("other") == []
    with pytest.raises(StoreConflict), store.transaction() as tx:
        tx.insert_assessment(assessment(2))                      # a version is never reused
    with store.transaction() as tx:
        assert tx.delete_assessments([a, b]) == 2
    assert [r.purpose for r in store.assessments()] == ["q"]


def test_audit_details_and_last_processing(store):
    with store.transaction() as tx:
        s1 = tx.audit(AuditEvent("RegisterImpactAssessment", "operator", "o", "t", purpose="p",
                                 details={"assessment_sha256": "a" * 64}))
    store.clock.advance(50)
    store.audit(AuditEvent("Verify", "device", "d", "t", "s1", "p"))
    assert store.audit_details([s1, 999]) == {s1: ("RegisterImpactAssessment", '{"assessment_sha256":"' + "a" * 64 + '"}')}
    assert store.last_processing_at("t", "p") == T0 + 50 and store.last_processing_at("t", "none") is None


def test_off_device_consents_and_their_withdrawal(store):
    with store.transaction() as tx:
        for cid, purpose in (("c1", "p"), ("c2", "q")):
            tx.insert_off_device_consent(OffDeviceConsentRow(cid, "t", "s1", purpose, "n1", "tpl", "central", "why", T0))
        tx.insert_template(TemplateRow("t", "s1", "p", BIO, 1, b"x", T0, T0 + 9, "c1", "g"))
        tx.insert_template(TemplateRow("t", "s1", "q", BIO, 1, b"x", T0, T0 + 9, "legacy", "g"))
    s = store.off_device_summary()
    assert (s.active, s.withdrawn, s.recipients, s.templates_without_consent) == (2, 0, ["central"], 1)
    with store.transaction() as tx:
        assert tx.withdraw_off_device_consents("t", "s1", "q", T0 + 1) == 1
        assert tx.withdraw_off_device_consents("t", "s1", "q", T0 + 2) == 0
        assert tx.off_device_consent("c2").withdrawn_at == T0 + 1 and tx.off_device_consent("c1").withdrawn_at is None
        assert tx.delete_purpose_templates("t", "s1", "q") == 1
        assert tx.withdraw_off_device_consents("t", "s1", "", T0 + 3) == 1
    assert store.off_device_summary().active == 0
    with store.transaction() as tx:
        assert tx.delete_off_device_consents() == 2


def test_oversight_keys_bundles_and_persons(store):
    with store.transaction() as tx:
        tx.insert_oversight_key(OversightKeyRow("t", "d1", b"k" * 32, "fp", T0))
        tx.insert_oversight_bundle(bundle(1))
        tx.insert_oversight_bundle(bundle(2))
        tx.apply_oversight_persons("t", "d1", ["a", "b", "c"], [])
        tx.apply_oversight_persons("t", "d1", ["d"], ["a"])
        assert tx.oversight_persons_known("t", "d1", ["a", "b", "z"]) == {"b"}
        assert tx.count_oversight_persons("t", "d1") == 3
        assert tx.last_oversight_bundle("t", "d1").seq == 2 and tx.last_oversight_bundle("t", "d2") is None
        assert tx.oversight_seq_of("t", "d1", f"{1:064x}") == 1 and tx.oversight_seq_of("t", "d1", "x") is None
        tx.insert_template(TemplateRow("t", "b", "p", BIO, 1, b"x", T0, T0 + 9, "c", "g"))
        tx.insert_template(TemplateRow("t", "z", "p", BIO, 1, b"x", T0, T0 + 9, "c", "g"))
        assert tx.persons_fleet() == 4                           # b, c, d on the device; b, z here
    assert store.fleet_persons() == 4 and store.stored_subjects("t") == ["b", "z"]
    assert store.template_purposes() == [("t", "p")]
    assert store.oversight_key_of("t", "d1").public_key == b"k" * 32 and store.oversight_key_of("t", "x") is None
    assert [r.seq for r in store.oversight_index()] == [1, 2] and store.oversight_index()[0].bundle == b""
    assert [r.bundle for r in store.oversight_bundles("t", "d1")] == [b"body", b"body"]
    with pytest.raises(StoreConflict), store.transaction() as tx:
        tx.insert_oversight_bundle(bundle(3, digest=f"{1:064x}"))  # the same bytes twice
    with pytest.raises(StoreConflict), store.transaction() as tx:
        tx.insert_oversight_key(OversightKeyRow("t", "d1", b"j" * 32, "fp2", T0))


def test_outbox_keeps_the_persons_base_on_the_newest_row_only(store):
    with store.transaction() as tx:
        tx.insert_outbox(OutboxRow(1, T0, "a", 3, "h1", b"b1", b"s1", ["x", "y"]))
        tx.insert_outbox(OutboxRow(2, T0, "b", 5, "h2", b"b2", b"s2", ["y"]))
    assert store.outbox_last().persons == ["y"] and [r.persons for r in store.outbox(False)] == [[], ["y"]]
    with store.transaction() as tx:
        assert tx.ack_outbox(1, T0 + 1) == 1
    assert [r.seq for r in store.outbox()] == [2]


def test_termination_and_its_cancellation(store):
    assert store.termination() is None
    with store.transaction() as tx:
        tx.insert_termination(TerminationRow(T0, "2025-02-17", 30, "c" * 64, False))
        assert tx.record_filing_cancellation("FR-1", "2025-02-01", T0 + 5) == 1
        assert tx.record_filing_cancellation("FR-2", "2025-02-02", T0 + 6) == 0
    t = store.termination()
    assert (t.reference, t.cancelled_on, t.cancelled_at, t.deadline) == ("FR-1", "2025-02-01", T0 + 5, "2025-02-17")


def test_wipe_keeps_the_measures_records(store):
    with store.transaction() as tx:
        tx.insert_assessment(assessment())
        tx.insert_oversight_key(OversightKeyRow("t", "d1", b"k" * 32, "fp", T0))
        tx.insert_oversight_bundle(bundle(1))
        tx.wipe()
    assert len(store.assessments()) == 1 and len(store.oversight_index()) == 1 and store.oversight_keys()
