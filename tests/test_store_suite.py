"""The store contract: every method of Store / WriteTx, run against each implementation
(``tests.support.stores.STORES``: SQLite now; PostgreSQL joins with issue 12)."""
from __future__ import annotations

import pytest

from engine.service.audit import AuditEvent
from engine.service.clock import ManualClock
from engine.service.store import (
    SCHEMA_VERSION,
    ConsentRow,
    DeviceRow,
    FilingAlert,
    HEContextRow,
    HEEpoch,
    HESnapshotRow,
    ProcessingRecord,
    RequestRow,
    StoreConflict,
    SubjectRow,
    TemplateKey,
    TemplateRow,
)
from tests.support.stores import STORES

T0 = 1_000.0
HE = 'he/v1:{"dim":128,"mode":"identify"}'
BIO = 'biohash/v1:{"bits":256,"dim":128}'


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path):
    s = STORES[request.param](tmp_path, ManualClock(T0))
    yield s
    s.close()


def template(subject: str, purpose: str = "p", scheme: str = BIO, kv: int = 1, expires: float = T0 + 100,
             tenant: str = "t", blob: bytes = b"\x01\x02") -> TemplateRow:
    return TemplateRow(tenant, subject, purpose, scheme, kv, blob, T0, expires, "c1", "gate-1")


def insert(store, *rows: TemplateRow) -> list[int]:
    with store.transaction() as tx:
        return [tx.insert_template(r) for r in rows]


# -- meta ------------------------------------------------------------------------------------------
def test_new_store_is_current_and_live(store):
    assert store.schema_version() == SCHEMA_VERSION and not store.decommissioned() and store.purged_total() == 0


def test_decommissioned_flag(store):
    with store.transaction() as tx:
        assert not tx.decommissioned()
        tx.mark_decommissioned()
    assert store.decommissioned()


def test_purged_total_adds_up(store):
    for n in (2, 3):
        with store.transaction() as tx:
            tx.add_purged(n)
    assert store.purged_total() == 5 and store.counts().purged_total == 5


# -- devices -----------------------------------------------------------------------------------------
def test_devices_insert_once(store):
    d = DeviceRow("t", "gate-1", 1, "lobby", True, T0)
    with store.transaction() as tx:
        assert tx.insert_device(d)
        assert not tx.insert_device(DeviceRow("t", "gate-1", 3, "toilet", False, T0))
    assert store.devices() == [d]


# -- consents ------------------------------------------------------------------------------------------
def test_consent_roundtrip_and_withdrawal(store):
    c = ConsentRow("c1", "t", "s1", "p", "n1", T0, 12, True, "g1", "parent", T0, "gate-1")
    with store.transaction() as tx:
        tx.insert_consent(c)
        tx.insert_consent(ConsentRow("c2", "t", "s1", "q", "n1", T0, 30, False, "", "", 0.0, "gate-1"))
        assert tx.consent("c1") == c and tx.consent("nope") is None
    with store.transaction() as tx:
        assert tx.withdraw_consents("t", "s1", T0 + 5) == 2
        assert tx.withdraw_consents("t", "s1", T0 + 6) == 0       # already withdrawn
        assert tx.consent("c1").withdrawn_at == T0 + 5
    assert store.counts().consents_active == 0


# -- subjects ------------------------------------------------------------------------------------------
def test_subject_state_upsert(store):
    with store.transaction() as tx:
        assert tx.subject("t", "s1") is None
        tx.put_subject(SubjectRow("t", "s1", 1, 0, T0))
        tx.put_subject(SubjectRow("t", "s1", 2, 1, T0 + 1))
        assert tx.subject("t", "s1") == SubjectRow("t", "s1", 2, 1, T0 + 1)
    assert store.subjects() == [SubjectRow("t", "s1", 2, 1, T0 + 1)]


