"""Smoke test of ``python -m bench.scale`` at toy sizes (the harness must not rot between the quiet
reruns that produce its numbers): every record is produced with its fields, no call fails, every
bulk row is accepted, the key service decides the planted subject from the shards' merged HE scores. No
timing is asserted."""
from __future__ import annotations

import pytest

from tests.support.services import pg_dsn, ray_address

FIELDS = {"name", "n", "shards", "p50_ms", "p99_ms", "baseline", "speedup"}


def test_scale_bench_smoke(tmp_path):
    pytest.importorskip("tenseal")
    from bench.scale import run
    pg = pg_dsn()
    addr, node_ip = ray_address()
    recs = run(pg, addr, node_ip, sizes=[3000], shards=2, seconds=1.0, clients=2, stream_rows=1000, stream_batch=250,
               per_row=50, replica_gallery=2000, he_sizes=[300], he_queries=1)
    by = {r["name"]: r for r in recs}
    assert set(by) == {"scale_enroll_stream", "scale_verify_replicas", "scale_identify_he128_300",
                       "scale_identify_biohash256_3000"}
    for r in recs:
        assert FIELDS <= set(r) and r["p99_ms"] >= r["p50_ms"] > 0 and r["baseline"] > 0
    assert by["scale_enroll_stream"]["rejected"] == 0 and by["scale_enroll_stream"]["rows_per_s"] > 0
    assert by["scale_verify_replicas"]["errors"] == 0
    assert by["scale_identify_biohash256_3000"]["errors"] == 0
    assert by["scale_identify_he128_300"]["top1_is_target"]
