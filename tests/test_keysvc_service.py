"""keysvc: the key service over gRPC on its own -- role tokens, per-transaction key release (rules,
rate limits, harvesting lock-out, audit without keys), decision grants, Decide (checks of the
request against the grant and of the result against its own key records, refused probes, replays,
no score in the answer), rotation, hostile input."""
from __future__ import annotations

import hashlib
import json

import grpc
import numpy as np
import pytest

from engine._proto.veilface.v1 import keyservice_pb2 as kpb
from engine.client import ServiceError
from engine.keyservice.signing import Verifier, check_decision
from engine.schemes import make_scheme
from tests.support.keyservice import KEK, KS_BOUND_DEVICE, KS_TOKENS, running_keyservice

pytest.importorskip("tenseal")

SPEC = make_scheme("biohash:bits=256,dim=128").spec.key()
PURPOSE = "access_control"
PROBE = hashlib.sha256(b"probe").digest()


def err(fn) -> ServiceError:
    with pytest.raises(ServiceError) as ei:
        fn()
    return ei.value


@pytest.fixture
def ks(tmp_path):
    with running_keyservice(tmp_path / "ks", fast_identify=[PURPOSE]) as k:
        yield k


@pytest.fixture
def dev(ks):
    return ks.client("device", device_id="gate-1")


# -- tokens and roles ----------------------------------------------------------------------------------
def test_every_call_needs_a_token_of_the_right_role(ks, dev):
    anon = ks.client("device", token="not-a-token")
    assert err(lambda: anon.verification_key()).code == grpc.StatusCode.UNAUTHENTICATED
    assert err(lambda: ks.client("matcher").release_key(PURPOSE, SPEC, "VERIFY", subject="a", key_version=1)
               ).reason == "ROLE_NOT_ALLOWED"
    assert err(lambda: dev.rotate("MASTER")).reason == "ROLE_NOT_ALLOWED"
    assert err(lambda: list(dev.audit_log())).reason == "ROLE_NOT_ALLOWED"
    assert err(lambda: dev.decide(ticket="t" * 20, grant="g", kind="verify", tenant="default", purpose=PURPOSE,
                                  subject="a", device_id="gate-1", probe_sha256=PROBE, threshold=0, top_k=0,
                                  result=b"x")).reason == "ROLE_NOT_ALLOWED"
    assert ks.client("auditor").verification_key().key_id == Verifier(ks.public_key).key_id
    denied = [e for e in ks.client("auditor").audit_log() if e.result != "OK"]
    assert {e.reason for e in denied} >= {"BAD_TOKEN", "ROLE_NOT_ALLOWED"}


def test_a_pinned_client_refuses_another_key_service(tmp_path, ks):
    with running_keyservice(tmp_path / "other") as other:
        from engine.keyservice.client import KeyServiceClient
        c = KeyServiceClient(other.target, KS_TOKENS["device"], pinned_key=ks.public_key)
        with pytest.raises(Exception, match="another key than the pinned"):
            c.verification_key()


# -- per-transaction keys -----------------------------------------------------------------------------
def test_release_is_deterministic_per_subject_version_and_spec_and_audited_without_the_key(ks, dev):
    a1 = dev.release_key(PURPOSE, SPEC, "ENROL", subject="alice", key_version=1)
    a2 = dev.release_key(PURPOSE, SPEC, "VERIFY", subject="alice", key_version=1)
    b = dev.release_key(PURPOSE, SPEC, "VERIFY", subject="bob", key_version=1)
    v2 = dev.release_key(PURPOSE, SPEC, "VERIFY", subject="alice", key_version=2)
    assert len(a1.key) == 32 and a1.key == a2.key and len({a1.key, b.key, v2.key}) == 3
    assert (a1.key_version, a1.master_version) == (1, 1)
    entries = [e for e in ks.client("auditor").audit_log(action="ReleaseKey")]
    assert [json.loads(e.details_json)["op"] for e in entries] == ["ENROL", "VERIFY", "VERIFY", "VERIFY"]
    assert all(e.device_id == "gate-1" and e.subject_id in ("alice", "bob") for e in entries)
    dump = json.dumps([list(e.ListFields()) for e in ks.client("auditor").audit_log()], default=str)
    for k in (a1.key, b.key, v2.key):
        assert k.hex() not in dump and str(k) not in dump


