"""Typed exceptions shared by every layer (the service maps them to gRPC status codes)."""
from __future__ import annotations

#: gRPC trailing-metadata key carrying the machine-readable reason of a failed call
REASON_KEY = "veilface-reason"


class VeilfaceError(Exception):
    """Base class of every error Veilface raises on purpose.

    ``reason`` is a short machine-readable code (e.g. ``"INVALID_EMBEDDING"``) that the
    service copies into its gRPC error details.
    """

    reason = "VEILFACE_ERROR"


class InvalidEmbedding(VeilfaceError, ValueError):
    """An embedding has the wrong shape or dimension, is not finite, or has zero norm."""

    reason = "INVALID_EMBEDDING"


class InvalidParameter(VeilfaceError, ValueError):
    """A scheme, gallery or kernel parameter is out of range."""

    reason = "INVALID_PARAMETER"


class TemplateFormatError(VeilfaceError, ValueError):
    """Serialised template bytes are truncated, corrupt or of an unknown format version."""

    reason = "MALFORMED_TEMPLATE"


class SchemeMismatch(VeilfaceError, ValueError):
    """A template was made by another scheme, scheme version or parameter set."""

    reason = "SCHEME_MISMATCH"


class UnknownScheme(VeilfaceError, ValueError):
    """No scheme is registered under that name (or that version)."""

    reason = "UNKNOWN_SCHEME"


class NotEnrolled(VeilfaceError, KeyError):
    """The subject has no template in this gallery (never enrolled, withdrawn or expired)."""

    reason = "NOT_ENROLLED"

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "not enrolled"
