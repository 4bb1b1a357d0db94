"""Scale-out benchmark (issue 12): Identify through gRPC over galleries in Ray shards (BioHash-256 and
HE-128), bulk loading into PostgreSQL, Verify with one and two replicas.

Needs a PostgreSQL database and a Ray cluster (``.ci/services.sh`` starts both on loopback):

    source .ci/services.sh && services_start .venv/bin/python && \\
    python -m bench.scale --pg "$VEILFACE_TEST_PG_DSN" --ray "$VEILFACE_TEST_RAY_ADDRESS" \\
        --node-ip "$VEILFACE_TEST_RAY_NODE_IP" --sizes 1000000,10000000 --he-sizes 1048576 --json scale.json

Records (one JSON object each, printed as they are measured): ``name, n, shards, p50_ms, p99_ms,
baseline, speedup`` (+ details). Every baseline is measured in the same run:

* ``scale_identify_biohash256_<n>``: Identify (top-5) through ``veilface serve`` with the gallery in
  ``--shards`` Ray actors, ``--clients`` concurrent clients (``p50_1client_ms``: one client, no
  queueing); ``baseline`` = p50 of the in-process native gallery (one query, same code size) at
  min(n, 1M); ``speedup`` = baseline / p50 (< 1: the price of gRPC + scatter/merge + the service's
  checks and audit entry; at 10M the baseline stays the 1M in-process number: how cost grows);
* ``scale_identify_he128_<n>``: encrypted Identify (HE-128, identify mode, probe encrypted) through
  ``veilface serve`` over HE galleries on the Ray shards (blocks of 8,192 templates bulk-loaded with
  ``add_he_block``: the store cannot hold 1M uploads of ~256 KB); the latency is the whole call: the
  shards' encrypted scores concatenated, sent to a key service (in this process) that decrypts and
  returns a signed decision (issue 9); ``baseline`` = p50 of one in-process ``IdentifyGallery``
  search at ``baseline_n`` templates (no decision), ``speedup`` = templates/s through gRPC over
  shards / templates/s of that baseline;
* ``scale_enroll_stream``: rows/s of EnrollStream into PostgreSQL with every policy check (consent,
  device, key version, retention, filing, and the 2025 Measures' impact assessment of the purpose
  and each row's off-device-storage consent: the matchers are central, their operator registers
  the assessment through the API and the bench's setup records an off-device consent with every
  consent, for both stores alike); ``p50_ms`` / ``p99_ms`` per call of ``--stream-batch`` rows;
  ``baseline`` = rows/s of the same EnrollStream into SQLite, ``speedup`` = PostgreSQL / SQLite;
  ``enroll_rows_per_s`` = per-row unary Enroll into PostgreSQL (4 clients);
* ``scale_verify_replicas``: Verify throughput and p99 with two replicas vs one over the same store
  and shards (load driver of ``bench.load``): ``baseline`` = req/s of one replica, ``speedup`` =
  req/s(2) / req/s(1).

Memory: ~32 B of codes + ~120 B of ids/bookkeeping per BioHash template per shard process (~1.5 GB
at 10M, plus PostgreSQL ~3 GB on disk); HE: 4 KiB of ciphertext per template (4.1 GB at 1M).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SCHEME = "biohash:bits=256,dim=128"
HE_SCHEME = "he:dim=128,mode=identify"
TENANT, PURPOSE, DEVICE, NOTICE = "default", "access_control", "gate-1", "notice-bench"
LOAD_BATCH = 100_000


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else str(n)


def _pct(lat_ms: list[float]) -> tuple[float, float]:
    a = np.asarray(lat_ms)
    return round(float(np.percentile(a, 50)), 3), round(float(np.percentile(a, 99)), 3)


def _codes(start: int, m: int, seed: int = 1) -> np.ndarray:
    """The BioHash codes of subjects ``p<start> .. p<start+m-1>`` (reproducible per load batch)."""
    assert start % LOAD_BATCH == 0 and m <= LOAD_BATCH
    return np.random.default_rng(seed + start).integers(0, 256, size=(m, 32), dtype=np.uint8)


def _template_bytes(scheme, code: np.ndarray, key_version: int = 1) -> bytes:
    from engine.template import Template
    return Template(scheme.spec, code, key_version).to_bytes()


def load_gallery(store_dsn: str, n: int, seed: int = 1) -> float:
    """n BioHash templates straight into the store (COPY; a gallery to search, not an enrolment
    benchmark: see scale_enroll_stream); returns seconds."""
    from engine.schemes import make_scheme
    from engine.service.clock import SystemClock
    from engine.service.store import DeviceRow, TemplateRow
    from engine.service.store.postgres import PostgresStore
    scheme = make_scheme(SCHEME)
    store = PostgresStore(store_dsn, SystemClock(), max_size=4)
    t0, now = time.perf_counter(), time.time()
    with store.transaction() as tx:
        tx.insert_device(DeviceRow(TENANT, DEVICE, 1, "lobby", True, now))
    key = scheme.spec.key()
    for start in range(0, n, LOAD_BATCH):
        m = min(LOAD_BATCH, n - start)
        codes = _codes(start, m, seed)
        rows = [TemplateRow(TENANT, f"p{start + i:09d}", PURPOSE, key, 1, _template_bytes(scheme, codes[i]), now,
                            now + 365 * 86400, f"c{start + i}", DEVICE) for i in range(m)]
        with store.transaction() as tx:
            tx.insert_templates(rows)
        del rows
    store.close()
    return time.perf_counter() - t0


def baseline_p50(n: int, queries: int = 50) -> tuple[float, float]:
    """p50 / p99 ms of the in-process native gallery (one query at a time)."""
    from engine.gallery import make_gallery
    from engine.schemes import make_scheme
    scheme = make_scheme(SCHEME)
    g = make_gallery(scheme, "native")
    rng = np.random.default_rng(7)
    g.add_codes([f"p{i}" for i in range(n)], rng.integers(0, 256, size=(n, 32), dtype=np.uint8))
    lat = []
    for _ in range(queries):
        q = rng.integers(0, 256, size=(1, 32), dtype=np.uint8)
        t0 = time.perf_counter()
        g.search_codes(q, 5)
        lat.append((time.perf_counter() - t0) * 1e3)
    return _pct(lat)


def _serve(tmp: Path, name: str, tokens: dict, **settings):
    from engine.service.launcher import ServerProcess, write_config
    settings = {"identify_limit": 10**9, "identify_nomatch_limit": 10**9, "verify_fail_limit": 10**9, **settings}
    return ServerProcess(write_config(tmp / name, tokens=tokens, **settings)[0], timeout=3600)


def _ray_settings(ray_addr: str, node_ip: str, ns: str, shards: int) -> dict:
    return {"matching": f"ray://{ray_addr}", "ray_node_ip": node_ip, "ray_namespace": ns, "ray_shards": shards,
            "ray_timeout_s": 600.0}


def identify_requests(count: int) -> list[bytes]:
    from engine._proto.veilface.v1 import matcher_pb2 as pb
    from engine.schemes import make_scheme
    scheme = make_scheme(SCHEME)
    codes = np.random.default_rng(99).integers(0, 256, size=(count, 32), dtype=np.uint8)
    return [pb.IdentifyRequest(probe=_template_bytes(scheme, c), top_k=5, purpose=PURPOSE, device_id=DEVICE,
                               threshold=0.5).SerializeToString() for c in codes]


def _drive_many(targets: list[str], token: str, method: str, requests: list[bytes], clients: int,
                duration: float) -> dict:
    """bench.load's driver over several replicas at once (clients split evenly), merged."""
    import grpc

    from bench.load import _drive
    from engine._proto.veilface.v1 import matcher_pb2 as pb
    out: list[dict] = [{} for _ in targets]
    failed: list[BaseException] = []
    per = max(1, clients // len(targets))
    resp = {"Verify": pb.VerifyResponse, "Identify": pb.IdentifyResponse}[method]
    for target in targets:            # warm up (shards loading, connections) without a deadline of 10 s
        with grpc.insecure_channel(target) as ch:
            ch.unary_unary(f"/veilface.v1.Matcher/{method}", request_serializer=lambda b: b,
                           response_deserializer=resp.FromString)(
                requests[0], metadata=(("authorization", f"Bearer {token}"),), timeout=1800)

    def run(i: int, target: str) -> None:
        try:
            out[i] = _drive(target, token, method, requests, per, duration, 10**7)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            failed.append(exc)
    ts = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(targets)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if failed:
        raise failed[0]
    # percentiles of the union are not derivable from per-target ones: weight by requests (reported as such)
    reqs = sum(r["requests"] for r in out)
    return {"requests": reqs, "errors": sum(r["errors"] for r in out), "rps": round(sum(r["rps"] for r in out), 1),
            "p50_ms": round(sum(r["p50_ms"] * r["requests"] for r in out) / max(reqs, 1), 3),
            "p99_ms": max(r["p99_ms"] for r in out)}


# -- scale_identify_biohash256_<n> -------------------------------------------------------------------------
def identify_biohash(pg: str, ray_addr: str, node_ip: str, sizes: list[int], shards: int, seconds: float,
                     clients: int, tokens: dict, tmp: Path) -> list[dict]:
    from tests.support.services import drop_schema, fresh_schema, remove_namespace
    out = []
    base50, base99 = baseline_p50(min(max(sizes), 1_000_000))
    for n in sizes:
        dsn, schema = fresh_schema(pg)
        ns = "vfbench_" + secrets.token_hex(4)
        try:
            load_s = load_gallery(dsn, n)
            t0 = time.perf_counter()
            srv = _serve(tmp, f"id{n}", tokens, store=dsn, workers=16, **_ray_settings(ray_addr, node_ip, ns, shards))
            ready_s = time.perf_counter() - t0
            try:
                reqs = identify_requests(64)
                r = _drive_many([srv.target], tokens["device"], "Identify", reqs, clients, seconds)
                one = _drive_many([srv.target], tokens["device"], "Identify", reqs, 1, seconds)   # no queueing
            finally:
                srv.stop()
                remove_namespace(ray_addr, node_ip, ns)
            out.append({"name": f"scale_identify_biohash256_{_label(n)}", "n": n, "shards": shards,
                        "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "baseline": base50,
                        "baseline_p99_ms": base99, "baseline_n": min(max(sizes), 1_000_000),
                        "speedup": round(base50 / r["p50_ms"], 3), "rps": r["rps"], "errors": r["errors"] + one["errors"],
                        "p50_1client_ms": one["p50_ms"], "p99_1client_ms": one["p99_ms"], "rps_1client": one["rps"],
                        "load_s": round(load_s, 1), "shards_ready_s": round(ready_s, 1), "clients": clients})
            _emit(out[-1])
        finally:
            drop_schema(schema, pg)
    return out


# -- scale_enroll_stream -------------------------------------------------------------------------------------
def _seed_consents(store, subjects: list[str], now: float) -> list[str]:
    """One consent record per subject, each with its separate off-device-storage consent (the
    matcher is central: issue 15), written straight into the store (the bench's setup: what
    RecordConsent with ``off_device`` stores, without one RPC per subject)."""
    from engine.service.store import ConsentRow, OffDeviceConsentRow
    from tests.support.measures import OFF_DEVICE as O
    ids = [f"c_{s}" for s in subjects]
    for k in range(0, len(subjects), 10_000):
        with store.transaction() as tx:
            for s, c in zip(subjects[k:k + 10_000], ids[k:k + 10_000]):
                tx.insert_consent(ConsentRow(c, TENANT, s, PURPOSE, NOTICE, now, 30, False, "", "", 0.0, DEVICE))
                tx.insert_off_device_consent(OffDeviceConsentRow(c, TENANT, s, PURPOSE, O.notice_version, O.transferred,
                                                                 O.recipient, O.why, now))
    return ids


def _stream_rate(target: str, token: str, scheme, subjects: list[str], consents: list[str], batch: int,
                 message_rows: int = 500) -> tuple[float, list[float], int]:
    """EnrollStream calls of ``batch`` rows each; returns (rows/s, per-call ms, rejected)."""
    import grpc

    from engine._proto.veilface.v1 import matcher_pb2 as pb
    from engine._proto.veilface.v1 import matcher_pb2_grpc as pb_grpc
    stub = pb_grpc.MatcherStub(grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]))
    md = (("authorization", f"Bearer {token}"),)
    rng = np.random.default_rng(5)
    lat, rejected, t_all = [], 0, time.perf_counter()
    for k in range(0, len(subjects), batch):
        part = list(zip(subjects[k:k + batch], consents[k:k + batch]))
        codes = rng.integers(0, 256, size=(len(part), 32), dtype=np.uint8)
        rows = [pb.BulkEnrollRow(subject_id=s, template=_template_bytes(scheme, codes[i]), consent_id=c)
                for i, (s, c) in enumerate(part)]
        msgs = [pb.EnrollStreamRequest(purpose=PURPOSE, device_id=DEVICE, rows=rows[j:j + message_rows])
                for j in range(0, len(rows), message_rows)]
        t0 = time.perf_counter()
        r = stub.EnrollStream(iter(msgs), metadata=md, timeout=3600)
        lat.append((time.perf_counter() - t0) * 1e3)
        rejected += r.rejected_total
    return len(subjects) / (time.perf_counter() - t_all), lat, rejected


