"""Load benchmark of the matching service: Verify and Identify over loopback gRPC.

Starts ``veilface serve`` as a subprocess on 127.0.0.1 (ephemeral port, temp SQLite store,
intrusion-detection limits raised so the load is not throttled), enrols a synthetic gallery
per scheme through the real API, then drives Verify (1:1, genuine probes) and Identify (1:N,
top-5) from concurrent client threads. Requests are pre-protected and pre-serialised so the
numbers measure the service (auth, policy, audit write, gallery, gRPC), not the device.

Bounded: a fixed duration per (scheme, operation) and a hard request cap; loopback only.

    python -m bench.load --quick            # ~30 s
    python -m bench.load --json out.json    # larger gallery, longer runs
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SCHEMES = {
    "biohash": "biohash:bits=256,dim=128",
    "iom": "iom:m=256,q=16,dim=128",
    "rotation": "rotation:dim=128",
}
PURPOSE = "access_control"


def _assessment() -> dict:
    """The impact assessment a central matcher needs before enrolling for PURPOSE (issue 15)."""
    import datetime

    from engine.service import pia
    doc = pia.draft(PURPOSE, tenant="bench", mode="central", today=datetime.date.today(),
                    eval_report=Path(__file__).resolve().parents[1] / "docs" / "eval" / "report.json",
                    recipient="the benchmark matcher")
    doc.update(legal_basis="load benchmark on synthetic subjects", necessity="throughput measurement",
               assessor="benchmark")
    doc["deployment"]["off_device"]["why"] = "throughput measurement of the central matcher"
    return doc


# the separate off-device-storage consent every synthetic subject gives (central matcher, issue 15)
OFF_DEVICE = ("offdevice-bench", "protected face template", "the benchmark matcher", "throughput measurement")


def _enrol(target, tokens, scheme_desc, prefix, centres, workers=4):
    from engine.client import DeviceClient, OffDeviceTerms
    from engine.keys import KeyDeriver
    deriver = KeyDeriver(bytes(range(32)), "bench")
    n = len(centres)

    def work(w):
        dev = DeviceClient(target, tokens["device"], "bench-dev", deriver, scheme=scheme_desc, tenant="bench",
                           off_device=OffDeviceTerms(*OFF_DEVICE))
        for i in range(w, n, workers):
            c = dev.record_consent(f"{prefix}{i:06d}", "notice-bench", 30)
            dev.enroll(f"{prefix}{i:06d}", centres[i], c.consent_id, request_id=f"{prefix}{i}")
        dev.close()

    ts = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return DeviceClient(target, tokens["device"], "bench-dev", deriver, scheme=scheme_desc, tenant="bench")


def _drive(target, token, method, requests, clients, duration, cap):
    """Run ``requests`` (serialised protos, round robin) from ``clients`` threads."""
    import grpc

    from engine._proto.veilface.v1 import matcher_pb2 as pb
    resp_type = {"Verify": pb.VerifyResponse, "Identify": pb.IdentifyResponse}[method]
    channel = grpc.insecure_channel(target)
    call = channel.unary_unary(f"/veilface.v1.Matcher/{method}", request_serializer=lambda b: b,
                               response_deserializer=resp_type.FromString)
    md = (("authorization", f"Bearer {token}"),)
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    count = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def work(c):
        i = c
        while time.perf_counter() < stop_at:
            with lock:
                if count[0] >= cap:
                    return
                count[0] += 1
            t0 = time.perf_counter()
            try:
                call(requests[i % len(requests)], metadata=md, timeout=10)
            except grpc.RpcError:
                errors[c] += 1
            lat[c].append(time.perf_counter() - t0)
            i += clients

    call(requests[0], metadata=md, timeout=10)          # warm-up
    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    channel.close()
    all_lat = np.array([x for row in lat for x in row]) * 1e3
    return {"requests": int(all_lat.size), "errors": int(sum(errors)), "seconds": round(wall, 3),
            "rps": round(all_lat.size / wall, 1),
            "p50_ms": round(float(np.percentile(all_lat, 50)), 3),
            "p99_ms": round(float(np.percentile(all_lat, 99)), 3)}


def run(quick: bool = True, schemes: list[str] | None = None, clients: int = 8,
        gallery: int | None = None, duration: float | None = None, verbose: bool = True) -> list[dict]:
    """Run the benchmark; returns one record per (scheme, operation)."""
    from engine._proto.veilface.v1 import matcher_pb2 as pb
    from engine.client import LocationClass, OperatorClient
    from engine.service.launcher import ServerProcess, write_config

    gallery = gallery or (500 if quick else 5000)
    duration = duration or (3.0 if quick else 10.0)
    cap = 20_000 if quick else 200_000
    schemes = schemes or list(SCHEMES)
    data = Path(tempfile.mkdtemp(prefix="veilface-load-"))
    big = 10 ** 9
    cfg_path, tokens = write_config(data, workers=16, verify_fail_limit=big, identify_limit=big,
                                    identify_nomatch_limit=big)
    srv = ServerProcess(cfg_path)
    records = []
    try:
        assert srv.target.startswith("127.0.0.1:"), srv.target
        OperatorClient(srv.target, tokens["admin"]).register_device(
            "bench-dev", LocationClass.RESTRICTED_AREA, "bench", tenant="bench")
        OperatorClient(srv.target, tokens["admin"]).register_impact_assessment(_assessment(), tenant="bench")
        rng = np.random.default_rng(0)
        for name in schemes:
            desc = SCHEMES.get(name, name)
            centres = rng.standard_normal((gallery, 128))
            centres /= np.linalg.norm(centres, axis=1, keepdims=True)
            t0 = time.perf_counter()
            dev = _enrol(srv.target, tokens, desc, f"{name[:3]}-", centres)
            enrol_s = time.perf_counter() - t0
            m = min(256, gallery)
            probes = centres[:m] + 0.45 * rng.standard_normal((m, 128)) / np.sqrt(128)
            temps = [dev.protect(None, p).to_bytes() for p in probes]
            verify_reqs = [pb.VerifyRequest(subject_id=f"{name[:3]}-{i:06d}", probe=t, purpose=PURPOSE,
                                            device_id="bench-dev", tenant="bench").SerializeToString()
                           for i, t in enumerate(temps)]
            ident_reqs = [pb.IdentifyRequest(probe=t, purpose=PURPOSE, device_id="bench-dev", top_k=5,
                                             tenant="bench").SerializeToString() for t in temps]
            dev.close()
            for method, reqs in (("Verify", verify_reqs), ("Identify", ident_reqs)):
                r = _drive(srv.target, tokens["device"], method, reqs, clients, duration, cap)
                rec = {"scheme": desc, "op": method, "gallery": gallery, "clients": clients,
                       "enrol_per_s": round(gallery / enrol_s, 1), **r}
                records.append(rec)
                if verbose:
                    print(f"{name:<9} {method:<8} gallery {gallery:>6}  clients {clients:>2}  "
                          f"{r['rps']:>8.1f} req/s  p50 {r['p50_ms']:>7.2f} ms  p99 {r['p99_ms']:>7.2f} ms  "
                          f"errors {r['errors']}  (enrol {rec['enrol_per_s']:.0f}/s)", flush=True)
    finally:
        srv.stop()
        shutil.rmtree(data, ignore_errors=True)
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small gallery, 3 s per measurement")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--gallery", type=int)
    ap.add_argument("--duration", type=float)
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args(argv)
    recs = run(args.quick, args.schemes.split(","), args.clients, args.gallery, args.duration)
    if args.json:
        Path(args.json).write_text(json.dumps(recs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
