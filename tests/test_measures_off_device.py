"""Face information stays in the device unless the person separately consents (2025 Measures):
a central matcher stores a template only with an off-device-storage consent on the consent
record; withdrawing that consent alone deletes the central copy (an edge copy may remain);
hostile off-device fields get a typed error and store nothing."""
from __future__ import annotations

import datetime as dt
import json
import math

import grpc
import pytest

from engine._proto.veilface.v1 import matcher_pb2 as pb
from engine.client import LocationClass, OffDeviceTerms, ServiceError
from engine.edge import EdgeDevice
from engine.service.clock import ManualClock
from engine.service.config import ServiceConfig
from engine.service.status import BadRequest
from tests.support import NOTICE, OFF_DEVICE, assessment, faces, running_server

MONDAY = dt.datetime(2025, 1, 6, 12, tzinfo=dt.timezone.utc).timestamp()


@pytest.fixture
def srv(tmp_path):
    with running_server(tmp_path / "data", ManualClock(MONDAY)) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        yield s


def err(fn) -> ServiceError:
    with pytest.raises(ServiceError) as ei:
        fn()
    return ei.value


def counts(s) -> tuple[int, int, int]:
    c, o = s.store.counts(), s.store.off_device_summary()
    return c.templates_stored, c.consents_active, o.active


def test_central_enrolment_without_off_device_consent_is_refused_and_nothing_stored(srv):
    dev = srv.device()
    c = dev.record_consent("s1", NOTICE, 30, off_device=False)
    assert not c.off_device
    e = err(lambda: dev.enroll("s1", faces(1)[0], c.consent_id))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "OFF_DEVICE_CONSENT_REQUIRED"
    assert counts(srv) == (0, 1, 0)


def test_consent_with_its_off_device_consent_allows_central_storage(srv):
    dev = srv.device()
    c = dev.record_consent("s1", NOTICE, 30)
    assert c.off_device
    dev.enroll("s1", faces(1)[0], c.consent_id)
    row = srv.store.off_device_summary()
    assert counts(srv) == (1, 1, 1) and row.recipients == [OFF_DEVICE.recipient]
    entry = list(srv.client("auditor").audit_log(action="RecordConsent"))[0]
    assert json.loads(entry.details_json)["off_device_notice"] == OFF_DEVICE.notice_version


def test_another_subjects_off_device_consent_does_not_count(srv):
    dev = srv.device()
    c = dev.record_consent("s1", NOTICE, 30, off_device=False)
    dev.record_consent("s2", NOTICE, 30)
    assert err(lambda: dev.enroll("s1", faces(1)[0], c.consent_id)).reason == "OFF_DEVICE_CONSENT_REQUIRED"


def test_withdrawing_only_the_off_device_consent_deletes_the_central_copy(srv):
    dev, x = srv.device(), faces(2)
    c = dev.record_consent("s1", NOTICE, 30)
    dev.enroll("s1", x[0], c.consent_id)
    r = dev.withdraw_off_device_consent("s1")
    assert (r.templates_deleted, r.off_device_consents_withdrawn, r.withdrawn_at) == (1, 1, MONDAY)
    assert err(lambda: dev.verify("s1", x[0])).reason == "NOT_ENROLLED"
    assert dev.identify(x[0]) == []
    assert counts(srv) == (0, 1, 0)                  # the consent to face processing stays
    e = err(lambda: dev.enroll("s1", x[0], c.consent_id))
    assert e.reason == "OFF_DEVICE_CONSENT_WITHDRAWN" and counts(srv)[0] == 0
    audited = list(srv.client("auditor").audit_log(action="WithdrawOffDeviceConsent"))
    assert len(audited) == 1 and json.loads(audited[0].details_json)["templates_deleted"] == 1


def test_off_device_withdrawal_of_one_purpose_keeps_the_other(srv):
    dev, x = srv.device(), faces(1)
    for p in ("access_control", "payment"):
        dev.enroll("s1", x[0], dev.record_consent("s1", NOTICE, 30, purpose=p).consent_id, purpose=p)
    r = dev.withdraw_off_device_consent("s1", purpose="payment")
    assert r.templates_deleted == 1 and dev.verify("s1", x[0]).matched
    # no template for that purpose any more: Verify answers as for a subject never enrolled
    assert err(lambda: dev.verify("s1", x[0], purpose="payment")).reason == "NOT_ENROLLED"
    assert counts(srv) == (1, 2, 1)


