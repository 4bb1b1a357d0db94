"""Scale-out benchmark (issue 12): Identify through gRPC over BioHash-256 galleries in Ray shards,
bulk loading into PostgreSQL, Verify with one and two replicas.

Needs a PostgreSQL database and a Ray cluster (``.ci/services.sh`` starts both on loopback):

    source .ci/services.sh && services_start && \\
    python -m bench.scale --pg "$VEILFACE_TEST_PG_DSN" --ray "$VEILFACE_TEST_RAY_ADDRESS" \\
        --node-ip "$VEILFACE_TEST_RAY_NODE_IP" --sizes 100000,1000000,10000000 --shards 2 --json scale.json

Records (one JSON object each): ``name, n, shards, p50_ms, p99_ms, baseline, speedup`` (+ details):

* ``scale_identify_biohash256_<n>``: Identify (top-5) through ``veilface serve`` with the gallery in
  ``--shards`` Ray actors; ``baseline`` = p50 of the in-process native gallery (one query, same
  codes) at min(n, 1M) measured in the same run, ``speedup`` = baseline / p50 (< 1: the price of
  gRPC + scatter/merge; at 10M the baseline stays the 1M in-process number: how cost grows);
* ``scale_enroll_stream``: rows/s of EnrollStream into PostgreSQL with every policy check
  (``p50_ms`` / ``p99_ms`` per 5,000-row batch message);
* ``scale_verify_replicas``: Verify throughput and p99 with two replicas vs one (load from
  ``bench.load``): ``speedup`` = rps(2) / rps(1).

The gallery is random BioHash-256 codes written with COPY through the store's bulk path (the
consents are real rows); memory: ~32 B of codes + ~90 B of ids/bookkeeping per template per shard
process, i.e. ~1.3 GB of actor memory at 10M, plus PostgreSQL ~2.5 GB on disk.
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SCHEME = "biohash:bits=256,dim=128"
TENANT, PURPOSE, DEVICE = "default", "access_control", "gate-1"


def _templates(scheme, n: int, seed: int):
    from engine.template import Template
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    return codes, [Template(scheme.spec, codes[i], 1) for i in range(n)]


def load_gallery(store_dsn: str, n: int, batch: int = 100_000, seed: int = 1) -> float:
    """n templates straight into the store through its bulk path (COPY); returns seconds."""
    from engine.schemes import make_scheme
    from engine.service.clock import SystemClock
    from engine.service.store import DeviceRow, TemplateRow
    from engine.service.store.postgres import PostgresStore
    scheme = make_scheme(SCHEME)
    store = PostgresStore(store_dsn, SystemClock(), max_size=4)
    t0, now = time.perf_counter(), time.time()
    with store.transaction() as tx:
        tx.insert_device(DeviceRow(TENANT, DEVICE, 1, "lobby", True, now))
    for start in range(0, n, batch):
        m = min(batch, n - start)
        _, ts = _templates(scheme, m, seed + start)
        with store.transaction() as tx:
            rows = [TemplateRow(TENANT, f"p{start + i:09d}", PURPOSE, scheme.spec.key(), 1, ts[i].to_bytes(), now,
                                now + 365 * 86400, f"c{start + i}", DEVICE) for i in range(m)]
            tx.insert_templates(rows)
            del rows
    store.close()
    return time.perf_counter() - t0


def baseline_p50(n: int, queries: int = 50) -> tuple[float, float]:
    """p50 / p99 ms of the in-process native gallery (one query at a time)."""
    from engine.gallery import make_gallery
    from engine.schemes import make_scheme
    scheme = make_scheme(SCHEME)
    codes, _ = _templates(scheme, 1, 0)
    g = make_gallery(scheme, "native")
    rng = np.random.default_rng(7)
    g.add_codes([f"p{i}" for i in range(n)], rng.integers(0, 256, size=(n, 32), dtype=np.uint8))
    lat = []
    for _ in range(queries):
        q = rng.integers(0, 256, size=(1, 32), dtype=np.uint8)
        t0 = time.perf_counter()
        g.search_codes(q, 5)
        lat.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def _serve(tmp: Path, name: str, tokens: dict, **settings):
    from engine.service.launcher import ServerProcess, write_config
    return ServerProcess(write_config(tmp / name, tokens=tokens, identify_limit=10**9, identify_nomatch_limit=10**9,
                                      verify_fail_limit=10**9, **settings)[0], timeout=3600)


def identify_requests(count: int, token_device: str = DEVICE) -> list[bytes]:
    from engine._proto.veilface.v1 import matcher_pb2 as pb
    from engine.schemes import make_scheme
    scheme = make_scheme(SCHEME)
    _, ts = _templates(scheme, count, 99)
    return [pb.IdentifyRequest(probe=t.to_bytes(), top_k=5, purpose=PURPOSE, device_id=token_device,
                               threshold=0.5).SerializeToString() for t in ts]


def run(pg: str, ray_addr: str, node_ip: str, sizes: list[int], shards: int, seconds: float, clients: int) -> list[dict]:
    from bench.load import _drive
    from engine.service.config import ROLES, new_token
    from tests.support.services import drop_schema, fresh_schema
    tokens = {r: new_token(r) for r in ROLES}
    out: list[dict] = []
    base50, base99 = baseline_p50(min(max(sizes), 1_000_000))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for n in sizes:
            dsn, schema = fresh_schema(pg)
            ns = "vfbench_" + secrets.token_hex(4)
            try:
                load_s = load_gallery(dsn, n)
                t0 = time.perf_counter()
                srv = _serve(tmp, f"id{n}", tokens, store=dsn, matching=f"ray://{ray_addr}", ray_node_ip=node_ip,
                             ray_namespace=ns, ray_shards=shards, workers=16)
                ready_s = time.perf_counter() - t0
                try:
                    r = _drive(srv.target, tokens["device"], "Identify", identify_requests(64), clients, seconds, 10**6)
                finally:
                    srv.stop()
                    _kill_namespace(ray_addr, node_ip, ns)
                label = f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else str(n)
                out.append({"name": f"scale_identify_biohash256_{label}", "n": n, "shards": shards,
                            "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "baseline": round(base50, 3),
                            "baseline_p99_ms": round(base99, 3), "speedup": round(base50 / r["p50_ms"], 3),
                            "rps": r["rps"], "errors": r["errors"], "load_s": round(load_s, 1),
                            "shards_ready_s": round(ready_s, 1), "clients": clients})
                print(json.dumps(out[-1]), flush=True)
            finally:
                drop_schema(schema, pg)
    return out


def _kill_namespace(addr: str, node_ip: str, ns: str) -> None:
    import subprocess
    code = ("import ray, sys\n"
            "ray.init(address=sys.argv[1], logging_level='ERROR', **({'_node_ip_address': sys.argv[2]} if sys.argv[2] else {}))\n"
            "for a in ray.util.list_named_actors(all_namespaces=True):\n"
            "    if a['namespace'] == sys.argv[3]: ray.kill(ray.get_actor(a['name'], namespace=a['namespace']))\n")
    subprocess.run([sys.executable, "-c", code, addr, node_ip, ns], timeout=300, check=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    ap.add_argument("--pg", required=True, help="PostgreSQL DSN (a schema per size is created and dropped)")
    ap.add_argument("--ray", required=True, help="Ray GCS address HOST:PORT")
    ap.add_argument("--node-ip", default="", help="this machine's Ray node address")
    ap.add_argument("--sizes", default="100000", help="gallery sizes, comma separated (e.g. 1000000,10000000)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--json", help="write the records here")
    a = ap.parse_args(argv)
    recs = run(a.pg, a.ray, a.node_ip, [int(s) for s in a.sizes.split(",")], a.shards, a.seconds, a.clients)
    if a.json:
        Path(a.json).write_text(json.dumps(recs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
