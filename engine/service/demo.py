"""``veilface demo``: the scripted scenarios, with timings.

* ``--mode edge`` (:mod:`engine.edge.demo`): the default single-site deployment -- the engine on
  two devices, fleet oversight by a central service that never receives a template;
* ``--mode central``: a gRPC matcher on the embedded store; the device SDK protects every capture
  locally and the server stores protected templates only with the subjects' separate
  off-device-storage consent;
* ``--mode keyservice`` (:mod:`engine.keyservice.demo`): three processes -- the key service, a
  matcher that uses it as its HE decider, the device SDK holding no key beyond one transaction;
* ``--mode both``: edge, then central; ``--mode all`` (default, what ``make demo`` runs): edge,
  central, then the key service.

Synthetic subjects: random unit "face" centres in 128-d; a capture is the centre plus noise
(genuine) -- an impostor is another subject's capture.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

NOTICE = "notice-2025-11"
PURPOSE = "access_control"


class Timer:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    @contextmanager
    def step(self, name: str, note: str = ""):
        t0 = time.perf_counter()
        box = {"note": note}
        yield box
        self.rows.append((name, time.perf_counter() - t0, box["note"]))
        print(f"  {name:<44} {1e3 * (time.perf_counter() - t0):9.1f} ms  {box['note']}", flush=True)


def expect_error(fn, code: str) -> str:
    """Run ``fn``, which must fail with status ``code`` (a code name or a reason); returns "CODE REASON".
    Works for gRPC errors (``ServiceError``) and in-process ones (``StatusError``, edge mode)."""
    from ..errors import VeilfaceError
    try:
        fn()
    except VeilfaceError as e:
        name = getattr(e.code, "name", e.code) if hasattr(e, "code") else type(e).__name__
        if code not in (name, getattr(e, "reason", "")):
            raise AssertionError(f"expected {code}, got {name} {getattr(e, 'reason', '')}") from None
        return f"{name} {e.reason}"
    raise AssertionError(f"expected {code}, the call succeeded")


_expect_error = expect_error
_Timer = Timer


MODES = ("all", "both", "edge", "central", "keyservice")


def run_demo(mode: str = "all", subjects: int | None = None, scheme: str = "biohash:bits=256,dim=128",
             keep: str | None = None, in_process: bool = False, seed: int = 7) -> int:
    """Run the scenario(s) of ``mode`` (one of :data:`MODES`); 0 when every check passed."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    t_all = time.perf_counter()
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="veilface-demo-"))
    if keep and root.exists():
        shutil.rmtree(root)
    tm = Timer()
    ok = True
    if mode in ("edge", "both", "all"):
        from ..edge.demo import run_edge
        n = subjects or 60
        print(f"Veilface demo, EDGE mode (the default single-site deployment): {n} synthetic subjects per device, "
              f"scheme {scheme}, data {root / 'edge'}")
        edge_ok = run_edge(root / "edge", n, scheme, in_process, seed, tm)
        print(f"\nedge demo {'PASSED' if edge_ok else 'FAILED'}")
        ok &= edge_ok
    if mode in ("central", "both", "all"):
        ok &= _run_central(root / "central", subjects or 300, scheme, in_process, seed, tm) == 0
    if mode in ("keyservice", "all"):   # keysvc: key service + a matcher that uses it + the device SDK
        from ..keyservice.demo import run_keyservice_demo
        ks_ok = run_keyservice_demo(root / "keyservice", tm)
        print(f"\nkey-service demo {'PASSED' if ks_ok else 'FAILED'}")
        ok &= ks_ok
    print(f"\ndemo {'PASSED' if ok else 'FAILED'} in {time.perf_counter() - t_all:.1f} s")
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


