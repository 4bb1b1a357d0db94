"""DESIGN.md section 4, rule by rule, through the gRPC API (injected clock where time matters)."""
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


def test_separate_consent_required(srv):
    dev = srv.device()
    x = faces(1)[0]
    e = err(lambda: dev.enroll("s1", x, ""))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "CONSENT_REQUIRED"
    e = err(lambda: dev.enroll("s1", x, "c_doesnotexist"))
    assert e.reason == "CONSENT_REQUIRED"
    e = err(lambda: dev.record_consent("s1", NOTICE, 30, separate_consent=False))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "SEPARATE_CONSENT_REQUIRED"
    other = dev.record_consent("s2", NOTICE, 30)            # someone else's consent does not count
    e = err(lambda: dev.enroll("s1", x, other.consent_id))
    assert e.reason == "CONSENT_REQUIRED"
    assert count_templates(srv) == 0                         # nothing stored
    c = dev.record_consent("s1", NOTICE, 30)
    assert c.notice_version == NOTICE and c.consented_at == MONDAY
    dev.enroll("s1", x, c.consent_id)
    assert count_templates(srv) == 1


def test_guardian_consent_under_14(srv):
    dev = srv.device()
    e = err(lambda: dev.record_consent("kid-1", NOTICE, 13))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "GUARDIAN_CONSENT_REQUIRED"
    e = err(lambda: dev.record_consent("kid-1", NOTICE, 0))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "MISSING_SUBJECT_AGE"
    c = dev.record_consent("kid-1", NOTICE, 13, guardian_ref="g-1", guardian_relationship="parent")
    assert c.minor and c.guardian_consent
    dev.enroll("kid-1", faces(1)[0], c.consent_id)
    teen = dev.record_consent("teen-1", NOTICE, 14)          # 14 and over: own consent suffices
    assert not teen.minor
    # a minor's consent row without guardian (e.g. imported) is still refused at enrolment
    strip_guardian(srv, c.consent_id)
    dev.withdraw("kid-1")
    c2 = dev.record_consent("kid-1", NOTICE, 12, guardian_ref="g-1")
    strip_guardian(srv, c2.consent_id)
    e = err(lambda: dev.enroll("kid-1", faces(1)[0], c2.consent_id))
    assert e.reason == "GUARDIAN_CONSENT_REQUIRED"


def test_purpose_binding(srv):
    dev = srv.device()
    x = faces(2)
    c = dev.record_consent("s1", NOTICE, 30, purpose="access_control")
    e = err(lambda: dev.enroll("s1", x[0], c.consent_id, purpose="marketing"))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "PURPOSE_NOT_CONSENTED"
    dev.enroll("s1", x[0], c.consent_id, purpose="access_control")
    e = err(lambda: dev.verify("s1", x[0], purpose="marketing"))
    assert e.reason == "PURPOSE_NOT_CONSENTED"
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


def test_retention_expiry_purge(srv):
    dev = srv.device()
    x = faces(3)
    for i, days in enumerate((1, 10, 100000)):              # the last is capped at max retention
        c = dev.record_consent(f"s{i}", NOTICE, 30)
        r = dev.enroll(f"s{i}", x[i], c.consent_id, retention_days=days)
        assert r.expires_at == MONDAY + min(days, srv.cfg.max_retention_days) * DAY
    srv.clock.advance(2 * DAY)
    # the first template is past its expiry: treated as gone and purged on the next call
    assert err(lambda: dev.verify("s0", x[0])).reason == "NOT_ENROLLED"
    assert dev.verify("s1", x[1]).matched
    assert count_templates(srv) == 2
    rep = srv.client("operator").compliance_report()
    assert rep["retention"]["purged_total"] == 1 and rep["retention"]["expired_pending_purge"] == 0
    srv.clock.advance(20 * DAY)
    assert srv.client("operator").purge_expired().templates_purged == 1
    assert count_templates(srv) == 1
    purges = list(srv.client("auditor").audit_log(action="RETENTION_PURGE"))
    assert {p.subject_id for p in purges} == {"s0", "s1"}


def test_private_space_devices_and_signage(srv):
    admin = srv.client("admin")
    e = err(lambda: admin.register_device("gate-2", LocationClass.PUBLIC_PLACE, "street"))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "SIGNAGE_REQUIRED"
    d = admin.register_device("room-1", LocationClass.PRIVATE_SPACE, "hotel_room")
    assert not d.can_enroll and not d.can_identify
    # a private kind declared as something else is still a private space
    d2 = admin.register_device("cr-1", LocationClass.RESTRICTED_AREA, "changing room")
    assert d2.location_class == LocationClass.PRIVATE_SPACE
    room = srv.device("room-1")
    c = room.record_consent("s1", NOTICE, 30)
    e = err(lambda: room.enroll("s1", faces(1)[0], c.consent_id))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "PRIVATE_SPACE_DEVICE"
    e = err(lambda: room.identify(faces(1)[0]))
    assert e.reason == "PRIVATE_SPACE_DEVICE"
    unknown = srv.device("not-registered")
    e = err(lambda: unknown.enroll("s1", faces(1)[0], c.consent_id))
    assert e.reason == "DEVICE_NOT_REGISTERED"
    assert count_templates(srv) == 0


