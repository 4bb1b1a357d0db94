"""Smoke test of the load benchmark (tiny gallery, sub-second runs)."""
from __future__ import annotations


def test_load_benchmark_smoke():
    from bench.load import run
    recs = run(quick=True, schemes=["biohash"], clients=2, gallery=20, duration=0.3, verbose=False)
    assert {r["op"] for r in recs} == {"Verify", "Identify"}
    for r in recs:
        assert r["requests"] > 0 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"] > 0
