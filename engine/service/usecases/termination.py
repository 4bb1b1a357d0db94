"""Termination (2025 Measures): when the face recognition application stops, its filing is
cancelled within 30 working days and the face information is dealt with.

A decommission (:func:`engine.service.usecases.maintenance.decommission`) records a termination
with the filing-cancellation deadline -- ``filing_working_days`` working days later, the rule of
the filing alert -- and states in the deletion certificate what was done with the face
information (:func:`certificate_terms`). The termination stays *open* in the report until the
operator records the cancellation (``RecordFilingCancellation`` / ``veilface filing cancel``).
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from .. import policy
from ..audit import AuditEvent
from ..clock import Clock
from ..config import ServiceConfig
from ..scope import Scope
from ..status import AlreadyExists, BadRequest, PreconditionFailed
from ..store import Store, TerminationRow, WipeCounts, WriteTx

YEAR = 365.25 * 86400.0


@dataclass(frozen=True)
class CancellationInfo:
    reference: str
    cancelled_on: str
    recorded_at: float
    deadline: str
    on_time: bool


def _day(t: float) -> _dt.date:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).date()


def certificate_terms(cfg: ServiceConfig, now: float, filing_alert_raised: bool, counts: WipeCounts,
                      off_device_consents_deleted: int) -> dict:
    """The deletion certificate's account of the filing and of the face information."""
    deadline = policy.filing_deadline(now, cfg.filing_working_days, cfg.holidays)
    kept_until = _day(now + cfg.records_retention_years * YEAR).isoformat()
    return {
        "filing": {
            "cancellation_deadline": deadline, "working_days": cfg.filing_working_days,
            "filing_alert_raised": filing_alert_raised,
            "instruction": "cancel the filing with the authority by the deadline, then record it: "
                           "veilface filing cancel --reference <filing number> (or RecordFilingCancellation)",
        },
        "face_information": {
            "deployment": cfg.deployment,
            "handling": "deleted",
            "protected_templates_deleted": counts.templates_deleted,
            "he_contexts_deleted": counts.he_contexts_deleted, "he_snapshots_deleted": counts.he_snapshots_deleted,
            "off_device_consents_deleted": off_device_consents_deleted,
            "how": "rows deleted with SQLite secure_delete (pages overwritten), database VACUUMed, WAL truncated",
            "never_held": "images and raw face features (never stored); transform keys and HE secret keys "
                          "(held on devices / key holders: destroy them to crypto-shred any copy)",
            "elsewhere": "edge devices hold their own stores: each is decommissioned on the device and reports it "
                         "in its oversight bundle" if cfg.deployment == "central" else
                         "this device's store was the only copy (edge mode: nothing was transferred off the device)",
        },
        "records_kept": {
            "what": "the audit log (no biometric payload), impact assessments, oversight bundles, this certificate",
            "until_at_least": kept_until,
        },
    }


def record_termination(tx: WriteTx, cfg: ServiceConfig, now: float, cert: dict) -> None:
    """Inside the decommission's transaction: the open termination."""
    f = cert["filing"]
    tx.insert_termination(TerminationRow(now, f["cancellation_deadline"], f["working_days"], cert["certificate_sha256"],
                                         f["filing_alert_raised"]))


def record_cancellation(store: Store, now: float, ev: AuditEvent, reference: str, cancelled_on: str = "") -> CancellationInfo:
    """Record that the filing was cancelled (``reference``: the authority's number, or
    ``not-filed`` when no filing was ever made); closes the open termination."""
    if not reference or len(reference) > 128 or any(ord(c) < 32 for c in reference):
        raise BadRequest("reference is required (the filing number, at most 128 printable characters)",
                         reason="BAD_FILING_REFERENCE")
    day = _day(now)
    try:
        on = _dt.date.fromisoformat(cancelled_on) if cancelled_on else day
    except ValueError:
        raise BadRequest("cancelled_on must be an ISO date (YYYY-MM-DD)", reason="BAD_FILING_REFERENCE") from None
    if on > day:
        raise BadRequest("cancelled_on is in the future", reason="BAD_FILING_REFERENCE")
    term = store.termination()
    if term is None:
        raise PreconditionFailed("nothing was decommissioned: there is no filing to cancel", reason="NO_TERMINATION")
    if term.cancelled_at is not None:
        raise AlreadyExists(f"the cancellation was already recorded ({term.reference})", reason="FILING_CANCELLATION_EXISTS")
    with store.transaction() as tx:
        if not tx.record_filing_cancellation(reference, on.isoformat(), now):
            raise AlreadyExists("the cancellation was recorded meanwhile", reason="FILING_CANCELLATION_EXISTS")
        ev.details = {"reference": reference, "cancelled_on": on.isoformat(), "deadline": term.deadline,
                      "on_time": on.isoformat() <= term.deadline}
        tx.audit(ev)
    return CancellationInfo(reference, on.isoformat(), now, term.deadline, on.isoformat() <= term.deadline)


def termination_report(store: Store, now: float) -> dict:
    """The ``termination`` section: open until the filing cancellation is recorded."""
    t = store.termination()
    if t is None:
        return {"decommissioned": store.decommissioned(), "open": False}
    return {"decommissioned": True, "open": t.cancelled_at is None, "decommissioned_at": t.decommissioned_at,
            "filing_cancellation_deadline": t.deadline, "working_days": t.working_days,
            "overdue": t.cancelled_at is None and _day(now).isoformat() > t.deadline,
            "certificate_sha256": t.certificate_sha256, "filing_alert_raised": t.filing_alert_raised,
            "cancellation": None if t.cancelled_at is None else
            {"reference": t.reference, "cancelled_on": t.cancelled_on, "recorded_at": t.cancelled_at,
             "on_time": t.cancelled_on <= t.deadline}}


class Termination:
    """RecordFilingCancellation."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store, self.clock = store, clock

    def record_cancellation(self, scope: Scope, reference: str, cancelled_on: str = "") -> CancellationInfo:
        return record_cancellation(self.store, self.clock.now(), scope.ev, reference, cancelled_on)