def _per_row_rate(target: str, token: str, scheme, subjects: list[str], consents: list[str], clients: int = 4) -> float:
    import grpc

    from engine._proto.veilface.v1 import matcher_pb2 as pb
    rng = np.random.default_rng(6)
    codes = rng.integers(0, 256, size=(len(subjects), 32), dtype=np.uint8)
    reqs = [pb.EnrollRequest(subject_id=s, template=_template_bytes(scheme, codes[i]), consent_id=c, purpose=PURPOSE,
                             device_id=DEVICE, request_id=f"r{s}").SerializeToString()
            for i, (s, c) in enumerate(zip(subjects, consents))]
    ch = grpc.insecure_channel(target)
    call = ch.unary_unary("/veilface.v1.Matcher/Enroll", request_serializer=lambda b: b,
                          response_deserializer=pb.EnrollResponse.FromString)
    md = (("authorization", f"Bearer {token}"),)

    def work(c: int) -> None:
        for i in range(c, len(reqs), clients):
            call(reqs[i], metadata=md, timeout=60)
    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    ch.close()
    return len(reqs) / (time.perf_counter() - t0)


def _register_device(target: str, token: str, assessment: bool = False) -> None:
    """The enrolling device and, with ``assessment``, the impact assessment of PURPOSE (issue 15:
    a purpose receives no enrolment before one is registered), through the API."""
    from engine.client import LocationClass, OperatorClient
    from tests.support.measures import register_assessments
    with OperatorClient(target, token) as op:
        op.register_device(DEVICE, LocationClass.PUBLIC_PLACE, "lobby", True)
        if assessment:
            register_assessments(op, (PURPOSE,), TENANT)


