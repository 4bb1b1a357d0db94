"""``veilface demo --mode edge``: the default single-site deployment, end to end.

Two capture devices each run the engine on the device (:class:`EdgeDevice`: own store, gallery,
matching, audit chain, keys). The operator's central service (a ``veilface serve`` process) never
receives a template: only the devices' signed oversight bundles, which it verifies and
aggregates into the fleet view, counting a person enrolled at both sites once. The impact
assessment is drafted from a quick ``veilface eval`` run, completed, and registered before the
first enrolment; a device is decommissioned at the end and its filing cancellation recorded.
"""
from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np

from ..data import EVAL_REPORT
from ..service.demo import NOTICE, PURPOSE, Timer, expect_error


def _assessment(eval_report: Path, scheme: str, mode: str, persons: int, devices: int, recipient: str = "") -> dict:
    """The drafted assessment with what a person must state filled in (as the operator would)."""
    from ..service import pia
    doc = pia.draft(PURPOSE, mode=mode, scheme=scheme, today=dt.date.today(), eval_report=eval_report,
                    persons_stored=persons, devices=devices, recipient=recipient or "the operator's central matcher")
    doc.update(legal_basis="separate consent of each person (PIPL art. 29; 2025 Measures art. 5)",
               necessity="staff entrance without badges for those who choose it; badge and staff check remain",
               assessor="data-protection-officer")
    if mode == "central":
        doc["deployment"]["off_device"]["why"] = "one gallery shared by the sites of the demo operator"
    return doc


def eval_report(out: Path, scheme: str) -> tuple[Path, str]:
    """A ``veilface eval`` report.json holding ``scheme``: a quick synthetic run here, or -- when the
    ``eval`` extra is not installed (a matcher-only install) -- the report the repository ships."""
    from .._optional import MissingDependency
    try:
        from ..evaluation.runner import evaluate
        rep = evaluate(None, [scheme], out=out, quick=True, progress=False, plots=False)
        return out / "report.json", f"quick synthetic `veilface eval` run ({rep.seconds:.1f} s)"
    except MissingDependency as exc:
        shipped = EVAL_REPORT
        if not shipped.exists():
            raise
        return shipped, (f"the eval report shipped in engine/data (a copy of docs/eval/report.json; "
                         f"{exc.__class__.__name__}: no [eval] extra here)")


