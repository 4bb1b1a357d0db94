"""Off-device storage only with its own consent (2025 Measures: face information is stored in the
face recognition device unless the person separately consents).

A central matcher (``deployment = "central"``) stores a template only when the consent record it
cites carries an active, separate off-device-storage consent -- what is transferred, to whom,
why, under which notice version (:func:`check_off_device_consent`, inside the enrolment's
transaction; ``OFF_DEVICE_CONSENT_REQUIRED`` otherwise, nothing stored). Withdrawing that
consent alone (:meth:`OffDevice.withdraw`) deletes the central copy and audits it; the subject's
consent to face processing -- and so a copy on an edge device -- may remain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import policy
from ..clock import Clock
from ..config import ServiceConfig
from ..matching import GalleryIndex
from ..scope import Scope
from ..status import BadRequest, ConsentRequired, NotFound
from ..store import OffDeviceConsentRow, Store, WriteTx

MAX_TERM_CHARS = 500
REASON = "BAD_OFF_DEVICE_CONSENT"


@dataclass(frozen=True)
class OffDeviceTerms:
    """The subject's separate consent to off-device storage, as the device recorded it."""

    separate_consent: bool
    notice_version: str
    transferred: str            # what is transferred ("protected face template, biohash-256")
    recipient: str              # to whom (the operator's central matcher)
    why: str                    # why it cannot stay on the device
    consented_at: float = 0.0   # 0 = now


@dataclass(frozen=True)
class OffDeviceWithdrawn:
    templates_deleted: int
    off_device_consents_withdrawn: int
    withdrawn_at: float


def _text(name: str, v: str, max_len: int) -> str:
    if not isinstance(v, str) or not v.strip():
        raise BadRequest(f"off_device.{name} is required (what is transferred, to whom, why, which notice)",
                         reason=REASON)
    if len(v) > max_len or any(ord(c) < 32 for c in v):
        raise BadRequest(f"off_device.{name}: at most {max_len} printable characters", reason=REASON)
    return v


def off_device_row(consent_id: str, scope: Scope, terms: OffDeviceTerms, now: float) -> OffDeviceConsentRow:
    """Validate the terms of an off-device consent recorded with consent ``consent_id``."""
    if not terms.separate_consent:
        raise ConsentRequired("off-device storage needs its own separate consent (off_device.separate_consent = true)",
                              reason="OFF_DEVICE_SEPARATE_CONSENT_REQUIRED")
    at = terms.consented_at or now
    if not math.isfinite(at) or at < 0:
        raise BadRequest("off_device.consented_at must be a unix time", reason=REASON)
    if at > now + 300:
        raise BadRequest("off_device.consented_at is in the future", reason=REASON)
    return OffDeviceConsentRow(consent_id, scope.tenant, scope.subject, scope.purpose,
                               _text("notice_version", terms.notice_version, 64),
                               _text("transferred", terms.transferred, MAX_TERM_CHARS),
                               _text("recipient", terms.recipient, MAX_TERM_CHARS),
                               _text("why", terms.why, MAX_TERM_CHARS), float(at))


def check_off_device_consent(tx: WriteTx, cfg: ServiceConfig, consent_id: str) -> None:
    """Inside an enrolment on a central matcher: the cited consent carries an active off-device consent."""
    if cfg.deployment != "central":
        return                      # edge: the template stays on the device that stores it
    check_off_device_row(tx.off_device_consent(consent_id))


def check_off_device_row(row: OffDeviceConsentRow | None) -> None:
    """A central enrolment's off-device consent (``row``: the one of the cited consent record, or None)."""
    if row is None:
        raise ConsentRequired("a central matcher stores face templates only with the subject's separate consent to "
                              "off-device storage (record it with the consent: what, to whom, why, notice)",
                              reason="OFF_DEVICE_CONSENT_REQUIRED")
    if row.withdrawn_at is not None:
        raise ConsentRequired("the subject withdrew the off-device-storage consent", reason="OFF_DEVICE_CONSENT_WITHDRAWN")


def off_device_report(store: Store, cfg: ServiceConfig) -> dict:
    """The ``off_device_consents`` section of the compliance report."""
    s = store.off_device_summary()
    return {"deployment": cfg.deployment, "required": cfg.deployment == "central", "active": s.active,
            "withdrawn": s.withdrawn, "recipients": s.recipients,
            # central: templates stored before this rule (or whose consent lapsed) -- should be 0
            "templates_without_off_device_consent": s.templates_without_consent if cfg.deployment == "central" else 0}


class OffDevice:
    """WithdrawOffDeviceConsent."""

    def __init__(self, store: Store, clock: Clock, index: GalleryIndex) -> None:
        self.store, self.clock, self.index = store, clock, index

    def withdraw(self, scope: Scope, purpose: str = "") -> OffDeviceWithdrawn:
        """Withdraw the subject's off-device-storage consent (for ``purpose``; "" = every purpose)
        and delete the central copy of its templates (of that purpose). Its consent to face
        processing stays: an edge device may keep its own copy."""
        purpose = policy.check_purpose(purpose) if purpose else ""
        tenant, subject, now = scope.tenant, scope.subject, self.clock.now()
        scope.ev.purpose = purpose
        with self.index.subject_lock(tenant, subject):
            with self.store.transaction() as tx:
                n_c = tx.withdraw_off_device_consents(tenant, subject, purpose, now)
                n_t = (tx.delete_purpose_templates(tenant, subject, purpose) if purpose
                       else tx.delete_subject_templates(tenant, subject))
                if not (n_c or n_t):
                    raise NotFound(f"no off-device consent or stored template of subject {subject!r}",
                                   reason="OFF_DEVICE_CONSENT_NOT_FOUND")
                scope.ev.details = {"templates_deleted": n_t, "off_device_consents_withdrawn": n_c,
                                    "scope": purpose or "all purposes"}
                tx.audit(scope.ev)
            self.index.forget(tenant, subject, lambda p, s, m: not purpose or p == purpose)
        self.store.checkpoint()
        return OffDeviceWithdrawn(n_t, n_c, now)