def _run_central(data_dir: Path, subjects: int, scheme: str, in_process: bool, seed: int, tm: Timer) -> int:
    from .launcher import ServerProcess, write_config

    print(f"\nVeilface demo, CENTRAL mode: {subjects} synthetic subjects, scheme {scheme}, store {data_dir}")
    settings = {"filing_threshold": 100_000}
    cfg_path, tokens = write_config(data_dir, **settings)
    server = None
    with tm.step("start server (subprocess, SQLite store)" if not in_process else "start server (in-process)") as s:
        if in_process:
            from .config import load_config
            from .server import VeilfaceServer
            server = VeilfaceServer(load_config(str(cfg_path), env={})).start()
            target = server.target
        else:
            server = ServerProcess(cfg_path)
            target = server.target
        s["note"] = f"listening on {target} (loopback only)"
    try:
        rc = _scenario(target, tokens, subjects, scheme, seed, tm, data_dir)
    finally:
        with tm.step("stop server"):
            server.stop()
    if rc == 0:
        from .audit_keys import attach_audit_key
        from .store import open_store
        store = open_store(data_dir)
        attach_audit_key(store, Path(data_dir) / "audit.key", create=False)   # the key the server made
        rep = store.verify_audit()
        store.close()
        print(f"\nafter shutdown, `veilface audit verify --data-dir {data_dir}`: {rep}")
        rc = 0 if rep.ok else 1
    print(f"\ncentral demo {'PASSED' if rc == 0 else 'FAILED'}")
    return rc


