"""What the API slice costs per request, as ratios measured in one run (in-process servers, loopback):

* observability: Verify through a server with the access log (formatted as JSON into a null
  stream) and Prometheus metrics on, against the same server configuration with both off;
* named galleries: GallerySearch over ``n`` subjects x ``samples`` samples (per-subject best
  sample, top-k subjects) against Identify over the default gallery of the same ``n`` subjects.

Calls alternate between the two sides in small batches, so machine noise hits both alike.

    python -m bench.api_overhead --quick
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SCHEME = "biohash:bits=256,dim=128"


def _server(base: Path, name: str, **settings):
    from engine.service.config import ROLES, ServiceConfig
    from engine.service.server import VeilfaceServer
    cfg = ServiceConfig(port=0, data_dir=str(base / name), identify_limit=10**9, identify_nomatch_limit=10**9,
                        verify_fail_limit=10**9, purge_interval_s=3600.0, **settings)
    for role in ROLES:
        cfg.add_token(role, f"bench-{role}")
    return VeilfaceServer(cfg).start()


def _clients(srv):
    from engine.client import DeviceClient, LocationClass, OperatorClient
    from engine.keys import KeyDeriver
    OperatorClient(srv.target, "bench-admin").register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", True)
    return (DeviceClient(srv.target, "bench-device", "gate-1", KeyDeriver(bytes(range(32)), "default"), scheme=SCHEME),
            OperatorClient(srv.target, "bench-operator"))


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _alternate(a, b, rounds: int, batch: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(rounds):
        ta += _timed(a, batch)
        tb += _timed(b, batch)
    return statistics.median(ta), statistics.median(tb)


def observability(base: Path, rounds: int, batch: int) -> dict:
    handler = logging.StreamHandler(io.StringIO())
    from engine.service.observability import JsonFormatter
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("veilface.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    off = _server(base, "off", access_log=False)
    on = _server(base, "on", access_log=True, metrics_port=0)
    try:
        x = np.random.default_rng(1).standard_normal(128)
        calls = []
        for srv in (off, on):
            dev, _ = _clients(srv)
            dev.enroll("s-1", x, dev.record_consent("s-1", "n", 30).consent_id)
            probe = dev.protect_probe("s-1", x)
            calls.append(lambda dev=dev, probe=probe: dev.verify("s-1", template=probe))
        m_off, m_on = _alternate(calls[0], calls[1], rounds, batch)
    finally:
        off.stop(0)
        on.stop(0)
        access.removeHandler(handler)
    return {"verify_median_ms_off": m_off * 1e3, "verify_median_ms_on": m_on * 1e3, "ratio_on_off": m_on / m_off}


def galleries(base: Path, n: int, samples: int, rounds: int, batch: int) -> dict:
    srv = _server(base, "galleries")
    try:
        dev, op = _clients(srv)
        op.create_gallery("staff", "access_control", SCHEME)
        rng = np.random.default_rng(2)
        people = rng.standard_normal((n, 128))
        for i, p in enumerate(people):
            c = dev.record_consent(f"s{i}", "n", 30).consent_id
            dev.enroll(f"s{i}", p, c)
            for _ in range(samples):
                dev.add_sample("staff", f"s{i}", p + 0.3 * rng.standard_normal(128) / np.sqrt(128), c)
        probe = dev.protection.identify_probes(people[0], "access_control")[0]
        identify = lambda: dev.identify(templates=[probe], top_k=5)                 # noqa: E731
        search = lambda: dev.search_gallery("staff", templates=[probe], top_k=5)    # noqa: E731
        assert identify()[0][0] == "s0" and search()[0][0] == "s0"
        m_id, m_gs = _alternate(identify, search, rounds, batch)
    finally:
        srv.stop(0)
    return {"subjects": n, "samples_per_subject": samples, "identify_median_ms": m_id * 1e3,
            "gallery_search_median_ms": m_gs * 1e3, "ratio_search_identify": m_gs / m_id}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small gallery, few calls (~1 min)")
    ap.add_argument("--json", metavar="PATH", help="write the results here too")
    args = ap.parse_args(argv)
    rounds, batch, n = (10, 20, 300) if args.quick else (30, 50, 2000)
    with tempfile.TemporaryDirectory(prefix="vf-bench-api-") as d:
        out = {"observability": observability(Path(d), rounds, batch),
               "galleries": galleries(Path(d), n, 3, rounds, batch)}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
