"""``veilface.v1.KeyService`` over gRPC: role tokens (its own, :data:`METHOD_ROLES`), then one thin
method per RPC (request -> :class:`~engine.keyservice.app.KeyServiceApp` -> response), an audit
entry for every call and the matcher's error-to-status table (:mod:`engine.service.status`).

The token check runs in :class:`KeyServiceAuth` *before* the method (PERMISSION_DENIED reveals
nothing); the role checks are repeated inside the use cases (defence in depth).
"""
from __future__ import annotations

import contextvars
import functools
import hashlib
import hmac
import logging

import grpc

from .._proto.veilface.v1 import keyservice_pb2 as kpb
from .._proto.veilface.v1 import keyservice_pb2_grpc as kpb_grpc
from ..errors import REASON_KEY
from ..service.audit import AuditEvent
from ..service.status import BadRequest, DeadlineExceeded, classify
from .app import DecideRequest, GrantRequest, KeyServiceApp, Principal, ReleaseRequest
from .config import KSTokenEntry

log = logging.getLogger("veilface.keyservice")
SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["KeyService"].full_name

METHOD_ROLES: dict[str, frozenset[str]] = {
    "GetVerificationKey": frozenset({"device", "matcher", "operator", "admin", "auditor"}),
    "GetHEContext": frozenset({"device", "matcher", "operator", "admin"}),
    "ReleaseKey": frozenset({"device"}),
    "GrantDecision": frozenset({"device"}),
    "Decide": frozenset({"matcher"}),
    "Rotate": frozenset({"admin"}),
    "GetAuditLog": frozenset({"auditor", "admin"}),
    "VerifyAuditChain": frozenset({"auditor", "admin"}),
}
ANONYMOUS = Principal("none", "anonymous")
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("veilface_ks_principal", default=ANONYMOUS)
_HE_REASONS = {"HE_PROBE_REFUSED": "FAILED_PRECONDITION", "HE_EPOCH_REVOKED": "FAILED_PRECONDITION",
               "HE_CONTEXT_MISMATCH": "FAILED_PRECONDITION", "KEK_ERROR": "FAILED_PRECONDITION"}


def status_of(exc: BaseException) -> tuple[str, str, str]:
    """The matcher's table plus the HE decider's reasons."""
    reason = getattr(exc, "reason", "")
    if reason in _HE_REASONS and not hasattr(exc, "code"):
        return _HE_REASONS[reason], reason, str(exc)
    return classify(exc)


class KeyServiceAuth(grpc.ServerInterceptor):
    """Bearer role tokens (SHA-256 hashes compared in constant time); refusals are audited."""

    def __init__(self, entries: list[KSTokenEntry], on_denied=None) -> None:
        self._entries = [(bytes.fromhex(e.sha256), Principal(e.role, e.name, e.device_id, e.bound_tenant))
                         for e in entries]
        self.on_denied = on_denied

    def lookup(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for h, p in self._entries:
            if hmac.compare_digest(h, digest):
                found = p
        return found

    def intercept_service(self, continuation, details):
        method = details.method or ""
        handler = continuation(details)
        if method.startswith("/grpc.health.v1.Health/"):
            return handler
        token = ""
        for k, v in details.invocation_metadata or ():
            if k == "authorization":
                v = v.decode() if isinstance(v, bytes) else v
                token = v[7:].strip() if v[:7].lower() == "bearer " else ""
        principal = self.lookup(token) if token else None
        short = method.rsplit("/", 1)[-1]
        name = short if short in METHOD_ROLES else "UNKNOWN_METHOD"
        if principal is None:
            return self._deny(handler, ANONYMOUS, name, grpc.StatusCode.UNAUTHENTICATED,
                              "MISSING_TOKEN" if not token else "BAD_TOKEN", "a valid role token is required")
        allowed = METHOD_ROLES.get(short, frozenset()) if method.startswith(f"/{SERVICE_NAME}/") else \
            frozenset(METHOD_ROLES["GetVerificationKey"])
        if principal.role not in allowed:
            return self._deny(handler, principal, name, grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED",
                              f"role {principal.role!r} may not call {name}")
        if handler is None:
            return None

        def wrap(fn):
            if fn is None:
                return None

            def run(req, ctx):
                tok = _current.set(principal)
                try:
                    return fn(req, ctx)
                finally:
                    _current.reset(tok)
            return run
        return handler._replace(unary_unary=wrap(handler.unary_unary))

    def _deny(self, handler, principal: Principal, method: str, code, reason: str, message: str):
        if self.on_denied is not None:
            try:
                self.on_denied(principal, method, code.name, reason)
            except Exception:  # noqa: BLE001 - auditing must not turn a denial into a crash
                pass

        def abort(request, context):
            context.set_trailing_metadata(((REASON_KEY, reason),))
            context.abort(code, f"{reason}: {message}")
        return grpc.unary_unary_rpc_method_handler(abort, handler.request_deserializer if handler else None,
                                                   handler.response_serializer if handler else None)


def _rpc(fn):
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: KeyServiceServicer, request, context):
        p = _current.get()
        ev = AuditEvent(name, p.role, p.name)
        try:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("deadline expired before the call started")
            resp = fn(self, request, context, p, ev)
            if not ev.written:
                self.app.store.audit(ev, "OK")
            return resp
        except Exception as exc:  # noqa: BLE001 - mapped to a status code below
            code, reason, msg = status_of(exc)
            if code == "INTERNAL":
                log.exception("internal error in %s", name)
            try:
                self.app.store.audit(ev, code, reason)
            except Exception:  # noqa: BLE001
                log.exception("could not audit %s", name)
            context.set_trailing_metadata(((REASON_KEY, reason),))
            context.abort(getattr(grpc.StatusCode, code), f"{reason}: {msg}")
    return wrapper


