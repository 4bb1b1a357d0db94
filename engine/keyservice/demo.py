"""The key-service part of ``veilface demo`` (``make demo``): three processes end to end -- the key
service (``veilface keyservice``), a matcher that uses it as its HE decider (``veilface serve``),
and the device SDK in this process.

Shown: per-transaction keys (the device keeps none), the fast cancellable 1:N mode, HE 1:1 and 1:N
decided by the key service with signed decisions (no score anywhere outside it), a scaled probe
refused, the removed self-report refused, a lock-out no device call lifts, rotation + re-enrolment,
both audit chains. The matcher is a central one: the purposes' impact assessments are registered
first and every consent carries the subject's separate off-device-storage consent (issue 15).
The three services always run as processes (``--in-process`` concerns the central demo only).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data import EVAL_REPORT

NOTICE = "notice-2025-11"
PURPOSE = "access_control"
#: the purposes of the scenario and the scheme each is assessed for (the HE ones with the [he] extra)
ASSESSED = ((PURPOSE, "biohash:bits=256,dim=128"), ("door", "he:dim=128,mode=verify"),
            ("hall", "he:dim=128,mode=identify"))


def run_keyservice_demo(root: Path, tm, seed: int = 11, subjects: int = 20) -> bool:
    """Run the scenario under ``root`` with the demo's timer ``tm``; True when every check passed."""
    from ..service.launcher import ServerProcess
    from ..service.launcher import write_config as write_matcher_config
    from .launcher import KeyServiceProcess
    from .launcher import write_config as write_ks_config

    root.mkdir(parents=True, exist_ok=True)
    print("\n6. the key service: three processes (key service, matcher, device SDK)")
    ks_cfg, ks_tokens = write_ks_config(root / "keyservice", root / "keyservice.kek", fast_identify=[PURPOSE])
    ks = matcher = None
    try:
        with tm.step("start the key service (subprocess)") as s:
            ks = KeyServiceProcess(ks_cfg)
            s["note"] = f"{ks.target}, verification key {ks.public_key[:16]}... (KEK outside its data dir)"
        m_cfg, m_tokens = write_matcher_config(root / "matcher", keyservice=ks.target,
                                               keyservice_token=ks_tokens["matcher"], keyservice_key=ks.public_key)
        with tm.step("start a matcher that pins it (subprocess)") as s:
            matcher = ServerProcess(m_cfg)
            s["note"] = f"{matcher.target}, decider {ks.target}"
        return _scenario(ks, ks_tokens, matcher, m_tokens, root, tm, seed, subjects)
    finally:
        for proc in (matcher, ks):
            if proc is not None:
                proc.stop()


