"""The compliance rules (docs/architecture.md, "Compliance rules"), one behaviour per test, through the
gRPC API (injected clock where time matters)."""
from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import grpc
import pytest

from engine.client import LocationClass, ServiceError
from engine.service.clock import ManualClock
from engine.service.config import ServiceConfig
from engine.service.status import BadRequest
from tests.support import NOTICE, faces, running_server

DAY = 86400.0
# Monday 2025-01-06 12:00 UTC
MONDAY = dt.datetime(2025, 1, 6, 12, tzinfo=dt.timezone.utc).timestamp()


@pytest.fixture
def srv(tmp_path):
    with running_server(tmp_path / "data", ManualClock(MONDAY), filing_threshold=5) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        yield s


def err(fn) -> ServiceError:
    with pytest.raises(ServiceError) as ei:
        fn()
    return ei.value


def count_templates(s) -> int:
    return s.server.store.counts().templates_stored


def strip_guardian(s, consent_id: str) -> None:
    """Simulate an imported consent row of a minor without its guardian record (raw file access)."""
    con = sqlite3.connect(s.server.store.path, isolation_level=None, timeout=30)
    try:
        con.execute("UPDATE consents SET guardian_ref = '' WHERE consent_id = ?", (consent_id,))
    finally:
        con.close()


def test_enrolment_without_a_consent_reference_is_refused(srv):
    e = err(lambda: srv.device().enroll("s1", faces(1)[0], ""))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "CONSENT_REQUIRED"
    assert count_templates(srv) == 0


def test_enrolment_with_an_unknown_consent_is_refused(srv):
    assert err(lambda: srv.device().enroll("s1", faces(1)[0], "c_doesnotexist")).reason == "CONSENT_REQUIRED"
    assert count_templates(srv) == 0


def test_bundled_consent_is_refused(srv):
    e = err(lambda: srv.device().record_consent("s1", NOTICE, 30, separate_consent=False))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "SEPARATE_CONSENT_REQUIRED"


def test_someone_elses_consent_does_not_count(srv):
    dev = srv.device()
    other = dev.record_consent("s2", NOTICE, 30)
    assert err(lambda: dev.enroll("s1", faces(1)[0], other.consent_id)).reason == "CONSENT_REQUIRED"
    assert count_templates(srv) == 0


def test_own_separate_consent_allows_enrolment(srv):
    dev = srv.device()
    c = dev.record_consent("s1", NOTICE, 30)
    assert c.notice_version == NOTICE and c.consented_at == MONDAY
    dev.enroll("s1", faces(1)[0], c.consent_id)
    assert count_templates(srv) == 1


def test_under_14_needs_a_guardian(srv):
    e = err(lambda: srv.device().record_consent("kid-1", NOTICE, 13))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "GUARDIAN_CONSENT_REQUIRED"


def test_consent_needs_an_age(srv):
    e = err(lambda: srv.device().record_consent("kid-1", NOTICE, 0))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "MISSING_SUBJECT_AGE"


def test_guardian_consent_allows_a_minor(srv):
    dev = srv.device()
    c = dev.record_consent("kid-1", NOTICE, 13, guardian_ref="g-1", guardian_relationship="parent")
    assert c.minor and c.guardian_consent
    dev.enroll("kid-1", faces(1)[0], c.consent_id)
    assert count_templates(srv) == 1


def test_fourteen_and_over_consent_themselves(srv):
    assert not srv.device().record_consent("teen-1", NOTICE, 14).minor


def test_minor_record_without_guardian_is_refused_at_enrolment(srv):
    # a minor's consent row without guardian (e.g. imported) is still refused at enrolment
    dev = srv.device()
    c = dev.record_consent("kid-1", NOTICE, 12, guardian_ref="g-1")
    strip_guardian(srv, c.consent_id)
    e = err(lambda: dev.enroll("kid-1", faces(1)[0], c.consent_id))
    assert e.reason == "GUARDIAN_CONSENT_REQUIRED"


def test_purpose_binding_at_enrolment(srv):
    dev = srv.device()
    c = dev.record_consent("s1", NOTICE, 30, purpose="access_control")
    e = err(lambda: dev.enroll("s1", faces(1)[0], c.consent_id, purpose="marketing"))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "PURPOSE_NOT_CONSENTED"


def test_purpose_binding_at_matching(srv):
    dev, x = srv.device(), faces(1)
    dev.enroll("s1", x[0], dev.record_consent("s1", NOTICE, 30, purpose="access_control").consent_id,
               purpose="access_control")
    assert err(lambda: dev.verify("s1", x[0], purpose="marketing")).reason == "NOT_ENROLLED"   # no oracle (issue 10)
    assert dev.identify(x[0], purpose="marketing") == []     # 1:N only among those who consented
    assert dev.identify(x[0], purpose="access_control")[0][0] == "s1"