def test_off_device_withdrawal_survives_a_restart(tmp_path):
    with running_server(tmp_path / "d", ManualClock(MONDAY)) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = s.device()
        dev.enroll("s1", faces(1)[0], dev.record_consent("s1", NOTICE, 30).consent_id)
        s.client("operator").withdraw_off_device_consent("s1")
    with running_server(tmp_path / "d", ManualClock(MONDAY)) as s:
        assert err(lambda: s.device().verify("s1", faces(1)[0])).reason == "NOT_ENROLLED"
        assert s.app.loaded["templates"] == 0


def test_an_edge_copy_remains_when_the_central_copy_goes(srv, tmp_path):
    x = faces(1)
    edge = EdgeDevice(tmp_path / "edge", "gate-1", clock=srv.clock)
    edge.register_assessment(assessment(mode="edge", today=dt.date(2025, 1, 6)))
    edge.enroll("s1", x[0], edge.record_consent("s1", NOTICE, 30).consent_id)
    dev = srv.device()
    dev.enroll("s1", x[0], dev.record_consent("s1", NOTICE, 30).consent_id)
    dev.withdraw_off_device_consent("s1")
    assert err(lambda: dev.verify("s1", x[0])).reason == "NOT_ENROLLED"
    assert edge.verify("s1", x[0]).matched
    edge.close()


def test_full_withdrawal_withdraws_the_off_device_consent_too(srv):
    dev = srv.device()
    dev.enroll("s1", faces(1)[0], dev.record_consent("s1", NOTICE, 30).consent_id)
    dev.withdraw("s1")
    assert counts(srv) == (0, 0, 0) and srv.store.off_device_summary().withdrawn == 1


def test_unknown_subject_off_device_withdrawal_is_not_found(srv):
    e = err(lambda: srv.device().withdraw_off_device_consent("nobody"))
    assert e.code == grpc.StatusCode.NOT_FOUND and e.reason == "OFF_DEVICE_CONSENT_NOT_FOUND"


def test_report_section_counts_off_device_consents(srv):
    dev = srv.device()
    dev.enroll("s1", faces(1)[0], dev.record_consent("s1", NOTICE, 30).consent_id)
    dev.record_consent("s2", NOTICE, 30)
    dev.withdraw_off_device_consent("s2")
    sec = srv.client("auditor").compliance_report()["off_device_consents"]
    assert sec == {"deployment": "central", "required": True, "active": 1, "withdrawn": 1,
                   "recipients": [OFF_DEVICE.recipient], "templates_without_off_device_consent": 0}


def test_an_edge_deployment_server_must_stay_on_the_device(tmp_path):
    with pytest.raises(BadRequest) as ei:
        ServiceConfig(deployment="edge", host="0.0.0.0", allow_remote=True, tls_cert="c", tls_key="k").validate()
    assert ei.value.reason == "REMOTE_NOT_ALLOWED"
    ServiceConfig(deployment="edge").validate()          # loopback: the device's own matcher


def test_an_edge_deployment_needs_no_off_device_consent(tmp_path):
    with running_server(tmp_path / "d", ManualClock(MONDAY), deployment="edge", assessments=False) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        s.client("admin").register_impact_assessment(assessment(mode="edge", today=dt.date(2025, 1, 6)))
        dev = s.device(off_device=False)
        dev.enroll("s1", faces(1)[0], dev.record_consent("s1", NOTICE, 30).consent_id)
        assert s.client("auditor").compliance_report()["off_device_consents"]["required"] is False