def test_filing_alert_at_threshold_with_30_working_day_deadline(srv):
    dev = srv.device()
    x = faces(6)
    for i in range(4):
        dev.enroll(f"s{i}", x[i], dev.record_consent(f"s{i}", NOTICE, 30).consent_id)
    assert not srv.client("operator").compliance_report()["filing"]["raised"]
    dev.enroll("s4", x[4], dev.record_consent("s4", NOTICE, 30).consent_id)   # 5th distinct person
    rep = srv.client("auditor").compliance_report()
    f = rep["filing"]
    assert f["raised"] and f["persons_at_alert"] == 5 and f["threshold"] == 5
    # 30 working days after Monday 2025-01-06 (weekends skipped) is Monday 2025-02-17
    assert f["deadline"] == "2025-02-17"
    alerts = list(srv.client("auditor").audit_log(action="FILING_ALERT"))
    assert len(alerts) == 1 and alerts[0].reason == "FILING_THRESHOLD_REACHED"
    dev.enroll("s5", x[5], dev.record_consent("s5", NOTICE, 30).consent_id)   # raised once only
    assert len(list(srv.client("auditor").audit_log(action="FILING_ALERT"))) == 1
    assert rep["persons_stored"] == 5


def test_not_the_only_method(srv):
    dev = srv.device()
    x = faces(2)
    dev.enroll("s1", x[0], dev.record_consent("s1", NOTICE, 30).consent_id)
    r = dev.verify("s1", x[1])
    assert not r.matched and r.fallback_required
    assert r.fallback_methods == srv.cfg.fallback_methods and "alternative" in r.fallback_message


def test_intrusion_detection_verify_burst(srv):
    dev = srv.device()
    x = faces(3)
    dev.enroll("s1", x[0], dev.record_consent("s1", NOTICE, 30).consent_id)
    for _ in range(srv.cfg.verify_fail_limit):
        assert not dev.verify("s1", x[1]).matched
    e = err(lambda: dev.verify("s1", x[0]))                  # even the genuine face is throttled now
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "VERIFY_BURST"
    alerts = list(srv.client("auditor").audit_log(action="INTRUSION_ALERT"))
    assert len(alerts) == 1 and alerts[0].subject_id == "s1" and alerts[0].reason == "VERIFY_BURST"
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


def test_decommission_with_certificate(srv, tmp_path):
    dev = srv.device()
    x = faces(4)
    for i in range(4):
        dev.enroll(f"s{i}", x[i], dev.record_consent(f"s{i}", NOTICE, 30).consent_id)
    e = err(lambda: srv.client("admin").decommission(confirm="yes"))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    r = srv.client("admin").decommission(reason="contract ended")
    cert = json.loads(r.certificate_json)
    assert r.templates_deleted == 4 and cert["subjects_deleted"] == 4 and cert["type"] == "veilface-deletion-certificate"
    files = list(Path(srv.cfg.data_dir).glob("deletion-certificate-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["certificate_sha256"] == r.certificate_sha256
    assert count_templates(srv) == 0
    assert err(lambda: dev.verify("s1", x[1])).code == grpc.StatusCode.NOT_FOUND
    e = err(lambda: dev.record_consent("s9", NOTICE, 30))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "DECOMMISSIONED"
    aud = srv.client("auditor")
    assert aud.verify_audit_chain().ok
    d = [a for a in aud.audit_log(action="Decommission") if a.result == "OK"]
    assert len(d) == 1 and json.loads(d[0].details_json)["certificate_sha256"] == r.certificate_sha256
    assert aud.compliance_report()["decommissioned"]


def test_stays_local_by_default():
    cfg = ServiceConfig()
    assert cfg.host == "127.0.0.1" and cfg.validate()
    with pytest.raises(BadRequest) as ei:
        ServiceConfig(host="0.0.0.0").validate()
    assert ei.value.reason == "REMOTE_NOT_ALLOWED"
    with pytest.raises(BadRequest) as ei:
        ServiceConfig(host="0.0.0.0", allow_remote=True).validate()
    assert ei.value.reason == "TLS_REQUIRED"
    ServiceConfig(host="0.0.0.0", allow_remote=True, tls_cert="c.pem", tls_key="k.pem").validate()
    assert ServiceConfig(host="::1").validate() and ServiceConfig(host="localhost").validate()
