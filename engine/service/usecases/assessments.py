"""Impact assessments before processing (2025 Measures): registration, the enrolment check, the
report section and the retention of the records.

* A purpose receives no enrolment until an assessment for it is registered
  (``IMPACT_ASSESSMENT_REQUIRED``), nor once the newest one's review date has passed
  (``IMPACT_ASSESSMENT_LAPSED``): :func:`check_assessment`, called inside the enrolment's
  transaction.
* Registering stores the canonical document immutably (a new version supersedes, nothing
  edits) with its SHA-256 in the audit entry of the same transaction; the report checks both.
* Assessments outlive the templates they describe: decommission and purges keep them, and
  :func:`purge_records` deletes an assessment only once no template of its purpose is stored and
  ``records_retention_years`` (>= 3) have passed since the last audited processing of the purpose.

:func:`register_assessment`, :func:`assessments_report` and :func:`purge_records` work on a store
alone (shared with ``veilface pia`` and ``veilface report``); :class:`Assessments` is the RPC side.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass

from .. import pia
from ..audit import AuditEvent
from ..clock import Clock
from ..config import ServiceConfig
from ..scope import Scope
from ..status import BadRequest, PreconditionFailed
from ..store import AssessmentRow, Store, WriteTx

YEAR = 365.25 * 86400.0


@dataclass(frozen=True)
class AssessmentInfo:
    assessment_id: int
    tenant: str
    purpose: str
    version: int
    sha256: str
    registered_at: float
    assessed_on: str
    review_by: str
    audit_seq: int
    unchanged: bool = False        # the same document was already the current one


def today(now: float) -> _dt.date:
    return _dt.datetime.fromtimestamp(now, _dt.timezone.utc).date()


def check_assessment(tx: WriteTx, tenant: str, purpose: str, now: float) -> AssessmentRow:
    """Inside an enrolment: the purpose's current assessment, registered and not lapsed."""
    row = tx.current_assessment(tenant, purpose)
    if row is None:
        raise PreconditionFailed(f"no impact assessment is registered for purpose {purpose!r}: register one "
                                 f"(veilface pia draft / register) before enrolling", reason="IMPACT_ASSESSMENT_REQUIRED")
    if row.review_by < today(now).isoformat():
        raise PreconditionFailed(f"the impact assessment of purpose {purpose!r} lapsed on {row.review_by} "
                                 f"(review date passed): review it and register the new version",
                                 reason="IMPACT_ASSESSMENT_LAPSED")
    return row


def register_assessment(store: Store, cfg: ServiceConfig, now: float, ev: AuditEvent, document: bytes | str,
                        tenant: str = "") -> AssessmentInfo:
    """Check and store an assessment document; its hash goes into the audit chain (``ev``, the
    call's audit event, written in the same transaction). Registering the current document
    again changes nothing (``unchanged``)."""
    a = pia.parse(document, tenant)
    ev.tenant, ev.purpose = a.tenant, a.purpose
    day = today(now)
    if a.mode != cfg.deployment:
        raise PreconditionFailed(f"the assessment is for a {a.mode} deployment; this is a {cfg.deployment} one",
                                 reason="IMPACT_ASSESSMENT_MISMATCH")
    if a.assessed_on > day + _dt.timedelta(days=1):
        raise BadRequest("assessed_on is in the future", reason=pia.REASON)
    if a.review_by < day:
        raise PreconditionFailed(f"review_by {a.review_by} has passed: the assessment is already lapsed",
                                 reason="IMPACT_ASSESSMENT_LAPSED")
    sha = a.sha256
    with store.transaction() as tx:
        cur = tx.current_assessment(a.tenant, a.purpose)
        if cur is not None and cur.sha256 == sha:
            ev.details = {"assessment_sha256": sha, "version": cur.version, "unchanged": True}
            tx.audit(ev)
            return _info(cur, unchanged=True)
        version = (cur.version if cur else 0) + 1
        ev.details = {"assessment_sha256": sha, "version": version, "review_by": a.review_by.isoformat(),
                      "mode": a.mode}
        seq = tx.audit(ev)
        row = AssessmentRow(a.tenant, a.purpose, version, sha, a.canonical.decode(), a.assessed_on.isoformat(),
                            a.review_by.isoformat(), now, ev.actor or ev.actor_role, seq)
        aid = tx.insert_assessment(row)
    return _info(dataclasses.replace(row, id=aid))