def test_group_keys_only_in_fast_mode_and_only_the_current_version(ks, dev):
    g = dev.release_key(PURPOSE, SPEC, "IDENTIFY_FAST", group=True)
    assert g.key_version == 1 and g.key == dev.release_key(PURPOSE, SPEC, "ENROL", group=True).key
    assert err(lambda: dev.release_key("marketing", SPEC, "IDENTIFY_FAST", group=True)).reason == "FAST_MODE_NOT_ENABLED"
    ks.client("admin").rotate("GROUP", purpose=PURPOSE)
    g2 = dev.release_key(PURPOSE, SPEC, "IDENTIFY_FAST", group=True)
    assert g2.key_version == 2 and g2.key != g.key
    e = err(lambda: dev.release_key(PURPOSE, SPEC, "IDENTIFY_FAST", group=True, key_version=1))
    assert e.reason == "KEY_VERSION_NOT_CURRENT"
    assert err(lambda: dev.release_key(PURPOSE, SPEC, "IDENTIFY_FAST", subject="alice", key_version=1)
               ).reason == "BAD_OP"


def test_master_rotation_changes_every_key(ks, dev):
    before = dev.release_key(PURPOSE, SPEC, "VERIFY", subject="alice", key_version=1)
    r = ks.client("admin").rotate("MASTER", reason="device gate-7 stolen")
    assert (r.old_version, r.new_version, r.shredded) == (1, 2, True)
    after = dev.release_key(PURPOSE, SPEC, "VERIFY", subject="alice", key_version=1)
    assert after.key != before.key and after.master_version == 2
    rot = [json.loads(e.details_json) for e in ks.client("auditor").audit_log(action="Rotate")]
    assert rot[0]["shredded"] is True and rot[0]["reason"] == "device gate-7 stolen"


@pytest.mark.parametrize("field,value,reason", [
    ("scheme", "biohash", "BAD_SCHEME"), ("scheme", "biohash/v9:{}", "BAD_SCHEME"),
    ("scheme", 'he/v2:{"dim":128,"mode":"verify"}', "BAD_SCHEME"),
    ("scheme", 'biohash/v2:{"bits":256, "dim":128}', "BAD_SCHEME"),      # not canonical
    ("scheme", "x" * 5000, "BAD_SCHEME"), ("key_version", 0, "BAD_KEY_VERSION"),
    ("key_version", -5, "BAD_KEY_VERSION"), ("key_version", 2_000_000_000, "BAD_KEY_VERSION"),
    ("subject_id", "alice@example.com", "BAD_SUBJECT_ID"), ("subject_id", "", "MISSING_SUBJECT_ID"),
    ("purpose", "Marketing!", "BAD_PURPOSE"), ("device_id", "gate-2", "DEVICE_MISMATCH"),
    ("tenant", "other", "TENANT_MISMATCH"), ("op", 0, "BAD_OP"), ("op", 99, "BAD_OP"),
])
def test_hostile_release_requests_get_typed_errors(ks, field, value, reason):
    bound = ks.client("device", token=KS_BOUND_DEVICE)
    req = dict(tenant="default", purpose=PURPOSE, subject_id="alice", scheme=SPEC, key_version=1, op=kpb.VERIFY,
               device_id="gate-1")
    req[field] = value
    e = err(lambda: bound._call("ReleaseKey", kpb.ReleaseKeyRequest(**req)))
    assert e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                      grpc.StatusCode.FAILED_PRECONDITION)
    assert e.reason == reason
    assert not [a for a in ks.client("auditor").audit_log(action="ReleaseKey") if a.result == "OK"]


def test_smuggled_unknown_fields_are_ignored_and_nothing_else_changes(ks, dev):
    raw = kpb.ReleaseKeyRequest(tenant="default", purpose=PURPOSE, subject_id="alice", scheme=SPEC, key_version=1,
                                op=kpb.VERIFY, device_id="gate-1").SerializeToString() + b"\xfa\x07\x05extra"
    call = dev.channel.unary_unary("/veilface.v1.KeyService/ReleaseKey")
    out = kpb.ReleasedKey.FromString(call(raw, metadata=dev._md))
    assert out.key == dev.release_key(PURPOSE, SPEC, "VERIFY", subject="alice", key_version=1).key


