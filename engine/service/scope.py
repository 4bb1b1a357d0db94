"""The request scope: who acts, for which tenant, subject, purpose and device -- checked once.

Every RPC starts the same way: refuse writes on a decommissioned matcher, then validate the
tenant (and that the caller's token is bound to it), the subject id (pseudonymous), the purpose and the device the call acts for (a device
token may be bound to one device; an unregistered or private-space device is refused for
enrolment and 1:N). :meth:`Scopes.open` does that in this fixed order and fills the call's audit
event as it goes, so a refusal is audited with everything known up to that point.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import policy
from .audit import AuditEvent
from .auth import Principal
from .status import DeadlineExceeded, Decommissioned, PermissionDenied


def _no_deadline() -> float | None:
    return None


@dataclass
class Scope:
    """One call: the principal, its validated tenant / subject / purpose / device and the audit
    event the call leaves (use cases add details to it; the store marks it written)."""

    principal: Principal
    ev: AuditEvent
    tenant: str = ""
    subject: str = ""
    purpose: str = ""
    device: str = ""
    time_remaining: Callable[[], float | None] = field(default=_no_deadline)

    def check_deadline(self) -> None:
        """Raise :class:`DeadlineExceeded` once the client's deadline has passed."""
        remaining = self.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("deadline exceeded")

    @property
    def caller(self) -> str:
        """Who calls, for intrusion detection: the authenticated principal (its token) within the
        tenant -- never the client-chosen device id, which an unbound token could vary for a fresh
        budget on every call."""
        return f"{self.tenant}/{self.principal.key}"


class Scopes:
    """Builds :class:`Scope` objects. ``device_class(tenant, device)`` is the registered location
    class of a device (None if unregistered); ``decommissioned()`` whether writes are refused."""

    def __init__(self, device_class: Callable[[str, str], int | None], decommissioned: Callable[[], bool]) -> None:
        self.device_class, self.decommissioned = device_class, decommissioned

    def open(self, ev: AuditEvent, principal: Principal, *, tenant: str, subject: str | None = None,
             purpose: str | None = None, device: str | None = None, device_op: str | None = None,
             writes: bool = False, time_remaining: Callable[[], float | None] = _no_deadline) -> Scope:
        """Validate the parts of a call that are given (None = not part of this call).

        ``device``: the requested device id ("" = the token's device); ``device_op``: "enroll",
        "verify" or "identify" to apply the device-location rules of that operation.
        """
        if writes and self.decommissioned():
            raise Decommissioned("this matcher has been decommissioned")
        scope = Scope(principal, ev, time_remaining=time_remaining)
        scope.tenant = ev.tenant = policy.tenant_of(tenant)
        if principal.tenant not in ("*", scope.tenant):
            raise PermissionDenied(f"this token acts for tenant {principal.tenant!r}", reason="TENANT_MISMATCH")
        if subject is not None:
            scope.subject = ev.subject = policy.check_id("subject id", subject)
        if purpose is not None:
            scope.purpose = ev.purpose = policy.check_purpose(purpose)
        if device is not None:
            scope.device = self._device(scope, device, device_op)
        return scope

    def _device(self, scope: Scope, requested: str, op: str | None) -> str:
        p = scope.principal
        device = requested or p.device_id
        if p.device_id and device != p.device_id:
            raise PermissionDenied("this device token is bound to another device", reason="DEVICE_MISMATCH")
        if p.role == "device" or device:
            policy.check_id("device id", device)
            scope.ev.device = device
            cls = self.device_class(scope.tenant, device)
            policy.require_device(None if cls is None else (cls,), device, op or "use")
        return device