def enroll_stream(pg: str, rows: int, batch: int, per_row: int, tokens: dict, tmp: Path) -> dict:
    from engine.schemes import make_scheme
    from engine.service.clock import SystemClock
    from engine.service.store import SQLiteStore
    from engine.service.store.postgres import PostgresStore
    from tests.support.services import drop_schema, fresh_schema
    scheme = make_scheme(SCHEME)
    subjects = [f"b{i:09d}" for i in range(rows)]
    extra = [f"u{i:09d}" for i in range(per_row)]
    res = {}
    dsn, schema = fresh_schema(pg)
    try:
        for kind in ("sqlite", "postgres"):
            data = tmp / f"stream-{kind}"
            settings = {"store": dsn} if kind == "postgres" else {}
            srv = _serve(tmp, f"stream-{kind}", tokens, workers=8, bulk_batch_rows=batch, **settings)
            try:
                _register_device(srv.target, tokens["admin"], assessment=True)
                store = PostgresStore(dsn, SystemClock(), max_size=2) if kind == "postgres" else SQLiteStore(data)
                try:
                    consents = _seed_consents(store, subjects + extra, time.time())
                finally:
                    store.close()
                rate, lat, rejected = _stream_rate(srv.target, tokens["operator"], scheme, subjects,
                                                   consents[:rows], batch)
                per_row_rate = (_per_row_rate(srv.target, tokens["device"], scheme, extra, consents[rows:])
                                if kind == "postgres" and per_row else 0.0)
            finally:
                srv.stop()
            res[kind] = (rate, lat, rejected, per_row_rate)
    finally:
        drop_schema(schema, pg)
    rate, lat, rejected, per_row_rate = res["postgres"]
    p50, p99 = _pct(lat)
    rec = {"name": "scale_enroll_stream", "n": rows, "shards": 0, "p50_ms": p50, "p99_ms": p99,
           "rows_per_s": round(rate, 1), "baseline": round(res["sqlite"][0], 1),
           "baseline_kind": "EnrollStream into SQLite (rows/s)", "speedup": round(rate / res["sqlite"][0], 3),
           "per_call_rows": batch, "rejected": rejected + res["sqlite"][2],
           "enroll_rows_per_s": round(per_row_rate, 1), "enroll_rows": per_row}
    _emit(rec)
    return rec