def test_key_harvesting_locks_the_device_out_and_raises_an_alert(tmp_path):
    with running_keyservice(tmp_path / "ks", device_subject_limit=5) as ks:
        dev = ks.client("device", device_id="gate-1")
        for i in range(5):
            dev.release_key(PURPOSE, SPEC, "VERIFY", subject=f"s{i}", key_version=1)
        dev.release_key(PURPOSE, SPEC, "VERIFY", subject="s0", key_version=1)        # a known subject: fine
        assert err(lambda: dev.release_key(PURPOSE, SPEC, "VERIFY", subject="s5", key_version=1)
                   ).reason == "KEY_HARVESTING"
        assert err(lambda: dev.release_key(PURPOSE, SPEC, "VERIFY", subject="s0", key_version=1)
                   ).reason == "DEVICE_THROTTLED"
        other = ks.client("device", device_id="gate-2")
        assert other.release_key(PURPOSE, SPEC, "VERIFY", subject="s9", key_version=1).key   # another device: fine
        alerts = list(ks.client("auditor").audit_log(action="INTRUSION_ALERT"))
        assert [a.reason for a in alerts] == ["KEY_HARVESTING"]
        ks.clock.advance(ks.cfg.lockout_s + ks.cfg.device_subject_window_s + 1)
        assert dev.release_key(PURPOSE, SPEC, "VERIFY", subject="s6", key_version=1).key


def test_device_rate_limit(tmp_path):
    with running_keyservice(tmp_path / "ks", device_limit=3) as ks:
        dev = ks.client("device", device_id="gate-1")
        for _ in range(3):
            dev.grant_decision(PURPOSE, "verify", PROBE, subject="a")
        assert err(lambda: dev.grant_decision(PURPOSE, "verify", PROBE, subject="a")).reason == "DEVICE_THROTTLED"
        assert err(lambda: dev.release_key(PURPOSE, SPEC, "VERIFY", subject="a", key_version=1)
                   ).code == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- HE contexts ---------------------------------------------------------------------------------------
def test_he_contexts_are_signed_and_devices_get_no_evaluation_keys(ks, dev):
    assert err(lambda: dev.he_context(PURPOSE, "verify", 128)).reason == "HE_KEY_NOT_FOUND"
    assert err(lambda: dev.he_context(PURPOSE, "verify", 128, create=True)).reason == "ROLE_NOT_ALLOWED"
    ctx, r = ks.client("operator").he_context(PURPOSE, "verify", 128, eval_keys=True, create=True)
    assert ctx.has_eval_keys and r.epoch == 1
    assert err(lambda: dev.he_context(PURPOSE, "verify", 128, eval_keys=True)).reason == "ROLE_NOT_ALLOWED"
    dctx, _ = dev.he_context(PURPOSE, "verify", 128)
    assert not dctx.has_eval_keys and dctx.fingerprint == ctx.fingerprint
    from engine.keyservice.signing import DecisionRejected, check_context
    with pytest.raises(DecisionRejected):       # the statement names the purpose: another purpose fails
        check_context(dev.verifier(), bytes(r.statement), bytes(r.signature), bytes(r.context), tenant="default",
                      purpose="other")


# -- decisions -----------------------------------------------------------------------------------------
@pytest.fixture
def verify_setup(ks, dev):
    from engine.he import EncryptedGallery
    ctx, _ = ks.client("operator").he_context(PURPOSE, "verify", 128, eval_keys=True, create=True)
    g = EncryptedGallery(ctx)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(128)
    x /= np.linalg.norm(x)
    g.add("alice", ctx.encrypt(x, "template"))
    return ctx, g, x


def decide(ks, grant, result, ticket="T" * 24, kind="verify", subject="alice", probe=PROBE, threshold=0.0,
           device="gate-1", top_k=0):
    return ks.client("matcher").decide(ticket=ticket, grant=grant, kind=kind, tenant="default", purpose=PURPOSE,
                                       subject=subject, device_id=device, probe_sha256=probe, threshold=threshold,
                                       top_k=top_k, result=result)


