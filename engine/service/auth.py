"""Role tokens and the server interceptor that checks them on every RPC.

Clients send ``authorization: Bearer <token>``. The interceptor hashes the token (SHA-256),
finds it among the configured hashes with a constant-time comparison, and checks the role
against :data:`METHOD_ROLES` *before* the method runs -- so PERMISSION_DENIED never reveals
whether an object exists. Tokens are never logged; audit entries name the principal.
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from ..errors import REASON_KEY
from .config import TokenEntry

SERVICE = "veilface.v1.Matcher"

#: which roles may call which method (each role can only do its job)
METHOD_ROLES: dict[str, frozenset[str]] = {
    "RegisterDevice": frozenset({"admin", "operator"}),
    "RecordConsent": frozenset({"device", "operator"}),
    "Enroll": frozenset({"device"}),
    "Verify": frozenset({"device"}),
    "Identify": frozenset({"device"}),
    "Withdraw": frozenset({"device", "operator"}),
    "EnrollStream": frozenset({"operator", "admin"}),   # pg: bulk enrolment (gallery migration / import)
    "Revoke": frozenset({"device", "operator"}),
    "ListSubjects": frozenset({"operator", "admin"}),
    "GetAuditLog": frozenset({"auditor", "admin"}),
    "VerifyAuditChain": frozenset({"auditor", "admin"}),
    "ComplianceReport": frozenset({"operator", "auditor", "admin"}),
    "PurgeExpired": frozenset({"operator", "admin"}),
    "Decommission": frozenset({"admin"}),
    "RegisterHEContext": frozenset({"admin", "operator"}),
    "ListHEContexts": frozenset({"device", "operator", "auditor", "admin"}),
}
ANY_ROLE = frozenset({"device", "operator", "auditor", "admin"})
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."


@dataclass(frozen=True)
class Principal:
    role: str
    name: str
    device_id: str = ""


ANONYMOUS = Principal("none", "anonymous")
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("veilface_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    return _current.get()


class TokenTable:
    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = [(bytes.fromhex(e.sha256), Principal(e.role, e.name, e.device_id)) for e in entries]

    def lookup(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for h, p in self._entries:      # compare against all entries: no early exit timing
            if hmac.compare_digest(h, digest):
                found = p
        return found


def _token_from(metadata) -> str:
    for k, v in metadata or ():
        if k == "authorization":
            v = v.decode() if isinstance(v, bytes) else v
            return v[7:].strip() if v[:7].lower() == "bearer " else ""
    return ""


def _denier(handler, code: grpc.StatusCode, reason: str, message: str):
    def abort(request_or_iterator, context):
        context.set_trailing_metadata(((REASON_KEY, reason),))
        context.abort(code, f"{reason}: {message}")

    if handler is None or (not handler.request_streaming and not handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(
            abort, handler.request_deserializer if handler else None,
            handler.response_serializer if handler else None)
    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.unary_stream_rpc_method_handler(abort, **kw)


def _with_principal(handler, principal: Principal):
    """Wrap a handler so the behaviour runs with ``principal`` as the current principal."""
    def wrap(fn):
        if fn is None:
            return None

        def run(req, ctx):
            token = _current.set(principal)
            try:
                return fn(req, ctx)
            finally:
                _current.reset(token)
        return run

    return handler._replace(unary_unary=wrap(handler.unary_unary), unary_stream=wrap(handler.unary_stream),
                            stream_unary=wrap(handler.stream_unary), stream_stream=wrap(handler.stream_stream))


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks the role token of every call. ``on_denied(principal, method, code, reason)``
    is called for refused calls (the app audits them)."""

    def __init__(self, tokens: TokenTable, health_requires_token: bool = False,
                 on_denied: Callable[[Principal, str, str, str], None] | None = None) -> None:
        self.tokens = tokens
        self.health_requires_token = health_requires_token
        self.on_denied = on_denied

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        handler = continuation(handler_call_details)
        if method.startswith(HEALTH_PREFIX) and not self.health_requires_token:
            return handler
        token = _token_from(handler_call_details.invocation_metadata)
        principal = self.tokens.lookup(token) if token else None
        short = method.rsplit("/", 1)[-1]
        if principal is None:
            self._denied(ANONYMOUS, short, "UNAUTHENTICATED", "MISSING_TOKEN" if not token else "BAD_TOKEN")
            return _denier(handler, grpc.StatusCode.UNAUTHENTICATED,
                           "MISSING_TOKEN" if not token else "BAD_TOKEN", "a valid role token is required")
        if method.startswith(f"/{SERVICE}/"):
            allowed = METHOD_ROLES.get(short, frozenset())
        else:  # health (when protected), reflection: any authenticated role
            allowed = ANY_ROLE
        if principal.role not in allowed:
            self._denied(principal, short, "PERMISSION_DENIED", "ROLE_NOT_ALLOWED")
            return _denier(handler, grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED",
                           f"role {principal.role!r} may not call {short}")
        if handler is None:
            return None
        return _with_principal(handler, principal)

    def _denied(self, principal: Principal, method: str, code: str, reason: str) -> None:
        if self.on_denied is not None:
            try:
                self.on_denied(principal, method, code, reason)
            except Exception:  # noqa: BLE001 - auditing must not turn a denial into a crash
                pass
