"""keysvc: the matcher with the key service as its HE decider, through gRPC on loopback -- signed
decisions checked against the pinned key, tickets + grants + result hashes, no score to the
device, ReportDecision gone, lock-outs no device call lifts, forged / replayed decisions refused,
the key service down, contexts that are not the key service's."""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from engine._proto.veilface.v1 import matcher_pb2 as pb
from engine.client import LocationClass, ServiceError
from engine.keyservice.signing import DecisionRejected
from tests.support import NOTICE, capture, faces, running_server
from tests.support.keyservice import ks_device, register_he, running_pair

pytest.importorskip("tenseal")

VERIFY = "he:dim=128,mode=verify"
IDENTIFY = "he:dim=32,mode=identify"
PV, PI = "door", "lobby"


def err(fn) -> ServiceError:
    with pytest.raises(ServiceError) as ei:
        fn()
    return ei.value


def enrol(dev, subject, x, purpose):
    c = dev.record_consent(subject, NOTICE, 30, purpose=purpose)
    return dev.enroll(subject, x, c.consent_id, purpose=purpose)


@pytest.fixture
def pair(tmp_path):
    with running_pair(tmp_path) as (ks, m):
        m.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        register_he(ks, m, PV, "verify", 128)
        yield ks, m


@pytest.fixture
def vdev(pair):
    ks, m = pair
    dev = ks_device(ks, m, scheme=VERIFY, purpose=PV)
    x = faces(3, seed=5)
    for i in range(3):
        enrol(dev, f"s{i}", x[i], PV)
    return dev, x


def test_verify_is_decided_by_the_key_service_and_checked_by_matcher_and_device(pair, vdev):
    ks, m = pair
    dev, x = vdev
    rng = np.random.default_rng(1)
    g = dev.verify("s0", capture(x[0], rng))
    assert g.encrypted and g.matched and g.decision_verified and np.isnan(g.score) and not g.fallback_required
    imp = dev.verify("s1", capture(x[0], rng))
    assert not imp.matched and imp.fallback_required and imp.fallback_methods
    # the wire answer: a decision and its signature, no score, no ciphertext
    probe = dev.protect_probe("s0", capture(x[0], rng)).to_bytes()
    grant = dev.protection.grant("verify", probe, "s0", PV)
    raw = dev._call("Verify", pb.VerifyRequest(subject_id="s0", probe=probe, purpose=PV, device_id="gate-1",
                                               decision_grant=grant))
    assert raw.encrypted and raw.matched and raw.score == 0.0 and raw.decision_ticket and raw.decision_signature
    body = json.loads(raw.decision_payload)
    assert body["ticket"] == raw.decision_ticket and body["grant"] == grant and "score" not in body
    assert not raw.HasField("fallback") or raw.fallback.methods
    # the matcher's audit entries carry the signed decision's reference, never a score
    ver = [json.loads(a.details_json) for a in m.client("auditor").audit_log(action="Verify") if a.result == "OK"]
    assert all(d["encrypted"] and "signed_decision" in d and "score" not in d for d in ver)
    assert [d["matched"] for d in ver] == [True, False, True]
    decided = [json.loads(e.details_json) for e in ks.client("auditor").audit_log(action="Decide")]
    assert [d["matched"] for d in decided] == [True, False, True]
    assert m.client("auditor").verify_audit_chain().ok and ks.client("auditor").verify_audit_chain().ok


def test_the_device_refuses_an_answer_that_contradicts_the_signed_decision(pair, vdev):
    dev, x = vdev
    probe = dev.protect_probe("s1", x[0]).to_bytes()
    grant = dev.protection.grant("verify", probe, "s1", PV)
    raw = dev._call("Verify", pb.VerifyRequest(subject_id="s1", probe=probe, purpose=PV, device_id="gate-1",
                                               decision_grant=grant))
    assert not raw.matched
    forged = pb.VerifyResponse()
    forged.CopyFrom(raw)
    forged.matched = True
    with pytest.raises(DecisionRejected):
        dev.protection.verify_result(forged, 0.0, grant, probe, "s1", PV)
    tampered = pb.VerifyResponse()
    tampered.CopyFrom(raw)
    tampered.decision_payload = raw.decision_payload.replace(b'"matched":false', b'"matched":true')
    tampered.matched = True
    with pytest.raises(DecisionRejected):
        dev.protection.verify_result(tampered, 0.0, grant, probe, "s1", PV)
    with pytest.raises(DecisionRejected):     # the decision is bound to the probe the device sent
        dev.protection.verify_result(raw, 0.0, grant, dev.protect_probe("s1", x[0]).to_bytes(), "s1", PV)


