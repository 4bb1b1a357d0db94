"""The client's one error: a failed call, decoded from gRPC.

The server puts a machine-readable reason in the trailing metadata ``veilface-reason``
(:data:`engine.errors.REASON_KEY`) and prefixes the status message with it; this module turns
that back into ``(code, reason, message)``.
"""
from __future__ import annotations

import grpc

from ..errors import REASON_KEY, VeilfaceError


class ServiceError(VeilfaceError):
    """A failed call: ``code`` (:class:`grpc.StatusCode`), ``reason`` (machine-readable, e.g.
    ``"NOT_ENROLLED"``; the status code's name when the server gave none) and ``message``.

    ``details`` is the same text as ``message`` (kept for older callers).
    """

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code, self.reason, self.details = code, reason, message

    @property
    def message(self) -> str:
        return self.details

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> ServiceError:
        """Decode a ``grpc.RpcError`` (status code, ``veilface-reason`` trailer, message)."""
        reason = ""
        for k, v in (err.trailing_metadata() or ()):
            if k == REASON_KEY:
                reason = v
        code = err.code()
        details = err.details() or ""
        if reason and details.startswith(reason + ": "):
            details = details[len(reason) + 2:]
        return cls(code, reason or code.name, details)
