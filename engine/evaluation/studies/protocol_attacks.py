"""Protocol attacks (issue 9), each run against the real gRPC services -- a key service and a
matcher on loopback in this process (:func:`engine.keyservice.local.start_local`), the device SDK,
and the attacker's own code -- with Clopper-Pearson 95% intervals.

Each attack yields one :class:`AttackRecord` for the protocol as built (``protocol="current"``)
and, where the old protocol was weak, one for a faithful re-creation of that old behaviour in the
same run (``protocol="control: ..."``): the control shows the attack has the power to succeed, so
a result at chance means the defence, not a weak attack.

* ``he_verify_divide_out`` -- the strongest party of a 1:1 match: the key service's HE secret key
  (an insider with the KEK), the device's own probe ciphertext and the result ciphertext the key
  service receives. Divide the result by the probe (ciphertext level) or deconvolve (plaintext
  level) -> |cos| to the enrolled template. Control: the unsanitised product (algorithm 1).
* ``he_verify_score_oracle`` -- a device sends basis probes ``e_i`` (unit) and scaled ``4 e_i``
  through Verify; it learns decisions only (scaled probes are refused by the norm check). Control:
  the old 1:1 protocol, where the device decrypted the score itself.
* ``he_identify_gallery_dump`` -- the same through Identify against a 1:N gallery. Control: a
  decider that releases scores (the old SDK default decider). ``he_identify_score_leak``: responses
  that carry any finite score (must be 0).
* ``device_compromise_offline`` -- one device's persistent state (its config, tokens, version
  book) plus the whole matcher store: every secret-looking string of the state is tried as a
  master secret or a key; inversion of subjects the device never captured, type I at the
  unprotected system's FMR 0.1% threshold. Control: the old SDK, whose device kept the tenant
  master secret. ``device_compromise_online``: the same device's *live* key-service token asking
  for the victims' keys before it is revoked -- bounded by the per-device distinct-subject limit.
* ``version_linkage`` -- a curious matcher logs every Identify probe during a key-version change
  (fast 1:N mode), pairs probes sent back to back under two versions, and links old-version to
  new-version templates (fresh pseudonyms); rank-1. Control: the old SDK's one probe per version in use.
* ``cross_tenant_linkage`` -- two tenants' stores, the same people: rank-1 linkage by direct
  comparison. Control: one master secret behind both tenants' devices (the old SDK allowed it).
* ``forged_decision`` / ``replayed_decision`` -- a man-in-the-middle key service answers the
  matcher with its own signature, or with a genuine signed decision of an earlier match;
  ``replayed_grant`` -- a device reuses a decision grant; ``self_reported_decision`` -- the removed
  ``ReportDecision`` RPC called anyway; ``lockout_lift`` -- after a VERIFY_BURST lock-out, every
  device call is tried, then a genuine capture: a lift is a success.

The deployments raise the matcher's and key service's *rate limits* for the oracle attacks (so that
what is measured is what a decision leaks, not how fast the limiter stops it) and keep the
defaults for ``device_compromise_online`` and ``lockout_lift``. Over 400 lines: one attack per
function, sharing the deployment and the record type; they only make sense together.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...keyservice.local import OFF_DEVICE
from ..records import OMIT_NONE
from ..scores import ScoreContext

PURPOSE = "protocol_attacks"
TENANTS = ("pa-t1", "pa-t2", "pa-c1", "pa-c2", "pa-old", "pa-vl-old")   # tenants of the deployments
ALPHA = 1e-3           # recovered-template success: |cos| beyond what a random guess reaches with p = 0.001
SCALE = 4.0            # the scaled basis probes


@dataclass
class AttackRecord:
    """One row of ``report.json["protocol_attacks"]``."""

    attack: str
    scheme: str
    success: float
    ci_low: float
    ci_high: float
    n: int
    chance: float
    protocol: str = "current"
    successes: int = 0
    criterion: str = ""
    note: str = ""
    mean_abs_cos: float | None = field(default=None, metadata=OMIT_NONE)          # recovery attacks
    chance_mean_abs_cos: float | None = field(default=None, metadata=OMIT_NONE)   # E|cos| of a random guess


@dataclass
class ProtocolAttacks:
    records: list[AttackRecord]
    seconds: float
    settings: dict


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval (Clopper-Pearson) of ``k`` successes in ``n`` trials."""
    from scipy.stats import beta
    if n <= 0:
        return 0.0, 1.0
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def chance_cosine(dim: int, alpha: float = ALPHA) -> float:
    """``t`` with ``P(|cos(u, v)| >= t) = alpha`` for independent uniform unit vectors in ``dim``
    dimensions (``cos^2 ~ Beta(1/2, (dim-1)/2)``)."""
    from scipy.stats import beta
    return float(math.sqrt(beta.ppf(1 - alpha, 0.5, (dim - 1) / 2)))


def _record(attack: str, scheme: str, successes: int, n: int, chance: float, protocol: str = "current",
            criterion: str = "", note: str = "", mean_abs_cos: float | None = None) -> AttackRecord:
    lo, hi = clopper_pearson(int(successes), int(n))
    return AttackRecord(attack, scheme, successes / n if n else 0.0, lo, hi, int(n), float(chance), protocol,
                        int(successes), criterion, note, None if mean_abs_cos is None else float(mean_abs_cos))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _abs_cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return 0.0 if not (na > 0 and nb > 0) else abs(float(a @ b) / (na * nb))


def chance_abs_cos(dim: int) -> float:
    """``E|cos|`` between a fixed and a uniform random unit vector in ``dim`` dimensions."""
    return float(math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi))