def test_withdrawal_logged_and_not_enrolled(srv):
    dev = srv.device()
    c = dev.record_consent("s1", NOTICE, 30)
    dev.enroll("s1", faces(1)[0], c.consent_id)
    dev.withdraw("s1")
    assert err(lambda: dev.verify("s1", faces(1)[0])).reason == "NOT_ENROLLED"
    w = list(srv.client("auditor").audit_log(action="Withdraw"))
    assert len(w) == 1 and w[0].subject_id == "s1" and w[0].result == "OK"
    assert json.loads(w[0].details_json)["templates_deleted"] == 1


@pytest.fixture
def retained(srv):
    """s0, s1, s2 enrolled for 1, 10 and 100000 (capped) days."""
    dev, x = srv.device(), faces(3)
    replies = []
    for i, days in enumerate((1, 10, 100000)):
        c = dev.record_consent(f"s{i}", NOTICE, 30)
        replies.append(dev.enroll(f"s{i}", x[i], c.consent_id, retention_days=days))
    return dev, x, replies


def test_every_template_gets_an_expiry_capped_at_the_maximum(srv, retained):
    for r, days in zip(retained[2], (1, 10, 100000)):
        assert r.expires_at == MONDAY + min(days, srv.cfg.max_retention_days) * DAY


def test_expired_template_is_gone_at_the_next_call(srv, retained):
    dev, x = retained[:2]
    srv.clock.advance(2 * DAY)
    assert err(lambda: dev.verify("s0", x[0])).reason == "NOT_ENROLLED"
    assert dev.verify("s1", x[1]).matched
    assert count_templates(srv) == 2
    rep = srv.client("operator").compliance_report()
    assert rep["retention"]["purged_total"] == 1 and rep["retention"]["expired_pending_purge"] == 0


def test_purge_on_request_and_audited_per_subject(srv, retained):
    srv.clock.advance(22 * DAY)
    r = srv.client("operator").purge_expired()
    assert (r.templates_purged, r.subjects_purged) == (2, 2) and count_templates(srv) == 1
    purges = list(srv.client("auditor").audit_log(action="RETENTION_PURGE"))
    assert {p.subject_id for p in purges} == {"s0", "s1"}


def test_signage_required_in_public_places(srv):
    e = err(lambda: srv.client("admin").register_device("gate-2", LocationClass.PUBLIC_PLACE, "street"))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "SIGNAGE_REQUIRED"


def test_private_kind_declared_as_something_else_is_a_private_space(srv):
    d = srv.client("admin").register_device("cr-1", LocationClass.RESTRICTED_AREA, "changing room")
    assert d.location_class == LocationClass.PRIVATE_SPACE and not d.can_enroll and not d.can_identify


def test_private_space_device_cannot_enrol_or_identify(srv):
    srv.client("admin").register_device("room-1", LocationClass.PRIVATE_SPACE, "hotel_room")
    room = srv.device("room-1")
    c = room.record_consent("s1", NOTICE, 30)
    e = err(lambda: room.enroll("s1", faces(1)[0], c.consent_id))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "PRIVATE_SPACE_DEVICE"
    assert err(lambda: room.identify(faces(1)[0])).reason == "PRIVATE_SPACE_DEVICE"
    assert count_templates(srv) == 0


def test_unregistered_device_cannot_enrol(srv):
    c = srv.device().record_consent("s1", NOTICE, 30)
    e = err(lambda: srv.device("not-registered").enroll("s1", faces(1)[0], c.consent_id))
    assert e.reason == "DEVICE_NOT_REGISTERED" and count_templates(srv) == 0


def enrol_persons(srv, ids) -> None:
    dev, x = srv.device(), faces(10)
    for i in ids:
        dev.enroll(f"s{i}", x[i], dev.record_consent(f"s{i}", NOTICE, 30).consent_id)


def test_no_filing_alert_below_the_threshold(srv):
    enrol_persons(srv, range(4))
    assert not srv.client("operator").compliance_report()["filing"]["raised"]
    assert list(srv.client("auditor").audit_log(action="FILING_ALERT")) == []


def test_filing_alert_at_threshold_with_30_working_day_deadline(srv):
    enrol_persons(srv, range(5))                                       # the 5th distinct person
    rep = srv.client("auditor").compliance_report()
    f = rep["filing"]
    assert f["raised"] and f["persons_at_alert"] == 5 and f["threshold"] == 5 and rep["persons_stored"] == 5
    # 30 working days after Monday 2025-01-06 (weekends skipped) is Monday 2025-02-17
    assert f["deadline"] == "2025-02-17"
    alerts = list(srv.client("auditor").audit_log(action="FILING_ALERT"))
    assert len(alerts) == 1 and alerts[0].reason == "FILING_THRESHOLD_REACHED"


def test_filing_alert_is_raised_once(srv):
    enrol_persons(srv, range(6))
    assert len(list(srv.client("auditor").audit_log(action="FILING_ALERT"))) == 1


def test_not_the_only_method(srv):
    dev = srv.device()
    x = faces(2)
    dev.enroll("s1", x[0], dev.record_consent("s1", NOTICE, 30).consent_id)
    r = dev.verify("s1", x[1])
    assert not r.matched and r.fallback_required
    assert r.fallback_methods == srv.cfg.fallback_methods and "alternative" in r.fallback_message


