"""Role tokens and the server interceptor that checks them on every RPC.

Clients send ``authorization: Bearer <token>``. The interceptor hashes the token (SHA-256),
finds it among the configured hashes with a constant-time comparison, and checks the role
against :data:`METHOD_ROLES` *before* the method runs -- so PERMISSION_DENIED never reveals
whether an object exists. Tokens are never logged; audit entries name the principal.

A principal is bound to a tenant (``TokenEntry.tenant``; unset: "default" for device and
operator tokens, any tenant for admin and auditor tokens, whose jobs -- the audit log,
decommissioning, the compliance report -- are matcher-wide). Failed authentications are
counted per peer address (:class:`~engine.service.ratelimit.AuthFailures`): past the limit
the peer gets RESOURCE_EXHAUSTED ``AUTH_THROTTLED`` for every call until the lock-out ends
(its tokens are not even looked at, so guessing gains nothing), and only a bounded number of
failures are audited, each naming a *known* method (an unknown, attacker-chosen method name
is audited as ``UNKNOWN_METHOD``).
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
from .request_context import note_principal

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
    # measures
    "RegisterImpactAssessment": frozenset({"admin", "operator"}),
    "WithdrawOffDeviceConsent": frozenset({"device", "operator"}),
    "RegisterOversightKey": frozenset({"admin", "operator"}),
    "SubmitOversight": frozenset({"device", "operator"}),    # operator: relays bundles collected offline
    "RecordFilingCancellation": frozenset({"admin", "operator"}),
    # harden
    "ResetLockout": frozenset({"operator", "admin"}),
    # api: named galleries and samples
    "CreateGallery": frozenset({"admin", "operator"}),
    "ListGalleries": frozenset({"device", "operator", "auditor", "admin"}),
    "DescribeGallery": frozenset({"device", "operator", "auditor", "admin"}),
    "DeleteGallery": frozenset({"admin", "operator"}),
    "AddSample": frozenset({"device"}),
    "ListSamples": frozenset({"operator", "admin"}),
    "DeleteSample": frozenset({"device", "operator"}),
    "GalleryVerify": frozenset({"device"}),
    "GallerySearch": frozenset({"device"}),
    "SearchBySubject": frozenset({"device", "operator"}),
}
ANY_ROLE = frozenset({"device", "operator", "auditor", "admin"})
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: role, name (from the token entry), bound device, bound tenant
    ("*" = any) and ``id`` (a short non-secret digest of the token: rate limits key on it)."""

    role: str
    name: str
    device_id: str = ""
    tenant: str = "*"
    id: str = ""

    @property
    def key(self) -> str:
        """What rate limits count per (within a tenant): the token, named for humans."""
        return f"{self.name}#{self.id}"


ANONYMOUS = Principal("none", "anonymous")
#: admin and auditor jobs are matcher-wide; device and operator tokens act for one tenant
_ANY_TENANT_ROLES = frozenset({"admin", "auditor"})