def test_a_granted_verify_is_decided_and_signed_without_a_score(ks, dev, verify_setup):
    ctx, g, x = verify_setup
    grant = dev.grant_decision(PURPOSE, "verify", PROBE, subject="alice")
    result = g.verify("alice", ctx.encrypt(x, "probe"))
    sd = decide(ks, grant, result, threshold=0.3)
    d = check_decision(Verifier(ks.public_key), sd.payload, sd.signature, kind="verify", ticket="T" * 24, grant=grant,
                       subject="alice", result_sha256=hashlib.sha256(result).hexdigest(), probe_sha256=PROBE.hex())
    assert d.matched and d.threshold == 0.5          # requested 0.3: floored at the key service's minimum
    body = json.loads(sd.payload)
    assert "score" not in json.dumps(body) and set(body) >= {"ticket", "grant", "result_sha256", "matched"}
    assert err(lambda: decide(ks, grant, result)).reason == "DECISION_GRANT_UNKNOWN"          # single use
    g2 = dev.grant_decision(PURPOSE, "verify", PROBE, subject="alice")
    assert err(lambda: decide(ks, g2, result, ticket="U" * 24)).reason == "DECISION_REPLAYED"  # same result


def test_decide_checks_the_request_against_the_grant(ks, dev, verify_setup):
    ctx, g, x = verify_setup
    result = g.verify("alice", ctx.encrypt(x, "probe"))
    for kw in ({"subject": "bob"}, {"probe": hashlib.sha256(b"other").digest()}, {"device": "gate-9"},
               {"kind": "identify", "subject": ""}):
        grant = dev.grant_decision(PURPOSE, "verify", PROBE, subject="alice")
        e = err(lambda: decide(ks, grant, result, **kw))
        assert e.reason in ("DECISION_GRANT_MISMATCH", "BAD_REQUEST"), kw


def test_a_scaled_probe_is_refused_by_the_norm(ks, dev, verify_setup):
    from engine.evaluation.he_attacks import _encrypt_raw
    ctx, g, x = verify_setup
    grant = dev.grant_decision(PURPOSE, "verify", PROBE, subject="alice")
    result = g.verify("alice", _encrypt_raw(ctx, 4.0 * np.eye(128)[0]))
    e = err(lambda: decide(ks, grant, result))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "HE_PROBE_REFUSED"


def test_a_result_of_another_context_or_a_garbage_blob_is_refused(tmp_path, ks, dev, verify_setup):
    from engine.he import EncryptedGallery, KeyHolder
    ctx, g, x = verify_setup
    foreign = KeyHolder("verify", 128, tenant="default").public_context()       # same tenant, not the key service's
    fg = EncryptedGallery(foreign)
    fg.add("alice", foreign.encrypt(x, "template"))
    grant = dev.grant_decision(PURPOSE, "verify", PROBE, subject="alice")
    assert err(lambda: decide(ks, grant, fg.verify("alice", foreign.encrypt(x, "probe")))).reason == "HE_CONTEXT_MISMATCH"
    for blob in (b"garbage", b"VFHE" + b"\x00" * 64, ctx.encrypt(x, "template")):
        grant = dev.grant_decision(PURPOSE, "verify", PROBE, subject="alice")
        e = err(lambda: decide(ks, grant, blob))
        assert e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), e


def test_a_shredded_epoch_cannot_be_decided(ks, dev, verify_setup):
    ctx, g, x = verify_setup
    result = g.verify("alice", ctx.encrypt(x, "probe"))
    ks.client("admin").rotate("HE", purpose=PURPOSE, mode="verify", dim=128)
    grant = dev.grant_decision(PURPOSE, "verify", PROBE, subject="alice")
    assert err(lambda: decide(ks, grant, result)).reason == "HE_EPOCH_REVOKED"