def _scenario(ks, ks_tokens, matcher, m_tokens, root: Path, tm, seed: int, n: int) -> bool:
    from .._optional import installed
    from ..client import DeviceClient, KeyVersions, LocationClass, OperatorClient
    from .client import KeyServiceClient

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n + 1, 128))
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def capture(i):
        return x[i] + 0.45 * rng.standard_normal(128) / np.sqrt(128)

    target, checks = matcher.target, {}
    admin, operator = OperatorClient(target, m_tokens["admin"]), OperatorClient(target, m_tokens["operator"])
    with tm.step("impact assessments of the purposes (central matcher)") as s:
        he = installed("tenseal")
        infos = [admin.register_impact_assessment(_assessment(root, p, scheme, n)) for p, scheme in ASSESSED
                 if he or not scheme.startswith("he:")]
        s["note"] = ", ".join(f"{i.purpose} v{i.version}" for i in infos)
    admin.register_device("gate-9", LocationClass.PUBLIC_PLACE, "lobby", signage_declared=True)
    kclient = KeyServiceClient(ks.target, ks_tokens["device"], pinned_key=ks.public_key, device_id="gate-9")
    versions = KeyVersions(root / "device-versions.json")
    dev = DeviceClient(target, m_tokens["device"], "gate-9", keyservice=kclient, key_scope="subject",
                       versions=versions, purpose=PURPOSE, off_device=OFF_DEVICE)

    def enrol(d, sid, emb, purpose=PURPOSE):
        c = d.record_consent(sid, NOTICE, 30, purpose=purpose)
        return d.enroll(sid, emb, c.consent_id, purpose=purpose)

    with tm.step(f"enrol {n} subjects with per-transaction keys") as s:
        for i in range(n):
            enrol(dev, f"ks-{i:03d}", x[i])
        ok = dev.verify("ks-000", capture(0)).matched and not dev.verify("ks-001", capture(0)).matched
        checks["cancellable 1:1"] = ok
        left = [p.name for p in root.glob("*") if p.is_file() and p.suffix == ".json" and "device" in p.name]
        s["note"] = (f"1:1 genuine/impostor as expected: {ok}; on the device: {left} (version numbers only), "
                     f"no key, no master secret")
    with tm.step("fast cancellable 1:N (group key, one probe)") as s:
        fast = DeviceClient(target, m_tokens["device"], "gate-9", keyservice=kclient, purpose=PURPOSE,
                            off_device=OFF_DEVICE)
        for i in range(5):
            enrol(fast, f"fast-{i}", x[i])
        hit = fast.identify(capture(2), top_k=1)
        checks["fast 1:N"] = bool(hit) and hit[0][0] == "fast-2"
        s["note"] = f"top-1 {hit[0][0] if hit else None}"

    ks_op = KeyServiceClient(ks.target, ks_tokens["operator"], pinned_key=ks.public_key)
    if installed("tenseal"):
        _he_steps(ks, ks_op, kclient, operator, target, m_tokens, tm, checks, enrol, capture, x)
    else:
        print("     (HE steps skipped: the [he] extra (tenseal) is not installed)")
    with tm.step("a device reports a decision itself") as s:
        call = dev.channel.unary_unary("/veilface.v1.Matcher/ReportDecision")
        try:
            call(b"\n\x04tick\x10\x01", metadata=dev._md)
            checks["no self-report"] = False
        except Exception as exc:  # noqa: BLE001 - grpc.RpcError
            checks["no self-report"] = True
            s["note"] = f"refused: {exc.code().name}"
    with tm.step("rotate the tenant master secret (device stolen)") as s:
        r = KeyServiceClient(ks.target, ks_tokens["admin"], pinned_key=ks.public_key).rotate(
            "MASTER", reason="gate-7 reported stolen")
        after = dev.verify("ks-003", capture(3))
        dev.revoke("ks-003")
        re = enrol(dev, "ks-003", x[3])
        back = dev.verify("ks-003", capture(3)).matched
        checks["rotation"] = r.shredded and not after.matched and back
        s["note"] = (f"master v{r.old_version} shredded -> v{r.new_version}; old template matched={after.matched}; "
                     f"re-enrolled under key version {re.key_version}: matched={back}")
    with tm.step("both audit chains") as s:
        mc = OperatorClient(target, m_tokens["auditor"]).verify_audit_chain()
        kc = KeyServiceClient(ks.target, ks_tokens["auditor"], pinned_key=ks.public_key)
        kchain = kc.verify_audit_chain()
        released = sum(1 for _ in kc.audit_log(action="ReleaseKey"))
        decided = [json.loads(e.details_json) for e in kc.audit_log(action="Decide")]
        checks["audit"] = mc.ok and kchain.ok and all("score" not in d for d in decided)
        s["note"] = (f"matcher ok={mc.ok} ({mc.entries} entries); key service ok={kchain.ok} "
                     f"({kchain.entries} entries: {released} key releases, {len(decided)} decisions, no key, no score)")
    failed = [k for k, v in checks.items() if not v]
    print(f"     key-service checks: {len(checks) - len(failed)}/{len(checks)} passed" +
          (f"; FAILED: {failed}" if failed else ""))
    return not failed


def _off_device():
    from ..client import OffDeviceTerms
    return OffDeviceTerms("offdevice-2025-11", "protected face template (cancellable code or CKKS ciphertext)",
                          "the operator's central matcher", "one gallery shared by every entrance")


OFF_DEVICE = _off_device()


