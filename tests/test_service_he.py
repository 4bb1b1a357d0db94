"""Encrypted (he / CKKS) templates through the gRPC service on loopback: public-context
registration (private contexts refused), enrolment, 1:1 and 1:N decided by the key service
(keysvc: signed decisions, no score to the device; the device's self-report is gone), decisions in
the audit log, withdrawal / revocation / retention / decommission, epoch rotation, message sizes,
restart reload."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("tenseal")

from engine._proto.veilface.v1 import matcher_pb2 as pb  # noqa: E402
from engine.client import LocationClass, ServiceError  # noqa: E402
from engine.he import KeyHolder, PublicContext, blob_header  # noqa: E402
from tests.support import NOTICE, PURPOSE, TOKENS, capture, device_client, faces, running_server  # noqa: E402
from tests.support.keyservice import ks_device, register_he, running_keyservice, running_pair  # noqa: E402

VERIFY = "he:dim=128,mode=verify"
IDENTIFY = "he:dim=128,mode=identify"
DAY = 86400.0


def err(fn) -> ServiceError:
    with pytest.raises(ServiceError) as ei:
        fn()
    return ei.value


def enrol(dev, subject, emb, **kw):
    c = dev.record_consent(subject, NOTICE, 30)
    return dev.enroll(subject, emb, c.consent_id, **kw)


@pytest.fixture
def rng():
    return np.random.default_rng(11)


@pytest.fixture
def srv(tmp_path):
    with running_server(tmp_path / "data") as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        yield s


@pytest.fixture
def pair(tmp_path):
    """keysvc: a key service and a matcher that uses it as its HE decider."""
    with running_pair(tmp_path) as (ks, m):
        m.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        yield ks, m


@pytest.fixture
def ksrv(pair):
    """The matcher of ``pair``."""
    return pair[1]


@pytest.fixture(scope="module")
def vkh():
    return KeyHolder("verify", 128, tenant="default")


@pytest.fixture(scope="module")
def ikh():
    return KeyHolder("identify", 128, tenant="default")


def he_device(s, scheme, **kw):
    return device_client(s.target, TOKENS["device"], "gate-1", scheme=scheme, **kw)


def he_galleries(s) -> list:
    """The in-process HE gallery objects of a running server."""
    backend = s.app.index.backend
    return [backend.gallery(k) for k in backend.keys() if k.encrypted]


# -- registration ---------------------------------------------------------------------------
def test_enrolment_before_registration_is_refused(srv, vkh):
    e = err(lambda: enrol(he_device(srv, VERIFY, key_holder=vkh), "s1", faces(1)[0]))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "HE_CONTEXT_NOT_REGISTERED"
    assert srv.store.counts().templates_stored == 0


def test_private_context_is_refused_and_audited(srv, vkh):
    # raw bytes of the secret context, so the SDK cannot strip it
    e = err(lambda: srv.client("operator").register_he_context(vkh.to_bytes(), PURPOSE))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "HE_PRIVATE_CONTEXT"
    refused = [a for a in srv.client("auditor").audit_log(action="RegisterHEContext") if a.result != "OK"]
    assert [a.reason for a in refused] == ["HE_PRIVATE_CONTEXT"]


def test_identify_context_needs_evaluation_keys(srv, ikh):
    e = err(lambda: srv.client("operator").register_he_context(ikh.public_context(eval_keys=False).to_bytes(), PURPOSE))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "HE_EVAL_KEYS_REQUIRED"


def test_another_tenants_context_is_refused(srv):
    other = KeyHolder("verify", 128, tenant="other").public_context()
    assert err(lambda: srv.client("operator").register_he_context(other, PURPOSE)).reason == "HE_TENANT_MISMATCH"


def test_garbage_context_is_invalid_argument(srv):
    e = err(lambda: srv.client("operator").register_he_context(b"VFHE garbage", PURPOSE))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT


def test_devices_cannot_register_contexts(srv, vkh):
    e = err(lambda: srv.client("device").register_he_context(vkh.public_context(), PURPOSE))
    assert e.code == grpc.StatusCode.PERMISSION_DENIED


def test_only_the_public_half_of_a_key_holder_is_registered(srv, vkh):
    info = srv.client("operator").register_he_context(vkh, PURPOSE)
    assert (info.epoch, info.mode, info.dim, info.fingerprint, info.unchanged) == (1, "verify", 128, vkh.fingerprint, False)
    (row,) = srv.store.current_he_contexts()
    assert blob_header(row.context)["kind"] == "public_context"


def test_registering_the_same_context_again_is_idempotent(srv, vkh):
    op = srv.client("operator")
    first = op.register_he_context(vkh, PURPOSE)
    again = op.register_he_context(vkh.public_context().to_bytes(), PURPOSE)
    assert again.unchanged and again.fingerprint == vkh.fingerprint and again.registered_at == first.registered_at


def test_another_context_for_the_same_epoch_is_refused(srv, vkh):
    op = srv.client("operator")
    op.register_he_context(vkh, PURPOSE)
    other = KeyHolder("verify", 128, tenant="default")       # same epoch, other keys
    e = err(lambda: op.register_he_context(other.public_context(), PURPOSE))
    assert e.code == grpc.StatusCode.ALREADY_EXISTS and e.reason == "HE_CONTEXT_EXISTS"


def test_registered_contexts_are_listed_without_keys(srv, vkh):
    srv.client("operator").register_he_context(vkh, PURPOSE)
    listed = he_device(srv, VERIFY, key_holder=vkh).list_he_contexts()
    assert [(c.purpose, c.epoch, c.fingerprint, c.templates) for c in listed] == [(PURPOSE, 1, vkh.fingerprint, 0)]


def test_allowed_schemes_can_exclude_he(tmp_path, vkh):
    with running_server(tmp_path / "d", allowed_schemes=["biohash"]) as s:
        e = err(lambda: s.client("operator").register_he_context(vkh, PURPOSE))
        assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "SCHEME_NOT_ALLOWED"
        assert s.store.current_he_contexts() == []


# -- 1:1 ---------------------------------------------------------------------------------------
def test_verify_decided_by_the_key_service_and_audited(pair, rng):
    ks, srv = pair
    register_he(ks, srv, PURPOSE, "verify", 128)
    dev = ks_device(ks, srv, scheme=VERIFY)
    x = faces(3, seed=1)
    for i in range(3):
        r = enrol(dev, f"s{i}", x[i])
        assert r.key_version == 1 and r.scheme.startswith("he/")
    g = dev.verify("s0", capture(x[0], rng))
    assert g.encrypted and g.matched and np.isnan(g.score) and not g.fallback_required and g.decision_verified
    imp = dev.verify("s1", capture(x[0], rng))
    assert not imp.matched and imp.fallback_required and imp.fallback_methods
    assert "alternative" in imp.fallback_message
    # what the matcher returns: the key service's signed decision, no score, no ciphertext
    probe = dev.protect_probe("s0", capture(x[0], rng)).to_bytes()
    raw = dev._call("Verify", pb.VerifyRequest(subject_id="s0", probe=probe, purpose=PURPOSE, device_id="gate-1",
                                               decision_grant=dev.protection.grant("verify", probe, "s0", PURPOSE)))
    assert raw.encrypted and raw.matched and raw.score == 0.0 and raw.decision_ticket and raw.decision_signature
    assert json.loads(raw.decision_payload)["ticket"] == raw.decision_ticket and raw.fallback.methods
    # the audit log: one Verify entry per call, with the decision and its signed reference, no score
    aud = srv.client("auditor")
    ver = [json.loads(a.details_json) for a in aud.audit_log(action="Verify") if a.result == "OK"]
    assert [d["matched"] for d in ver] == [True, False, True]
    assert all(d["encrypted"] and d["signed_decision"] and "score" not in d for d in ver)
    assert aud.verify_audit_chain().ok
    # 1:N is refused on a verify-mode context; an unknown subject is NOT_FOUND
    e = err(lambda: dev.identify(capture(x[0], rng)))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "HE_MODE_MISMATCH"
    assert err(lambda: dev.verify("nobody", x[0])).code == grpc.StatusCode.NOT_FOUND


def test_failed_encrypted_verifies_count_towards_the_burst_limit(pair, rng):
    ks, srv = pair
    register_he(ks, srv, PURPOSE, "verify", 128)
    dev = ks_device(ks, srv, scheme=VERIFY)
    x = faces(2, seed=2)
    enrol(dev, "s0", x[0])
    assert dev.verify("s0", capture(x[0], rng)).matched
    for _ in range(srv.cfg.verify_fail_limit):                 # decided by the key service: no report to withhold
        assert not dev.verify("s0", x[1]).matched
    e = err(lambda: dev.verify("s0", capture(x[0], rng)))
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "VERIFY_BURST"


# -- 1:N ---------------------------------------------------------------------------------------
@pytest.fixture
def identify(pair):
    """An identify context of the key service; a capture device; s0..s3 enrolled (s3 for one day only)."""
    ks, srv = pair
    register_he(ks, srv, PURPOSE, "identify", 128)
    dev = ks_device(ks, srv, scheme=IDENTIFY)
    x = faces(4, seed=3)
    for i in range(4):
        enrol(dev, f"s{i}", x[i], retention_days=1 if i == 3 else 0)
    return dev, x


def test_identify_decided_by_the_decider(identify, rng):
    dev, x = identify
    for i in range(4):
        hits = dev.identify(capture(x[i], rng), top_k=3)
        assert hits and hits[0][0] == f"s{i}"      # the decider releases ids, not scores
    assert dev.identify(faces(1, seed=99)[0]) == []                # stranger: no match


def test_identify_reply_is_a_signed_decision_without_scores(identify):
    dev, x = identify
    probe = dev.protect_probe(None, x[0]).to_bytes()
    raw = dev._call("Identify", pb.IdentifyRequest(probe=probe, purpose=PURPOSE, device_id="gate-1", top_k=1,
                                                   decision_grant=dev.protection.grant("identify", probe, "", PURPOSE)))
    assert raw.encrypted and [c.subject_id for c in raw.candidates] == ["s0"] and raw.gallery_size == 4
    assert np.isnan(raw.candidates[0].score) and raw.decision_ticket
    assert json.loads(raw.decision_payload)["subject_ids"] == ["s0"]


def test_identify_decisions_are_audited(ksrv, identify, rng):
    dev, x = identify
    dev.identify(capture(x[0], rng))
    dev.identify(faces(1, seed=99)[0])
    dec = [json.loads(a.details_json) for a in ksrv.client("auditor").audit_log(action="Identify") if a.result == "OK"]
    assert [(d["encrypted"], d["candidates"]) for d in dec] == [(True, 1), (True, 0)]
    assert all("score" not in d and d["signed_decision"] for d in dec)


def test_withdrawal_removes_the_subject_from_the_encrypted_gallery(ksrv, identify, rng):
    dev, x = identify
    assert dev.withdraw("s1").templates_deleted == 1
    (gal,) = he_galleries(ksrv)
    assert "s1" not in gal and len(gal) == 3
    assert all(h != "s1" for h, _ in dev.identify(capture(x[1], rng), top_k=3))
    assert "s1" not in {s.subject_id for s in ksrv.client("operator").list_subjects()}


def test_revocation_deletes_the_subjects_he_template(ksrv, identify):
    dev = identify[0]
    assert dev.revoke("s2").templates_deleted == 1
    assert "s2" not in he_galleries(ksrv)[0] and ksrv.store.templates_of("default", "s2") == []


def test_retention_purges_encrypted_templates(ksrv, identify, rng):
    dev, x = identify
    ksrv.clock.advance(2 * DAY)
    assert ksrv.client("operator").purge_expired().templates_purged == 1
    assert "s3" not in he_galleries(ksrv)[0] and len(he_galleries(ksrv)[0]) == 3
    assert [s.subject_id for s in ksrv.client("operator").list_subjects()] == ["s0", "s1", "s2"]


def test_too_large_encrypted_result_is_refused(pair, monkeypatch):
    """A 1:N result above max_response_bytes is refused, not sent on (a real one needs ~10^4 templates:
    the backend's reply is inflated here)."""
    ks, srv = pair
    register_he(ks, srv, PURPOSE, "identify", 128)
    dev = ks_device(ks, srv, scheme=IDENTIFY)
    backend = srv.app.index.backend
    real = backend.search
    limit = max(srv.cfg.max_message_bytes, srv.cfg.max_response_bytes) - 4096
    monkeypatch.setattr(backend, "search", lambda key, probe, k, thr: real(key, probe, k, thr) + b"\0" * limit)
    e = err(lambda: dev.identify(faces(1)[0]))
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "HE_RESULT_TOO_LARGE"
    audited = [a for a in srv.client("auditor").audit_log(action="Identify")]
    assert [(a.result, a.reason) for a in audited] == [("RESOURCE_EXHAUSTED", "HE_RESULT_TOO_LARGE")]


# -- revocation = new epoch ------------------------------------------------------------------------
def test_epoch_rotation_refuses_old_ciphertexts(pair, rng):
    ks, srv = pair
    op = srv.client("operator")
    register_he(ks, srv, PURPOSE, "verify", 128)
    dev = ks_device(ks, srv, scheme=VERIFY)
    x = faces(2, seed=4)
    enrol(dev, "s0", x[0])
    pub1, _ = ks.client("device").he_context(PURPOSE, "verify", 128)
    old_probe = dev.protect_probe("s0", x[0])
    old_tpl = dev.protect("s1", x[1])
    r = ks.client("admin").rotate("HE", purpose=PURPOSE, mode="verify", dim=128)   # epoch 2; epoch 1's key shredded
    assert (r.old_version, r.new_version, r.shredded) == (1, 2, True)
    info = register_he(ks, srv, PURPOSE, "verify", 128)
    assert (info.epoch, info.retired_epoch, info.templates_deleted) == (2, 1, 1)
    assert [c.epoch for c in op.list_he_contexts()] == [2]
    e = err(lambda: dev.verify("s0", template=old_probe))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "HE_EPOCH_REVOKED"
    c = dev.record_consent("s1", NOTICE, 30)
    e = err(lambda: dev.enroll("s1", consent_id=c.consent_id, template=old_tpl))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "HE_EPOCH_REVOKED"
    e = err(lambda: op.register_he_context(pub1.to_bytes(), PURPOSE))   # cannot go back
    assert e.reason in ("HE_EPOCH_REVOKED", "HE_CONTEXT_NOT_FROM_KEYSERVICE")
    # re-enrol from a fresh capture under the new epoch (the device fetches the new context)
    dev.protection.refresh()
    assert enrol(dev, "s0b", x[0]).key_version == 2
    assert dev.verify("s0b", capture(x[0], rng)).matched
    assert err(lambda: dev.verify("s0", x[0])).code == grpc.StatusCode.NOT_FOUND   # old template is gone
    # the retired epoch keeps no key material in the store
    con = sqlite3.connect(f"file:{srv.store.path}?mode=ro", uri=True, timeout=30)
    rows = con.execute("SELECT epoch, length(context) FROM he_contexts ORDER BY epoch").fetchall()
    con.close()
    assert rows[0] == (1, 0) and rows[1][1] > 0


# -- threat model, restart, sizes ------------------------------------------------------------------
def test_matcher_has_no_private_context_and_restart_reloads(tmp_path, rng):
    x = faces(3, seed=5)
    data = tmp_path / "data"
    with running_keyservice(tmp_path / "ks") as ks:
        with running_server(data, ks.clock, **ks.matcher_settings()) as s:
            s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
            register_he(ks, s, PURPOSE, "identify", 128)
            dev = ks_device(ks, s, scheme=IDENTIFY)
            for i in range(3):
                enrol(dev, f"s{i}", x[i])
            for e in s.app.contexts.entries():
                assert isinstance(e.context, PublicContext) and not e.context.is_private()
            for g in he_galleries(s):
                assert not g.ctx.is_private()
        with running_server(data, ks.clock, **ks.matcher_settings()) as s:   # restart: galleries rebuilt
            assert s.app.loaded["templates"] == 3
            dev = ks_device(ks, s, scheme=IDENTIFY)
            for i in range(3):
                assert dev.identify(capture(x[i], rng), top_k=1)[0][0] == f"s{i}"
            store = s.store
            for row in store.current_he_contexts():
                assert blob_header(row.context)["kind"] == "public_context"
                assert not PublicContext.from_bytes(row.context).is_private()
            for row in store.template_index():
                from engine.template import Template
                blob = store.template_blob(row.id)
                assert blob_header(Template.from_bytes(blob).data.tobytes())["kind"] == "template"
            store.checkpoint()
        ikh = ks.server.keys.he_key("default", PURPOSE, "identify", 128)
    raw = b"".join(p.read_bytes() for p in Path(data).iterdir() if p.name.startswith("veilface.db"))
    secret_part = ikh.to_bytes()[-4096:]                    # from the SEAL-serialised secret key
    assert secret_part[:256] not in raw and secret_part[-256:] not in raw
    assert b"secret_context" not in raw


def test_message_sizes(tmp_path, ikh):
    # a 1:N probe (~262 KB) fits the default limit (the other tests); a small server limit still
    # refuses it with RESOURCE_EXHAUSTED, while the streamed context upload fits in small chunks
    with running_server(tmp_path / "d", max_message_bytes=128 * 1024, max_he_context_bytes=32 << 20) as s:
        s.client("admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
        op = s.client("operator")
        info = op.register_he_context(ikh, PURPOSE, chunk_bytes=64 * 1024)      # several MB in 64 KB chunks
        assert info.eval_keys and info.epoch == ikh.epoch
        dev = he_device(s, IDENTIFY, key_holder=ikh)
        c = dev.record_consent("s0", NOTICE, 30)
        e = err(lambda: dev.enroll("s0", faces(1)[0], c.consent_id))
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with running_server(tmp_path / "e", max_he_context_bytes=1 << 20) as s:
        e = err(lambda: s.client("operator").register_he_context(ikh, PURPOSE))
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "HE_CONTEXT_TOO_LARGE"


def test_decommission_purges_he_contexts_and_templates(srv, vkh):
    srv.client("operator").register_he_context(vkh, PURPOSE)
    dev = he_device(srv, VERIFY, key_holder=vkh)
    enrol(dev, "s0", faces(1)[0])
    r = srv.client("admin").decommission(reason="end of service")
    cert = json.loads(r.certificate_json)
    assert r.templates_deleted == 1 and cert["he_contexts_deleted"] == 1
    assert not srv.app.contexts.entries() and not srv.app.index.backend.keys()
    assert srv.client("operator").list_he_contexts() == []
