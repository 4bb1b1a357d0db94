"""The key service without its transport: each RPC is one method here (testable without gRPC).

Who may do what (the role table of ``docs/architecture.md``):

* **device** -- ``release_key`` (its own device id, its tenant; rate-limited per device and
  tenant, at most ``device_subject_limit`` distinct subjects per window), ``grant_decision`` (one
  single-use grant per encrypted match, bound to the probe's hash), ``he_context`` without
  evaluation keys;
* **matcher** -- ``decide``: decrypts an encrypted result of a granted request and returns a
  signed decision (no score); ``he_context`` with evaluation keys;
* **operator / admin** -- ``he_context`` (may create epoch 1); **admin** -- ``rotate``;
* **auditor / admin** -- the audit log.

Every call leaves one audit entry (who, what, tenant, subject, purpose, device, result -- never a
key, a score or a template); a decision and its replay record commit in one transaction.
"""
from __future__ import annotations

import hmac
import json
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..service import policy
from ..service.audit import AuditEvent
from ..service.clock import Clock
from ..service.status import BadRequest, NotFound, PermissionDenied, PreconditionFailed
from .config import KeyServiceConfig
from .keystore import KeyStore
from .limits import KeyServiceLimits
from .signing import CONTEXT_DOMAIN, DECISION_DOMAIN, DECISION_VERSION, Signer, context_statement, sha256_hex
from .store import KeyServiceStore

OPS = ("ENROL", "VERIFY", "IDENTIFY_FAST")
KINDS = ("verify", "identify")
_TICKET = re.compile(r"^[A-Za-z0-9_\-]{16,128}$")
MAX_RESULT_BYTES = 1 << 31


@dataclass(frozen=True)
class Principal:
    role: str
    name: str
    device_id: str = ""
    tenant: str = "*"


@dataclass(frozen=True)
class ReleaseRequest:
    tenant: str
    purpose: str
    subject: str
    group: bool
    scheme: str
    key_version: int
    op: str
    device: str


@dataclass(frozen=True)
class Released:
    key: bytes
    key_version: int
    master_version: int
    release_ref: str


@dataclass(frozen=True)
class GrantRequest:
    tenant: str
    purpose: str
    kind: str
    subject: str
    probe_sha256: bytes
    device: str


@dataclass(frozen=True)
class Grant:
    tenant: str
    purpose: str
    kind: str
    subject: str
    probe_sha256: str
    device: str
    expires_at: float


@dataclass(frozen=True)
class DecideRequest:
    ticket: str
    grant: str
    kind: str
    tenant: str
    purpose: str
    subject: str
    device: str
    probe_sha256: bytes
    threshold: float
    top_k: int
    result: bytes


@dataclass(frozen=True)
class ContextAnswer:
    context: bytes
    epoch: int
    fingerprint: str
    statement: bytes
    signature: bytes
    key_id: str


def _ref(secret: str) -> str:
    return sha256_hex(secret.encode())[:16]


def parse_scheme_key(label: str):
    """A canonical cancellable scheme spec key (``name/vN:{json}``) -> its scheme object."""
    from ..schemes import make_scheme
    from ..template import SchemeSpec
    m = re.fullmatch(r"([a-z][a-z0-9_]{0,31})/v([0-9]{1,4}):(\{.{0,400}\})", label or "", re.S)
    if not m:
        raise BadRequest("scheme must be a canonical scheme spec key (name/vN:{params})", reason="BAD_SCHEME")
    try:
        params = json.loads(m.group(3))
        if not isinstance(params, dict):
            raise ValueError
        scheme = make_scheme(SchemeSpec(m.group(1), int(m.group(2)), params))
    except BadRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - unknown scheme / bad parameters
        raise BadRequest(f"bad scheme spec: {exc}", reason="BAD_SCHEME") from None
    if scheme.spec.key() != label:
        raise BadRequest("scheme spec key is not canonical", reason="BAD_SCHEME")
    if getattr(scheme, "encrypted", False):
        raise BadRequest("the he scheme has no transform key (use GetHEContext)", reason="BAD_SCHEME")
    return scheme


