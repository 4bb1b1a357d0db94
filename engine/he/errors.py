"""Errors of the homomorphic-encryption layer (all are :class:`engine.errors.VeilfaceError`)."""
from __future__ import annotations

from ..errors import InvalidParameter, TemplateFormatError, VeilfaceError


class HEError(VeilfaceError):
    """Base class of HE-specific errors."""

    reason = "HE_ERROR"


class HEContextMismatch(HEError, ValueError):
    """A ciphertext was made under another HE context (other tenant, other keys or parameters)."""

    reason = "HE_CONTEXT_MISMATCH"


class HEEpochRevoked(HEError, ValueError):
    """A ciphertext or key belongs to a key epoch that was rotated away or crypto-shredded."""

    reason = "HE_EPOCH_REVOKED"


class HEPrivateContext(HEError, ValueError):
    """A context holding the secret key was handed to matcher-side code."""

    reason = "HE_PRIVATE_CONTEXT"


class HEFormatError(HEError, TemplateFormatError):
    """HE blob bytes are truncated, corrupt, of another kind or of an unknown format version."""

    reason = "HE_MALFORMED"


class HEUnsupported(HEError, InvalidParameter):
    """The operation is not available in this HE mode (e.g. 1:N search on a 1:1 context)."""

    reason = "HE_UNSUPPORTED"


class HEProbeRefused(HEError, ValueError):
    """The decider refused an encrypted result: the probe's decrypted norm is not ~1 (a scaled or
    crafted probe), or the result carries no norm to check."""

    reason = "HE_PROBE_REFUSED"


__all__ = ["HEError", "HEContextMismatch", "HEEpochRevoked", "HEPrivateContext", "HEFormatError",
           "HEUnsupported", "HEProbeRefused"]