def _scenario(target: str, tokens: dict, n: int, scheme: str, seed: int, tm: Timer, data_dir: Path) -> int:
    from ..client import DeviceClient, LocationClass, OffDeviceTerms, OperatorClient
    from ..keys import KeyDeriver
    from ..template import Template
    from .commands import format_report

    rng = np.random.default_rng(seed)
    dim = 128
    centres = rng.standard_normal((n + 50, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def capture(i: int) -> np.ndarray:
        """A new noisy capture of subject ``i`` (cosine to the centre ~0.9)."""
        return centres[i] + 0.45 * rng.standard_normal(dim) / np.sqrt(dim)

    admin = OperatorClient(target, tokens["admin"])
    operator = OperatorClient(target, tokens["operator"])
    auditor = OperatorClient(target, tokens["auditor"])
    deriver = KeyDeriver(KeyDeriver.new_master_secret(), tenant="default")   # lives on the device only
    # the device's consent screen has a separate tick box for storage on the central matcher
    terms = OffDeviceTerms("offdevice-2025-11", f"protected face template ({scheme})",
                           "the operator's central matcher", "one gallery shared by every entrance")
    device = DeviceClient(target, tokens["device"], "gate-1", deriver, scheme=scheme, purpose=PURPOSE, off_device=terms)
    room = DeviceClient(target, tokens["device"], "room-101", deriver, scheme=scheme, purpose=PURPOSE, off_device=terms)
    sid = [f"subj-{i:05d}" for i in range(n + 50)]

    print("\n0. impact assessment (central deployment)")
    with tm.step("measured figures + drafted assessment") as s:
        from ..edge.demo import _assessment, eval_report
        report, source = eval_report(data_dir / "eval", scheme)
        info = admin.register_impact_assessment(_assessment(report, scheme, "central", n, 2))
        s["note"] = f"from {source}; registered v{info.version}, sha256 {info.sha256[:16]}... (audit {info.audit_seq})"

    print("\n1. devices and consent")
    with tm.step("register public-place device (signage)") as s:
        d = admin.register_device("gate-1", LocationClass.PUBLIC_PLACE, "lobby", signage_declared=True)
        s["note"] = f"gate-1 can_enroll={d.can_enroll}"
    with tm.step("register hotel-room device") as s:
        d = admin.register_device("room-101", LocationClass.RESTRICTED_AREA, "hotel_room")
        s["note"] = f"room-101 classed {LocationClass.Name(d.location_class)}, can_enroll={d.can_enroll}"
    with tm.step("public device without signage") as s:
        s["note"] = "refused: " + _expect_error(
            lambda: admin.register_device("gate-2", LocationClass.PUBLIC_PLACE, "street"), "INVALID_ARGUMENT")

    print(f"\n2. enrol {n} subjects (consent + protect on device + Enroll)")
    consent = {}
    with tm.step(f"record {n} separate consents") as s:
        for i in range(n):
            consent[i] = device.record_consent(sid[i], NOTICE, subject_age=int(rng.integers(18, 80))).consent_id
        s["note"] = f"{n} consent records"
    t0 = time.perf_counter()
    with tm.step(f"enrol {n} protected templates") as s:
        for i in range(n):
            device.enroll(sid[i], capture(i), consent[i], request_id=f"enrol-{sid[i]}")
        s["note"] = f"{n / (time.perf_counter() - t0):.0f} enrolments/s (incl. on-device protection)"
    with tm.step("retry an enrolment (same request id)") as s:
        # a client retry re-sends the very same request: it is answered from the store, not duplicated
        c = device.record_consent(sid[n], NOTICE, 30).consent_id
        t = device.protect(sid[n], capture(n))
        a = device.enroll(sid[n], template=t, consent_id=c, request_id="retry-demo")
        b = device.enroll(sid[n], template=t, consent_id=c, request_id="retry-demo")
        s["note"] = f"second answer replayed={b.replayed}, same expiry={a.expires_at == b.expires_at}"
    with tm.step("enrol without consent") as s:
        s["note"] = "refused: " + _expect_error(lambda: device.enroll(sid[n + 1], capture(n + 1), ""),
                                                "FAILED_PRECONDITION")
    with tm.step("enrol without the off-device-storage consent") as s:
        c = device.record_consent(sid[n + 4], NOTICE, 30, off_device=False)
        s["note"] = "refused: " + _expect_error(lambda: device.enroll(sid[n + 4], capture(n + 4), c.consent_id),
                                                "OFF_DEVICE_CONSENT_REQUIRED")
    with tm.step("consent of a 12-year-old without guardian") as s:
        s["note"] = "refused: " + _expect_error(lambda: device.record_consent(sid[n + 2], NOTICE, 12),
                                                "FAILED_PRECONDITION")
    with tm.step("... with guardian consent, then enrol") as s:
        c = device.record_consent(sid[n + 2], NOTICE, 12, guardian_ref="guardian-77", guardian_relationship="parent")
        device.enroll(sid[n + 2], capture(n + 2), c.consent_id)
        s["note"] = "enrolled (guardian consent on record)"
    with tm.step("enrol from the hotel-room device") as s:
        c = room.record_consent(sid[n + 3], NOTICE, 40)
        s["note"] = "refused: " + _expect_error(lambda: room.enroll(sid[n + 3], capture(n + 3), c.consent_id),
                                                "FAILED_PRECONDITION")

    print("\n3. verify (1:1) and identify (1:N)")
    m = min(100, n)
    lat, gen, imp = [], [], []
    with tm.step(f"{m} genuine verifications") as s:
        for i in range(m):
            t0 = time.perf_counter()
            gen.append(device.verify(sid[i], capture(i)))
            lat.append(time.perf_counter() - t0)
        s["note"] = f"accepted {sum(r.matched for r in gen)}/{m}, mean score {np.mean([r.score for r in gen]):.3f}"
    with tm.step(f"{m} impostor verifications") as s:
        for i in range(m):
            imp.append(device.verify(sid[i], capture((i + 1) % n)))
        s["note"] = (f"accepted {sum(r.matched for r in imp)}/{m}, mean score {np.mean([r.score for r in imp]):.3f}; "
                     f"every rejection carries a fallback: {all(r.fallback_required for r in imp if not r.matched)}")
    print(f"     verify latency p50 {1e3 * np.percentile(lat, 50):.2f} ms, p99 {1e3 * np.percentile(lat, 99):.2f} ms; "
          f"fallback offered: {imp[0].fallback_methods}")
    hits = 0
    with tm.step(f"{m // 2} identifications of enrolled subjects") as s:
        for i in range(m // 2):
            res = device.identify(capture(i), top_k=5)
            hits += bool(res) and res[0][0] == sid[i]
        s["note"] = f"rank-1 correct {hits}/{m // 2} over a gallery of {n}"
    with tm.step("10 identifications of never-enrolled people") as s:
        nomatch = sum(not device.identify(capture(n + 10 + j)) for j in range(10))
        s["note"] = f"'no match' answers {nomatch}/10 (a normal answer, not an error)"
    with tm.step("identify from the hotel-room device") as s:
        s["note"] = "refused: " + _expect_error(lambda: room.identify(capture(0)), "FAILED_PRECONDITION")
    with tm.step("verify for a purpose without consent") as s:   # the same answer as "not enrolled" (issue 10)
        s["note"] = "refused: " + _expect_error(lambda: device.verify(sid[0], capture(0), purpose="marketing"),
                                                "NOT_FOUND")

    print("\n4. withdrawal, revocation, intrusion detection")
    with tm.step(f"withdraw only the off-device consent of {sid[4]}") as s:
        r = device.withdraw_off_device_consent(sid[4])
        s["note"] = (f"central copy deleted ({r.templates_deleted} template); verify now: "
                     + _expect_error(lambda: device.verify(sid[4], capture(4)), "NOT_FOUND"))
    w = 3
    with tm.step(f"withdraw consent of {sid[w]}") as s:
        r = device.withdraw(sid[w])
        s["note"] = f"deleted {r.templates_deleted} template(s), key version {r.destroyed_key_version} destroyed"
    with tm.step("verify the withdrawn subject") as s:
        s["note"] = _expect_error(lambda: device.verify(sid[w], capture(w)), "NOT_FOUND")
    with tm.step("identify the withdrawn subject") as s:
        res = device.identify(capture(w))
        s["note"] = f"candidates {[c for c, _ in res]} (withdrawn subject absent: {sid[w] not in dict(res)})"
    v = 5
    old_t = device.protect(sid[v], capture(v))           # an old capture under key version 1
    with tm.step(f"revoke key version 1 of {sid[v]}") as s:
        r = device.revoke(sid[v])
        s["note"] = f"revoked v{r.revoked_key_version}, {r.templates_deleted} template(s) deleted; next v{r.next_key_version}"
    with tm.step("re-enrol under key version 2") as s:
        c = device.record_consent(sid[v], NOTICE, 35)
        e = device.enroll(sid[v], capture(v), c.consent_id)
        s["note"] = f"enrolled key version {e.key_version}"
    with tm.step("verify a fresh capture (v2)") as s:
        r = device.verify(sid[v], capture(v))
        s["note"] = f"matched={r.matched} score={r.score:.3f}"
    with tm.step("verify with the old v1 template") as s:
        s["note"] = "refused: " + _expect_error(lambda: device.verify(sid[v], template=old_t), "FAILED_PRECONDITION")
    with tm.step("old v1 template relabelled as v2 (attack)") as s:
        forged = Template(old_t.spec, old_t.data, 2)
        r = device.verify(sid[v], template=forged)
        s["note"] = f"matched={r.matched} score={r.score:.3f} (impostor level: old and new are unlinkable)"
    with tm.step("burst of failed verifications on one subject") as s:
        outcomes = []
        for _ in range(7):
            try:
                outcomes.append("fail" if not device.verify(sid[10], capture(11)).matched else "ok")
            except Exception as exc:  # noqa: BLE001
                outcomes.append(getattr(exc, "reason", "error"))
        s["note"] = " ".join(outcomes)

    print("\n5. audit and compliance")
    with tm.step("device tries to read the audit log") as s:
        s["note"] = "refused: " + _expect_error(lambda: list(OperatorClient(target, tokens["device"]).audit_log()),
                                                "PERMISSION_DENIED")
    with tm.step("auditor tries to enrol") as s:
        bad = DeviceClient(target, tokens["auditor"], "gate-1", deriver, scheme=scheme)
        s["note"] = "refused: " + _expect_error(lambda: bad.enroll(sid[0], capture(0), consent[0]), "PERMISSION_DENIED")
    with tm.step("auditor verifies the audit chain") as s:
        chain = auditor.verify_audit_chain()
        s["note"] = f"ok={chain.ok}, {chain.entries} entries, head {chain.head_hash[:16]}..."
    with tm.step("alerts in the audit log") as s:
        alerts = list(auditor.audit_log(action="INTRUSION_ALERT"))
        s["note"] = f"{len(alerts)} intrusion alert(s): {[a.reason for a in alerts]}"
    with tm.step("list subjects (paginated)") as s:
        listed = list(operator.list_subjects(page_size=100))
        s["note"] = f"{len(listed)} subjects in pages of 100"
    with tm.step("compliance report") as s:
        rep = operator.compliance_report()
    print("\n" + "\n".join("     " + line for line in format_report(rep).splitlines()))
    ok = (chain.ok and sum(r.matched for r in gen) >= 0.95 * m and sum(r.matched for r in imp) == 0
          and hits >= 0.9 * (m // 2) and rep["persons_stored"] == n and len(alerts) >= 1
          and rep["off_device_consents"]["templates_without_off_device_consent"] == 0)
    for c in (admin, operator, auditor, device, room, bad):
        c.close()
    return 0 if ok else 1