# -- templates -----------------------------------------------------------------------------------------
def test_template_ids_increase_and_are_never_reused(store):
    a, b = insert(store, template("s1"), template("s2"))
    assert b > a
    with store.transaction() as tx:
        assert tx.delete_subject_templates("t", "s2") == 1
    (c,) = insert(store, template("s2"))
    assert c > b


def test_template_is_unique_per_subject_purpose_scheme(store):
    insert(store, template("s1"))
    with store.transaction() as tx:
        assert tx.has_template("t", "s1", "p", BIO) and not tx.has_template("t", "s1", "q", BIO)
    with pytest.raises(StoreConflict) as ei:
        insert(store, template("s1"))
    assert ei.value.code == "ALREADY_EXISTS"
    assert len(store.templates_of("t", "s1")) == 1


def test_template_index_omits_he_blobs(store):
    ids = insert(store, template("s1", blob=b"code"), template("s2", scheme=HE, blob=b"ciphertext"))
    idx = store.template_index()
    assert [r.id for r in idx] == ids
    assert idx[0].template == b"code" and idx[1].template is None
    assert store.template_blob(ids[1]) == b"ciphertext" and store.template_blob(10**9) is None


def test_templates_of(store):
    (i,) = insert(store, template("s1"))
    assert store.templates_of("t", "s1") == [TemplateRow("t", "s1", "p", BIO, 1, b"\x01\x02", T0, T0 + 100, "c1",
                                                         "gate-1", i)]
    assert store.templates_of("t", "s2") == [] and store.templates_of("u", "s1") == []


def test_delete_he_and_cancellable_templates_separately(store):
    insert(store, template("s1", kv=1), template("s1", purpose="q", kv=2), template("s1", purpose="r", scheme=HE, kv=7))
    with store.transaction() as tx:
        assert tx.delete_templates_upto("t", "s1", 1) == 1      # cancellable v1 only
        assert tx.delete_he_templates("t", "s1") == 1           # any epoch
    assert [(r.purpose, r.key_version) for r in store.templates_of("t", "s1")] == [("q", 2)]


def test_delete_epoch_templates_returns_subjects(store):
    insert(store, template("s1", scheme=HE, kv=1), template("s2", scheme=HE, kv=1), template("s3", scheme=HE, kv=2))
    with store.transaction() as tx:
        assert sorted(tx.delete_epoch_templates("t", "p", HE, 2)) == ["s1", "s2"]
    assert [r.subject for r in store.template_index()] == ["s3"]


def test_expiry_and_purge(store):
    insert(store, template("s1", expires=T0 + 10), template("s2", expires=T0 + 20))
    assert store.next_expiry() == T0 + 10 and store.expired_pending(T0 + 15) == 1
    with store.transaction() as tx:
        assert tx.expired_templates(T0 + 15) == [TemplateKey("t", "s1", "p", BIO)]
        assert tx.delete_expired(T0 + 15) == 1
    assert store.expired_pending(T0 + 15) == 0 and store.next_expiry() == T0 + 20


def test_list_subjects_pages_and_aggregates(store):
    insert(store, template("a", kv=1), template("a", purpose="q", kv=2, expires=T0 + 50), template("b"),
           template("c", purpose="q"), template("x", tenant="other"))
    page = store.list_subjects("t", "", 2)
    assert [s.subject for s in page] == ["a", "b"]
    a = page[0]
    assert (a.key_version, a.schemes, a.purposes, a.expires_at) == (2, [BIO], ["p", "q"], T0 + 50)
    assert [s.subject for s in store.list_subjects("t", "b", 10)] == ["c"]
    assert [s.subject for s in store.list_subjects("t", "", 10, purpose="q")] == ["a", "c"]
    assert store.list_subjects("t", "", 10, purpose="q")[0].purposes == ["q"]
    assert store.count_subjects("t") == 3 and store.count_subjects("t", "q") == 2 and store.count_subjects("u") == 0