def run_edge(data_dir: Path, subjects: int, scheme: str, in_process: bool, seed: int, tm: Timer) -> bool:
    from ..client import LocationClass, OperatorClient, ServiceError
    from ..service.launcher import ServerProcess, write_config
    from ..service.oversight import sign
    from .device import EdgeDevice
    from .uplink import Uplink

    rng = np.random.default_rng(seed)
    n = subjects
    both = n // 4                                  # enrolled at both sites (one person, counted once)
    centres = rng.standard_normal((n + n // 2, 128))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def capture(i: int) -> np.ndarray:
        return centres[i] + 0.45 * rng.standard_normal(128) / np.sqrt(128)

    print("\nE1. impact assessment from measured figures")
    with tm.step("measured figures of the scheme") as s:
        report, s["note"] = eval_report(data_dir / "eval", scheme)
    doc = _assessment(report, scheme, "edge", n + n // 2, 2)
    m = doc["protection"]["measured"]
    data = "synthetic" if m["source"]["synthetic"] else m["source"]["dataset"]
    print(f"     measured ({data}): EER {m['eer']:.4f}, stolen-token EER {m['eer_stolen_token']:.4f}, "
          f"D_sys {m['d_sys']:.3f}, inversion success with the key {m['inversion_success']:.2f}, "
          f"renewed-template match rate {m['renewability_match_rate']:.4f}")

    print("\nE2. the operator's central oversight service (receives no templates)")
    central_dir = data_dir / "central"
    cfg_path, tokens = write_config(central_dir)
    if in_process:
        from ..service.config import load_config
        from ..service.server import VeilfaceServer
        server = VeilfaceServer(load_config(str(cfg_path), env={})).start()
    else:
        server = ServerProcess(cfg_path)
    ok = True
    try:
        admin = OperatorClient(server.target, tokens["admin"])
        gates = {}
        with tm.step("two edge devices, own stores and keys") as s:
            for name in ("gate-1", "gate-2"):
                gates[name] = EdgeDevice(data_dir / name, name, scheme=scheme, location_class=LocationClass.PUBLIC_PLACE,
                                         location_kind="entrance", signage=True)
                admin.register_device(name, LocationClass.PUBLIC_PLACE, "entrance", signage_declared=True)
                admin.register_oversight_key(name, gates[name].oversight_public_key())
            s["note"] = ", ".join(f"{k}: key {g.oversight_fingerprint()[:12]}" for k, g in gates.items())
        g1, g2 = gates["gate-1"], gates["gate-2"]
        sid = [f"p-{i:04d}" for i in range(n + n // 2)]
        with tm.step("enrol before any assessment") as s:
            c = g1.record_consent(sid[0], NOTICE, 30)
            s["note"] = "refused: " + expect_error(lambda: g1.enroll(sid[0], capture(0), c.consent_id),
                                                   "IMPACT_ASSESSMENT_REQUIRED")
        with tm.step("register the assessment on each device") as s:
            infos = [g.register_assessment(doc) for g in gates.values()]
            s["note"] = f"sha256 {infos[0].sha256[:16]}... in each device's audit chain (entry {infos[0].audit_seq})"

        print(f"\nE3. on-device enrolment and matching ({n} at gate-1, {n // 2} at gate-2, {both} at both)")
        site1, site2 = list(range(n)), list(range(n - both, n + n // 2 - both))
        t0 = time.perf_counter()
        with tm.step("consent + enrol on the devices") as s:
            for g, people in ((g1, site1), (g2, site2)):
                for i in people:
                    g.enroll(sid[i], capture(i), g.record_consent(sid[i], NOTICE, 30).consent_id)
            s["note"] = f"{(len(site1) + len(site2)) / (time.perf_counter() - t0):.0f} enrolments/s, nothing sent"
        with tm.step("verify and identify locally") as s:
            m, k = min(40, len(site1)), min(20, len(site2))
            gen = sum(g1.verify(sid[i], capture(i)).matched for i in site1[:m])
            imp = sum(g1.verify(sid[i], capture(i + 1)).matched for i in site1[:m])
            hit = sum((g2.identify(capture(i)) or [("", 0)])[0][0] == sid[i] for i in site2[:k])
            s["note"] = f"genuine {gen}/{m}, impostor {imp}/{m}, identify rank-1 {hit}/{k}"
            ok &= gen >= 0.9 * m and imp == 0 and hit >= 0.9 * k
        with tm.step(f"withdraw {sid[1]} at gate-1") as s:
            w = g1.withdraw(sid[1])
            s["note"] = f"{w.templates_deleted} template deleted on the device"

        print("\nE4. fleet oversight: signed bundles, no face information")
        with tm.step("sign the pending bundles") as s:
            pending = {k: g.oversight_bundles(max_entries=500) for k, g in gates.items()}
            blob = b"".join(r.bundle for rows in pending.values() for r in rows)
            stored = [r.template for g in gates.values() for r in g.store.template_index()]
            leaked = any(t[-32:] in blob or t[-32:].hex().encode() in blob for t in stored)
            s["note"] = (f"{sum(map(len, pending.values()))} bundles, {len(blob) // 1024} KiB; keys: "
                         f"{sorted(json.loads(pending['gate-1'][0].bundle))}; template bytes inside: {leaked}")
            ok &= not leaked
        with tm.step("deliver to the central service") as s:
            devs = {k: Uplink(server.target, tokens["device"], k) for k in gates}
            receipts = [r for k, g in gates.items() for r in g.send_oversight(devs[k].submit)]
            s["note"] = f"{len(receipts)} accepted; fleet persons {receipts[-1].persons_fleet}"
        with tm.step("replay a delivered bundle") as s:
            first = g1.store.outbox(pending_only=False)[0]
            s["note"] = "refused: " + expect_error(lambda: devs["gate-1"].submit(first.bundle, first.signature),
                                                   "OVERSIGHT_REPLAYED")
        with tm.step("a bundle signed by another key") as s:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            forged = sign(json.loads(first.bundle), Ed25519PrivateKey.generate())
            s["note"] = "refused: " + expect_error(lambda: devs["gate-1"].submit(forged.bundle, forged.signature),
                                                   "OVERSIGHT_SIGNATURE_INVALID")
        expected = len(set(site1) | set(site2)) - 1
        with tm.step("fleet view of the compliance report") as s:
            fleet = admin.compliance_report()["fleet"]
            s["note"] = (f"persons {fleet['persons_distinct']} (expected {expected}: {both} at both sites counted once); "
                         f"chains {[d['chain'] for d in fleet['devices']]}")
            ok &= fleet["persons_distinct"] == expected and all(d["chain"] == "ok" for d in fleet["devices"])

        print("\nE5. termination of gate-2")
        with tm.step("decommission gate-2") as s:
            cert = g2.decommission("site closed")
            s["note"] = (f"{cert['templates_deleted']} templates deleted; cancel the filing by "
                         f"{cert['filing']['cancellation_deadline']} ({cert['filing']['working_days']} working days)")
        with tm.step("its last bundle, then the fleet view") as s:
            g2.send_oversight(devs["gate-2"].submit)
            fleet = admin.compliance_report()["fleet"]
            d2 = [d for d in fleet["devices"] if d["device_id"] == "gate-2"][0]
            s["note"] = f"gate-2 persons {d2['persons']}, terminated {d2['termination'] is not None}; fleet {fleet['persons_distinct']}"
            ok &= d2["persons"] == 0 and fleet["persons_distinct"] == len(site1) - 1
        with tm.step("gate-2 report until the cancellation is recorded") as s:
            before = g2.report()["termination"]["open"]
            g2.record_filing_cancellation("FR-2025-000123")
            after = g2.report()["termination"]["open"]
            s["note"] = f"termination open {before} -> {after}"
            ok &= before and not after
        for g in gates.values():
            ok &= g.verify_audit().ok
            g.close()
        for c in devs.values():
            c.close()
        admin.close()
    except ServiceError as exc:
        print(f"  unexpected error: {exc}")
        ok = False
    finally:
        server.stop()
    return ok