def test_grants_are_required_single_use_and_bound_to_the_probe(pair, vdev):
    dev, x = vdev
    probe = dev.protect_probe("s0", x[0]).to_bytes()
    req = pb.VerifyRequest(subject_id="s0", probe=probe, purpose=PV, device_id="gate-1")
    assert err(lambda: dev._call("Verify", req)).reason == "DECISION_GRANT_REQUIRED"
    req.decision_grant = "g_" + "x" * 30
    assert err(lambda: dev._call("Verify", req)).reason == "DECISION_GRANT_UNKNOWN"
    other = dev.protect_probe("s0", x[0]).to_bytes()
    req.decision_grant = dev.protection.grant("verify", other, "s0", PV)       # a grant for another probe
    e = err(lambda: dev._call("Verify", req))
    assert e.code == grpc.StatusCode.PERMISSION_DENIED and e.reason == "DECISION_GRANT_MISMATCH"
    req.decision_grant = dev.protection.grant("verify", probe, "s0", PV)
    assert dev._call("Verify", req).matched
    assert err(lambda: dev._call("Verify", req)).reason == "DECISION_GRANT_UNKNOWN"     # used


@pytest.mark.parametrize("grant", ["\x00" * 10, "g_" + "y" * 5000, "ünïcode-grant"])
def test_hostile_grants_are_refused_and_nothing_is_decided(pair, vdev, grant):
    ks, _ = pair
    dev, x = vdev
    probe = dev.protect_probe("s0", x[0]).to_bytes()
    with pytest.raises(ServiceError):
        dev._call("Verify", pb.VerifyRequest(subject_id="s0", probe=probe, purpose=PV, device_id="gate-1",
                                             decision_grant=grant))
    assert not [e for e in ks.client("auditor").audit_log(action="Decide") if e.result == "OK"]


def test_report_decision_is_gone(pair, vdev):
    _, m = pair
    dev, _ = vdev
    call = dev.channel.unary_unary("/veilface.v1.Matcher/ReportDecision")
    with pytest.raises(grpc.RpcError) as ei:
        call(b"\n\x04tick\x10\x01", metadata=dev._md)
    # refused before any handler (the role table no longer names it) or unimplemented: never accepted
    assert ei.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED)
    assert not hasattr(pb, "ReportDecisionRequest")
    assert "ReportDecision" not in pb.DESCRIPTOR.services_by_name["Matcher"].methods_by_name


def test_no_device_call_lifts_a_lockout(pair, vdev):
    ks, m = pair
    dev, x = vdev
    rng = np.random.default_rng(4)
    for _ in range(m.cfg.verify_fail_limit):
        assert not dev.verify("s2", capture(x[0], rng)).matched
    assert err(lambda: dev.verify("s2", capture(x[2], rng))).reason == "VERIFY_BURST"
    call = dev.channel.unary_unary("/veilface.v1.Matcher/ReportDecision")
    for attempt in (lambda: call(b"\n\x04tick\x10\x01", metadata=dev._md),
                    lambda: dev.verify("s2", capture(x[2], rng)),
                    lambda: dev.record_consent("s2", NOTICE, 30, purpose=PV),
                    lambda: dev.list_he_contexts(PV)):
        try:
            attempt()
        except (ServiceError, grpc.RpcError):
            pass
        assert err(lambda: dev.verify("s2", capture(x[2], rng))).reason == "VERIFY_BURST"
    m.clock.advance(m.cfg.verify_lockout_s + 1)
    assert dev.verify("s2", capture(x[2], rng)).matched


def test_a_refused_probe_counts_as_a_failed_attempt(pair, vdev):
    from engine.evaluation.he_attacks import _encrypt_raw
    from engine.template import Template
    _, m = pair
    dev, x = vdev
    ctx = dev.protection._ctx(PV)
    for _ in range(m.cfg.verify_fail_limit):
        e = np.zeros(128)
        e[0] = 4.0
        t = Template(dev.scheme.spec, np.frombuffer(_encrypt_raw(ctx, e), dtype=np.uint8).copy(), ctx.epoch)
        assert err(lambda: dev.verify("s1", template=t)).reason == "HE_PROBE_REFUSED"
    assert err(lambda: dev.verify("s1", x[1])).reason == "VERIFY_BURST"