# -- idempotent requests ---------------------------------------------------------------------------------
def test_request_records(store):
    r = RequestRow("t", "req-1", "Enroll", "device-1", "h" * 64, b"\x00reply", T0)
    with store.transaction() as tx:
        tx.insert_request(r)
        assert tx.request("t", "Enroll", "req-1") == r
        assert tx.request("t", "Enroll", "req-2") is None and tx.request("u", "Enroll", "req-1") is None
    assert store.purge_requests(T0) == 0 and store.purge_requests(T0 + 1) == 1
    with store.transaction() as tx:
        assert tx.request("t", "Enroll", "req-1") is None


# -- HE contexts and snapshots -----------------------------------------------------------------------------
def he_context(epoch: int, fp: str = "fp") -> HEContextRow:
    return HEContextRow("t", "p", HE, epoch, "identify", 128, f"{fp}{epoch}", True, b"public-keys", T0 + epoch)


def test_he_context_rotation(store):
    with store.transaction() as tx:
        tx.insert_he_context(he_context(1))
        assert tx.current_he_epoch("t", "p", HE) == HEEpoch(1, "fp1") and tx.max_retired_he_epoch("t", "p", HE) == 0
        tx.insert_he_context(he_context(2))
        assert tx.retire_he_contexts("t", "p", HE, 2, T0 + 9) == 1
        assert tx.current_he_epoch("t", "p", HE) == HEEpoch(2, "fp2") and tx.max_retired_he_epoch("t", "p", HE) == 1
    current = store.current_he_contexts()
    assert [(c.epoch, c.context) for c in current] == [(2, b"public-keys")]
    assert store.he_context_registered_at("t", "p", HE, 1) == T0 + 1     # a retired epoch keeps its record
    assert store.he_context_registered_at("t", "p", HE, 3) is None


def test_he_context_listing_counts_templates_of_the_epoch(store):
    with store.transaction() as tx:
        tx.insert_he_context(he_context(1))
    insert(store, template("s1", scheme=HE, kv=1), template("s2", scheme=HE, kv=1), template("s3", scheme=BIO))
    (info,) = store.list_he_contexts("t")
    assert (info.purpose, info.epoch, info.templates, info.eval_keys) == ("p", 1, 2, True)
    assert store.list_he_contexts("t", "q") == [] and store.list_he_contexts("u") == []


def test_he_snapshots(store):
    snap = HESnapshotRow("t", "p", HE, 1, "fp1", 3, {"a": 2, "b": 3}, b"blocks", T0)
    with store.transaction() as tx:
        tx.put_he_snapshot(snap)
        tx.put_he_snapshot(HESnapshotRow("t", "p", HE, 1, "fp1", 4, {"a": 4}, b"blocks2", T0 + 1))   # replaces
        tx.put_he_snapshot(HESnapshotRow("t", "p", HE, 2, "fp2", 5, {}, b"x", T0))
    assert store.he_snapshot("t", "p", HE, 1).subjects == {"a": 4} and store.he_snapshot("t", "p", HE, 9) is None
    assert sorted(store.he_snapshot_keys()) == [("t", "p", HE, 1), ("t", "p", HE, 2)]
    with store.transaction() as tx:
        assert tx.delete_he_snapshots("t", "p", HE, 2) == 1
        assert tx.delete_he_snapshot("t", "p", HE, 2) == 1
        assert tx.delete_all_he_snapshots() == 0


# -- alerts, audit ---------------------------------------------------------------------------------------
def test_filing_alert_first_one_counts(store):
    assert store.filing_alert() is None
    with store.transaction() as tx:
        tx.insert_filing_alert(FilingAlert(T0, "2025-02-17", 5, 5))
        tx.insert_filing_alert(FilingAlert(T0 + 1, "2025-02-18", 6, 5))
    assert store.filing_alert() == FilingAlert(T0, "2025-02-17", 5, 5)