def normalise_method(method: str) -> str:
    """The audited name of a called method: a known RPC's short name, ``Health`` / ``Reflection``,
    else ``UNKNOWN_METHOD`` (an attacker-chosen path is never stored)."""
    short = (method or "").rsplit("/", 1)[-1]
    if (method or "").startswith(f"/{SERVICE}/") and short in METHOD_ROLES:
        return short
    if (method or "").startswith(HEALTH_PREFIX):
        return short if short in ("Check", "Watch") else "Health"
    if (method or "").startswith(REFLECTION_PREFIX):
        return "Reflection"
    return "UNKNOWN_METHOD"
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("veilface_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    return _current.get()


class TokenTable:
    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = [(bytes.fromhex(e.sha256), Principal(e.role, e.name, e.device_id, _tenant_of(e),
                                                             e.sha256[:12])) for e in entries]

    def lookup(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for h, p in self._entries:      # compare against all entries: no early exit timing
            if hmac.compare_digest(h, digest):
                found = p
        return found


def _tenant_of(entry: TokenEntry) -> str:
    tenant = getattr(entry, "tenant", "")
    if tenant:
        return tenant
    return "*" if entry.role in _ANY_TENANT_ROLES else "default"


def _token_from(metadata) -> str:
    for k, v in metadata or ():
        if k == "authorization":
            v = v.decode() if isinstance(v, bytes) else v
            return v[7:].strip() if v[:7].lower() == "bearer " else ""
    return ""


def _denier(handler, code: grpc.StatusCode, reason: str, message: str, before=None,
            principal: Principal | None = None):
    """A handler that refuses the call; ``before(context)`` may run first and return another
    ``(code, reason, message)`` (e.g. the peer is throttled)."""
    def abort(request_or_iterator, context):
        if principal is not None:
            note_principal(principal.role, principal.name)     # api: for the access log
        c, r, m = (before(context) if before is not None else None) or (code, reason, message)
        context.set_trailing_metadata(((REASON_KEY, r),))
        context.abort(c, f"{r}: {m}")

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


def _with_principal(handler, principal: Principal, guard=None):
    """Wrap a handler so the behaviour runs with ``principal`` as the current principal (after
    ``guard(context)``, which may abort the call)."""
    def wrap(fn):
        if fn is None:
            return None

        def run(req, ctx):
            note_principal(principal.role, principal.name)     # api: for the access log
            if guard is not None:
                guard(ctx)
            token = _current.set(principal)
            try:
                return fn(req, ctx)
            finally:
                _current.reset(token)
        return run

    return handler._replace(unary_unary=wrap(handler.unary_unary), unary_stream=wrap(handler.unary_stream),
                            stream_unary=wrap(handler.stream_unary), stream_stream=wrap(handler.stream_stream))


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks the role token of every call. ``on_denied(principal, method, code, reason, details)``
    is called for refused calls that are audited (the app audits them); ``failures`` (an
    :class:`~engine.service.ratelimit.AuthFailures`) throttles and bounds failed authentications."""

    def __init__(self, tokens: TokenTable, health_requires_token: bool = False,
                 on_denied: Callable[..., None] | None = None, failures=None) -> None:
        self.tokens = tokens
        self.health_requires_token = health_requires_token
        self.on_denied = on_denied
        self.failures = failures

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        handler = continuation(handler_call_details)
        if method.startswith(HEALTH_PREFIX) and not self.health_requires_token:
            return handler
        name = normalise_method(method)
        token = _token_from(handler_call_details.invocation_metadata)
        principal = self.tokens.lookup(token) if token else None
        if principal is None:
            if self.failures is None:
                self._denied(ANONYMOUS, name, "UNAUTHENTICATED", "MISSING_TOKEN" if not token else "BAD_TOKEN")
                before = None
            else:   # counted (and maybe audited) at call time, where the peer address is known
                def before(context, token=token):
                    return self._unauthenticated(context, name, token)
            return _denier(handler, grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN" if not token else "BAD_TOKEN",
                           "a valid role token is required", before)
        if method.startswith(f"/{SERVICE}/"):
            allowed = METHOD_ROLES.get(name, frozenset())
        else:  # health (when protected), reflection: any authenticated role
            allowed = ANY_ROLE
        if principal.role not in allowed:
            self._denied(principal, name, "PERMISSION_DENIED", "ROLE_NOT_ALLOWED")
            return _denier(handler, grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED",
                           f"role {principal.role!r} may not call {name}",
                           self._throttled_answer if self.failures is not None else None, principal)
        if handler is None:
            return None
        return _with_principal(handler, principal, self._throttle_guard if self.failures is not None else None)

    def _throttled_answer(self, context):
        """AUTH_THROTTLED for a throttled peer (so a role denial does not tell a valid token apart)."""
        from .ratelimit import AuthFailures
        if self.failures.throttled(AuthFailures.peer_address(context.peer())):
            return (grpc.StatusCode.RESOURCE_EXHAUSTED, "AUTH_THROTTLED",
                    "too many failed authentications from this address; retry later")
        return None

    def _throttle_guard(self, context) -> None:
        """A throttled peer is refused even with a valid token (the same answer as a bad one), so
        guessing tokens during the lock-out learns nothing."""
        from .ratelimit import AuthFailures
        if self.failures.throttled(AuthFailures.peer_address(context.peer())):
            context.set_trailing_metadata(((REASON_KEY, "AUTH_THROTTLED"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "AUTH_THROTTLED: too many failed authentications from this address; retry later")

    def _unauthenticated(self, context, method: str, token: str):
        """At call time: count the failure of the caller's peer; audit it if it is one of the
        bounded few; RESOURCE_EXHAUSTED when the peer is throttled."""
        from .ratelimit import AuthFailures
        peer = AuthFailures.peer_address(context.peer())
        throttled, audit, suppressed = self.failures.record(peer)
        reason = "AUTH_THROTTLED" if throttled else ("MISSING_TOKEN" if not token else "BAD_TOKEN")
        if audit:
            details = {"peer": peer, "suppressed": suppressed}
            self._denied(ANONYMOUS, method, "RESOURCE_EXHAUSTED" if throttled else "UNAUTHENTICATED", reason, details)
        if throttled:
            return (grpc.StatusCode.RESOURCE_EXHAUSTED, reason,
                    "too many failed authentications from this address; retry later")
        return (grpc.StatusCode.UNAUTHENTICATED, reason, "a valid role token is required")

    def _denied(self, principal: Principal, method: str, code: str, reason: str, details: dict | None = None) -> None:
        if self.on_denied is not None:
            try:
                if details is None:
                    self.on_denied(principal, method, code, reason)
                else:
                    self.on_denied(principal, method, code, reason, details)
            except Exception:  # noqa: BLE001 - auditing must not turn a denial into a crash
                pass
