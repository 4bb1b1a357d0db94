"""One place that maps every error the service raises to a gRPC status code + reason.

Service-level errors are :class:`StatusError` subclasses (each a ``VeilfaceError`` with a gRPC
status code name and a ``reason``); engine errors (``engine.errors``) are mapped by class, and
those of ``engine.he.errors`` by reason (so this module does not import the HE layer). The
client side has its own ``engine.client.ServiceError``: a failed call as the client sees it. The servicer puts the
reason in the trailing metadata ``veilface-reason`` and prefixes the status message with it.
Codes are kept as names here so that this module does not import grpc.
"""
from __future__ import annotations

from ..errors import (
    InvalidEmbedding,
    InvalidParameter,
    NotEnrolled,
    SchemeMismatch,
    TemplateFormatError,
    UnknownScheme,
    VeilfaceError,
)


class StatusError(VeilfaceError):
    """An error with an explicit gRPC status code name and machine-readable reason."""

    code = "INTERNAL"
    reason = "INTERNAL"

    def __init__(self, message: str = "", reason: str | None = None) -> None:
        super().__init__(message or self.__doc__ or self.reason)
        if reason:
            self.reason = reason


class BadRequest(StatusError):
    """The request is malformed."""
    code, reason = "INVALID_ARGUMENT", "BAD_REQUEST"


class PreconditionFailed(StatusError):
    """The request is well-formed but a policy precondition does not hold."""
    code, reason = "FAILED_PRECONDITION", "PRECONDITION_FAILED"


class ConsentRequired(PreconditionFailed):
    """No valid separate consent covers this subject and purpose."""
    reason = "CONSENT_REQUIRED"


class GuardianConsentRequired(PreconditionFailed):
    """The subject is under 14: a guardian consent record is required."""
    reason = "GUARDIAN_CONSENT_REQUIRED"


class PurposeNotConsented(PreconditionFailed):
    """The subject did not consent to this purpose."""
    reason = "PURPOSE_NOT_CONSENTED"


class KeyVersionRevoked(PreconditionFailed):
    """The template's key version was revoked (re-key and re-enrol)."""
    reason = "KEY_VERSION_REVOKED"


class DeviceNotAllowed(PreconditionFailed):
    """The device may not perform this operation."""
    reason = "DEVICE_NOT_ALLOWED"


class Decommissioned(PreconditionFailed):
    """The service has been decommissioned; its templates are destroyed."""
    reason = "DECOMMISSIONED"


class NotFound(StatusError):
    """The object does not exist."""
    code, reason = "NOT_FOUND", "NOT_FOUND"


class AlreadyExists(StatusError):
    """The object already exists."""
    code, reason = "ALREADY_EXISTS", "ALREADY_EXISTS"


class Unauthenticated(StatusError):
    """A valid role token is required."""
    code, reason = "UNAUTHENTICATED", "UNAUTHENTICATED"


class PermissionDenied(StatusError):
    """The caller's role may not call this method."""
    code, reason = "PERMISSION_DENIED", "ROLE_NOT_ALLOWED"


class Throttled(StatusError):
    """Rate limit hit (intrusion detection)."""
    code, reason = "RESOURCE_EXHAUSTED", "RATE_LIMITED"


class DeadlineExceeded(StatusError):
    """The client's deadline expired before the work could be done."""
    code, reason = "DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"


# engine.errors -> status code name (most specific first)
_ENGINE_CODES: tuple[tuple[type, str], ...] = (
    (TemplateFormatError, "INVALID_ARGUMENT"),
    (InvalidEmbedding, "INVALID_ARGUMENT"),
    (InvalidParameter, "INVALID_ARGUMENT"),
    (SchemeMismatch, "FAILED_PRECONDITION"),
    (UnknownScheme, "FAILED_PRECONDITION"),
    (NotEnrolled, "NOT_FOUND"),
)


# engine errors mapped by reason (e.g. engine.he errors, without importing engine.he here)
_REASON_CODES: dict[str, str] = {
    "HE_EPOCH_REVOKED": "FAILED_PRECONDITION",
    "HE_CONTEXT_MISMATCH": "FAILED_PRECONDITION",
    "HE_PRIVATE_CONTEXT": "FAILED_PRECONDITION",
}


def classify(exc: BaseException) -> tuple[str, str, str]:
    """``(status code name, reason, message)`` for any exception (unknown ones -> INTERNAL)."""
    if isinstance(exc, StatusError):
        return exc.code, exc.reason, str(exc)
    if isinstance(exc, VeilfaceError) and getattr(exc, "reason", "") in _REASON_CODES:
        return _REASON_CODES[exc.reason], exc.reason, str(exc)
    for cls, code in _ENGINE_CODES:
        if isinstance(exc, cls):
            return code, exc.reason, str(exc)
    if isinstance(exc, VeilfaceError):
        return "INTERNAL", exc.reason, str(exc)
    return "INTERNAL", "INTERNAL", "internal error"
