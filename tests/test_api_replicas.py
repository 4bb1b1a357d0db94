"""Named galleries across replicas: two ``veilface serve`` over one PostgreSQL store and Ray shards
(the services of ``.ci/services.sh``; skipped without them, failed under CI). Samples added through
one replica are matched through the other; deletions and withdrawal through one are seen by the
other at once; a restarted shard set reloads the samples with their gallery."""
from __future__ import annotations

import numpy as np
import pytest

from engine.client import LocationClass, OperatorClient, ServiceError
from engine.service.audit_keys import attach_audit_key
from engine.service.store import open_store
from tests.support import NOTICE, PURPOSE, TOKENS, capture, device_client, faces, register_assessments
from tests.test_pg_replicas import DERIVER, _replica, cluster  # noqa: F401 - the fixture

SCHEME = "biohash:bits=256,dim=128"


def test_named_gallery_samples_across_replicas(cluster):  # noqa: F811 - the imported fixture
    a, b = _replica(cluster, "a"), _replica(cluster, "b")
    x = faces(3, seed=31)
    rng = np.random.default_rng(31)
    OperatorClient(a.target, TOKENS["admin"]).register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
    register_assessments(OperatorClient(a.target, TOKENS["admin"]))        # issue 15: before any enrolment
    OperatorClient(a.target, TOKENS["operator"]).create_gallery("staff", PURPOSE, SCHEME)
    op_b = OperatorClient(b.target, TOKENS["operator"])
    with device_client(a.target, TOKENS["device"], "gate-1", DERIVER) as on_a, \
            device_client(b.target, TOKENS["device"], "gate-1", DERIVER) as on_b:
        c0 = on_a.record_consent("s0", NOTICE, 30).consent_id
        first = on_a.add_sample("staff", "s0", capture(x[0], rng), c0)
        on_a.add_sample("staff", "s0", capture(x[0], rng), c0)
        on_a.add_sample("staff", "twin", capture(x[0], rng), on_a.record_consent("twin", NOTICE, 30).consent_id)
        on_a.add_sample("staff", "s1", capture(x[1], rng), on_a.record_consent("s1", NOTICE, 30).consent_id)

        assert on_b.verify_in_gallery("staff", "s0", capture(x[0], rng)).matched      # B sees A's samples
        hits = on_b.search_gallery("staff", capture(x[0], rng), top_k=3)
        assert sorted(h[0] for h in hits) == ["s0", "twin"]                            # once per subject
        by_s0 = [c.subject_id for c in op_b.search_by_subject("staff", "s0")]
        assert by_s0[0] == "twin" and "s0" not in by_s0              # the duplicate first, never itself

        on_b.delete_sample("staff", "s0", first.sample_id)                            # deleted through B ...
        left = [s.sample_id for s in OperatorClient(a.target, TOKENS["operator"]).list_samples("staff", "s0")]
        assert len(left) == 1 and first.sample_id not in left
        assert on_a.verify_in_gallery("staff", "s0", capture(x[0], rng)).sample_id != first.sample_id  # ... gone on A

        on_b.withdraw("s0")                                                            # every sample, every replica
        with pytest.raises(ServiceError) as ei:
            on_a.verify_in_gallery("staff", "s0", capture(x[0], rng))
        assert ei.value.reason == "NOT_ENROLLED"
        assert "s0" not in [h[0] for h in on_a.search_gallery("staff", capture(x[0], rng), top_k=3)]
        assert on_a.verify_in_gallery("staff", "s1", capture(x[1], rng)).matched

    store = open_store(cluster["tmp"], url=cluster["dsn"], pool_size=2)
    try:
        attach_audit_key(store, cluster["settings"]["audit_key_file"], create=False)
        assert store.verify_audit().ok
        assert {(r.subject, r.gallery) for r in store.template_index()} == {("twin", "staff"), ("s1", "staff")}
    finally:
        store.close()