class KeyServiceApp:
    """Use cases of the key service over one store, one key store, one clock."""

    def __init__(self, cfg: KeyServiceConfig, store: KeyServiceStore, keys: KeyStore, clock: Clock) -> None:
        self.cfg, self.store, self.keys, self.clock = cfg, store, keys, clock
        self.signer = Signer(keys.signing_key())
        self.limits = KeyServiceLimits(clock, cfg)
        self._grants: OrderedDict[str, Grant] = OrderedDict()
        self._lock = threading.Lock()
        self._policy = None
        store.prune_decisions(clock.now() - cfg.decision_record_ttl_s)

    @property
    def policy(self):
        """The HE decision policy (made on first use: a key service without the ``[he]`` extra
        serves cancellable-scheme keys; its HE calls say which extra is missing)."""
        if self._policy is None:
            from ..he.decisions import DecisionPolicy
            self._policy = DecisionPolicy(self.cfg.max_k, self.cfg.min_threshold, self.cfg.norm_tolerance)
        return self._policy

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _role(p: Principal, *roles: str) -> None:
        if p.role not in roles:
            raise PermissionDenied(f"role {p.role!r} may not do this", reason="ROLE_NOT_ALLOWED")

    @staticmethod
    def _tenant(p: Principal, ev: AuditEvent, tenant: str) -> str:
        t = ev.tenant = policy.tenant_of(tenant)
        if p.tenant not in ("*", t):
            raise PermissionDenied("this token acts for another tenant", reason="TENANT_MISMATCH")
        return t

    @staticmethod
    def _device(p: Principal, ev: AuditEvent, device: str) -> str:
        d = device or p.device_id
        if p.device_id and d != p.device_id:
            raise PermissionDenied("this device token is bound to another device", reason="DEVICE_MISMATCH")
        ev.device = policy.check_id("device id", d)
        return d

    def _admit(self, tenant: str, device: str = "", subject: str | None = None) -> None:
        alert = self.limits.admit(tenant, device, subject)
        if alert is not None:
            self.store.audit(AuditEvent("INTRUSION_ALERT", "system", "keyservice-limits", tenant, device=device,
                                        details={"kind": alert.kind, "count": alert.count, "window_s": alert.window_s,
                                                 "locked_until": alert.locked_until}), "ALERT", alert.kind)
            raise self.limits.refuse(alert)

    # -- public material -------------------------------------------------------------------------
    def verification_key(self) -> tuple[bytes, str]:
        return self.signer.public_raw, self.signer.key_id

    def he_context(self, p: Principal, ev: AuditEvent, tenant: str, purpose: str, mode: str, dim: int,
                   eval_keys: bool, create: bool) -> ContextAnswer:
        tenant = self._tenant(p, ev, tenant)
        purpose = ev.purpose = policy.check_purpose(purpose)
        if mode not in KINDS:
            raise BadRequest("mode must be 'verify' or 'identify'", reason="BAD_MODE")
        if not 1 <= int(dim) <= 4096:
            raise BadRequest("dim must be in [1, 4096]", reason="BAD_DIM")
        if eval_keys and p.role == "device":
            raise PermissionDenied("devices get the public key only (no evaluation keys)", reason="ROLE_NOT_ALLOWED")
        if create and p.role not in ("operator", "admin"):
            raise PermissionDenied("only an operator or admin creates an HE epoch", reason="ROLE_NOT_ALLOWED")
        kh = self.keys.he_key(tenant, purpose, mode, int(dim), create=create)
        if kh is None:
            raise NotFound("no HE key for this tenant, purpose, mode and dim (an operator creates it)",
                           reason="HE_KEY_NOT_FOUND")
        ctx = kh.public_context(eval_keys=bool(eval_keys))
        statement, sig = self.signer.sign(CONTEXT_DOMAIN, context_statement(tenant, purpose, mode, dim, kh.epoch,
                                                                            kh.fingerprint))
        ev.details = {"mode": mode, "dim": int(dim), "epoch": kh.epoch, "eval_keys": bool(eval_keys)}
        return ContextAnswer(ctx.to_bytes(), kh.epoch, kh.fingerprint, statement, sig, self.signer.key_id)

    # -- per-transaction keys ---------------------------------------------------------------------
    def release_key(self, p: Principal, ev: AuditEvent, req: ReleaseRequest) -> Released:
        self._role(p, "device")
        tenant = self._tenant(p, ev, req.tenant)
        device = self._device(p, ev, req.device)
        purpose = ev.purpose = policy.check_purpose(req.purpose)
        if req.op not in OPS:
            raise BadRequest("op must be ENROL, VERIFY or IDENTIFY_FAST", reason="BAD_OP")
        scheme = parse_scheme_key(req.scheme)
        if req.group:
            if req.subject:
                raise BadRequest("a group key names no subject", reason="BAD_REQUEST")
            if not self.cfg.fast_mode(tenant, purpose):
                raise PreconditionFailed(f"the fast (cancellable) 1:N mode is not enabled for purpose {purpose!r}; "
                                         "1:N uses the HE scheme", reason="FAST_MODE_NOT_ENABLED")
            current = self.keys.group_version(tenant, purpose)
            if req.key_version not in (0, current):
                raise PreconditionFailed(f"group key version {req.key_version} is not current ({current}): "
                                         "re-enrol under the current version", reason="KEY_VERSION_NOT_CURRENT")
            owner, version, label = f"group.{purpose}", current, f"group.{purpose}"
        else:
            if req.op == "IDENTIFY_FAST":
                raise BadRequest("IDENTIFY_FAST releases the group key only", reason="BAD_OP")
            subject = ev.subject = policy.check_id("subject id", req.subject)
            if not 1 <= int(req.key_version) <= 1_000_000:
                raise BadRequest("key_version must be in [1, 1000000]", reason="BAD_KEY_VERSION")
            owner, version, label = subject, int(req.key_version), subject
        self._admit(tenant, device, label)
        key, master_version = self.keys.derive(tenant, owner, version, scheme.spec.key())
        ref = secrets.token_hex(8)
        ev.details = {"op": req.op, "scope": "group" if req.group else "subject", "scheme": scheme.name,
                      "key_version": version, "master_version": master_version, "release_ref": ref}
        return Released(key, version, master_version, ref)

    # -- decisions ------------------------------------------------------------------------------
    def grant_decision(self, p: Principal, ev: AuditEvent, req: GrantRequest) -> tuple[str, float]:
        self._role(p, "device")
        tenant = self._tenant(p, ev, req.tenant)
        device = self._device(p, ev, req.device)
        purpose = ev.purpose = policy.check_purpose(req.purpose)
        if req.kind not in KINDS:
            raise BadRequest("kind must be 'verify' or 'identify'", reason="BAD_KIND")
        subject = ""
        if req.kind == "verify":
            subject = ev.subject = policy.check_id("subject id", req.subject)
        elif req.subject:
            raise BadRequest("an identify grant names no subject", reason="BAD_REQUEST")
        if not isinstance(req.probe_sha256, (bytes, bytearray)) or len(req.probe_sha256) != 32:
            raise BadRequest("probe_sha256 must be 32 bytes", reason="BAD_PROBE_HASH")
        self._admit(tenant, device)
        grant = "g_" + secrets.token_urlsafe(24)
        expires = self.clock.now() + self.cfg.grant_ttl_s
        with self._lock:
            self._grants[grant] = Grant(tenant, purpose, req.kind, subject, bytes(req.probe_sha256).hex(), device,
                                        expires)
            while len(self._grants) > self.cfg.max_open_grants:
                self._grants.popitem(last=False)
        ev.details = {"kind": req.kind, "grant_ref": _ref(grant)}
        return grant, expires

    def _take_grant(self, grant_id: str) -> Grant:
        with self._lock:
            g = self._grants.pop(grant_id or "", None)
        if g is None or g.expires_at < self.clock.now():
            raise PreconditionFailed("unknown, used or expired decision grant", reason="DECISION_GRANT_UNKNOWN")
        return g

    def decide(self, p: Principal, ev: AuditEvent, req: DecideRequest) -> tuple[bytes, bytes, str]:
        """Decrypt the encrypted result of a granted request and sign the decision (no score)."""
        from ..he import blob_header
        from ..he.errors import HEContextMismatch, HEEpochRevoked

        self._role(p, "matcher")
        tenant = self._tenant(p, ev, req.tenant)
        purpose = ev.purpose = policy.check_purpose(req.purpose)
        if req.kind not in KINDS:
            raise BadRequest("kind must be 'verify' or 'identify'", reason="BAD_KIND")
        if not _TICKET.match(req.ticket or ""):
            raise BadRequest("malformed ticket", reason="BAD_TICKET")
        if not isinstance(req.result, (bytes, bytearray)) or not 0 < len(req.result) < MAX_RESULT_BYTES:
            raise BadRequest("the encrypted result is required", reason="MISSING_RESULT")
        if len(req.probe_sha256) != 32:
            raise BadRequest("probe_sha256 must be 32 bytes", reason="BAD_PROBE_HASH")
        ev.details = {"kind": req.kind, "ticket_ref": _ref(req.ticket), "grant_ref": _ref(req.grant or "")}
        g = self._take_grant(req.grant)        # consumed whatever happens next: one decision per grant
        ev.device = g.device
        ev.subject = g.subject
        want = (tenant, purpose, req.kind, req.subject if req.kind == "verify" else "", req.device,
                bytes(req.probe_sha256).hex())
        have = (g.tenant, g.purpose, g.kind, g.subject, g.device, g.probe_sha256)
        if not all(hmac.compare_digest(str(a), str(b)) for a, b in zip(want, have)):
            raise PermissionDenied("the decision request does not match the device's grant (tenant, purpose, kind, "
                                   "subject, device or probe)", reason="DECISION_GRANT_MISMATCH")
        self._admit(tenant)
        result = bytes(req.result)
        h = blob_header(result)                           # HEFormatError -> INVALID_ARGUMENT
        want_kind = "score" if req.kind == "verify" else "scores"
        if h.get("kind") != want_kind:
            raise BadRequest(f"a {req.kind} decision needs a {want_kind!r} result", reason="HE_WRONG_KIND")
        params = h.get("params") if isinstance(h.get("params"), dict) else {}
        mode, dim, epoch = params.get("mode"), params.get("dim"), h.get("epoch")
        if h.get("tenant") != tenant or mode != ("verify" if req.kind == "verify" else "identify"):
            raise HEContextMismatch("the result was not computed under this tenant's context of that mode")
        if not (isinstance(dim, int) and isinstance(epoch, int)):
            raise BadRequest("result header without dim / epoch", reason="HE_MALFORMED")
        # the matcher's header is used for lookup only: our own record decides
        record = self.keys.he_epoch_state(tenant, purpose, mode, dim, epoch)
        if record is None:
            raise HEContextMismatch("no HE key of this tenant, purpose, mode, dim and epoch")
        state, fp = record
        if state != "current":
            raise HEEpochRevoked(f"HE epoch {epoch} was rotated away and its secret key shredded")
        if h.get("fp") != fp:
            raise HEContextMismatch("the result names another context fingerprint than our key of that epoch")
        kh = self.keys.he_key(tenant, purpose, mode, dim)
        if kh is None or kh.epoch != epoch:   # pragma: no cover - the record said current
            raise HEEpochRevoked("the HE epoch changed meanwhile")
        kh.policy = self.policy
        requested = float(req.threshold) if req.threshold else None
        if req.kind == "verify":
            if h.get("subject") != g.subject:
                raise PermissionDenied("the result is for another subject than the grant", reason="DECISION_GRANT_MISMATCH")
            d = kh.decide_verify(result, requested)       # refuses a missing / non-unit probe norm
            matched, ids, thr = d.matched, [], d.threshold
        else:
            k = self.policy.k(req.top_k or None)
            d = kh.decide_identify(result, requested, k)
            matched, ids, thr = d.matched, list(d.subject_ids), d.threshold
        result_sha = sha256_hex(result)
        body = {"v": DECISION_VERSION, "kind": req.kind, "ticket": req.ticket, "grant": req.grant, "tenant": tenant,
                "purpose": purpose, "subject": g.subject, "device": g.device, "probe_sha256": g.probe_sha256,
                "result_sha256": result_sha, "matched": bool(matched), "subject_ids": ids, "threshold": float(thr),
                "epoch": int(epoch), "fingerprint": fp, "issued_at": self.clock.now(), "key_id": self.signer.key_id}
        payload, sig = self.signer.sign(DECISION_DOMAIN, body)
        ev.details.update({"matched": bool(matched), "released_ids": len(ids), "threshold": float(thr),
                           "epoch": int(epoch), "result_ref": result_sha[:16]})
        with self.store.transaction() as tx:
            if not tx.record_decision(req.ticket, req.grant, result_sha):
                raise PreconditionFailed("this ticket, grant or result was decided before", reason="DECISION_REPLAYED")
            tx.audit(ev)
        return payload, sig, self.signer.key_id

    # -- rotation ---------------------------------------------------------------------------------
    def rotate(self, p: Principal, ev: AuditEvent, scope: str, tenant: str, purpose: str = "", mode: str = "",
               dim: int = 0, reason: str = "") -> tuple[int, int, bool, str]:
        self._role(p, "admin")
        tenant = self._tenant(p, ev, tenant)
        ev.details = {"scope": scope, "reason": (reason or "")[:200]}
        if scope == "MASTER":
            old, new = self.keys.rotate_master(tenant, ev)
            return old, new, old > 0, ""
        purpose = ev.purpose = policy.check_purpose(purpose)
        if scope == "GROUP":
            old, new = self.keys.rotate_group(tenant, purpose, ev)
            return old, new, False, ""
        if scope == "HE":
            if mode not in KINDS or not 1 <= int(dim) <= 4096:
                raise BadRequest("HE rotation needs mode and dim", reason="BAD_MODE")
            ev.details.update({"mode": mode, "dim": int(dim)})
            old, kh = self.keys.rotate_he(tenant, purpose, mode, int(dim), ev)
            return old, kh.epoch, old > 0, kh.fingerprint
        raise BadRequest("scope must be MASTER, GROUP or HE", reason="BAD_SCOPE")


__all__ = ["KeyServiceApp", "Principal", "ReleaseRequest", "Released", "GrantRequest", "DecideRequest",
           "ContextAnswer", "parse_scheme_key", "OPS", "KINDS"]