# -- scale_verify_replicas -----------------------------------------------------------------------------------
def verify_replicas(pg: str, ray_addr: str, node_ip: str, gallery: int, shards: int, seconds: float, clients: int,
                    tokens: dict, tmp: Path) -> dict:
    from engine._proto.veilface.v1 import matcher_pb2 as pb
    from engine.schemes import make_scheme
    from tests.support.services import drop_schema, fresh_schema, remove_namespace
    scheme = make_scheme(SCHEME)
    dsn, schema = fresh_schema(pg)
    ns = "vfbench_" + secrets.token_hex(4)
    try:
        load_gallery(dsn, gallery)
        codes = _codes(0, min(gallery, LOAD_BATCH))
        m = min(512, len(codes))
        reqs = [pb.VerifyRequest(subject_id=f"p{i:09d}", probe=_template_bytes(scheme, codes[i]), purpose=PURPOSE,
                                 device_id=DEVICE).SerializeToString() for i in range(m)]
        settings = {"store": dsn, "workers": 16, "audit_key_file": str(tmp / f"{schema}.key"),   # one chain, one key
                    **_ray_settings(ray_addr, node_ip, ns, shards)}
        a = _serve(tmp, "rep-a", tokens, **settings)
        b = _serve(tmp, "rep-b", tokens, **settings)
        try:
            one = _drive_many([a.target], tokens["device"], "Verify", reqs, clients, seconds)
            two = _drive_many([a.target, b.target], tokens["device"], "Verify", reqs, clients, seconds)
        finally:
            a.stop()
            b.stop()
            remove_namespace(ray_addr, node_ip, ns)
    finally:
        drop_schema(schema, pg)
    rec = {"name": "scale_verify_replicas", "n": gallery, "shards": shards, "p50_ms": two["p50_ms"],
           "p99_ms": two["p99_ms"], "rps": two["rps"], "baseline": one["rps"], "baseline_kind": "req/s of one replica",
           "baseline_p50_ms": one["p50_ms"], "baseline_p99_ms": one["p99_ms"],
           "speedup": round(two["rps"] / max(one["rps"], 1e-9), 3), "errors": one["errors"] + two["errors"],
           "clients": clients, "cores": os.cpu_count()}
    _emit(rec)
    return rec