_OPS = {kpb.ENROL: "ENROL", kpb.VERIFY: "VERIFY", kpb.IDENTIFY_FAST: "IDENTIFY_FAST"}
_SCOPES = {kpb.MASTER: "MASTER", kpb.GROUP: "GROUP", kpb.HE: "HE"}


class KeyServiceServicer(kpb_grpc.KeyServiceServicer):
    def __init__(self, app: KeyServiceApp) -> None:
        self.app = app

    @_rpc
    def GetVerificationKey(self, req, context, p, ev):
        raw, kid = self.app.verification_key()
        return kpb.VerificationKey(public_key=raw, key_id=kid, algorithm="Ed25519")

    @_rpc
    def GetHEContext(self, req, context, p, ev):
        a = self.app.he_context(p, ev, req.tenant, req.purpose, req.mode, req.dim, req.eval_keys, req.create)
        return kpb.HEContextResponse(context=a.context, epoch=a.epoch, fingerprint=a.fingerprint,
                                     statement=a.statement, signature=a.signature, key_id=a.key_id)

    @_rpc
    def ReleaseKey(self, req, context, p, ev):
        op = _OPS.get(req.op)
        if op is None:
            raise BadRequest("op is required (ENROL, VERIFY, IDENTIFY_FAST)", reason="BAD_OP")
        r = self.app.release_key(p, ev, ReleaseRequest(req.tenant, req.purpose, req.subject_id, req.group, req.scheme,
                                                       req.key_version, op, req.device_id))
        return kpb.ReleasedKey(key=r.key, key_version=r.key_version, master_version=r.master_version,
                               release_ref=r.release_ref)

    @_rpc
    def GrantDecision(self, req, context, p, ev):
        grant, expires = self.app.grant_decision(p, ev, GrantRequest(req.tenant, req.purpose, req.kind, req.subject_id,
                                                                     bytes(req.probe_sha256), req.device_id))
        return kpb.DecisionGrant(grant=grant, expires_at=expires)

    @_rpc
    def Decide(self, req, context, p, ev):
        payload, sig, kid = self.app.decide(p, ev, DecideRequest(
            req.ticket, req.grant, req.kind, req.tenant, req.purpose, req.subject_id, req.device_id,
            bytes(req.probe_sha256), req.threshold, req.top_k, bytes(req.result)))
        return kpb.SignedDecision(payload=payload, signature=sig, key_id=kid)

    @_rpc
    def Rotate(self, req, context, p, ev):
        scope = _SCOPES.get(req.scope)
        if scope is None:
            raise BadRequest("scope is required (MASTER, GROUP, HE)", reason="BAD_SCOPE")
        old, new, shredded, fp = self.app.rotate(p, ev, scope, req.tenant, req.purpose, req.mode, req.dim, req.reason)
        return kpb.RotateResponse(old_version=old, new_version=new, shredded=shredded, fingerprint=fp)

    @_rpc
    def GetAuditLog(self, req, context, p, ev):
        size = req.page_size or 100
        if not 1 <= size <= 1000:
            raise BadRequest("page_size must be in [1, 1000]", reason="BAD_PAGE_SIZE")
        tok = req.page_token or "0"
        if not tok.isdigit() or len(tok) > 18:
            raise BadRequest("bad page token", reason="BAD_PAGE_TOKEN")
        rows = self.app.store.audit_entries(int(tok), size + 1, req.action)
        more = len(rows) > size
        rows = rows[:size]
        ev.details = {"returned": len(rows)}
        return kpb.KeyServiceAuditResponse(entries=[
            kpb.KeyServiceAuditEntry(seq=r.seq, ts=r.ts, actor_role=r.actor_role, actor=r.actor, action=r.action,
                                     tenant=r.tenant, subject_id=r.subject, purpose=r.purpose, device_id=r.device,
                                     result=r.result, reason=r.reason, details_json=r.details, prev_hash=r.prev_hash,
                                     hash=r.hash) for r in rows],
            next_page_token=str(rows[-1].seq) if more and rows else "")

    @_rpc
    def VerifyAuditChain(self, req, context, p, ev):
        r = self.app.store.verify_audit()
        return kpb.KeyServiceChainResponse(ok=r.ok, entries=r.entries, head_hash=r.head_hash,
                                           first_bad_seq=r.first_bad_seq, problem=r.problem)


__all__ = ["KeyServiceServicer", "KeyServiceAuth", "METHOD_ROLES", "SERVICE_NAME", "status_of"]