# -- hostile off-device fields -------------------------------------------------------------------------------
GOOD = dict(separate_consent=True, notice_version="od-1", transferred="template", recipient="central", why="1:N")
HOSTILE = {
    "not separate": ({"separate_consent": False}, "OFF_DEVICE_SEPARATE_CONSENT_REQUIRED"),
    "no notice version": ({"notice_version": ""}, "BAD_OFF_DEVICE_CONSENT"),
    "no recipient": ({"recipient": ""}, "BAD_OFF_DEVICE_CONSENT"),
    "blank purpose": ({"why": "   "}, "BAD_OFF_DEVICE_CONSENT"),
    "huge text": ({"transferred": "x" * 100_000}, "BAD_OFF_DEVICE_CONSENT"),
    "control characters": ({"recipient": "a\x00b"}, "BAD_OFF_DEVICE_CONSENT"),
    "long notice": ({"notice_version": "v" * 65}, "BAD_OFF_DEVICE_CONSENT"),
    "future": ({"consented_at": MONDAY + 86400}, "BAD_OFF_DEVICE_CONSENT"),
    "negative time": ({"consented_at": -5.0}, "BAD_OFF_DEVICE_CONSENT"),
    "NaN time": ({"consented_at": math.nan}, "BAD_OFF_DEVICE_CONSENT"),
    "infinite time": ({"consented_at": math.inf}, "BAD_OFF_DEVICE_CONSENT"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_off_device_fields_are_refused_and_nothing_stored(tmp_path, name):
    change, reason = HOSTILE[name]
    with running_server(tmp_path / "d", ManualClock(MONDAY)) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        req = pb.RecordConsentRequest(subject_id="s1", purpose="access_control", notice_version=NOTICE,
                                      separate_consent=True, subject_age=30, device_id="gate-1",
                                      off_device=pb.OffDeviceConsent(**{**GOOD, **change}))
        e = err(lambda: s.device()._call("RecordConsent", req))
        assert e.reason == reason and e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        assert counts(s) == (0, 0, 0)                 # neither record is stored
    with running_server(tmp_path / "d", ManualClock(MONDAY)) as s:   # restart unaffected
        assert counts(s) == (0, 0, 0) and s.client("auditor").verify_audit_chain().ok
        dev = s.device(off_device=OffDeviceTerms("od-2", "template", "central", "1:N"))
        dev.enroll("s1", faces(1)[0], dev.record_consent("s1", NOTICE, 30).consent_id)


# -- bulk enrolment applies the same rules -------------------------------------------------------------------
def _stream(s, rows):
    import grpc as _grpc

    from engine._proto.veilface.v1 import matcher_pb2_grpc as pb_grpc
    from tests.support import TOKENS
    stub = pb_grpc.MatcherStub(_grpc.insecure_channel(s.target))
    return stub.EnrollStream(iter([pb.EnrollStreamRequest(purpose="access_control", device_id="gate-1", rows=rows)]),
                             metadata=(("authorization", f"Bearer {TOKENS['operator']}"),))


def test_bulk_rows_without_off_device_consent_are_rejected(srv):
    dev, x = srv.device(), faces(2)
    with_c = dev.record_consent("s0", NOTICE, 30).consent_id
    without = dev.record_consent("s1", NOTICE, 30, off_device=False).consent_id
    r = _stream(srv, [pb.BulkEnrollRow(subject_id="s0", template=dev.protect("s0", x[0]).to_bytes(), consent_id=with_c),
                      pb.BulkEnrollRow(subject_id="s1", template=dev.protect("s1", x[1]).to_bytes(), consent_id=without)])
    assert r.enrolled == 1 and [(x.row, x.reason) for x in r.rejected] == [(1, "OFF_DEVICE_CONSENT_REQUIRED")]
    assert counts(srv)[0] == 1


def test_bulk_enrolment_without_an_assessment_stores_nothing(tmp_path):
    with running_server(tmp_path / "d", ManualClock(MONDAY), assessments=False) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = s.device()
        c = dev.record_consent("s0", NOTICE, 30).consent_id
        r = _stream(s, [pb.BulkEnrollRow(subject_id="s0", template=dev.protect("s0", faces(1)[0]).to_bytes(),
                                         consent_id=c)])
        assert r.enrolled == 0 and [x.reason for x in r.rejected] == ["IMPACT_ASSESSMENT_REQUIRED"]
        assert counts(s)[0] == 0