def _recovery(name: str, scheme: str, ests, truth: np.ndarray, protocol: str, note: str) -> AttackRecord:
    """``ests``: one ``(n, dim)`` estimate per attack strategy. Per template: success when any
    strategy reaches ``|cos| >= chance_cosine`` (chance ``1 - (1 - ALPHA)^strategies``);
    ``mean_abs_cos``: the better strategy's mean (an attacker picks a strategy, not per template)."""
    ests = [ests] if isinstance(ests, np.ndarray) else list(ests)
    d = truth.shape[1]
    t = chance_cosine(d)
    cos = np.array([[_abs_cos(e, x) for e, x in zip(est, truth)] for est in ests])
    chance = 1 - (1 - ALPHA) ** len(ests)
    rec = _record(name, scheme, int((cos.max(axis=0) >= t).sum()), cos.shape[1], chance, protocol,
                  f"|cos(recovered, enrolled)| >= {t:.3f} (p = {ALPHA:g} for a random guess in {d}-d)", note,
                  float(cos.mean(axis=1).max()))
    rec.chance_mean_abs_cos = chance_abs_cos(d)
    return rec


# -- the deployment -----------------------------------------------------------------------------------
class _Env:
    """A key service + matcher (+ helpers) under a temporary directory, on a manual clock."""

    def __init__(self, root: Path, ks_settings: dict, matcher_settings: dict) -> None:
        from ...keyservice.local import start_local
        from ...service.clock import ManualClock
        self.clock = ManualClock()
        self.root = root
        self.dep = start_local(root, self.clock, ks_settings, matcher_settings, tenants=TENANTS)

    def close(self) -> None:
        self.dep.close()

    def enrol(self, dev, subject: str, emb, purpose: str, matcher=None, version: int | None = None):
        """Consent (+ the off-device consent) and enrolment, after the purpose's impact assessment
        (a central matcher: issue 15's rules hold here too)."""
        return self.dep.enrol(dev, subject, emb, purpose, version=version, matcher=matcher)

    def spy_decisions(self) -> list[bytes]:
        """What the key service receives in ``Decide`` (the attacker sits inside the key service)."""
        seen: list[bytes] = []
        app = self.dep.ks.app
        orig = app.decide

        def spy(p, ev, req):
            seen.append(bytes(req.result))
            return orig(p, ev, req)
        app.decide = spy
        return seen

    def spy_identify(self, matcher=None) -> list[tuple[str, bytes]]:
        """What a curious matcher logs: (device, probe bytes) of every Identify, in order."""
        seen: list[tuple[str, bytes]] = []
        m = (matcher or self.dep.matcher).app.matching
        orig = m.identify

        def spy(scope, req):
            seen.append((scope.ev.device, bytes(req.probe)))
            return orig(scope, req)
        m.identify = spy
        return seen


