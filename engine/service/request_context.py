"""The request being served on this thread: its request id and principal, for logs and audit.

:class:`engine.service.observability.ObservabilityInterceptor` opens one :class:`RequestInfo`
per RPC (the id comes from the caller's ``x-request-id`` metadata, or is generated); an audit
event created while it is open carries the id (:class:`engine.service.audit.AuditEvent`), so the
access-log line and the audit entry of a call can be joined. Kept apart from the interceptor so
that the audit module (imported by the offline tools) does not import gRPC.
"""
from __future__ import annotations

import contextvars
import re
import uuid
from dataclasses import dataclass

#: what a caller-supplied request id may look like (anything else is replaced by a fresh one)
REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
METADATA_KEY = "x-request-id"


@dataclass
class RequestInfo:
    request_id: str
    method: str
    principal: str = ""       # "role:name" once the token is checked


_current: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar("veilface_request", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(metadata) -> str:
    """The caller's ``x-request-id`` when it is a plain id, else a fresh one."""
    for k, v in metadata or ():
        if k == METADATA_KEY:
            v = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
            if REQUEST_ID.match(v):
                return v
    return new_request_id()


def begin(info: RequestInfo) -> contextvars.Token:
    return _current.set(info)


def end(token: contextvars.Token) -> None:
    _current.reset(token)


def current() -> RequestInfo | None:
    return _current.get()


def current_request_id() -> str:
    """The id of the request served on this thread ("" outside a request, e.g. background purge)."""
    info = _current.get()
    return info.request_id if info is not None else ""


def note_principal(role: str, name: str) -> None:
    """Record who the current request acts as (called where the token is checked)."""
    info = _current.get()
    if info is not None:
        info.principal = f"{role}:{name}"
