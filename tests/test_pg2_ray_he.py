"""Encrypted (he / CKKS) galleries on Ray shards: a replica over PostgreSQL + two gallery shards;
enrolment expands each ciphertext on its subject's shard, Identify concatenates the shards'
encrypted scores (ciphertexts only) and the decider decides on the merged blob; withdrawal removes
the subject on its shard; a shard restarted by Ray reloads its HE templates from the store; HE
Verify goes to the owning shard. Real server process, real SDK clients, loopback only."""
from __future__ import annotations

import secrets

import numpy as np
import pytest

pytest.importorskip("tenseal")

from engine._proto.veilface.v1 import matcher_pb2 as pb  # noqa: E402
from engine.client import LocationClass, OperatorClient  # noqa: E402
from engine.he import KeyHolder, blob_header  # noqa: E402
from engine.service.store import shard_of  # noqa: E402
from tests.support import NOTICE, PURPOSE, TOKENS, capture, device_client, faces, register_assessments  # noqa: E402
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
    cfg = write_config(tmp_path / "a", tokens=dict(TOKENS), store=dsn, matching=f"ray://{addr}", ray_node_ip=node_ip,
                       ray_namespace=ns, ray_shards=SHARDS, ray_timeout_s=300.0, workers=8,
                       purge_interval_s=3600.0, max_message_bytes=64 << 20)[0]
    p = ServerProcess(cfg, timeout=180)
    try:
        yield p, (addr, node_ip, ns)
    finally:
        p.stop()
        remove_namespace(addr, node_ip, ns)
        drop_schema(schema)


def test_he_identify_and_verify_on_ray_shards(replica):
    srv, ray_where = replica
    op = OperatorClient(srv.target, TOKENS["admin"])
    op.register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
    register_assessments(op)                                  # issue 15: before any enrolment
    ikh = KeyHolder("identify", 128, tenant="default")
    op.register_he_context(ikh, PURPOSE)
    dev = device_client(srv.target, TOKENS["device"], "gate-1", scheme=IDENTIFY, timeout=300.0,
                       he_context=ikh.public_context(eval_keys=False).to_bytes(), decider=ikh)
    x, rng = faces(6, seed=8), np.random.default_rng(8)
    subjects = [f"s{i}" for i in range(6)]
    for s, e in zip(subjects, x):
        dev.enroll(s, e, dev.record_consent(s, NOTICE, 30).consent_id)
    owners = {shard_of("default", s, SHARDS) for s in subjects}
    assert owners == {0, 1}                                   # both shards hold subjects

    # one reply = the shards' encrypted scores concatenated: one block per shard, every subject once
    raw = dev._call("Identify", pb.IdentifyRequest(probe=dev.protect_probe(None, x[0]).to_bytes(), purpose=PURPOSE,
                                                   device_id="gate-1", top_k=1))
    h = blob_header(raw.encrypted_scores)
    assert raw.encrypted and not raw.candidates and raw.gallery_size == 6
    assert len(h["blocks"]) == 2 and sorted(s for _, ids in h["blocks"] for s in ids) == subjects
    for i in (0, 3, 5):                                       # the decider decides on the merged blob
        assert dev.identify(capture(x[i], rng), top_k=1)[0][0] == f"s{i}"
    assert dev.identify(faces(1, seed=99)[0]) == []

    assert dev.withdraw("s1").templates_deleted == 1          # removed on its shard before the ack
    raw = dev._call("Identify", pb.IdentifyRequest(probe=dev.protect_probe(None, x[1]).to_bytes(), purpose=PURPOSE,
                                                   device_id="gate-1", top_k=1))
    assert "s1" not in {s for _, ids in blob_header(raw.encrypted_scores)["blocks"] for s in ids}
    assert all(s != "s1" for s, _ in dev.identify(capture(x[1], rng), top_k=3))

    # a shard killed and restarted by Ray reloads its HE gallery (context + templates) from the store
    owner = shard_of("default", "s2", SHARDS)
    before = ray_driver(*ray_where, f"print(ray.get(shard({owner}).ping.remote())[2])")
    ray_driver(*ray_where, f"ray.kill(shard({owner}), no_restart=False)")
    assert dev.identify(capture(x[2], rng), top_k=1)[0][0] == "s2"
    after = ray_driver(*ray_where, f"print(ray.get(shard({owner}).ping.remote())[2])")
    assert before != after                                    # a new shard process answered

    # HE Verify (1:1) goes to the owning shard; the device's key holder decides
    vkh = KeyHolder("verify", 128, tenant="default")
    op.register_he_context(vkh, "payments")
    vdev = device_client(srv.target, TOKENS["device"], "gate-1", scheme=VERIFY, key_holder=vkh, purpose="payments",
                        timeout=300.0)
    vdev.enroll("s0", x[0], vdev.record_consent("s0", NOTICE, 30).consent_id)
    assert vdev.verify("s0", capture(x[0], rng)).matched
    assert not vdev.verify("s0", faces(1, seed=98)[0]).matched
    assert OperatorClient(srv.target, TOKENS["auditor"]).verify_audit_chain().ok
