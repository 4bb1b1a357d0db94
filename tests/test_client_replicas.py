"""Several matcher replicas behind one SDK client: gRPC round_robin spreads the calls, gRPC's
retry policy re-sends idempotent calls on UNAVAILABLE, and nothing else is retried.

Real in-process servers on loopback (two data dirs), a SIGKILLed subprocess replica, and a
byte-forwarding proxy that loses the answer of a call after the real server has executed it
(what a replica dying before it answers looks like) -- the server's audit log then shows how
many times the call really ran.
"""
from __future__ import annotations

import json
import threading
from collections import Counter
from concurrent import futures
from contextlib import ExitStack

import grpc
import numpy as np
import pytest

from engine._proto.veilface.v1 import matcher_pb2 as pb
from engine.client import (
    IDEMPOTENT_METHODS,
    NOT_RETRIED,
    LocationClass,
    OperatorClient,
    RetryPolicy,
    ServiceError,
)
from engine.client.channel import SERVICE, multi_target, service_config, split_targets
from engine.keys import KeyDeriver
from tests.support import NOTICE, TOKENS, capture, device_client, faces, register_assessments, running_server

DERIVER = KeyDeriver(bytes(range(32)), "default")


# -- configuration (no server) ---------------------------------------------------------------
def test_every_rpc_is_classified_once():
    rpcs = set(pb.DESCRIPTOR.services_by_name["Matcher"].methods_by_name)
    assert set(IDEMPOTENT_METHODS) | set(NOT_RETRIED) == rpcs
    assert not set(IDEMPOTENT_METHODS) & set(NOT_RETRIED)