def _assessment(root: Path, purpose: str, scheme: str, persons: int) -> dict:
    """The drafted assessment of ``purpose`` with what a person states filled in; measured figures
    from the repository's evaluation report (a quick synthetic run when it is not there)."""
    import datetime as dt

    from ..edge.demo import eval_report
    from ..service import pia
    from ..service.status import BadRequest
    shipped = EVAL_REPORT
    report = shipped if shipped.exists() else eval_report(root / "eval", "biohash:bits=256,dim=128")[0]
    kw = dict(mode="central", today=dt.date.today(), eval_report=report, persons_stored=persons, devices=1,
              recipient=OFF_DEVICE.recipient)
    try:
        doc = pia.draft(purpose, scheme=scheme, **kw)
    except BadRequest:          # a report without that scheme: the cancellable figures, said so
        doc = pia.draft(purpose, scheme="biohash:bits=256,dim=128", **kw)
    doc.update(legal_basis="separate consent of each person (PIPL art. 29; 2025 Measures art. 5)",
               necessity="entrance without badges for those who choose it; badge and staff check remain",
               assessor="data-protection-officer")
    doc["deployment"]["off_device"]["why"] = OFF_DEVICE.why
    return doc


def _he_steps(ks, ks_op, kclient, operator, target, m_tokens, tm, checks, enrol, capture, x) -> None:
    """HE 1:1 and 1:N decided by the key service, a scaled probe, a lock-out (the [he] extra)."""
    from ..client import DeviceClient, ServiceError
    from ..he.sealio import seal_save
    from ..he.wire import pack_blob
    from ..template import Template
    with tm.step("HE 1:1: context from the key service, decided there") as s:
        ctx, _ = ks_op.he_context("door", "verify", 128, eval_keys=True, create=True)
        operator.register_he_context(ctx, "door")
        hv = DeviceClient(target, m_tokens["device"], "gate-9", scheme="he:dim=128,mode=verify", purpose="door",
                          keyservice=kclient, off_device=OFF_DEVICE)
        for i in range(3):
            enrol(hv, f"he-{i}", x[i], "door")
        g, imp = hv.verify("he-0", capture(0)), hv.verify("he-1", capture(0))
        checks["HE 1:1"] = g.matched and g.decision_verified and not imp.matched and np.isnan(g.score)
        s["note"] = (f"genuine matched={g.matched}, impostor matched={imp.matched}; signed decisions checked by "
                     f"the device: {g.decision_verified}; score seen by device/matcher: none")
    with tm.step("a scaled probe (gallery-dump attack)") as s:
        hctx = hv.protection._ctx("door")
        e = np.zeros(128)
        e[0] = 4.0
        raw = pack_blob("probe", hctx.header(), [seal_save(hctx.encrypt_coeffs(hctx.core.layout(e, "probe")))])
        t = Template(hv.scheme.spec, np.frombuffer(raw, dtype=np.uint8).copy(), hctx.epoch)   # not L2-normalised
        try:
            hv.verify("he-2", template=t)
            checks["scaled probe refused"] = False
        except ServiceError as exc:
            checks["scaled probe refused"] = exc.reason == "HE_PROBE_REFUSED"
            s["note"] = f"refused: {exc.code.name} {exc.reason}"
    with tm.step("HE 1:N: ids only") as s:
        ctx, _ = ks_op.he_context("hall", "identify", 128, eval_keys=True, create=True)
        operator.register_he_context(ctx, "hall")
        hi = DeviceClient(target, m_tokens["device"], "gate-9", scheme="he:dim=128,mode=identify", purpose="hall",
                          keyservice=kclient, off_device=OFF_DEVICE)
        for i in range(4):
            enrol(hi, f"hall-{i}", x[i], "hall")
        hits = hi.identify(capture(3), top_k=3)
        checks["HE 1:N"] = [h[0] for h in hits][:1] == ["hall-3"] and all(np.isnan(h[1]) for h in hits)
        s["note"] = f"released {[h[0] for h in hits]} (no scores)"
    with tm.step("lock-out: impostor tries, then the genuine face") as s:
        for _ in range(6):        # the refused scaled probe above counted as one failed try already
            try:
                hv.verify("he-2", capture(1))
            except ServiceError:
                break
        try:
            hv.verify("he-2", capture(2))
            checks["lock-out holds"] = False
        except ServiceError as exc:
            checks["lock-out holds"] = exc.reason == "VERIFY_BURST"
            s["note"] = f"refused: {exc.reason} (only time or an operator lifts it)"


__all__ = ["run_keyservice_demo"]
