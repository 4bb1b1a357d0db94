"""Subject lifecycle: separate consent, withdrawal (delete everything) and key-version revocation."""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from .. import policy
from ..clock import Clock
from ..config import ServiceConfig
from ..encrypted import is_he_spec
from ..matching import GalleryIndex
from ..scope import Scope
from ..status import BadRequest, NotFound
from ..store import ConsentRow, Store, SubjectRow
from ..validation import check_relationship, check_time
from .off_device import OffDeviceTerms, off_device_row  # measures: off-device-storage consent


@dataclass(frozen=True)
class Guardian:
    guardian_ref: str
    relationship: str = ""
    consented_at: float = 0.0


@dataclass(frozen=True)
class ConsentRequest:
    separate_consent: bool
    notice_version: str
    subject_age: int
    consented_at: float = 0.0          # 0 = now
    guardian: Guardian | None = None
    off_device: OffDeviceTerms | None = None   # measures: the separate consent to off-device storage


@dataclass(frozen=True)
class ConsentRecord:
    consent_id: str
    tenant: str
    subject_id: str
    purpose: str
    notice_version: str
    consented_at: float
    minor: bool
    guardian_consent: bool
    off_device: bool = False           # measures: an off-device-storage consent was recorded with it


@dataclass(frozen=True)
class Withdrawn:
    templates_deleted: int
    consents_withdrawn: int
    destroyed_key_version: int
    withdrawn_at: float


@dataclass(frozen=True)
class Revoked:
    revoked_key_version: int
    next_key_version: int
    templates_deleted: int


class Lifecycle:
    """RecordConsent, Withdraw, Revoke."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock, index: GalleryIndex) -> None:
        self.cfg, self.store, self.clock, self.index = cfg, store, clock, index

    def record_consent(self, scope: Scope, req: ConsentRequest) -> ConsentRecord:
        g = req.guardian
        minor = policy.check_consent_request(req.separate_consent, req.notice_version, req.subject_age,
                                             g.guardian_ref if g else "", self.cfg.guardian_age)
        now = self.clock.now()
        at = check_time(req.consented_at, now, "consent time")
        guardian_at = check_time(g.consented_at, now, "guardian consent time") if g else 0.0
        relationship = check_relationship(g.relationship) if g else ""
        cid = "c_" + secrets.token_hex(12)
        notice = req.notice_version
        scope.ev.details = {"consent_id": cid, "notice_version": notice, "minor": minor,
                            "guardian": bool(g and g.guardian_ref)}
        # measures: the off-device-storage consent is its own record, stored with this one
        off = off_device_row(cid, scope, req.off_device, now) if req.off_device is not None else None
        if off is not None:
            scope.ev.details.update({"off_device": True, "off_device_notice": off.notice_version})
        with self.store.transaction() as tx:
            tx.insert_consent(ConsentRow(cid, scope.tenant, scope.subject, scope.purpose, notice, at, int(req.subject_age),
                                         minor, g.guardian_ref if g else "", relationship, guardian_at, scope.device))
            if off is not None:
                tx.insert_off_device_consent(off)
            tx.audit(scope.ev)
        return ConsentRecord(cid, scope.tenant, scope.subject, scope.purpose, notice, at, minor,
                             bool(g and g.guardian_ref), off is not None)

    def withdraw(self, scope: Scope) -> Withdrawn:
        """Delete every template of the subject, withdraw its consents, retire its key version,
        remove it from every gallery."""
        tenant, subject, now = scope.tenant, scope.subject, self.clock.now()
        with self.index.subject_lock(tenant, subject):
            with self.store.transaction() as tx:
                n_t = tx.delete_subject_templates(tenant, subject)
                n_c = tx.withdraw_consents(tenant, subject, now)
                tx.withdraw_off_device_consents(tenant, subject, "", now)   # measures: they go with the consent
                srow = tx.subject(tenant, subject)
                if not (n_t or n_c or srow):
                    raise NotFound(f"no subject {subject!r}", reason="SUBJECT_NOT_FOUND")
                kv, revoked = (srow.key_version, srow.revoked_upto) if srow else (0, 0)
                revoked = max(kv, revoked)
                tx.put_subject(SubjectRow(tenant, subject, kv, revoked, now))
                scope.ev.details = {"templates_deleted": n_t, "consents_withdrawn": n_c, "destroyed_key_version": kv}
                tx.audit(scope.ev)
            self.index.forget(tenant, subject, lambda p, s, m: True)
            self.index.set_versions(tenant, subject, kv, revoked)
        self.store.checkpoint()   # deleted pages leave the WAL too (secure_delete zeroes them)
        return Withdrawn(n_t, n_c, kv, now)

    def revoke(self, scope: Scope, key_version: int) -> Revoked:
        """Revoke ``key_version`` (0 = the current one) and every older one: their templates go;
        re-enrol under the next version. HE templates go whatever their version (the HE key
        version is the tenant epoch: re-keying is a new epoch, RegisterHEContext)."""
        if key_version < 0:
            raise BadRequest("key_version must be >= 0", reason="BAD_KEY_VERSION")
        tenant, subject, now = scope.tenant, scope.subject, self.clock.now()
        with self.index.subject_lock(tenant, subject):
            with self.store.transaction() as tx:
                srow = tx.subject(tenant, subject)
                n_he = tx.delete_he_templates(tenant, subject)
                if srow is None and not n_he:
                    raise NotFound(f"no subject {subject!r}", reason="SUBJECT_NOT_FOUND")
                kv, revoked = (srow.key_version, srow.revoked_upto) if srow else (0, 0)
                v = key_version or kv
                if srow is not None and v > kv:
                    raise BadRequest(f"key version {v} was never used (current {kv})", reason="BAD_KEY_VERSION")
                revoked = max(revoked, v)
                n = tx.delete_templates_upto(tenant, subject, v) + n_he
                if srow is not None:
                    tx.put_subject(SubjectRow(tenant, subject, kv, revoked, now))
                scope.ev.details = {"revoked_key_version": v, "templates_deleted": n, "he_templates_deleted": n_he}
                tx.audit(scope.ev)
            self.index.forget(tenant, subject, lambda p, s, m: is_he_spec(s) or m.key_version <= v)
            if srow is not None:
                self.index.set_versions(tenant, subject, kv, revoked)
        self.store.checkpoint()
        return Revoked(v, revoked + 1, n)