# -- scale_identify_he128_<n> ---------------------------------------------------------------------------------
def _he_blocks(n: int, shards: int, block: int, rng: np.random.Generator):
    """Subject ids grouped into blocks of ``block`` ids that all hash to one shard: [(ids, shard)]."""
    from engine.service.store import shard_of
    buckets: list[list[str]] = [[] for _ in range(shards)]
    out, made, j = [], 0, 0
    while made < n:
        sid = f"h{j:09d}"
        j += 1
        s = shard_of(TENANT, sid, shards)
        buckets[s].append(sid)
        if len(buckets[s]) == min(block, n - made):
            out.append((buckets[s], s))
            made += len(buckets[s])
            buckets[s] = []
    return out


def identify_he(pg: str, ray_addr: str, node_ip: str, sizes: list[int], shards: int, queries: int, tokens: dict,
                tmp: Path, baseline_blocks: int = 16) -> list[dict]:
    """Encrypted 1:N over Ray shards, decided by a key service (issue 9): the latency is the whole
    Identify -- shards' encrypted scores, merge, the key service's decryption and signed decision."""
    from engine._proto.veilface.v1 import matcher_pb2 as pb
    from engine.client import DeviceClient, OperatorClient
    from engine.he import IdentifyGallery, encrypt_block_blob
    from engine.schemes import make_scheme
    from engine.service.clock import SystemClock
    from engine.service.matching import GalleryKey
    from engine.service.matching.ray_backend import RayMatching
    from tests.support.keyservice import running_keyservice
    from tests.support.measures import OFF_DEVICE
    from tests.support.services import drop_schema, fresh_schema, remove_namespace
    scheme = make_scheme(HE_SCHEME)
    out = []
    with running_keyservice(tmp / "ks", clock=SystemClock(), max_message_bytes=512 << 20) as ks:
        pub, _ = ks.client("operator", tenant=TENANT).he_context(PURPOSE, "identify", 128, eval_keys=True, create=True)
        N = pub.params.poly_degree
        for n in sizes:
            dsn, schema = fresh_schema(pg)
            ns = "vfbench_" + secrets.token_hex(4)
            rng = np.random.default_rng(n)
            try:
                srv = _serve(tmp, f"he{n}", tokens, store=dsn, workers=8, max_message_bytes=512 << 20,
                             max_response_bytes=512 << 20, **ks.matcher_settings(),
                             **_ray_settings(ray_addr, node_ip, ns, shards))
                try:
                    _register_device(srv.target, tokens["admin"])
                    with OperatorClient(srv.target, tokens["admin"]) as op:
                        info = op.register_he_context(pub, PURPOSE)
                    key = GalleryKey(TENANT, PURPOSE, scheme.spec.key(), info.epoch)
                    backend = RayMatching(f"ray://{ray_addr}", "", shards, ns, node_ip, timeout_s=3600.0)
                    backend.open(key, scheme, pub)
                    target_emb, t0, base_blobs = None, time.perf_counter(), []
                    for ids, _ in _he_blocks(n, shards, N, rng):
                        emb = rng.standard_normal((len(ids), 128))
                        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
                        if target_emb is None:
                            target_emb, target_id = emb[0].copy(), ids[0]
                        blob = encrypt_block_blob(pub, emb)
                        backend.add_he_block(key, ids, blob)
                        if len(base_blobs) < baseline_blocks:
                            base_blobs.append((ids, blob))
                    load_s = time.perf_counter() - t0
                    dev = DeviceClient(srv.target, tokens["device"], DEVICE, scheme=HE_SCHEME, timeout=3600.0,
                                       keyservice=ks.client("device", device_id=DEVICE, tenant=TENANT),
                                       off_device=OFF_DEVICE)
                    capture = target_emb + 0.3 * rng.standard_normal(128) / np.sqrt(128)
                    lat, reply = [], None
                    for q in range(queries + 1):                       # the first one warms up
                        # a fresh encryption and a single-use grant per call (a replayed probe's
                        # result is refused by the key service), not timed
                        probe = dev.protect_probe(None, capture)
                        blob = probe.to_bytes()
                        grant = dev.protection.grant("identify", blob, "", PURPOSE)
                        req = pb.IdentifyRequest(probe=blob, purpose=PURPOSE, device_id=DEVICE, top_k=5,
                                                 decision_grant=grant)
                        t1 = time.perf_counter()
                        reply = dev._call("Identify", req, timeout=3600.0)
                        if q:
                            lat.append((time.perf_counter() - t1) * 1e3)
                    dev.close()
                    backend.close()
                finally:
                    srv.stop()
                    remove_namespace(ray_addr, node_ip, ns)
                # baseline: one in-process gallery (one core) over the first blocks, same probe, no decision
                g = IdentifyGallery(pub)
                for ids, b in base_blobs:
                    g.add_block(ids, b)
                del base_blobs
                g.search(probe)
                blat = []
                for _ in range(max(3, queries)):
                    t1 = time.perf_counter()
                    g.search(probe)
                    blat.append((time.perf_counter() - t1) * 1e3)
                bn, b50 = len(g), statistics.median(blat)
                del g
                p50, p99 = _pct(lat)
                hits = [c.subject_id for c in reply.candidates]
                rec = {"name": f"scale_identify_he128_{_label(n)}", "n": n,
                       "shards": shards, "p50_ms": p50, "p99_ms": p99, "baseline": round(b50, 1), "baseline_n": bn,
                       "baseline_kind": "one in-process IdentifyGallery search (ms) at baseline_n, no decision",
                       "speedup": round((n / p50) / (bn / b50), 3), "templates_per_s": round(n / p50 * 1e3),
                       "baseline_templates_per_s": round(bn / b50 * 1e3),
                       "includes": "shards + merge + key service decryption and signed decision + gRPC",
                       "top1_is_target": bool(hits and hits[0] == target_id), "load_s": round(load_s, 1),
                       "queries": queries}
                out.append(rec)
                _emit(rec)
            finally:
                drop_schema(schema, pg)
    return out


