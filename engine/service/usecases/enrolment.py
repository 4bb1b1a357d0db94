"""Enrolment: a protected template is stored durably (with its consent check, key-version state,
idempotency record and audit entry in one transaction), then made searchable."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..._proto.veilface.v1 import matcher_pb2 as pb
from .. import policy
from ..audit import AuditEvent
from ..clock import Clock
from ..config import ServiceConfig
from ..encrypted import HERegistry, check_blob, epoch_revoked
from ..matching import GalleryIndex, GalleryKey
from ..scope import Scope
from ..status import AlreadyExists, Decommissioned, KeyVersionRevoked
from ..store import FilingAlert, RequestRow, Store, SubjectRow, TemplateRow, WriteTx
from .assessments import check_assessment  # measures
from .common import TemplateReader, earlier_response
from .maintenance import Retention
from .off_device import check_off_device_consent  # measures

log = logging.getLogger("veilface.service")


@dataclass(frozen=True)
class EnrolRequest:
    template: bytes                  # Template.to_bytes(): cancellable codes or an HE ciphertext
    consent_id: str
    request_id: str = ""             # idempotency key (a retry with the same request is replayed)
    request_hash: str = ""           # digest of the whole request: a different request under the same id is refused
    retention_days: int = 0          # 0 = the default retention


@dataclass(frozen=True)
class EnrolResult:
    subject_id: str
    scheme: str
    key_version: int
    enrolled_at: float
    expires_at: float
    replayed: bool = False


def _reply_bytes(r: EnrolResult) -> bytes:
    """The stored reply of an idempotent request (the EnrollResponse wire format, as stored since v1)."""
    return pb.EnrollResponse(subject_id=r.subject_id, scheme=r.scheme, key_version=r.key_version,
                             enrolled_at=r.enrolled_at, expires_at=r.expires_at).SerializeToString()


def _replayed(blob: bytes) -> EnrolResult:
    m = pb.EnrollResponse.FromString(blob)
    return EnrolResult(m.subject_id, m.scheme, m.key_version, m.enrolled_at, m.expires_at, replayed=True)


class FilingMonitor:
    """The filing rule: once ``filing_threshold`` distinct persons are stored, record one
    FILING_ALERT with the deadline ``filing_working_days`` working days later."""

    def __init__(self, cfg: ServiceConfig, raised: bool) -> None:
        self.cfg, self.raised = cfg, raised

    def check(self, tx: WriteTx, tenant: str, persons: int, now: float) -> FilingAlert | None:
        """Inside the enrolment's transaction: record the alert if this enrolment reaches the threshold."""
        if persons < self.cfg.filing_threshold or self.raised:
            return None
        deadline = policy.filing_deadline(now, self.cfg.filing_working_days, self.cfg.holidays)
        alert = FilingAlert(now, deadline, persons, self.cfg.filing_threshold)
        tx.insert_filing_alert(alert)
        tx.audit(AuditEvent("FILING_ALERT", "system", "filing-monitor", tenant,
                            details={"persons": persons, "threshold": alert.threshold, "deadline": deadline}),
                 "ALERT", "FILING_THRESHOLD_REACHED")
        return alert

    def committed(self, alert: FilingAlert) -> None:
        self.raised = True
        log.warning("FILING ALERT: %d persons stored (threshold %d); file by %s", alert.persons, alert.threshold,
                    alert.deadline)


class Enrolment:
    """Enroll."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock, index: GalleryIndex, templates: TemplateReader,
                 contexts: HERegistry, retention: Retention, filing: FilingMonitor) -> None:
        self.cfg, self.store, self.clock, self.index = cfg, store, clock, index
        self.templates, self.contexts, self.retention, self.filing = templates, contexts, retention, filing

    def enrol(self, scope: Scope, req: EnrolRequest) -> EnrolResult:
        tenant, subject, purpose, ev = scope.tenant, scope.subject, scope.purpose, scope.ev
        if req.request_id:
            policy.check_id("request id", req.request_id)
        p = self.templates.read(req.template)
        t, kv = p.template, p.template.key_version
        ev.details = {"scheme": t.spec.name, "key_version": kv, "consent_id": req.consent_id[:64],
                      "idempotency_key": req.request_id[:64]}
        if p.encrypted:
            # a ciphertext of the current epoch's public context, fully parsed before anything is stored
            entry = check_blob(self.contexts.get(tenant, purpose, p.spec_key), tenant, p.he_header)
            entry.context.load_ciphertexts(t.data.tobytes(), "template")
        with self.index.subject_lock(tenant, subject):
            scope.check_deadline()
            with self.store.transaction() as tx:
                if tx.decommissioned():
                    raise Decommissioned("this matcher has been decommissioned")
                prior = earlier_response(tx, tenant, "Enroll", req, ev)
                if prior is not None:
                    return _replayed(prior)
                policy.check_enrol_consent(tx.consent(req.consent_id), req.consent_id, subject, tenant, purpose)
                # measures: an impact assessment first; off the device only with its own consent
                check_assessment(tx, tenant, purpose, self.clock.now())
                check_off_device_consent(tx, self.cfg, req.consent_id)
                state = tx.subject(tenant, subject)
                cur_kv, revoked = (state.key_version, state.revoked_upto) if state else (0, 0)
                self._check_version(tx, p, tenant, purpose, revoked)
                if tx.has_template(tenant, subject, purpose, p.spec_key):
                    raise AlreadyExists("the subject is already enrolled for this purpose and scheme "
                                        "(revoke the key version to re-enrol)", reason="ALREADY_ENROLLED")
                now = self.clock.now()
                expires = policy.expiry(now, req.retention_days, self.cfg.retention_days, self.cfg.max_retention_days)
                tid = tx.insert_template(TemplateRow(tenant, subject, purpose, p.spec_key, kv, bytes(req.template), now,
                                                     expires, req.consent_id, scope.device))
                if not p.encrypted:   # HE epochs are tenant-wide: the subject's key-version state is untouched
                    tx.put_subject(SubjectRow(tenant, subject, max(kv, cur_kv), revoked, now))
                result = EnrolResult(subject, p.spec_key, kv, now, expires)
                if req.request_id:
                    tx.insert_request(RequestRow(tenant, req.request_id, "Enroll", scope.principal.name,
                                                 req.request_hash, _reply_bytes(result), now))
                tx.audit(ev)
                filing = self.filing.check(tx, tenant, self.index.persons_with(tenant, subject), now)
            # committed (durable): now make it searchable
            self.index.enrol(GalleryKey(tenant, purpose, p.spec_key, kv), subject, t, template_id=tid,
                             expires_at=expires, versions=None if p.encrypted else (max(kv, cur_kv), revoked))
            self.retention.note_expiry(expires)
            if filing is not None:
                self.filing.committed(filing)
        return result

    def _check_version(self, tx: WriteTx, p, tenant: str, purpose: str, revoked: int) -> None:
        kv = p.template.key_version
        if p.encrypted:
            # an HE key version is the tenant epoch, not a per-subject key: check it is current
            cur = tx.current_he_epoch(tenant, purpose, p.spec_key)
            if cur is None or cur.epoch != kv:
                check_blob(self.contexts.get(tenant, purpose, p.spec_key), tenant, p.he_header)
                raise epoch_revoked("the HE context changed meanwhile; encrypt again")
        elif kv <= revoked:
            raise KeyVersionRevoked(f"key version {kv} of this subject was revoked; "
                                    f"re-enrol under version {revoked + 1} or later")