@pytest.fixture
def burst(srv):
    """``verify_fail_limit`` failed verifications of s1 in a row."""
    dev, x = srv.device(), faces(3)
    dev.enroll("s1", x[0], dev.record_consent("s1", NOTICE, 30).consent_id)
    for _ in range(srv.cfg.verify_fail_limit):
        assert not dev.verify("s1", x[1]).matched
    return dev, x


def test_verify_burst_throttles_the_subject(srv, burst):
    dev, x = burst
    e = err(lambda: dev.verify("s1", x[0]))                  # even the genuine face is throttled now
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "VERIFY_BURST"


def test_verify_burst_raises_one_alert(srv, burst):
    alerts = list(srv.client("auditor").audit_log(action="INTRUSION_ALERT"))
    assert len(alerts) == 1 and alerts[0].subject_id == "s1" and alerts[0].reason == "VERIFY_BURST"


def test_verify_lockout_ends(srv, burst):
    dev, x = burst
    srv.clock.advance(srv.cfg.verify_lockout_s + 1)
    assert dev.verify("s1", x[0]).matched


def test_intrusion_detection_identify_enumeration(srv):
    dev = srv.device()
    x = faces(60)
    dev.enroll("s1", x[0], dev.record_consent("s1", NOTICE, 30).consent_id)
    codes = []
    for i in range(1, 60):
        try:
            assert dev.identify(x[i]) == []
        except ServiceError as e:
            codes.append((i, e.code, e.reason))
            break
    assert codes and codes[0][1] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert codes[0][0] == srv.cfg.identify_nomatch_limit + 1
    alerts = list(srv.client("auditor").audit_log(action="INTRUSION_ALERT"))
    assert alerts and alerts[0].reason == "IDENTIFY_ENUMERATION" and alerts[0].device_id == "gate-1"


def test_identify_rate_limit(tmp_path):
    with running_server(tmp_path / "d", ManualClock(MONDAY), identify_limit=5) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = s.device()
        x = faces(2)
        dev.enroll("s1", x[0], dev.record_consent("s1", NOTICE, 30).consent_id)
        for _ in range(5):
            assert dev.identify(x[0])[0][0] == "s1"
        e = err(lambda: dev.identify(x[0]))
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "IDENTIFY_THROTTLED"
        assert [a.reason for a in s.client("auditor").audit_log(action="INTRUSION_ALERT")] == ["IDENTIFY_RATE"]


def test_decommission_needs_confirmation(srv):
    e = err(lambda: srv.client("admin").decommission(confirm="yes"))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "CONFIRMATION_REQUIRED"


@pytest.fixture
def decommissioned(srv):
    dev, x = srv.device(), faces(4)
    for i in range(4):
        dev.enroll(f"s{i}", x[i], dev.record_consent(f"s{i}", NOTICE, 30).consent_id)
    return dev, x, srv.client("admin").decommission(reason="contract ended")


def test_decommission_writes_a_certificate(srv, decommissioned):
    r = decommissioned[2]
    cert = json.loads(r.certificate_json)
    assert r.templates_deleted == 4 and cert["subjects_deleted"] == 4 and cert["type"] == "veilface-deletion-certificate"
    files = list(Path(srv.cfg.data_dir).glob("deletion-certificate-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["certificate_sha256"] == r.certificate_sha256


def test_decommission_deletes_everything(srv, decommissioned):
    dev, x = decommissioned[:2]
    assert count_templates(srv) == 0
    assert err(lambda: dev.verify("s1", x[1])).code == grpc.StatusCode.NOT_FOUND


def test_decommissioned_matcher_refuses_writes(srv, decommissioned):
    e = err(lambda: decommissioned[0].record_consent("s9", NOTICE, 30))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "DECOMMISSIONED"


def test_decommission_is_audited_and_reported(srv, decommissioned):
    aud = srv.client("auditor")
    assert aud.verify_audit_chain().ok
    d = [a for a in aud.audit_log(action="Decommission") if a.result == "OK"]
    assert len(d) == 1 and json.loads(d[0].details_json)["certificate_sha256"] == decommissioned[2].certificate_sha256
    assert aud.compliance_report()["decommissioned"]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_is_the_default_and_needs_nothing(host):
    assert ServiceConfig().host == "127.0.0.1" and ServiceConfig(host=host).validate()


def test_remote_listening_needs_the_explicit_setting():
    with pytest.raises(BadRequest) as ei:
        ServiceConfig(host="0.0.0.0").validate()
    assert ei.value.reason == "REMOTE_NOT_ALLOWED"


def test_remote_listening_needs_tls():
    with pytest.raises(BadRequest) as ei:
        ServiceConfig(host="0.0.0.0", allow_remote=True).validate()
    assert ei.value.reason == "TLS_REQUIRED"
    ServiceConfig(host="0.0.0.0", allow_remote=True, tls_cert="c.pem", tls_key="k.pem").validate()