def _emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def run(pg: str, ray_addr: str, node_ip: str, sizes: list[int], shards: int, seconds: float, clients: int,
        stream_rows: int = 0, stream_batch: int = 5000, per_row: int = 2000, replica_gallery: int = 0,
        he_sizes: list[int] | None = None, he_queries: int = 5) -> list[dict]:
    from engine.service.config import ROLES, new_token
    tokens = {r: new_token(r) for r in ROLES}
    out: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if stream_rows:
            out.append(enroll_stream(pg, stream_rows, stream_batch, per_row, tokens, tmp))
        if replica_gallery:
            out.append(verify_replicas(pg, ray_addr, node_ip, replica_gallery, shards, seconds, clients, tokens, tmp))
        if he_sizes:
            out += identify_he(pg, ray_addr, node_ip, he_sizes, shards, he_queries, tokens, tmp)
        if sizes:
            out += identify_biohash(pg, ray_addr, node_ip, sizes, shards, seconds, clients, tokens, tmp)
    return out


def _sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    ap.add_argument("--pg", required=True, help="PostgreSQL DSN (a schema per measurement is created and dropped)")
    ap.add_argument("--ray", required=True, help="Ray GCS address HOST:PORT")
    ap.add_argument("--node-ip", default="", help="this machine's Ray node address")
    ap.add_argument("--sizes", default="1000000", help="BioHash gallery sizes for Identify (e.g. 1000000,10000000; '' = skip)")
    ap.add_argument("--he-sizes", default="", help="HE-128 gallery sizes for encrypted Identify (e.g. 1048576)")
    ap.add_argument("--he-queries", type=int, default=5)
    ap.add_argument("--stream-rows", type=int, default=200_000, help="rows of scale_enroll_stream (0 = skip)")
    ap.add_argument("--stream-batch", type=int, default=5000, help="rows per EnrollStream call (= bulk_batch_rows)")
    ap.add_argument("--per-row", type=int, default=2000, help="rows of the per-row Enroll comparison")
    ap.add_argument("--replica-gallery", type=int, default=100_000, help="gallery of scale_verify_replicas (0 = skip)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--json", help="write the records here")
    a = ap.parse_args(argv)
    recs = run(a.pg, a.ray, a.node_ip, _sizes(a.sizes), a.shards, a.seconds, a.clients, a.stream_rows, a.stream_batch,
               a.per_row, a.replica_gallery, _sizes(a.he_sizes), a.he_queries)
    if a.json:
        Path(a.json).write_text(json.dumps(recs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