def test_service_config_retries_only_idempotent_methods_on_unavailable():
    cfg = service_config(RetryPolicy(max_attempts=4, initial_backoff_s=0.05, max_backoff_s=1.5))
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    (mc,) = cfg["methodConfig"]
    assert {n["method"] for n in mc["name"]} == set(IDEMPOTENT_METHODS)
    assert {n["service"] for n in mc["name"]} == {SERVICE}
    assert mc["retryPolicy"] == {"maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "1.5s",
                                 "backoffMultiplier": 2.0, "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}
    assert "methodConfig" not in service_config(None, "pick_first")
    assert "methodConfig" not in service_config(RetryPolicy(max_attempts=1))
    for bad in ({"max_attempts": 6}, {"max_attempts": 0}, {"initial_backoff_s": 0}, {"max_backoff_s": 0.01}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
    with pytest.raises(ValueError):
        service_config(lb_policy="least_request_home_made")


def test_targets():
    assert split_targets("127.0.0.1:1, 127.0.0.1:2,") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert split_targets(["a:1", " b:2 "]) == ["a:1", "b:2"]
    assert split_targets("ipv4:127.0.0.1:1,127.0.0.1:2") == ["ipv4:127.0.0.1:1,127.0.0.1:2"]  # a gRPC URI, whole
    assert split_targets("dns:///matchers.internal:50051") == ["dns:///matchers.internal:50051"]
    assert multi_target(["127.0.0.1:1", "10.0.0.2:2"]) == "ipv4:127.0.0.1:1,10.0.0.2:2"
    assert multi_target(["[::1]:1", "[fe80::2]:2"]) == "ipv6:[::1]:1,[fe80::2]:2"
    assert multi_target(["localhost:1", "127.0.0.1:2"]).startswith("ipv4:127.0.0.1:1,")
    for bad in (["127.0.0.1:1", "[::1]:2"], ["127.0.0.1", "127.0.0.1:2"], ["127.0.0.1:0", "127.0.0.1:2"],
                ["dns:///a:1", "127.0.0.1:2"]):
        with pytest.raises(ValueError):
            multi_target(bad)
    for bad in ("", " , ", [1, 2]):
        with pytest.raises(ValueError):
            split_targets(bad)


def test_tls_arguments_are_checked():
    with pytest.raises(ValueError, match="server_name"):   # one name must fit every replica's certificate
        OperatorClient(["127.0.0.1:1", "127.0.0.2:2"], "t", tls_ca=b"ca")
    with pytest.raises(ValueError, match="go together"):
        OperatorClient("127.0.0.1:1", "t", tls_ca=b"ca", client_cert=b"cert")
    with pytest.raises(ValueError, match="tls_ca"):        # no silent plaintext when a client cert is given
        OperatorClient("127.0.0.1:1", "t", client_cert=b"cert", client_key=b"key")


# -- helpers -----------------------------------------------------------------------------------
def _prepare(target: str, subjects: dict[str, np.ndarray]) -> None:
    """Register gate-1 on one replica and enrol ``subjects`` there (separate stores in these tests)."""
    OperatorClient(target, TOKENS["admin"]).register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
    with device_client(target, TOKENS["device"], "gate-1", DERIVER) as dev:
        for sid, x in subjects.items():
            dev.enroll(sid, x, dev.record_consent(sid, NOTICE, 30).consent_id)


def _count(target: str, action: str) -> int:
    with OperatorClient(target, TOKENS["auditor"]) as aud:
        return sum(1 for _ in aud.audit_log(action=action))


# -- two replicas, one client --------------------------------------------------------------------
def test_calls_spread_over_replicas_and_survive_a_stopped_one(tmp_path):
    x = faces(4, seed=5)
    subjects = {f"s{i}": x[i] for i in range(4)}
    rng = np.random.default_rng(5)
    with ExitStack() as stack:
        a = stack.enter_context(running_server(tmp_path / "a"))
        b = stack.enter_context(running_server(tmp_path / "b"))
        for s in (a, b):
            _prepare(s.target, subjects)
        dev = stack.enter_context(device_client(f"{a.target},{b.target}", TOKENS["device"], "gate-1", DERIVER))
        # round_robin: both replicas answer (the second one may still be connecting for the first calls)
        calls = 0
        while calls < 500 and not (_count(a.target, "Verify") and _count(b.target, "Verify")):
            assert dev.verify("s1", capture(x[1], rng)).matched
            calls += 1
        assert _count(a.target, "Verify") > 0 and _count(b.target, "Verify") > 0
        assert _count(a.target, "Verify") + _count(b.target, "Verify") == calls

        # stop replica A (SIGTERM-like: in-flight calls finish, new ones are refused) under load
        halfway, errors, done = threading.Barrier(5), [], Counter()

        def load(w: int) -> None:
            r = np.random.default_rng(w)
            for i in range(60):
                if i == 20:
                    halfway.wait()
                try:
                    if i % 3:
                        assert dev.verify(f"s{w}", capture(x[w], r)).matched
                    else:
                        assert dev.identify(capture(x[w], r), top_k=1)[0][0] == f"s{w}"
                    done[w] += 1
                except Exception as exc:  # noqa: BLE001 - collected, asserted below
                    errors.append(repr(exc))

        threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        halfway.wait()
        a.server.stop(2.0)
        for t in threads:
            t.join()
        assert errors == [] and sum(done.values()) == 240
        before = _count(b.target, "Verify")
        for _ in range(10):                       # afterwards every call lands on the survivor
            assert dev.verify("s2", capture(x[2], rng)).matched
        assert _count(b.target, "Verify") == before + 10
        with OperatorClient([a.target, b.target], TOKENS["operator"]) as op:
            assert sorted(s.subject_id for s in op.list_subjects()) == sorted(subjects)


def test_sigkilled_replica_the_other_serves(tmp_path):
    from engine.service.launcher import ServerProcess, write_config
    x = faces(2, seed=8)
    subjects = {"s0": x[0], "s1": x[1]}
    configs = [write_config(tmp_path / n, tokens=dict(TOKENS))[0] for n in ("a", "b")]
    for n in ("a", "b"):
        register_assessments(tmp_path / n)      # offline, before the server starts (issue 15)
    procs = [ServerProcess(c) for c in configs]
    try:
        for p in procs:
            _prepare(p.target, subjects)
        dev = device_client([p.target for p in procs], TOKENS["device"], "gate-1", DERIVER)
        rng = np.random.default_rng(8)
        halfway, errors, ok = threading.Barrier(4), [], Counter()

        def load(w: int) -> None:
            for i in range(80):
                if i == 20:
                    halfway.wait()
                try:
                    ok[w] += dev.verify(f"s{w % 2}", capture(x[w % 2], np.random.default_rng(i))).matched
                except Exception as exc:  # noqa: BLE001 - collected, asserted below
                    errors.append(repr(exc))

        threads = [threading.Thread(target=load, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        halfway.wait()
        procs[0].kill()                          # SIGKILL mid-load: connections reset, no goodbye
        for t in threads:
            t.join()
        assert errors == [] and sum(ok.values()) == 240
        assert dev.identify(capture(x[0], rng), top_k=1)[0][0] == "s0"
        dev.close()
    finally:
        for p in procs:
            p.stop()


# -- what is retried: a proxy that loses answers after the server executed the call ---------------
class LosingProxy(grpc.GenericRpcHandler):
    """Forwards every unary call to ``upstream`` as bytes; for an armed method, the next call is
    executed upstream and then answered with the armed status code (the answer is lost)."""

    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.attempts: Counter = Counter()
        self.armed: dict[str, grpc.StatusCode] = {}
        self.lock = threading.Lock()

    def service(self, details):
        name = details.method.rsplit("/", 1)[-1]
        forward = self.channel.unary_unary(details.method)

        def handle(request: bytes, context):
            with self.lock:
                self.attempts[name] += 1
                lose = self.armed.pop(name, None)
            md = [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]
            try:
                answer = forward(request, metadata=md, timeout=30)
            except grpc.RpcError as err:
                context.set_trailing_metadata(err.trailing_metadata() or ())
                context.abort(err.code(), err.details())
            if lose is not None:
                context.abort(lose, "injected: the replica died before answering")
            return answer
        return grpc.unary_unary_rpc_method_handler(handle)


@pytest.fixture
def proxied(tmp_path):
    with running_server(tmp_path / "d") as s:
        proxy = LosingProxy(s.target)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers((proxy,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield s, proxy, f"127.0.0.1:{port}"
        finally:
            server.stop(0)
            proxy.channel.close()


def test_idempotent_calls_are_retried_after_a_lost_answer(proxied):
    s, proxy, target = proxied
    x = faces(1, seed=9)[0]
    _prepare(s.target, {})
    dev = device_client(target, TOKENS["device"], "gate-1", DERIVER)
    c = dev.record_consent("s0", NOTICE, 30)
    proxy.armed["Enroll"] = grpc.StatusCode.UNAVAILABLE
    r = dev.enroll("s0", x, c.consent_id)
    assert r.replayed and proxy.attempts["Enroll"] == 2          # ran twice, stored once
    enrols = [e for e in s.client("auditor").audit_log(action="Enroll")]
    assert len(enrols) == 2 and json.loads(enrols[1].details_json).get("replayed") is True
    assert [t.subject_id for t in s.client("operator").list_subjects()] == ["s0"]
    for method, call in (("Verify", lambda: dev.verify("s0", x).matched),
                         ("Verify", lambda: dev.verify("s0", x).matched),
                         ("Identify", lambda: dev.identify(x, top_k=1)[0][0] == "s0"),
                         ("ListSubjects", lambda: len(list(OperatorClient(target, TOKENS["operator"]).list_subjects())) == 1),
                         ("VerifyAuditChain", lambda: OperatorClient(target, TOKENS["auditor"]).verify_audit_chain().ok)):
        before, tries = _count(s.target, method), proxy.attempts[method]
        # the second Verify: CANCELLED, what a replica that is shutting down answers
        code = grpc.StatusCode.CANCELLED if method == "Verify" and before else grpc.StatusCode.UNAVAILABLE
        proxy.armed[method] = code
        assert call()                                            # the caller never saw UNAVAILABLE
        assert proxy.attempts[method] == tries + 2
        assert _count(s.target, method) == before + 2            # executed twice: the lost one + the retry


def test_non_idempotent_calls_are_not_retried(proxied):
    s, proxy, target = proxied
    x = faces(1, seed=10)[0]
    _prepare(s.target, {"s0": x})
    dev = device_client(target, TOKENS["device"], "gate-1", DERIVER)
    op = OperatorClient(target, TOKENS["operator"])
    for method, call in (("RecordConsent", lambda: dev.record_consent("s1", NOTICE, 30)),
                         ("Revoke", lambda: dev.revoke("s0")),
                         ("Withdraw", lambda: dev.withdraw("s0")),
                         ("RegisterDevice", lambda: op.register_device("gate-2", LocationClass.PUBLIC_PLACE, "", True)),
                         ("PurgeExpired", lambda: op.purge_expired())):
        before = _count(s.target, method)
        proxy.armed[method] = grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ServiceError) as ei:
            call()
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE      # the caller decides what to do
        assert proxy.attempts[method] == 1
        assert _count(s.target, method) == before + 1            # it ran once (and only once)
    (revoke,) = s.client("auditor").audit_log(action="Revoke")   # ran once: version 1 revoked, not 2
    assert json.loads(revoke.details_json)["revoked_key_version"] == 1


def test_retry_can_be_turned_off(proxied):
    s, proxy, target = proxied
    _prepare(s.target, {})
    op = OperatorClient(target, TOKENS["operator"], retry=None)
    proxy.armed["ListSubjects"] = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ServiceError) as ei:
        list(op.list_subjects())
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE and proxy.attempts["ListSubjects"] == 1
    assert list(op.list_subjects()) == []


# -- HE: keysvc -- each match is decided within one call, so replicas may alternate -------------------
def test_he_matches_need_no_replica_affinity(tmp_path):
    pytest.importorskip("tenseal")
    from tests.support.keyservice import running_keyservice
    x = faces(1, seed=12)[0]
    rng = np.random.default_rng(12)
    with ExitStack() as stack:
        ks = stack.enter_context(running_keyservice(tmp_path / "ks"))
        ctx, _ = ks.client("operator").he_context("access_control", "verify", 128, eval_keys=True, create=True)
        servers = [stack.enter_context(running_server(tmp_path / n, **ks.matcher_settings())) for n in ("a", "b")]
        for s in servers:
            _prepare(s.target, {})
            s.client("operator").register_he_context(ctx, "access_control")
            with device_client(s.target, TOKENS["device"], "gate-1", scheme="he:dim=128,mode=verify",
                               keyservice=ks.client("device")) as d:
                d.enroll("s0", x, d.record_consent("s0", NOTICE, 30).consent_id)
        dev = stack.enter_context(device_client([s.target for s in servers], TOKENS["device"], "gate-1",
                                                scheme="he:dim=128,mode=verify", keyservice=ks.client("device")))
        assert not dev.protection.needs_replica_affinity
        for _ in range(6):   # round_robin: both replicas answer, each decision complete in its own call
            r = dev.verify("s0", capture(x, rng))
            assert r.encrypted and r.matched and r.decision_verified
        assert all(_count(s.target, "Verify") for s in servers)