def test_audit_chain_in_transactions(store):
    with store.transaction() as tx:
        ev = AuditEvent("Enroll", "device", "d1", "t", "s1", "p")
        assert tx.audit(ev) == 1 and ev.written
        assert tx.audit(AuditEvent("FILING_ALERT", "system", "x"), "ALERT", "FILING_THRESHOLD_REACHED") == 2
    assert store.audit(AuditEvent("Verify", "device", "d1", subject="s2")) == 3
    head = store.audit_head()
    assert head[0] == 3 and len(head[1]) == 64 and store.verify_audit().ok
    assert [e.seq for e in store.audit_entries(1, 10)] == [2, 3]
    assert [e.seq for e in store.audit_entries(0, 10, action="Enroll")] == [1]
    assert [e.seq for e in store.audit_entries(0, 10, subject="s2")] == [3]
    assert store.audit_entries(0, 1)[0].reason == ""


def test_rolled_back_transaction_writes_nothing(store):
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.insert_template(template("s1"))
            tx.audit(AuditEvent("Enroll"))
            raise RuntimeError("boom")
    assert store.template_index() == [] and store.audit_head()[0] == 0
    store.audit(AuditEvent("Enroll"))
    assert store.verify_audit().ok and store.audit_head()[0] == 1


# -- reporting, decommission -------------------------------------------------------------------------------
def test_counts_and_processing_records(store):
    with store.transaction() as tx:
        tx.insert_device(DeviceRow("t", "gate-1", 1, "lobby", True, T0))
        tx.insert_device(DeviceRow("t", "room-1", 3, "hotel_room", False, T0))
        tx.insert_consent(ConsentRow("c1", "t", "s1", "p", "n1", T0, 30, False, "", "", 0.0, "gate-1"))
        tx.audit(AuditEvent("Enroll", "device", "d", "t", "s1", "p"))
        tx.audit(AuditEvent("Verify", "device", "d", "t", "s1", "p"), "NOT_FOUND", "NOT_ENROLLED")   # not OK: not counted
        tx.audit(AuditEvent("INTRUSION_ALERT", "system", "ids"), "ALERT", "VERIFY_BURST")
    insert(store, template("s1"), template("s1", purpose="q"), template("s2"))
    c = store.counts()
    assert (c.persons_stored, c.templates_stored, c.devices, c.private_space_devices, c.consents_active, c.alerts) == \
        (2, 3, 2, 1, 1, 1)
    assert store.processing_records() == [ProcessingRecord("p", subjects=2, templates=2, enrolments=1),
                                          ProcessingRecord("q", subjects=1, templates=1)]


def test_wipe_keeps_audit_devices_and_alerts(store):
    with store.transaction() as tx:
        tx.insert_device(DeviceRow("t", "gate-1", 1, "lobby", True, T0))
        tx.insert_consent(ConsentRow("c1", "t", "s1", "p", "n1", T0, 30, False, "", "", 0.0, "gate-1"))
        tx.put_subject(SubjectRow("t", "s1", 1, 0, T0))
        tx.insert_request(RequestRow("t", "r1", "Enroll", "d", "h", b"", T0))
        tx.insert_he_context(he_context(1))
        tx.put_he_snapshot(HESnapshotRow("t", "p", HE, 1, "fp1", 1, {}, b"x", T0))
        tx.insert_filing_alert(FilingAlert(T0, "2025-02-17", 5, 5))
        tx.audit(AuditEvent("Enroll"))
    insert(store, template("s1"), template("s2"))
    with store.transaction() as tx:
        w = tx.wipe()
    assert (w.templates_deleted, w.subjects_deleted, w.consents_deleted, w.requests_deleted, w.he_contexts_deleted,
            w.he_snapshots_deleted) == (2, 1, 1, 1, 1, 1)
    assert store.template_index() == [] and store.subjects() == [] and store.current_he_contexts() == []
    assert len(store.devices()) == 1 and store.filing_alert() is not None and store.verify_audit().entries == 1


def test_maintenance_hooks_run(store):
    insert(store, template("s1"))
    store.checkpoint()
    store.vacuum()
    assert len(store.template_index()) == 1 and store.name and store.location
