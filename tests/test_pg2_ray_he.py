"""Encrypted (he / CKKS) galleries on Ray shards: a replica over PostgreSQL + two gallery shards;
enrolment expands each ciphertext on its subject's shard, Identify concatenates the shards'
encrypted scores (ciphertexts only) and the key service decides on the merged blob (issue 9: the
device never sees a score); withdrawal removes the subject on its shard; a shard restarted by Ray
reloads its HE templates from the store; HE Verify goes to the owning shard. Real server process,
real key service, real SDK clients, loopback only."""
from __future__ import annotations

import secrets

import numpy as np
import pytest

pytest.importorskip("tenseal")

from engine._proto.veilface.v1 import matcher_pb2 as pb  # noqa: E402
from engine.client import LocationClass, OperatorClient  # noqa: E402
from engine.service.clock import SystemClock  # noqa: E402
from engine.service.store import shard_of  # noqa: E402
from tests.support import NOTICE, PURPOSE, TOKENS, capture, faces, register_assessments  # noqa: E402
from tests.support.keyservice import ks_device, running_keyservice  # noqa: E402
from tests.support.services import (  # noqa: E402
    drop_schema,
    fresh_schema,
    pg_dsn,
    ray_address,
    remove_namespace,  # noqa: E402
)
from tests.support.services import ray_driver as _driver  # noqa: E402

IDENTIFY, VERIFY = "he:dim=128,mode=identify", "he:dim=128,mode=verify"
SHARDS = 2


def ray_driver(addr: str, node_ip: str, ns: str, body: str) -> str:
    return _driver(addr, node_ip, ns, body, SHARDS)


@pytest.fixture
def replica(tmp_path):
    from engine.service.launcher import ServerProcess, write_config
    pg_dsn()
    addr, node_ip = ray_address()
    dsn, schema = fresh_schema()
    ns = "vft_" + secrets.token_hex(4)
    with running_keyservice(tmp_path / "ks", clock=SystemClock()) as ks:
        cfg = write_config(tmp_path / "a", tokens=dict(TOKENS), store=dsn, matching=f"ray://{addr}", ray_node_ip=node_ip,
                           ray_namespace=ns, ray_shards=SHARDS, ray_timeout_s=300.0, workers=8,
                           purge_interval_s=3600.0, max_message_bytes=64 << 20, **ks.matcher_settings())[0]
        p = ServerProcess(cfg, timeout=180)
        try:
            yield p, ks, (addr, node_ip, ns)
        finally:
            p.stop()
            remove_namespace(addr, node_ip, ns)
            drop_schema(schema)


def _he_context(ks, op, purpose: str, mode: str) -> None:
    """The operator's set-up: the key service makes the HE key, the matcher gets its public context."""
    ctx, _ = ks.client("operator").he_context(purpose, mode, 128, eval_keys=True, create=True)
    op.register_he_context(ctx, purpose)


def _raw_identify(dev, x):
    probe = dev.protect_probe(None, x).to_bytes()
    return dev._call("Identify", pb.IdentifyRequest(probe=probe, purpose=PURPOSE, device_id="gate-1", top_k=3,
                                                    decision_grant=dev.protection.grant("identify", probe, "", PURPOSE)))


def test_he_identify_and_verify_on_ray_shards(replica):
    srv, ks, ray_where = replica
    op = OperatorClient(srv.target, TOKENS["admin"])
    op.register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
    register_assessments(op)                                  # issue 15: before any enrolment
    _he_context(ks, op, PURPOSE, "identify")
    dev = ks_device(ks, srv, scheme=IDENTIFY, timeout=300.0)
    x, rng = faces(6, seed=8), np.random.default_rng(8)
    subjects = [f"s{i}" for i in range(6)]
    for s, e in zip(subjects, x):
        dev.enroll(s, e, dev.record_consent(s, NOTICE, 30).consent_id)
    owners = {shard_of("default", s, SHARDS) for s in subjects}
    assert owners == {0, 1}                                   # both shards hold subjects

    # one reply = the key service's decision on the shards' encrypted scores concatenated: every
    # subject of both shards scored once, ids released, no score
    raw = _raw_identify(dev, x[0])
    assert raw.encrypted and raw.gallery_size == 6 and raw.decision_ticket
    assert [c.subject_id for c in raw.candidates][:1] == ["s0"] and np.isnan(raw.candidates[0].score)
    for i in (0, 3, 5):
        assert dev.identify(capture(x[i], rng), top_k=1)[0][0] == f"s{i}"
    assert dev.identify(faces(1, seed=99)[0]) == []

    assert dev.withdraw("s1").templates_deleted == 1          # removed on its shard before the ack
    raw = _raw_identify(dev, x[1])
    assert raw.gallery_size == 5 and "s1" not in [c.subject_id for c in raw.candidates]
    assert all(s != "s1" for s, _ in dev.identify(capture(x[1], rng), top_k=3))

    # a shard killed and restarted by Ray reloads its HE gallery (context + templates) from the store
    owner = shard_of("default", "s2", SHARDS)
    before = ray_driver(*ray_where, f"print(ray.get(shard({owner}).ping.remote())[2])")
    ray_driver(*ray_where, f"ray.kill(shard({owner}), no_restart=False)")
    assert dev.identify(capture(x[2], rng), top_k=1)[0][0] == "s2"
    after = ray_driver(*ray_where, f"print(ray.get(shard({owner}).ping.remote())[2])")
    assert before != after                                    # a new shard process answered

    # HE Verify (1:1) goes to the owning shard; the key service decides
    _he_context(ks, op, "payments", "verify")
    vdev = ks_device(ks, srv, scheme=VERIFY, purpose="payments", timeout=300.0)
    vdev.enroll("s0", x[0], vdev.record_consent("s0", NOTICE, 30).consent_id)
    assert vdev.verify("s0", capture(x[0], rng)).matched
    assert not vdev.verify("s0", faces(1, seed=98)[0]).matched
    assert OperatorClient(srv.target, TOKENS["auditor"]).verify_audit_chain().ok
    assert ks.client("auditor").verify_audit_chain().ok