def _info(r: AssessmentRow, unchanged: bool = False) -> AssessmentInfo:
    return AssessmentInfo(r.id, r.tenant, r.purpose, r.version, r.sha256, r.registered_at, r.assessed_on, r.review_by,
                          r.audit_seq, unchanged)


def _in_chain(row: AssessmentRow, audited: dict[int, tuple[str, str]]) -> bool:
    """The stored document hashes to ``row.sha256`` and the audit entry of its registration names that hash."""
    if hashlib.sha256(row.document.encode()).hexdigest() != row.sha256:
        return False
    action, details = audited.get(row.audit_seq, ("", "{}"))
    try:
        return action == "RegisterImpactAssessment" and json.loads(details).get("assessment_sha256") == row.sha256
    except ValueError:
        return False


def _retain_until(store: Store, cfg: ServiceConfig, rows: list[AssessmentRow]) -> float:
    last = max([r.registered_at for r in rows] + [store.last_processing_at(rows[0].tenant, rows[0].purpose) or 0.0])
    return last + cfg.records_retention_years * YEAR


def assessments_report(store: Store, cfg: ServiceConfig, now: float) -> dict:
    """The ``impact_assessments`` section: per (tenant, purpose) the current version (lapsed?,
    hash in the audit chain?), how many versions are kept and until when at least; purposes
    holding templates without an assessment."""
    groups: dict[tuple[str, str], list[AssessmentRow]] = {}
    for r in store.assessments():
        groups.setdefault((r.tenant, r.purpose), []).append(r)
    audited = store.audit_details([r.audit_seq for rs in groups.values() for r in rs])
    day = today(now).isoformat()
    current = []
    for (tenant, purpose), rows in sorted(groups.items()):
        cur = rows[-1]
        doc = json.loads(cur.document)
        measured = doc["protection"]["measured"]
        current.append({
            "tenant": tenant, "purpose": purpose, "version": cur.version, "versions_kept": len(rows),
            "sha256": cur.sha256, "registered_at": cur.registered_at, "assessed_on": cur.assessed_on,
            "review_by": cur.review_by, "lapsed": cur.review_by < day, "mode": doc["deployment"]["mode"],
            "scheme": doc["protection"]["scheme"], "measured_on_synthetic_data": measured["source"]["synthetic"],
            "hash_in_audit_chain": all(_in_chain(r, audited) for r in rows),
            "retain_until": _iso(_retain_until(store, cfg, rows)),
        })
    missing = [f"{t}/{p}" if t != "default" else p for t, p in store.template_purposes() if (t, p) not in groups]
    return {"required_before_enrolment": True, "records_retention_years": cfg.records_retention_years,
            "current": current, "purposes_without_assessment": missing}


def purge_records(store: Store, cfg: ServiceConfig, now: float, actor: tuple[str, str] = ("system", "retention")) -> int:
    """Delete the assessments whose purpose holds no template any more and whose retention
    (``records_retention_years`` after the last audited processing of the purpose, or the last
    registration) has passed. Returns how many versions were deleted (each group audited)."""
    groups: dict[tuple[str, str], list[AssessmentRow]] = {}
    for r in store.assessments():
        groups.setdefault((r.tenant, r.purpose), []).append(r)
    deleted = 0
    for (tenant, purpose), rows in groups.items():
        if store.count_subjects(tenant, purpose) or now < _retain_until(store, cfg, rows):
            continue
        with store.transaction() as tx:
            n = tx.delete_assessments([r.id for r in rows])
            tx.audit(AuditEvent("RECORDS_PURGE", actor[0], actor[1], tenant, purpose=purpose,
                                details={"assessments_deleted": n, "records_retention_years": cfg.records_retention_years}))
        deleted += n
    return deleted


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).date().isoformat()


class Assessments:
    """RegisterImpactAssessment."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock) -> None:
        self.cfg, self.store, self.clock = cfg, store, clock

    def register(self, scope: Scope, document: bytes) -> AssessmentInfo:
        return register_assessment(self.store, self.cfg, self.clock.now(), scope.ev, document, scope.tenant)
