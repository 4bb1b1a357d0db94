"""Bulk enrolment: many rows, each checked like an Enroll, stored in bounded batch transactions.

Every row passes the checks of :mod:`.enrolment` -- a pseudonymous subject id, a valid protected
template of an allowed cancellable scheme, the subject's separate consent for this purpose (not
withdrawn, guardian for a minor), the purpose's current impact assessment and, on a central
matcher, the consent's off-device-storage consent, a key version that is not revoked, no template already stored
for (subject, purpose, scheme) -- and a refused row is reported with the reason Enroll would give,
nothing of it stored. Accepted rows are written ``bulk_batch_rows`` at a time, in one transaction
per batch (PostgreSQL: ``COPY``; SQLite: ``executemany``), with the subjects' advisory locks held
(so a concurrent Withdraw on another replica is ordered before or after the whole batch) and ONE
audit entry per batch whose details carry the number of rows, the first and last subject and a
SHA-256 over the batch's (subject, scheme, key version, consent, template digest) lines: the
chain stays verifiable and proves which rows a batch held without an entry per row (10M entries
would double the load time and the log). The galleries are updated after each commit.

HE (encrypted) templates are refused here (``SCHEME_NOT_SUPPORTED``): enrol those one by one.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from ...template import Template
from .. import policy
from ..audit import AuditEvent
from ..clock import Clock
from ..config import ServiceConfig
from ..matching import Enrolled, GalleryIndex, GalleryKey
from ..scope import Scope
from ..status import Decommissioned, classify
from ..store import Store, SubjectRow, TemplateRow
from .assessments import check_assessment  # measures
from .common import TemplateReader
from .maintenance import Retention
from .off_device import check_off_device_row  # measures

log = logging.getLogger("veilface.service")
MAX_LISTED = 1000


@dataclass(frozen=True)
class BulkRow:
    subject_id: str
    template: bytes
    consent_id: str
    retention_days: int = 0


@dataclass
class BulkResult:
    enrolled: int = 0
    batches: int = 0
    rejected: list[tuple[int, str, str]] = field(default_factory=list)   # (row, subject, reason), first MAX_LISTED
    rejected_total: int = 0

    def reject(self, i: int, subject: str, reason: str) -> None:
        self.rejected_total += 1
        if len(self.rejected) < MAX_LISTED:
            self.rejected.append((i, subject[:128], reason))


class BulkEnrolment:
    """EnrollStream and ``veilface import``."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock, index: GalleryIndex | None,
                 templates: TemplateReader, retention: Retention | None = None) -> None:
        self.cfg, self.store, self.clock, self.index = cfg, store, clock, index
        self.templates, self.retention = templates, retention

    def enrol(self, scope: Scope, rows: Iterable[BulkRow]) -> BulkResult:
        res, batch = BulkResult(), []
        for i, row in enumerate(rows):
            batch.append((i, row))
            if len(batch) >= self.cfg.bulk_batch_rows:
                self._batch(scope, batch, res)
                batch = []
        if batch:
            self._batch(scope, batch, res)
        scope.ev.details = {"enrolled": res.enrolled, "batches": res.batches, "rejected": res.rejected_total}
        return res

    def _parse(self, i: int, row: BulkRow, res: BulkResult):
        try:
            subject = policy.check_id("subject id", row.subject_id)
            p = self.templates.read(row.template)
            if p.encrypted:
                res.reject(i, row.subject_id, "SCHEME_NOT_SUPPORTED")
                return None
            return subject, p
        except Exception as exc:  # noqa: BLE001 - the row's typed reason, as Enroll would answer
            res.reject(i, str(row.subject_id), classify(exc)[1])
            return None

    def _batch(self, scope: Scope, batch: list[tuple[int, BulkRow]], res: BulkResult) -> None:
        tenant, purpose = scope.tenant, scope.purpose
        parsed = [(i, row, self._parse(i, row, res)) for i, row in batch]
        parsed = [(i, row, *pp) for i, row, pp in parsed if pp is not None]
        if not parsed:
            return
        scope.check_deadline()
        subjects = sorted({s for _, _, s, _ in parsed})
        now = self.clock.now()
        with self.store.transaction() as tx:
            if tx.decommissioned():
                raise Decommissioned("this matcher has been decommissioned")
            tx.lock_subjects(tenant, subjects)
            consents = tx.consents([row.consent_id for _, row, _, _ in parsed])
            # measures: the purpose's impact assessment (every row refused without it); on a central
            # matcher, each row's off-device-storage consent
            try:
                check_assessment(tx, tenant, purpose, now)
            except Exception as exc:  # noqa: BLE001
                for i, _, subject, _ in parsed:
                    res.reject(i, subject, classify(exc)[1])
                return
            off_device = (tx.off_device_consents([row.consent_id for _, row, _, _ in parsed])
                          if self.cfg.deployment == "central" else None)
            states = tx.subject_states(tenant, subjects)
            existing = tx.existing_templates(tenant, subjects)
            rows, subj_rows, digest, keep = [], {}, hashlib.sha256(), []
            for i, row, subject, p in parsed:
                kv = p.template.key_version
                state = states.get(subject)
                cur_kv, revoked = (state.key_version, state.revoked_upto) if state else (0, 0)
                try:
                    policy.check_enrol_consent(consents.get(row.consent_id), row.consent_id, subject, tenant, purpose)
                    if off_device is not None:   # measures
                        check_off_device_row(off_device.get(row.consent_id))
                    if kv <= revoked:
                        raise_revoked(kv, revoked)
                    if (subject, purpose, p.spec_key) in existing:
                        res.reject(i, subject, "ALREADY_ENROLLED")
                        continue
                    expires = policy.expiry(now, row.retention_days, self.cfg.retention_days, self.cfg.max_retention_days)
                except Exception as exc:  # noqa: BLE001
                    res.reject(i, subject, classify(exc)[1])
                    continue
                existing.add((subject, purpose, p.spec_key))
                rows.append(TemplateRow(tenant, subject, purpose, p.spec_key, kv, bytes(row.template), now, expires,
                                        row.consent_id, scope.device))
                subj_rows[subject] = SubjectRow(tenant, subject, max(kv, cur_kv, subj_rows[subject].key_version
                                                                     if subject in subj_rows else 0), revoked, now)
                digest.update(f"{subject}\t{p.spec_key}\t{kv}\t{row.consent_id}\t"
                              f"{hashlib.sha256(row.template).hexdigest()}\n".encode())
                keep.append((subject, p, expires))
            if not rows:
                return
            tx.insert_templates(rows)
            tx.put_subjects(list(subj_rows.values()))
            ev = AuditEvent("EnrollBatch", scope.ev.actor_role, scope.ev.actor, tenant, "", purpose, scope.device,
                            details={"rows": len(rows), "first": rows[0].subject, "last": rows[-1].subject,
                                     "rows_sha256": digest.hexdigest()})
            tx.audit(ev)
        res.enrolled += len(rows)
        res.batches += 1
        if self.index is not None:
            self._index(tenant, purpose, keep)

    def _index(self, tenant: str, purpose: str, keep: list) -> None:
        groups: dict[GalleryKey, tuple[list, list]] = {}
        for subject, p, expires in keep:
            key = GalleryKey(tenant, purpose, p.spec_key, p.template.key_version)
            ids, ts = groups.setdefault(key, ([], []))
            ids.append(subject)
            ts.append(p.template)
            self.index.note(tenant, subject, purpose, p.spec_key, Enrolled(key.key_version, expires))
            if self.retention is not None:
                self.retention.note_expiry(expires)
        for key, (ids, ts) in groups.items():
            self.index.open(key)
            self.index.backend.add(key, ids, ts)


def raise_revoked(kv: int, revoked: int) -> None:
    from ..status import KeyVersionRevoked
    raise KeyVersionRevoked(f"key version {kv} of this subject was revoked; re-enrol under {revoked + 1} or later")


def rows_from_templates(items: Iterable[tuple[str, Template | bytes, str]]) -> Iterable[BulkRow]:
    """(subject, template, consent id) tuples -> rows (a convenience for callers and the bench)."""
    for subject, t, consent in items:
        yield BulkRow(subject, t if isinstance(t, bytes) else t.to_bytes(), consent)