@pytest.mark.parametrize("req", [
    dict(kind="maybe"), dict(probe_sha256=b"short"), dict(kind="identify", subject_id="alice"),
    dict(subject_id="x" * 500), dict(purpose=""),
])
def test_hostile_grant_requests(ks, dev, req):
    base = dict(tenant="default", purpose=PURPOSE, kind="verify", subject_id="alice", probe_sha256=PROBE,
                device_id="gate-1")
    e = err(lambda: dev._call("GrantDecision", kpb.GrantDecisionRequest(**{**base, **req})))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("req", [dict(ticket="short"), dict(ticket="bad ticket with spaces!"), dict(result=b""),
                                 dict(kind="both"), dict(probe_sha256=b"")])
def test_hostile_decide_requests(ks, req):
    base = dict(ticket="T" * 24, grant="g_x", kind="verify", tenant="default", purpose=PURPOSE, subject_id="alice",
                device_id="gate-1", probe_sha256=PROBE, threshold=0.5, top_k=0, result=b"x")
    e = err(lambda: ks.client("matcher")._call("Decide", kpb.DecideRequest(**{**base, **req})))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT


def test_identify_decisions_release_at_most_max_k_ids(tmp_path):
    from engine.he import EncryptedGallery
    with running_keyservice(tmp_path / "ks", max_k=2) as ks:
        dev = ks.client("device", device_id="gate-1")
        ctx, _ = ks.client("operator").he_context(PURPOSE, "identify", 32, eval_keys=True, create=True)
        g = EncryptedGallery(ctx)
        x = np.ones(32) / np.sqrt(32)
        for i in range(4):
            g.add(f"s{i}", ctx.encrypt(x + 0.01 * i, "template"))
        grant = dev.grant_decision(PURPOSE, "identify", PROBE)
        sd = decide(ks, grant, g.search(ctx.encrypt(x, "probe")), kind="identify", subject="", top_k=10)
        d = check_decision(Verifier(ks.public_key), sd.payload, sd.signature, kind="identify")
        assert d.matched and len(d.subject_ids) == 2
        assert not any(k in json.loads(sd.payload) for k in ("scores", "score"))


def test_cli_token_and_offline_audit_verify_with_the_kek(tmp_path, ks, dev, capsys, monkeypatch):
    from engine.cli import main
    assert main(["keyservice", "token", "--role", "matcher"]) == 0
    out = capsys.readouterr().out
    assert '"role": "matcher"' in out and "vf_matcher_" in out
    dev.release_key(PURPOSE, SPEC, "VERIFY", subject="alice", key_version=1)
    monkeypatch.setenv("VEILFACE_KS_KEK", KEK.hex())
    assert main(["keyservice", "audit-verify", "--data-dir", str(ks.cfg.data_dir)]) == 0
    monkeypatch.setenv("VEILFACE_KS_KEK", "00" * 32)          # the chain is keyed: another key does not verify it
    assert main(["keyservice", "audit-verify", "--data-dir", str(ks.cfg.data_dir)]) == 1


def test_hostile_input_stores_nothing_and_a_restart_is_unaffected(tmp_path):
    with running_keyservice(tmp_path / "ks") as ks:
        bound = ks.client("device", token=KS_BOUND_DEVICE)
        for req in (dict(scheme="x" * 5000), dict(key_version=-1), dict(subject_id="a b"), dict(op=77)):
            base = dict(tenant="default", purpose=PURPOSE, subject_id="alice", scheme=SPEC, key_version=1,
                        op=kpb.VERIFY, device_id="gate-1")
            with pytest.raises(ServiceError):
                bound._call("ReleaseKey", kpb.ReleaseKeyRequest(**{**base, **req}))
        with pytest.raises(ServiceError):
            ks.client("matcher")._call("Decide", kpb.DecideRequest(ticket="T" * 24, grant="g", kind="verify",
                                                                     tenant="default", purpose=PURPOSE,
                                                                     probe_sha256=PROBE, result=b"\xff" * 100))
        rows = ks.server.store._secret("", ())
        assert [r.kind for r in rows] == ["signing"]               # no master secret was created for them
        key = bound.release_key(PURPOSE, SPEC, "VERIFY", subject="alice", key_version=1).key
    with running_keyservice(tmp_path / "ks") as again:           # same data dir, same KEK
        assert again.client("device", token=KS_BOUND_DEVICE).release_key(
            PURPOSE, SPEC, "VERIFY", subject="alice", key_version=1).key == key
        assert again.client("auditor").verify_audit_chain().ok