def _faces(ctx: ScoreContext, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` subjects with two samples each: (enrolment samples, later captures), unit vectors."""
    ds = ctx.ds
    subjects = [s for s, rows in ctx.rows_of.items() if len(rows) >= 2]
    pick = rng.permutation(len(subjects))[:n]
    first = np.array([ds.embeddings[ctx.rows_of[subjects[i]][0]] for i in pick])
    second = np.array([ds.embeddings[ctx.rows_of[subjects[i]][1]] for i in pick])
    return _unit(first), _unit(second)


# -- HE 1:1 ---------------------------------------------------------------------------------------------
def he_verify_divide_out(env: _Env, faces: np.ndarray, rng: np.random.Generator) -> list[AttackRecord]:
    import tenseal.sealapi as seal

    from ...he.sealio import seal_load, seal_save
    from ...he.wire import unpack_blob
    from ...service.matching import GalleryKey
    from ..he_attacks import _deconvolve, _divide_out

    d, n = faces.shape[1], len(faces)
    purpose = PURPOSE + "_dv"
    scheme = f"he:dim={d},mode=verify"
    env.dep.register_he(purpose, "verify", d)
    dev = env.dep.device("pa-gate", scheme=scheme, purpose=purpose)
    for i in range(n):
        env.enrol(dev, f"dv{i}", faces[i], purpose)
    kh = env.dep.ks.keys.he_key("default", purpose, "verify", d)       # the insider's secret key
    seen = env.spy_decisions()
    gallery = None
    cur = [np.zeros((n, d)), np.zeros((n, d))]              # ciphertext division, plaintext deconvolution
    ctl = [np.zeros((n, d)), np.zeros((n, d))]
    for i in range(n):
        probe = _unit(rng.standard_normal(d))                         # an unrelated face
        t = dev.protect_probe(f"dv{i}", probe, purpose=purpose)
        dev.verify(f"dv{i}", template=t, purpose=purpose)
        probe_ct = kh.load_ciphertexts(t.data.tobytes(), "probe")[1][0]
        result = seal_load(seal.Ciphertext, kh.core.ctx, unpack_blob(seen[-1], "score")[1][0])
        for k, est in enumerate(_strategies(kh, result, probe_ct, probe, d, _divide_out, _deconvolve)):
            cur[k][i] = est
        if gallery is None:
            key = GalleryKey("default", purpose, dev.scheme.spec.key(), kh.epoch)
            gallery = env.dep.matcher.app.index.backend.gallery(key)
        bare = seal_load(seal.Ciphertext, kh.core.ctx, seal_save(gallery.product(probe_ct, gallery._index[f"dv{i}"])))
        for k, est in enumerate(_strategies(kh, bare, probe_ct, probe, d, _divide_out, _deconvolve)):
            ctl[k][i] = est
    return [_recovery("he_verify_divide_out", scheme, cur, faces, "current",
                      "key-service secret key + the device's probe ciphertext + the result the key service received; "
                      "two strategies: ciphertext division, plaintext deconvolution"),
            _recovery("he_verify_divide_out", scheme, ctl, faces, "control: unsanitised product (algorithm 1)",
                      "the same attack on the bare 3-part product the old matcher returned")]


def _strategies(kh, result, probe_ct, probe, d: int, divide, deconvolve) -> list[np.ndarray]:
    """The estimates of both recovery strategies (zeros where one does not apply)."""
    out = []
    for est in (divide(kh, result, probe_ct, d), deconvolve(kh, result, probe, d)):
        ok = est is not None and np.all(np.isfinite(est))
        out.append(np.asarray(est, dtype=np.float64) if ok else np.zeros(d))
    return out


def he_verify_score_oracle(env: _Env, faces: np.ndarray, rng: np.random.Generator, probes: int) -> list[AttackRecord]:
    from ...he.wire import unpack_blob
    from ...template import Template
    from ..he_attacks import _encrypt_raw

    d, n = faces.shape[1], len(faces)
    purpose = PURPOSE + "_so"
    scheme = f"he:dim={d},mode=verify"
    env.dep.register_he(purpose, "verify", d)
    dev = env.dep.device("pa-gate", scheme=scheme, purpose=purpose)
    ctx = dev.protection._ctx(purpose)
    for i in range(n):
        env.enrol(dev, f"so{i}", faces[i], purpose)
    seen = env.spy_decisions()
    kh = env.dep.ks.keys.he_key("default", purpose, "verify", d)
    cur, ctl = np.zeros((n, d)), np.zeros((n, d))
    refused = asked = 0
    guess = np.random.default_rng(rng.integers(1 << 62))
    for i in range(n):
        for j in range(min(probes, d)):
            e = np.zeros(d)
            e[j] = 1.0
            if dev.verify(f"so{i}", e, purpose=purpose).matched:
                cur[i, j] = 0.5
            ids, scores, _ = kh._open(seen[-1], "score")      # control: the score the old device decrypted
            ctl[i, j] = scores[0]
        for j in range(min(16, d)):                             # scaled probes: refused by the norm check
            e = np.zeros(d)
            e[j] = SCALE
            t = Template(dev.scheme.spec, np.frombuffer(_encrypt_raw(ctx, e), dtype=np.uint8).copy(), ctx.epoch)
            asked += 1
            try:
                if dev.verify(f"so{i}", template=t, purpose=purpose).matched:
                    cur[i, j] = 0.5 / SCALE
            except Exception as exc:  # noqa: BLE001 - a refusal is the expected answer
                refused += getattr(exc, "reason", "") == "HE_PROBE_REFUSED"
        if not cur[i].any():
            cur[i] = guess.standard_normal(d)                   # nothing learnt: a random guess
    del unpack_blob
    return [_recovery("he_verify_score_oracle", scheme, cur, faces, "current",
                      f"{min(probes, d)} unit basis probes per subject (decisions only) + {min(16, d)} probes scaled "
                      f"x{SCALE:g}: {refused} of {asked} refused by the key service's norm check"),
            _recovery("he_verify_score_oracle", scheme, ctl, faces, "control: the device decrypts the score",
                      "the same unit basis probes read through the decrypted score (the old 1:1 protocol)")]


# -- HE 1:N ----------------------------------------------------------------------------------------------
def he_identify_gallery_dump(env: _Env, n: int, dim: int, rng: np.random.Generator,
                             scaled: int = 16) -> list[AttackRecord]:
    from ...template import Template
    from ..he_attacks import _encrypt_raw

    purpose = PURPOSE + "_gd"
    scheme = f"he:dim={dim},mode=identify"
    env.dep.register_he(purpose, "identify", dim)
    dev = env.dep.device("pa-gate", scheme=scheme, purpose=purpose)
    truth = _unit(rng.standard_normal((n, dim)))
    for i in range(n):
        env.enrol(dev, f"gd{i}", truth[i], purpose)
    ctx = dev.protection._ctx(purpose)
    seen = env.spy_decisions()
    kh = env.dep.ks.keys.he_key("default", purpose, "identify", dim)
    cur, ctl = np.zeros((n, dim)), np.zeros((n, dim))
    leaks = responses = refused = 0
    plan = [(j, 1.0) for j in range(dim)] + [(j, SCALE) for j in range(min(scaled, dim))]
    for j, c in plan:
        e = np.zeros(dim)
        e[j] = c
        t = Template(dev.scheme.spec, np.frombuffer(_encrypt_raw(ctx, e), dtype=np.uint8).copy(), ctx.epoch)
        try:
            r = dev._call("Identify", _identify_request(dev, t, purpose, env))
        except Exception as exc:  # noqa: BLE001
            refused += getattr(exc, "reason", "") == "HE_PROBE_REFUSED"
            continue
        responses += 1
        leaks += any(math.isfinite(cand.score) for cand in r.candidates)
        for cand in r.candidates:
            cur[int(cand.subject_id[2:]), j] = 0.5 / c
        if c == 1.0:
            ids, scores = kh.decrypt_scores(seen[-1])          # control: a decider that releases scores
            for sid, s in zip(ids, scores):
                ctl[int(sid[2:]), j] = s
    guess = np.random.default_rng(rng.integers(1 << 62))
    for row in cur:
        if not row.any():
            row[:] = guess.standard_normal(dim)
    return [_recovery("he_identify_gallery_dump", scheme, cur, truth, "current",
                      f"{dim} unit basis probes + {min(scaled, dim)} scaled x{SCALE:g} through Identify -> the key "
                      f"service: {refused} refused (norm), ids released only at >= its minimum threshold"),
            _recovery("he_identify_gallery_dump", scheme, ctl, truth, "control: a decider that releases scores",
                      "the same probes read through the decrypted scores (the old SDK's default decider)"),
            _record("he_identify_score_leak", scheme, leaks, max(responses, 1), 0.0, "current",
                    "an Identify response carries a finite score", "no score leaves the key service")]


def _identify_request(dev, t, purpose: str, env: _Env):
    from ..._proto.veilface.v1 import matcher_pb2 as pb
    probe = t.to_bytes()
    grant = dev.protection.grant("identify", probe, "", purpose)
    return pb.IdentifyRequest(probe=probe, purpose=purpose, device_id=dev.device_id, top_k=10, decision_grant=grant)


# -- device compromise ------------------------------------------------------------------------------------
_SECRET_TEXT = re.compile(r"[A-Za-z0-9_\-+/=]{16,}")


def _secrets_in(state_dir: Path) -> list[bytes]:
    """Every secret-looking value of a device's persistent files: long strings (as text and, when
    hex, decoded) and every 32-byte window of binary files."""
    out: set[bytes] = set()
    for p in sorted(state_dir.rglob("*")):
        if not p.is_file():
            continue
        raw = p.read_bytes()
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            for off in range(0, max(len(raw) - 31, 0)):
                out.add(raw[off:off + 32])
            continue
        for m in _SECRET_TEXT.findall(text):
            out.add(m.encode())
            if re.fullmatch(r"[0-9a-fA-F]{32,}", m) and len(m) % 2 == 0:
                out.add(bytes.fromhex(m))
    return sorted(out)


def _agreement(scheme, key: bytes, code: np.ndarray, rng: np.random.Generator, steps: int) -> float:
    """How well a quick inversion under ``key``, re-protected under ``key``, reproduces ``code``:
    ~1 for the right key, ~chance for a wrong one (the attacker's own key test)."""
    from .. import attacks
    x = attacks.invert(scheme, key, code[None], steps=steps, rng=rng)
    return float(scheme.similarities(scheme.protect_codes(key, x), code[None])[0, 0])


def _invert_type1(scheme, keys: list, codes: np.ndarray, originals: np.ndarray, rng: np.random.Generator,
                  steps: int) -> np.ndarray:
    """Type-I cosine of the full inversion of each template under its key (-1 where None)."""
    from .. import attacks
    out = np.full(len(codes), -1.0)
    for k, key in enumerate(keys):
        if key is not None:
            x = attacks.candidates(scheme, key, codes[k:k + 1], steps=steps, rng=rng)[0]
            out[k] = float((_unit(x) @ originals[k]).max())
    return out


def _keys_from_state(scheme, found: list[bytes], tenant: str, rows, codes: np.ndarray, rng: np.random.Generator,
                     steps: int) -> tuple[list, str]:
    """The attacker's use of a device's secrets: every value, as a tenant master secret (HKDF per
    victim) or as a key, is tested on three victims' stored codes (:func:`_agreement`: the right key
    reproduces a code exactly, a wrong one reaches ~0.85-0.94 for BioHash-256); one that reproduces
    all three opens every victim. Nothing found: a random key per victim (a guess)."""
    from ...keys import KeyDeriver
    quick = max(5, min(steps, 20))
    probe = range(min(3, len(rows)))
    for s in found:
        if len(s) < 16:
            continue
        makers = (("master secret", lambda r, s=s: KeyDeriver(s, tenant).derive(r.subject, r.key_version, scheme.spec)),
                  ("key", lambda r, s=s: s))
        for what, make in makers:
            if all(_agreement(scheme, make(rows[k]), codes[k], rng, quick) >= 0.99 for k in probe):
                return [make(r) for r in rows], f"a value of the device's files works as the {what}"
    return [secrets.token_bytes(32) for _ in rows], "no value of the device's files reproduces a stored code: random keys"


def device_compromise(env: _Env, ctx: ScoreContext, scheme_desc: str, n_victims: int, rng: np.random.Generator,
                      steps: int) -> list[AttackRecord]:
    from ...client import DeviceClient, KeyVersions
    from ...keys import KeyDeriver
    from ...schemes import make_scheme
    from ...template import Template

    scheme = make_scheme(scheme_desc)
    purpose = PURPOSE + "_dc"
    own, _ = _faces(ctx, 5, rng)
    victims, _ = _faces(ctx, n_victims, rng)
    thr = float(ctx.raw_thresholds["0.001"])
    state = env.root / "device-a"
    state.mkdir()
    dep = env.dep
    dep.register_device("dev-a")
    dep.register_device("dev-b")
    # the current protocol: both devices get per-transaction keys from the key service
    a = dep.device("dev-a", scheme=scheme_desc, purpose=purpose, key_scope="subject",
                   versions=KeyVersions(state / "versions.json"))
    b = dep.device("dev-b", scheme=scheme_desc, purpose=purpose, key_scope="subject")
    for i, x in enumerate(own):
        env.enrol(a, f"dc-own{i}", x, purpose)
    for i, x in enumerate(victims):
        env.enrol(b, f"dc-v{i}", x, purpose)
    (state / "device.json").write_text(json.dumps({
        "matcher": dep.matcher.target, "device_id": "dev-a", "matcher_token": dep.matcher_tokens["device"],
        "keyservice": dep.ks.target, "keyservice_token": dep.ks_tokens["device"], "keyservice_key": dep.ks_key,
        "scheme": scheme_desc, "purpose": purpose}))
    # the control: the old SDK -- every device of the tenant holds the master secret in its keystore
    old_tenant = "pa-old"
    dep.register_device("old-a", tenant=old_tenant)
    dep.register_device("old-b", tenant=old_tenant)
    master = KeyDeriver.new_master_secret()
    old_state = env.root / "old-device-a"
    old_state.mkdir()
    (old_state / "keystore.json").write_text(json.dumps({"master_secret": master.hex(), "tenant": old_tenant}))
    kd = KeyDeriver(master, old_tenant)
    ob = DeviceClient(dep.matcher.target, dep.matcher_token("device", old_tenant), "old-b", kd, scheme=scheme_desc,
                      purpose=purpose, key_scope="subject", tenant=old_tenant, off_device=OFF_DEVICE)
    for i, x in enumerate(victims):
        env.enrol(ob, f"dc-v{i}", x, purpose)
    # the attacker: the persistent state of device a + the whole matcher store
    stored = {(row.tenant, row.subject): row for row in _stolen_rows(dep.matcher.store)}
    records = []
    for tenant, st, proto in (("default", state, "current"),
                              (old_tenant, old_state, "control: the device keeps the tenant master secret")):
        found = _secrets_in(st)
        rows = [stored[(tenant, f"dc-v{i}")] for i in range(n_victims)]
        codes = np.stack([scheme.codes_of(Template.from_bytes(r.template))[0] for r in rows])
        keys, how = _keys_from_state(scheme, found, tenant, rows, codes, rng, steps)
        best = _invert_type1(scheme, keys, codes, victims, rng, steps)
        records.append(_record("device_compromise_offline", scheme_desc, int((best >= thr).sum()), n_victims, 1e-3,
                               proto, "inversion type I at the unprotected FMR 0.1% threshold (cos >= "
                               f"{thr:.3f}), subjects the device never captured",
                               f"{len(found)} secret-looking values in the device's files, each tried as master "
                               f"secret and as key: {how}"))
    return records


def device_compromise_online(root: Path, ctx: ScoreContext, scheme_desc: str, n_victims: int, limit: int,
                             rng: np.random.Generator, steps: int) -> list[AttackRecord]:
    """The stolen device's live key-service token, default limits except ``device_subject_limit``."""
    from ...schemes import make_scheme
    from ...template import Template
    scheme = make_scheme(scheme_desc)
    env = _Env(root, {"device_subject_limit": limit}, {})
    try:
        purpose = PURPOSE + "_do"
        env.dep.register_device("dev-a")
        victims, _ = _faces(ctx, n_victims, rng)
        per = max(1, limit - 1)                  # enrolment stations stay under the limit too
        for start in range(0, n_victims, per):
            name = f"enrol-{start // per}"
            env.dep.register_device(name)
            b = env.dep.device(name, scheme=scheme_desc, purpose=purpose, key_scope="subject")
            for i in range(start, min(start + per, n_victims)):
                env.enrol(b, f"do-v{i}", victims[i], purpose)
        thief = env.dep.ks_client("device", device_id="dev-a")
        keys: list = []
        for i in range(n_victims):
            try:
                keys.append(bytes(thief.release_key(purpose, scheme.spec.key(), "VERIFY", subject=f"do-v{i}",
                                                    key_version=1).key))
            except Exception:  # noqa: BLE001 - KEY_HARVESTING lock-out
                keys.append(None)
        rows = {r.subject: r for r in _stolen_rows(env.dep.matcher.store)}
        codes = np.stack([scheme.codes_of(Template.from_bytes(rows[f"do-v{i}"].template))[0] for i in range(n_victims)])
        thr = float(ctx.raw_thresholds["0.001"])
        best = _invert_type1(scheme, keys, codes, victims, rng, steps)
        got = sum(k is not None for k in keys)
    finally:
        env.close()
    return [_record("device_compromise_online", scheme_desc, int((best >= thr).sum()), n_victims, 1e-3, "current",
                    "inversion type I at FMR 0.1% with keys the stolen token obtained before it was revoked",
                    f"the key service released {got} of {n_victims} victims' keys, then locked the token out "
                    f"(device_subject_limit = {limit} distinct subjects per hour, audited as KEY_HARVESTING); "
                    "bounded by the limit per window, not at chance: revoke the token, rotate, re-enrol")]


# -- linkage ------------------------------------------------------------------------------------------
def _similarities(scheme, probe_codes: np.ndarray, gallery_codes: np.ndarray) -> np.ndarray:
    return np.asarray(scheme.similarities(probe_codes, gallery_codes))


def _codes(scheme, blobs: list[bytes]) -> np.ndarray:
    from ...template import Template
    return np.stack([scheme.codes_of(Template.from_bytes(b))[0] for b in blobs])


def link_by_probe_pairs(scheme, probes: list[tuple[str, bytes]], old: dict, new: dict) -> dict[str, str]:
    """The curious matcher's linkage: probes of one device sent back to back under two key versions
    are one capture; each pair votes (best old template, best new template). ``old`` / ``new``:
    ``{subject: template bytes}`` of the two versions. Returns ``{new subject: old subject}``."""
    from ...template import Template
    old_ids, new_ids = list(old), list(new)
    old_codes, new_codes = _codes(scheme, [old[s] for s in old_ids]), _codes(scheme, [new[s] for s in new_ids])
    old_v = Template.from_bytes(old[old_ids[0]]).key_version
    votes: dict[str, Counter] = {}
    for (d1, p1), (d2, p2) in zip(probes, probes[1:]):
        t1, t2 = Template.from_bytes(p1), Template.from_bytes(p2)
        if d1 != d2 or t1.key_version == t2.key_version or old_v not in (t1.key_version, t2.key_version):
            continue
        po, pn = (t1, t2) if t1.key_version == old_v else (t2, t1)
        o = old_ids[int(np.argmax(scheme.similarities(scheme.codes_of(po), old_codes)[0]))]
        n = new_ids[int(np.argmax(scheme.similarities(scheme.codes_of(pn), new_codes)[0]))]
        votes.setdefault(n, Counter())[o] += 1
    direct = _similarities(scheme, new_codes, old_codes)
    out = {}
    for k, n in enumerate(new_ids):
        out[n] = votes[n].most_common(1)[0][0] if n in votes else old_ids[int(np.argmax(direct[k]))]
    return out


def version_linkage(env: _Env, ctx: ScoreContext, scheme_desc: str, n: int, captures: int,
                    rng: np.random.Generator) -> list[AttackRecord]:
    from ...client import DeviceClient
    from ...keys import KeyDeriver
    from ...schemes import make_scheme
    scheme = make_scheme(scheme_desc)
    enrol_x, capture_x = _faces(ctx, n, rng)
    perm = rng.permutation(n)
    dep = env.dep
    records = []
    for proto in ("current", "control: one probe per key version in use (old SDK)"):
        tenant = "default" if proto == "current" else "pa-vl-old"
        purpose = PURPOSE + "_vl"
        if tenant != "default":
            dep.register_device("pa-gate", tenant=tenant)
        if proto == "current":
            dev = dep.device("pa-gate", scheme=scheme_desc, purpose=purpose)          # group keys from the key service
        else:
            kd = KeyDeriver(KeyDeriver.new_master_secret(), tenant)
            dev = DeviceClient(dep.matcher.target, dep.matcher_token("device", tenant), "pa-gate", kd, scheme=scheme_desc,
                               purpose=purpose, tenant=tenant, off_device=OFF_DEVICE)
        for i in range(n):                                                           # old-version enrolments
            env.enrol(dev, f"old{i}", enrol_x[i], purpose, version=1 if proto != "current" else None)
        if proto == "current":
            dep.ks_client("admin").rotate("GROUP", purpose=purpose, reason="key-version change")
        for i in range(n):                                                           # re-enrolment, fresh pseudonyms
            env.enrol(dev, f"new{perm[i]}", enrol_x[i], purpose, version=2 if proto != "current" else None)
        seen = env.spy_identify()
        start = len(seen)
        for _ in range(captures):
            i = int(rng.integers(n))
            x = capture_x[i] + 0.2 * rng.standard_normal(capture_x.shape[1]) / math.sqrt(capture_x.shape[1])
            if proto == "current":
                dev.identify(x, top_k=1)
            else:                                                                    # the old SDK: every version in use
                dev.identify(templates=[scheme.protect(kd.derive("group." + purpose, v, scheme.spec), x, key_version=v)
                                        for v in (1, 2)], top_k=1)
            env.clock.advance(1.0)
        rows = [r for r in _stolen_rows(dep.matcher.store) if r.tenant == tenant and r.purpose == purpose]
        old = {r.subject: r.template for r in rows if r.subject.startswith("old")}
        new = {r.subject: r.template for r in rows if r.subject.startswith("new")}
        links = link_by_probe_pairs(scheme, seen[start:], old, new)
        correct = sum(links[f"new{perm[i]}"] == f"old{i}" for i in range(n))
        records.append(_record("version_linkage", scheme_desc, correct, n, 1 / n, proto,
                               "rank-1: the old-version template linked to a new-version one is the same person",
                               f"{captures} Identify calls logged by the matcher during the change; fast 1:N mode"))
    return records


def cross_tenant_linkage(env: _Env, ctx: ScoreContext, scheme_desc: str, n: int,
                         rng: np.random.Generator) -> list[AttackRecord]:
    from ...client import DeviceClient
    from ...keys import KeyDeriver
    from ...schemes import make_scheme
    scheme = make_scheme(scheme_desc)
    a_x, b_x = _faces(ctx, n, rng)
    perm = rng.permutation(n)
    dep = env.dep
    purpose = PURPOSE + "_ct"
    shared = KeyDeriver(KeyDeriver.new_master_secret(), "pa-shared")
    records = []
    for proto, tenants in (("current", ("pa-t1", "pa-t2")),
                           ("control: one master secret behind both tenants' devices", ("pa-c1", "pa-c2"))):
        devs = []
        for t in tenants:
            dep.register_device("pa-gate", tenant=t)
            if proto == "current":
                devs.append(dep.device("pa-gate", scheme=scheme_desc, purpose=purpose, tenant=t))
            else:
                devs.append(DeviceClient(dep.matcher.target, dep.matcher_token("device", t), "pa-gate", shared,
                                         scheme=scheme_desc, purpose=purpose, tenant=t, off_device=OFF_DEVICE))
        for i in range(n):
            env.enrol(devs[0], f"a{i}", a_x[i], purpose)
            env.enrol(devs[1], f"b{perm[i]}", b_x[i], purpose)
        rows = _stolen_rows(dep.matcher.store)
        ta = {r.subject: r.template for r in rows if r.tenant == tenants[0] and r.purpose == purpose}
        tb = {r.subject: r.template for r in rows if r.tenant == tenants[1] and r.purpose == purpose}
        a_ids = list(ta)
        sims = _similarities(scheme, _codes(scheme, [tb[f"b{perm[i]}"] for i in range(n)]),
                             _codes(scheme, [ta[s] for s in a_ids]))
        correct = sum(a_ids[int(np.argmax(sims[i]))] == f"a{i}" for i in range(n))
        records.append(_record("cross_tenant_linkage", scheme_desc, correct, n, 1 / n, proto,
                               "rank-1: a tenant-B template's best tenant-A match is the same person",
                               "both tenants' stores; fast 1:N mode (group keys) in both"))
    return records


# -- decisions ----------------------------------------------------------------------------------------
class _MITMKeyService:
    """A man-in-the-middle key service: proxies context requests to the real one and answers
    ``Decide`` with ``mode`` = "forge" (its own Ed25519 key, matched = true) or "replay" (the first
    genuine signed decision it saw, for every later request)."""

    def __init__(self, dep, mode: str) -> None:
        from concurrent import futures

        import grpc
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from ..._proto.veilface.v1 import keyservice_pb2 as kpb
        from ..._proto.veilface.v1 import keyservice_pb2_grpc as kpb_grpc
        from ...keyservice.signing import DECISION_DOMAIN, Signer
        real = dep.ks_client("matcher")
        signer = Signer(Ed25519PrivateKey.generate())
        stored: list = []

        class Servicer(kpb_grpc.KeyServiceServicer):
            def GetVerificationKey(self, req, context):
                return real.stub.GetVerificationKey(req, metadata=real._md)

            def GetHEContext(self, req, context):
                return real.stub.GetHEContext(req, metadata=real._md)

            def Decide(self, req, context):
                if mode == "replay" and stored:
                    return stored[0]
                if mode == "replay":
                    stored.append(real.stub.Decide(req, metadata=real._md))
                    return stored[0]
                body = {"v": 1, "kind": req.kind, "ticket": req.ticket, "grant": req.grant, "tenant": req.tenant,
                        "purpose": req.purpose, "subject": req.subject_id, "device": req.device_id,
                        "probe_sha256": bytes(req.probe_sha256).hex(),
                        "result_sha256": hashlib.sha256(req.result).hexdigest(), "matched": True, "subject_ids": [],
                        "threshold": 0.9, "epoch": 1, "fingerprint": "", "issued_at": time.time(),
                        "key_id": real.verifier().key_id}                       # claims the real key's id
                payload, sig = signer.sign(DECISION_DOMAIN, body)
                return kpb.SignedDecision(payload=payload, signature=sig, key_id=signer.key_id)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                  options=[("grpc.max_receive_message_length", 64 << 20)])
        kpb_grpc.add_KeyServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"
        self.server.start()
        self._real = real

    def stop(self) -> None:
        self.server.stop(0)
        self._real.close()


def decision_attacks(env: _Env, faces: np.ndarray, impostors: np.ndarray, trials: int) -> list[AttackRecord]:
    import grpc

    from ..._proto.veilface.v1 import matcher_pb2 as pb
    dep = env.dep
    d = faces.shape[1]
    scheme = f"he:dim={d},mode=verify"
    records = []
    # forged and replayed decisions through a man in the middle, in front of a second matcher
    for mode in ("forge", "replay"):
        mitm = _MITMKeyService(dep, mode)
        try:
            m2 = dep.start_matcher(env.root / f"matcher-{mode}", keyservice=mitm.target,
                                   verify_fail_limit=10_000)
            purpose = PURPOSE + "_" + mode
            dep.register_device("pa-gate", matcher=m2)
            dep.register_he(purpose, "verify", d, matcher=m2)
            dev = dep.device("pa-gate", scheme=scheme, purpose=purpose, matcher=m2)
            env.enrol(dev, "victim", faces[0], purpose, matcher=m2)
            if mode == "replay":   # one genuine match: the decision the man in the middle keeps
                dev.verify("victim", faces[0] + 0.01, purpose=purpose)
            accepted = 0
            for k in range(trials):
                try:
                    raw = dev._call("Verify", _verify_request(dev, "victim", impostors[k % len(impostors)], purpose))
                    accepted += bool(raw.matched)
                except Exception:  # noqa: BLE001 - refused: the expected answer
                    pass
        finally:
            mitm.stop()
        records.append(_record(f"{'forged' if mode == 'forge' else 'replayed'}_decision", scheme, accepted, trials, 0.0,
                               "current", "an impostor Verify answered matched = true",
                               "the matcher's key-service connection runs through an attacker that "
                               + ("signs its own decisions (matched = true)" if mode == "forge"
                                  else "replays a genuine signed decision of an earlier match")))
    # a device reuses its decision grant
    purpose = PURPOSE + "_grant"
    dep.register_he(purpose, "verify", d)
    dev = dep.device("pa-gate", scheme=scheme, purpose=purpose)
    env.enrol(dev, "victim", faces[0], purpose)
    probe = dev.protect_probe("victim", faces[0], purpose=purpose).to_bytes()
    grant = dev.protection.grant("verify", probe, "victim", purpose)
    req = pb.VerifyRequest(subject_id="victim", probe=probe, purpose=purpose, device_id=dev.device_id,
                           decision_grant=grant)
    dev._call("Verify", req)
    reused = 0
    for _ in range(trials):
        try:
            reused += bool(dev._call("Verify", req).matched)
        except Exception:  # noqa: BLE001
            pass
    records.append(_record("replayed_grant", scheme, reused, trials, 0.0, "current",
                           "a second Verify on one decision grant answered matched = true",
                           "grants are single use at the key service (decided tickets, grants and result hashes "
                           "are recorded)"))
    # the removed self-report
    channel = grpc.insecure_channel(dep.matcher.target)
    call = channel.unary_unary("/veilface.v1.Matcher/ReportDecision")
    ok = 0
    for _ in range(trials):
        try:
            call(b"\n\x08dt_forge\x10\x01", metadata=(("authorization", f"Bearer {dep.matcher_tokens['device']}"),))
            ok += 1
        except grpc.RpcError:
            pass
    channel.close()
    records.append(_record("self_reported_decision", scheme, ok, trials, 0.0, "current",
                           "the matcher accepts a device's report of a decision",
                           "ReportDecision was removed: refused before any handler (no role may call it)"))
    return records


def _verify_request(dev, subject: str, x, purpose: str):
    from ..._proto.veilface.v1 import matcher_pb2 as pb
    probe = dev.protect_probe(subject, x, purpose=purpose).to_bytes()
    grant = dev.protection.grant("verify", probe, subject, purpose)
    return pb.VerifyRequest(subject_id=subject, probe=probe, purpose=purpose, device_id=dev.device_id,
                            decision_grant=grant)


def lockout_lift(root: Path, faces: np.ndarray, impostors: np.ndarray, subjects: int) -> list[AttackRecord]:
    """Default limits. Lock ``subjects`` subjects out (impostor bursts), then try every device call
    and a genuine capture; success = the genuine capture was answered (the lock-out lifted)."""
    import grpc

    from ..._proto.veilface.v1 import matcher_pb2 as pb
    env = _Env(root, {}, {})
    dep = env.dep
    d = faces.shape[1]
    scheme = f"he:dim={d},mode=verify"
    lifted = trials = 0
    try:
        dep.register_device("pa-gate")
        purpose = PURPOSE + "_lock"
        dep.register_he(purpose, "verify", d)
        dev = dep.device("pa-gate", scheme=scheme, purpose=purpose)
        limit = dep.matcher.cfg.verify_fail_limit
        channel = grpc.insecure_channel(dep.matcher.target)
        report = channel.unary_unary("/veilface.v1.Matcher/ReportDecision")
        md = (("authorization", f"Bearer {dep.matcher_tokens['device']}"),)
        for s in range(subjects):
            sid = f"lk{s}"
            env.enrol(dev, sid, faces[s], purpose)
            for _ in range(limit):
                dev.verify(sid, impostors[s], purpose=purpose)
            tries = [lambda: report(b"\n\x08dt_forge\x10\x01", metadata=md),
                     lambda: dev.verify(sid, faces[s], purpose=purpose),
                     lambda: dev.identify(faces[s], purpose=purpose),
                     lambda: dev.record_consent(sid, "notice-v1", 30, purpose=purpose),
                     lambda: dev.list_he_contexts(purpose),
                     lambda: dev._call("Verify", pb.VerifyRequest(subject_id=sid, purpose=purpose, device_id="pa-gate"))]
            for attempt in tries:
                trials += 1
                try:
                    attempt()
                except Exception:  # noqa: BLE001 - refusals are expected
                    pass
                try:
                    dev.verify(sid, faces[s], purpose=purpose)      # a genuine capture: answered = lifted
                    lifted += 1
                except Exception:  # noqa: BLE001 - RESOURCE_EXHAUSTED VERIFY_BURST
                    pass
        channel.close()
    finally:
        env.close()
    return [_record("lockout_lift", scheme, lifted, trials, 0.0, "current",
                    "a genuine capture is answered during a VERIFY_BURST lock-out, after a device call",
                    "calls tried: ReportDecision, a genuine Verify, Identify, RecordConsent, ListHEContexts, "
                    "a malformed Verify; the lock-out ends only with time or an operator")]


# -- the study --------------------------------------------------------------------------------------------
def run(ctx: ScoreContext, subjects: int = 50, quick: bool = False) -> ProtocolAttacks:
    """Every attack; ``subjects``: victims per attack (>= 50 for the divide-out in a full run)."""
    t0 = time.perf_counter()
    rng = ctx.rng("protocol_attacks")
    steps = ctx.opts.attack_steps
    n = max(2, min(subjects, len([s for s, r in ctx.rows_of.items() if len(r) >= 2])))
    oracle_subjects, oracle_probes = (2, 16) if quick else (8, 128)
    dump_subjects, dump_dim = (6, 16) if quick else (30, 64)
    captures = 40 if quick else 200
    high = {"verify_fail_limit": 1_000_000, "identify_limit": 1_000_000, "identify_nomatch_limit": 1_000_000}
    ks_high = {"device_limit": 1_000_000, "device_subject_limit": 1_000_000, "tenant_limit": 1_000_000,
               "fast_identify": [PURPOSE + "_vl", PURPOSE + "_ct"]}
    records: list[AttackRecord] = []
    timings: dict[str, float] = {}
    cancellable = f"biohash:bits=256,dim={ctx.ds.dim}"

    def timed(name, fn, *args):
        t = time.perf_counter()
        records.extend(fn(*args))
        timings[name] = round(time.perf_counter() - t, 1)

    quiet = logging.getLogger("veilface")
    level = quiet.level
    quiet.setLevel(logging.ERROR)           # intrusion alerts are the point here, not news
    try:
        with tempfile.TemporaryDirectory(prefix="veilface-protocol-attacks-") as tmp:
            root = Path(tmp)
            env = _Env(root / "main", ks_high, high)
            try:
                env.dep.register_device("pa-gate")
                enrol_x, capture_x = _faces(ctx, n, rng)
                timed("he_verify_divide_out", he_verify_divide_out, env, enrol_x, rng)
                timed("he_verify_score_oracle", he_verify_score_oracle, env, enrol_x[:oracle_subjects], rng,
                      oracle_probes)
                timed("he_identify_gallery_dump", he_identify_gallery_dump, env, dump_subjects, dump_dim, rng)
                timed("device_compromise_offline", device_compromise, env, ctx, cancellable, n, rng, steps)
                timed("version_linkage", version_linkage, env, ctx, cancellable, n, captures, rng)
                timed("cross_tenant_linkage", cross_tenant_linkage, env, ctx, cancellable, n, rng)
                timed("decisions", decision_attacks, env, enrol_x, capture_x[::-1], 10 if quick else 20)
            finally:
                env.close()
            timed("device_compromise_online", device_compromise_online, root / "online", ctx, cancellable, n,
                  max(2, n // 5), rng, steps)
            timed("lockout_lift", lockout_lift, root / "lockout", enrol_x, capture_x[::-1], 2 if quick else 5)
    finally:
        quiet.setLevel(level)
    settings = {"subjects": n, "oracle_subjects": oracle_subjects, "oracle_probes": oracle_probes,
                "dump_subjects": dump_subjects, "dump_dim": dump_dim, "captures": captures, "alpha": ALPHA,
                "scaled_probe_factor": SCALE, "seconds_per_attack": timings}
    return ProtocolAttacks(records, time.perf_counter() - t0, settings)


__all__ = ["AttackRecord", "ProtocolAttacks", "run", "clopper_pearson", "chance_cosine", "link_by_probe_pairs"]


def _stolen_rows(store) -> list:
    """Every template row of the matcher's store, as an attacker who copied the database has them
    (read through the store's consistent export view)."""
    rows: list = []
    with store.export_view() as view:
        for tenant, purpose, _ in view.template_groups():
            after = 0
            while page := view.templates(tenant, purpose, after, 1000):
                rows += page
                after = page[-1].id
    return rows
