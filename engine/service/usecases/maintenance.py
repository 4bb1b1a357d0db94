"""Retention purge, the compliance report and decommissioning.

:func:`purge_expired`, :func:`compliance_report` and :func:`decommission` work on a store alone,
so the offline CLI (``veilface purge | report | decommission``) runs the very same code as the
RPCs; :class:`Retention` and :class:`Maintenance` add what a running matcher must also update
(its gallery index, the background purge thread).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from ..audit import AuditEvent
from ..clock import Clock
from ..config import ServiceConfig
from ..encrypted import TicketBook
from ..matching import GalleryIndex
from ..store import Store, TemplateKey
from .assessments import assessments_report, purge_records  # measures
from .off_device import off_device_report  # measures
from .oversight import fleet_report  # measures
from .termination import certificate_terms, record_termination, termination_report  # measures

log = logging.getLogger("veilface.service")


# -- on a store alone (shared with the offline CLI) ----------------------------------------------------
def purge_expired(store: Store, now: float, actor: tuple[str, str] = ("system", "retention")) -> list[TemplateKey]:
    """Delete every template whose expiry has passed, with one audit entry per subject, in one
    transaction. Returns the purged templates."""
    with store.transaction() as tx:
        rows = tx.expired_templates(now)
        if not rows:
            return []
        tx.delete_expired(now)
        per_subject: dict[tuple[str, str], int] = {}
        for r in rows:
            per_subject[(r.tenant, r.subject)] = per_subject.get((r.tenant, r.subject), 0) + 1
        for (tenant, subject), n in per_subject.items():
            tx.audit(AuditEvent("RETENTION_PURGE", actor[0], actor[1], tenant, subject, details={"templates_purged": n}))
        tx.add_purged(len(rows))
    return rows


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def compliance_report(store: Store, cfg: ServiceConfig, now: float) -> dict:
    """Persons stored, filing alert, retention state, processing records, devices, alerts, audit head."""
    counts = store.counts()
    head_seq, head_hash = store.audit_head()
    alert = store.filing_alert()
    return {
        "generated_at": now,
        "generated_at_iso": _iso(now),
        "persons_stored": counts.persons_stored,
        "templates_stored": counts.templates_stored,
        "filing": {"threshold": cfg.filing_threshold, "raised": alert is not None,
                   "raised_at": alert.raised_at if alert else 0.0,
                   "deadline": alert.deadline if alert else "",
                   "persons_at_alert": alert.persons if alert else 0,
                   "working_days": cfg.filing_working_days},
        "retention": {"default_days": cfg.retention_days, "max_days": cfg.max_retention_days,
                      "expired_pending_purge": store.expired_pending(now),
                      "next_expiry": store.next_expiry() or 0.0, "purged_total": counts.purged_total},
        "processing": [dataclasses.asdict(p) for p in store.processing_records()],
        "devices": counts.devices, "private_space_devices": counts.private_space_devices,
        "consents_active": counts.consents_active,
        "intrusion_alerts": counts.alerts,
        "audit": {"entries": head_seq, "head_hash": head_hash},
        "decommissioned": store.decommissioned(),
        # measures (issue 15): assessments, off-device consents, termination, the edge fleet
        "deployment": cfg.deployment,
        "impact_assessments": assessments_report(store, cfg, now),
        "off_device_consents": off_device_report(store, cfg),
        "termination": termination_report(store, now),
        "fleet": fleet_report(store, cfg),
        # harden: stored rows set aside at startup because they failed validation (usecases/recovery.py)
        "quarantine": [{"id": q.id, "kind": q.kind, "tenant": q.tenant, "subject": q.subject, "purpose": q.purpose,
                        "scheme": q.scheme, "key_version": q.key_version, "reason": q.reason, "detail": q.detail,
                        "quarantined_at": q.quarantined_at} for q in store.quarantined()],
    }


def decommission(store: Store, cfg: ServiceConfig, now: float, ev: AuditEvent | None = None,
                 reason: str = "", clear_memory: Callable[[], None] | None = None, mode: str | None = None) -> dict:
    """Purge every template, key-version record, consent, idempotency record, HE context and
    snapshot; keep the audit log (the proof) and the records the Measures keep (impact
    assessments, oversight bundles); record the termination (open until the filing cancellation
    is recorded); write a deletion certificate to the data dir; rewrite the storage (VACUUM).
    Returns the certificate.

    ``mode``: how it was run, when not one of the two above.
    ``clear_memory``: a running matcher's hook that empties its in-memory galleries (called right
    after the commit). The certificate states only what was done: without the hook (the offline
    command, which holds the data dir lock so no server is running) it says so instead.
    """
    ev = ev or AuditEvent("Decommission", "admin", "cli")
    measures = ["all protected templates deleted (SQLite secure_delete: pages overwritten)",
                "subject key-version registry deleted", "consent and request records deleted",
                "public HE contexts (all epochs) and HE gallery snapshots deleted",
                "database VACUUMed and WAL truncated after commit"]
    if clear_memory is not None:
        measures.append("in-memory galleries, HE contexts and decision tickets of the running matcher cleared")
        mode = "online: Decommission RPC of the running matcher"
    else:
        mode = mode or "offline: veilface decommission with the data dir locked (no matcher running on it)"
    filing_raised = store.filing_alert() is not None   # measures
    with store.transaction() as tx:
        head_before = store.audit_head()
        wiped = tx.wipe()
        counts = dataclasses.asdict(wiped)
        off_deleted = tx.delete_off_device_consents()   # measures
        tx.mark_decommissioned()
        cert = {
            "type": "veilface-deletion-certificate", "version": 2,
            "issued_at": _iso(now), "issued_at_unix": now, "reason": reason[:200], "store": store.name,
            "mode": mode, **counts,
            "audit_head_before": {"seq": head_before[0], "hash": head_before[1]},
            "measures": measures,
            "key_material": "the matcher never held transform keys or HE secret keys; destroy the "
                            "tenant master secrets on devices / key holders to crypto-shred any copies",
            # measures: the filing-cancellation deadline and what was done with the face information
            **certificate_terms(cfg, now, filing_raised, wiped, off_deleted),
        }
        cert["certificate_sha256"] = hashlib.sha256(json.dumps(cert, sort_keys=True).encode()).hexdigest()
        ev.details = {**counts, "certificate_sha256": cert["certificate_sha256"],
                      "filing_cancellation_deadline": cert["filing"]["cancellation_deadline"]}
        tx.audit(ev, "OK")
        record_termination(tx, cfg, now, cert)   # measures
    if clear_memory is not None:
        clear_memory()
    store.vacuum()
    out = Path(cfg.data_dir) / f"deletion-certificate-{int(now)}.json"
    out.write_text(json.dumps(cert, indent=1, sort_keys=True))
    log.warning("decommissioned: certificate %s", out)
    return cert


# -- in a running matcher --------------------------------------------------------------------------------
class Retention:
    """Expiry of templates in a running matcher: purged on the first call after the earliest
    expiry (``maybe_purge``), by a background thread, or on request."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock, index: GalleryIndex) -> None:
        self.cfg, self.store, self.clock, self.index = cfg, store, clock, index
        self._next_expiry: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def note_expiry(self, t: float) -> None:
        """A template expiring at ``t`` was stored."""
        if self._next_expiry is None or t < self._next_expiry:
            self._next_expiry = t

    def maybe_purge(self, force: bool = False) -> int:
        """Purge if a template has expired (always with ``force``); returns how many templates."""
        now = self.clock.now()
        nxt = self._next_expiry
        if not force and (nxt is None or now < nxt):
            return 0
        with self._lock:
            purged = purge_expired(self.store, now)
            for r in purged:
                with self.index.subject_lock(r.tenant, r.subject):
                    self.index.forget(r.tenant, r.subject, lambda p, s, m, r=r: (p, s) == (r.purpose, r.scheme)
                                      and m.expires_at <= now)
            self._next_expiry = self.store.next_expiry()
            return len(purged)

    def start(self) -> None:
        """Purge expired templates and old idempotency records every ``purge_interval_s``."""
        records_checked = [0.0]   # measures: the records' retention is checked once a day (it scans the audit log)

        def loop() -> None:
            while not self._stop.wait(self.cfg.purge_interval_s):
                try:
                    self.maybe_purge()
                    self.store.purge_requests(self.clock.now() - self.cfg.request_id_ttl_s)
                    if self.clock.now() - records_checked[0] >= 86400.0:
                        purge_records(self.store, self.cfg, self.clock.now())   # >= 3 years after the last use
                        records_checked[0] = self.clock.now()
                except Exception:  # noqa: BLE001
                    log.exception("background purge failed")
        self._thread = threading.Thread(target=loop, name="veilface-purge", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


@dataclasses.dataclass(frozen=True)
class PurgeResult:
    templates_purged: int
    subjects_purged: int


class Maintenance:
    """PurgeExpired, ComplianceReport and Decommission of a running matcher."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock, index: GalleryIndex, retention: Retention,
                 tickets: TicketBook) -> None:
        self.cfg, self.store, self.clock, self.index = cfg, store, clock, index
        self.retention, self.tickets = retention, tickets

    def purge(self, ev: AuditEvent) -> PurgeResult:
        before = self.index.persons()
        n = self.retention.maybe_purge(force=True)
        ev.details = {"templates_purged": n}
        return PurgeResult(n, max(0, before - self.index.persons()))

    def report(self) -> dict:
        self.retention.maybe_purge()
        return compliance_report(self.store, self.cfg, self.clock.now())

    def decommission(self, ev: AuditEvent, reason: str) -> dict:
        def clear_memory() -> None:
            self.index.clear()
            self.tickets.clear()
        return decommission(self.store, self.cfg, self.clock.now(), ev, reason, clear_memory)
