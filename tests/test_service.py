"""The matching service over real gRPC on loopback: roles, status codes + reasons,
idempotency, deadlines, health/reflection, 1:1 / 1:N, withdrawal, revocation, restarts."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from engine._proto.veilface.v1 import matcher_pb2 as pb
from engine._proto.veilface.v1 import matcher_pb2_grpc as pb_grpc
from engine.client import LocationClass, ServiceError
from engine.service.clock import ManualClock
from engine.template import Template
from tests.support import NOTICE, PURPOSE, TOKENS, capture, faces, running_server


@pytest.fixture
def srv(tmp_path):
    with running_server(tmp_path / "data") as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        yield s


@pytest.fixture
def rng():
    return np.random.default_rng(5)


def enrol(dev, subject, emb, purpose=PURPOSE, **kw):
    c = dev.record_consent(subject, NOTICE, 30, purpose=purpose)
    return dev.enroll(subject, emb, c.consent_id, purpose=purpose, **kw)


def err(fn) -> ServiceError:
    with pytest.raises(ServiceError) as ei:
        fn()
    return ei.value


def raw_stub(target):
    ch = grpc.insecure_channel(target)
    return ch, pb_grpc.MatcherStub(ch)


# -- authentication and roles -------------------------------------------------------------
def test_every_rpc_needs_a_token(srv):
    ch, stub = raw_stub(srv.target)
    with pytest.raises(grpc.RpcError) as ei:
        stub.ComplianceReport(pb.ComplianceReportRequest(), timeout=5)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("veilface-reason", "MISSING_TOKEN") in ei.value.trailing_metadata()
    with pytest.raises(grpc.RpcError) as ei:
        stub.ComplianceReport(pb.ComplianceReportRequest(), metadata=(("authorization", "Bearer nope"),), timeout=5)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ch.close()


@pytest.mark.parametrize("role,allowed", [
    ("device", False), ("operator", False), ("auditor", True), ("admin", True)])
def test_audit_log_roles(srv, role, allowed):
    c = srv.client(role)
    if allowed:
        assert c.verify_audit_chain().ok
    else:
        e = err(lambda: list(c.audit_log()))
        assert e.code == grpc.StatusCode.PERMISSION_DENIED and e.reason == "ROLE_NOT_ALLOWED"


def test_auditor_and_operator_cannot_enrol_and_device_cannot_decommission(srv):
    for role in ("auditor", "operator", "admin"):
        d = srv.device()
        d._md = (("authorization", f"Bearer {TOKENS[role]}"),)
        e = err(lambda: d.enroll("s1", faces(1)[0], "c_x"))
        assert e.code == grpc.StatusCode.PERMISSION_DENIED
    e = err(lambda: srv.client("device").decommission())
    assert e.code == grpc.StatusCode.PERMISSION_DENIED
    e = err(lambda: srv.client("operator").decommission())
    assert e.code == grpc.StatusCode.PERMISSION_DENIED


def test_permission_checked_before_existence(srv):
    # an auditor asking to withdraw a subject that does not exist learns nothing about it
    e = err(lambda: srv.client("auditor").withdraw("no-such-subject"))
    assert e.code == grpc.StatusCode.PERMISSION_DENIED
    e = err(lambda: srv.client("operator").withdraw("no-such-subject"))
    assert e.code == grpc.StatusCode.NOT_FOUND and e.reason == "SUBJECT_NOT_FOUND"


def test_denials_are_audited(srv):
    with pytest.raises(ServiceError):
        list(srv.client("device").audit_log())
    denied = [e for e in srv.client("auditor").audit_log() if e.result == "PERMISSION_DENIED"]
    assert denied and denied[-1].actor_role == "device" and denied[-1].action == "GetAuditLog"


def test_health_and_reflection(srv):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    ch = grpc.insecure_channel(srv.target)
    h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="veilface.v1.Matcher"), timeout=5)
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as ei:       # reflection needs a token like everything else
        list(stub.ServerReflectionInfo(iter([req]), timeout=5))
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    resp = list(stub.ServerReflectionInfo(iter([req]), timeout=5,
                                          metadata=(("authorization", f"Bearer {TOKENS['auditor']}"),)))
    names = {s.name for s in resp[0].list_services_response.service}
    assert "veilface.v1.Matcher" in names and "grpc.health.v1.Health" in names
    ch.close()


# -- status codes ---------------------------------------------------------------------------
def test_malformed_template_is_invalid_argument(srv):
    dev = srv.device()
    c = dev.record_consent("s1", NOTICE, 30)
    ch, stub = raw_stub(srv.target)
    md = (("authorization", f"Bearer {TOKENS['device']}"),)
    for blob in (b"garbage", b"VFT\x01\xff\xff\xff\xff", b""):
        with pytest.raises(grpc.RpcError) as ei:
            stub.Enroll(pb.EnrollRequest(subject_id="s1", template=blob, consent_id=c.consent_id, purpose=PURPOSE,
                                         device_id="gate-1"), metadata=md, timeout=5)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reason = dict(ei.value.trailing_metadata())["veilface-reason"]
        assert reason in ("MALFORMED_TEMPLATE", "MISSING_TEMPLATE")
    # an IoM code with an index out of range is malformed too
    t = srv.device(scheme="iom:m=32,q=16,dim=128").protect("s1", faces(1)[0])
    bad = Template(t.spec, np.full_like(t.data, 200), 1)
    e = err(lambda: dev.enroll("s1", template=bad, consent_id=c.consent_id))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "MALFORMED_TEMPLATE"
    ch.close()


def test_names_are_refused_as_subject_ids(srv):
    e = err(lambda: srv.device().record_consent("Jane Doe", NOTICE, 30))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "BAD_SUBJECT_ID"
    e = err(lambda: srv.device().record_consent("jane@example.com", NOTICE, 30))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT


def test_wrong_scheme_is_failed_precondition(srv):
    x = faces(2)
    dev = srv.device()
    enrol(dev, "s1", x[0])
    other = srv.device(scheme="biohash:bits=512,dim=128")
    e = err(lambda: other.verify("s1", x[0]))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "SCHEME_MISMATCH"
    unknown = dev.protect("s1", x[0])
    from engine.template import SchemeSpec
    forged = Template(SchemeSpec("nosuch", 1, {}), unknown.data, 1)
    e = err(lambda: dev.verify("s1", template=forged))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "UNKNOWN_SCHEME"


def test_not_found_and_already_exists(srv):
    x = faces(2)
    dev = srv.device()
    e = err(lambda: dev.verify("ghost", x[0]))
    assert e.code == grpc.StatusCode.NOT_FOUND and e.reason == "NOT_ENROLLED"
    c = dev.record_consent("s1", NOTICE, 30)
    dev.enroll("s1", x[0], c.consent_id)
    e = err(lambda: dev.enroll("s1", x[0], c.consent_id))
    assert e.code == grpc.StatusCode.ALREADY_EXISTS and e.reason == "ALREADY_ENROLLED"
    e = err(lambda: srv.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True))
    assert e.code == grpc.StatusCode.ALREADY_EXISTS and e.reason == "DEVICE_EXISTS"


def test_oversized_message_is_resource_exhausted(tmp_path):
    with running_server(tmp_path / "d", max_message_bytes=64 * 1024) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        ch, stub = raw_stub(s.target)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Verify(pb.VerifyRequest(subject_id="s", probe=b"x" * (200 * 1024), purpose=PURPOSE),
                        metadata=(("authorization", f"Bearer {TOKENS['device']}"),), timeout=5)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ch.close()


def test_idempotent_enrolment(srv):
    dev = srv.device()
    x = faces(2)
    c = dev.record_consent("s1", NOTICE, 30)
    t = dev.protect("s1", x[0])
    a = dev.enroll("s1", template=t, consent_id=c.consent_id, request_id="req-1")
    b = dev.enroll("s1", template=t, consent_id=c.consent_id, request_id="req-1")
    assert not a.replayed and b.replayed and a.enrolled_at == b.enrolled_at
    e = err(lambda: dev.enroll("s1", template=dev.protect("s1", x[1]), consent_id=c.consent_id, request_id="req-1"))
    assert e.code == grpc.StatusCode.ALREADY_EXISTS and e.reason == "REQUEST_ID_CONFLICT"
    assert len(list(srv.client("operator").list_subjects())) == 1


def test_deadline_is_honoured(srv):
    import time
    dev = srv.device()
    c = dev.record_consent("s1", NOTICE, 30)
    lock = srv.app.index.subject_lock("default", "s1")
    lock.acquire()                          # hold the subject: the enrolment waits past its deadline
    try:
        dev.timeout = 0.3
        e = err(lambda: dev.enroll("s1", faces(1)[0], c.consent_id))
        assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.15)                    # the server's copy of the deadline ends a hair later
    finally:
        lock.release()
    time.sleep(0.3)
    # the server saw the deadline had passed and did not store (nor acknowledge) anything
    assert srv.server.store.counts().templates_stored == 0
    results = [a.result for a in srv.client("auditor").audit_log(action="Enroll")]
    assert results == ["DEADLINE_EXCEEDED"]
    dev.timeout = 5
    assert dev.enroll("s1", faces(1)[0], c.consent_id).key_version == 1


# -- matching -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["biohash:bits=256,dim=128", "iom:m=128,q=16,dim=128", "rotation:dim=128"])
def test_verify_and_identify(srv, rng, scheme):
    dev = srv.device(scheme=scheme)
    x = faces(40, seed=1)
    for i in range(30):
        enrol(dev, f"s{i}", capture(x[i], rng))
    g = dev.verify("s3", capture(x[3], rng))
    assert g.matched and not g.fallback_required
    imp = dev.verify("s3", capture(x[4], rng))
    assert not imp.matched and imp.fallback_required and imp.fallback_methods and "alternative" in imp.fallback_message
    hits = dev.identify(capture(x[7], rng), top_k=3)
    assert hits[0][0] == "s7" and len(hits) <= 3
    assert dev.identify(capture(x[35], rng)) == []          # unknown person: "no match" is a normal answer
    # threshold below every score: top-k honoured
    assert len(dev.identify(capture(x[7], rng), top_k=4, threshold=-1e6)) == 4


def test_withdrawal_deletes_everywhere(srv, rng):
    dev = srv.device()
    x = faces(5)
    for i in range(5):
        if i != 2:
            enrol(dev, f"s{i}", capture(x[i], rng))
    c_old = dev.record_consent("s2", NOTICE, 30).consent_id
    dev.enroll("s2", capture(x[2], rng), c_old)
    enrol(dev, "s2", capture(x[2], rng), purpose="payment")
    r = dev.withdraw("s2")
    assert r.templates_deleted == 2 and r.consents_withdrawn == 2 and r.destroyed_key_version == 1
    e = err(lambda: dev.verify("s2", capture(x[2], rng)))
    assert e.code == grpc.StatusCode.NOT_FOUND and e.reason == "NOT_ENROLLED"
    assert "s2" not in dict(dev.identify(capture(x[2], rng), threshold=-1e6, top_k=10))
    assert srv.server.store.templates_of("default", "s2") == []
    # the old consent cannot be reused, and the destroyed key version cannot come back
    e = err(lambda: dev.enroll("s2", template=dev.protect("s2", x[2], version=1), consent_id=c_old))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "CONSENT_WITHDRAWN"
    c = dev.record_consent("s2", NOTICE, 30)
    e = err(lambda: dev.enroll("s2", template=dev.protect("s2", x[2], version=1), consent_id=c.consent_id))
    assert e.reason == "KEY_VERSION_REVOKED"
    assert dev.enroll("s2", capture(x[2], rng), c.consent_id).key_version == 2   # SDK moved to v2
    actions = [a.action for a in srv.client("auditor").audit_log(subject_id="s2")]
    assert "Withdraw" in actions


def test_revoke_and_reenrol_unlinkable(srv, rng):
    dev = srv.device()
    x = faces(3)
    for i in range(3):
        enrol(dev, f"s{i}", capture(x[i], rng))
    old = dev.protect("s1", capture(x[1], rng))
    r = dev.revoke("s1")
    assert (r.revoked_key_version, r.next_key_version, r.templates_deleted) == (1, 2, 1)
    e = err(lambda: dev.verify("s1", template=old))
    assert e.code == grpc.StatusCode.NOT_FOUND       # nothing enrolled any more
    c = dev.record_consent("s1", NOTICE, 30)
    assert dev.enroll("s1", capture(x[1], rng), c.consent_id).key_version == 2
    assert dev.verify("s1", capture(x[1], rng)).matched
    e = err(lambda: dev.verify("s1", template=old))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "KEY_VERSION_REVOKED"
    forged = dev.verify("s1", template=Template(old.spec, old.data, 2))
    assert not forged.matched and forged.score < 0.62        # impostor level
    e = err(lambda: dev.enroll("s1", template=old, consent_id=c.consent_id))
    assert e.reason == "KEY_VERSION_REVOKED"
    # 1:N under both versions in use still finds everyone
    assert dev.identify(capture(x[1], rng))[0][0] == "s1"
    assert dev.identify(capture(x[0], rng))[0][0] == "s0"


def test_listing_and_audit_pagination(srv, rng):
    dev = srv.device()
    x = faces(25)
    for i in range(25):
        enrol(dev, f"s{i:02d}", x[i])
    op = srv.client("operator")
    resp = op._call("ListSubjects", pb.ListSubjectsRequest(page_size=10))
    assert len(resp.subjects) == 10 and resp.next_page_token and resp.total == 25
    listed = list(op.list_subjects(page_size=7))
    assert [s.subject_id for s in listed] == sorted(f"s{i:02d}" for i in range(25))
    assert list(listed[0].schemes) == ['biohash/v1:{"bits":256,"dim":128}'] and list(listed[0].purposes) == [PURPOSE]
    entries = list(srv.client("auditor").audit_log(page_size=9))
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1)) and len(entries) > 50
    for e in entries:     # who / what / purpose / result; never a template or score
        assert "template" not in e.details_json and "score" not in e.details_json


def test_restart_reloads_galleries(tmp_path, rng):
    x = faces(20)
    clock = ManualClock()
    with running_server(tmp_path / "d", clock) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = s.device()
        for i in range(20):
            enrol(dev, f"s{i}", x[i])
        dev.withdraw("s4")
    with running_server(tmp_path / "d", clock) as s:
        assert s.app.loaded["templates"] == 19
        dev = s.device()
        assert dev.verify("s7", capture(x[7], rng)).matched
        assert dev.identify(capture(x[9], rng))[0][0] == "s9"
        assert err(lambda: dev.verify("s4", x[4])).code == grpc.StatusCode.NOT_FOUND
        assert s.client("auditor").verify_audit_chain().ok


def test_store_holds_no_raw_features_or_keys(tmp_path):
    from engine.keys import KeyDeriver
    x = faces(5).astype(np.float32)
    deriver = KeyDeriver(bytes(range(32)), "default")
    with running_server(tmp_path / "d") as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        dev = s.device(deriver=deriver)
        for i in range(5):
            enrol(dev, f"s{i}", x[i])
        dev.verify("s1", x[1])
    blob = b"".join(p.read_bytes() for p in (tmp_path / "d").iterdir() if p.is_file())
    key = deriver.derive("group.access_control", 1, "biohash")
    assert key not in blob and bytes(range(32)) not in blob
    for i in range(5):
        assert x[i].tobytes()[:32] not in blob
        normed = (x[i] / np.linalg.norm(x[i])).astype(np.float32)
        assert normed.tobytes()[:32] not in blob