def test_identify_releases_ids_only(pair):
    ks, m = pair
    register_he(ks, m, PI, "identify", 32)
    dev = ks_device(ks, m, scheme=IDENTIFY, purpose=PI)
    x = faces(4, dim=32, seed=9)
    for i in range(4):
        enrol(dev, f"i{i}", x[i], PI)
    rng = np.random.default_rng(2)
    hits = dev.identify(capture(x[2], rng, noise=0.2), top_k=3)
    assert [h[0] for h in hits] == ["i2"] and np.isnan(hits[0][1])
    assert dev.identify(faces(1, dim=32, seed=99)[0]) == []
    probe = dev.protect_probe(None, x[1]).to_bytes()
    raw = dev._call("Identify", pb.IdentifyRequest(probe=probe, purpose=PI, device_id="gate-1", top_k=5,
                                                   decision_grant=dev.protection.grant("identify", probe, "", PI)))
    assert raw.encrypted and [c.subject_id for c in raw.candidates] == ["i1"]
    assert all(np.isnan(c.score) for c in raw.candidates)
    assert raw.gallery_size == 4 and "scores" not in json.loads(raw.decision_payload)


def test_without_a_key_service_encrypted_matches_are_refused_but_enrolment_works(tmp_path):
    from engine.he import KeyHolder
    with running_server(tmp_path / "m") as m:
        m.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        kh = KeyHolder("verify", 128, tenant="default")
        m.client("operator").register_he_context(kh, PV)
        from tests.support import TOKENS, device_client, register_assessments
        register_assessments(m.app, (PV,))
        dev = device_client(m.target, TOKENS["device"], "gate-1", scheme=VERIFY, purpose=PV, key_holder=kh)
        x = faces(1)[0]
        enrol(dev, "s0", x, PV)
        probe = dev.protect_probe("s0", x).to_bytes()
        e = err(lambda: dev._call("Verify", pb.VerifyRequest(subject_id="s0", probe=probe, purpose=PV,
                                                             device_id="gate-1", decision_grant="g_x")))
        assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "KEYSERVICE_NOT_CONFIGURED"


def test_only_the_key_services_context_can_be_registered(pair):
    from engine.he import KeyHolder
    ks, m = pair
    own = KeyHolder("verify", 128, tenant="default")          # an operator's own key pair
    e = err(lambda: m.client("operator").register_he_context(own, "other_purpose"))
    assert e.reason == "HE_CONTEXT_NOT_FROM_KEYSERVICE"
    e = err(lambda: m.client("operator").register_he_context(KeyHolder("verify", 128, "default", epoch=2), PV))
    assert e.reason == "HE_CONTEXT_NOT_FROM_KEYSERVICE"


def test_the_key_service_down_is_unavailable_and_not_counted(tmp_path):
    with running_pair(tmp_path) as (ks, m):
        m.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        register_he(ks, m, PV, "verify", 128)
        dev = ks_device(ks, m, scheme=VERIFY, purpose=PV)
        x = faces(1)[0]
        enrol(dev, "s0", x, PV)
        probe = dev.protect_probe("s0", x).to_bytes()
        grants = [dev.protection.grant("verify", probe, "s0", PV) for _ in range(m.cfg.verify_fail_limit + 1)]
        ks.server.server.stop(0).wait()
        for g in grants:
            e = err(lambda: dev._call("Verify", pb.VerifyRequest(subject_id="s0", probe=probe, purpose=PV,
                                                                 device_id="gate-1", decision_grant=g)))
            assert e.code == grpc.StatusCode.UNAVAILABLE and e.reason == "KEYSERVICE_UNAVAILABLE"


def test_config_requires_the_pinned_key_with_a_key_service(tmp_path):
    from engine.service.config import ServiceConfig
    from engine.service.status import BadRequest
    with pytest.raises(BadRequest, match="keyservice_key"):
        ServiceConfig(data_dir=str(tmp_path), keyservice="127.0.0.1:1", keyservice_token="t").validate()
    with pytest.raises(BadRequest, match="64 hex"):
        ServiceConfig(data_dir=str(tmp_path), keyservice="127.0.0.1:1", keyservice_token="t",
                      keyservice_key="zz").validate()
    cfg = ServiceConfig(data_dir=str(tmp_path), keyservice="127.0.0.1:1", keyservice_token="secret-token",
                        keyservice_key="ab" * 32).validate()
    assert cfg.public_dict()["keyservice_token"] == "***"
