"""Several samples per subject in a named gallery: add (an enrolment), list, delete.

Adding a sample is enrolment, with every rule of Enroll: separate consent for the gallery's
purpose, retention, the device location rules, the subject's key-version state, idempotency by
request id, the filing threshold, one audit entry in the same transaction. Deleting the last
sample of a subject means the subject is no longer enrolled in that gallery; Withdraw deletes
every sample in every gallery (the store deletes all of the subject's rows; the index forgets
its samples with its other entries).
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass

from ..._proto.veilface.v1 import matcher_pb2 as pb
from ...errors import SchemeMismatch
from .. import policy
from ..clock import Clock
from ..config import ServiceConfig
from ..matching import GalleryIndex, GalleryKey
from ..scope import Scope
from ..status import BadRequest, Decommissioned, KeyVersionRevoked, NotFound, Throttled
from ..store import GalleryRow, RequestRow, SampleRow, Store, SubjectRow, TemplateRow
from .assessments import check_assessment  # measures
from .common import TemplateReader, earlier_response
from .enrolment import FilingMonitor
from .maintenance import Retention
from .off_device import check_off_device_consent  # measures


@dataclass(frozen=True)
class AddSampleRequest:
    template: bytes                  # Template.to_bytes() of the gallery's scheme
    consent_id: str
    request_id: str = ""             # idempotency key (a retry with the same request is replayed)
    request_hash: str = ""
    retention_days: int = 0          # 0 = the default retention


@dataclass(frozen=True)
class SampleResult:
    gallery: str
    subject_id: str
    sample_id: str
    scheme: str
    key_version: int
    enrolled_at: float
    expires_at: float
    replayed: bool = False


@dataclass(frozen=True)
class SamplesPage:
    samples: list[SampleRow]
    next_page_token: str             # "" = last page


@dataclass(frozen=True)
class SampleDeleted:
    samples_left: int
    subject_removed: bool            # it was the subject's last sample in the gallery


def _reply(r: SampleResult) -> bytes:
    return pb.Sample(gallery=r.gallery, subject_id=r.subject_id, sample_id=r.sample_id, scheme=r.scheme,
                     key_version=r.key_version, enrolled_at=r.enrolled_at, expires_at=r.expires_at).SerializeToString()


def _replayed(blob: bytes) -> SampleResult:
    m = pb.Sample.FromString(blob)
    return SampleResult(m.gallery, m.subject_id, m.sample_id, m.scheme, m.key_version, m.enrolled_at, m.expires_at,
                        replayed=True)


def _page_token(after: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(after)).encode()).decode()


def _after(token: str) -> tuple[str, str]:
    if not token:
        return "", ""
    try:
        a = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("bad page_token", reason="BAD_PAGE_TOKEN") from None
    if not (isinstance(a, list) and len(a) == 2 and all(isinstance(x, str) and len(x) <= 128 for x in a)):
        raise BadRequest("bad page_token", reason="BAD_PAGE_TOKEN")
    return a[0], a[1]


class Samples:
    """AddSample, ListSamples, DeleteSample."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock, index: GalleryIndex, templates: TemplateReader,
                 retention: Retention, filing: FilingMonitor) -> None:
        self.cfg, self.store, self.clock, self.index = cfg, store, clock, index
        self.templates, self.retention, self.filing = templates, retention, filing

    def add(self, scope: Scope, g: GalleryRow, req: AddSampleRequest) -> SampleResult:
        tenant, subject, ev = scope.tenant, scope.subject, scope.ev
        if req.request_id:
            policy.check_id("request id", req.request_id)
        p = self.templates.read(req.template)
        t, kv = p.template, p.template.key_version
        ev.details = {"gallery": g.name, "scheme": t.spec.name, "key_version": kv,
                      "consent_id": req.consent_id[:64], "idempotency_key": req.request_id[:64]}
        if p.spec_key != g.scheme:
            raise SchemeMismatch(f"gallery {g.name!r} holds templates of another scheme or parameters")
        with self.index.subject_lock(tenant, subject):
            scope.check_deadline()
            with self.store.transaction() as tx:
                if tx.decommissioned():
                    raise Decommissioned("this matcher has been decommissioned")
                prior = earlier_response(tx, tenant, "AddSample", req, ev)
                if prior is not None:
                    return _replayed(prior)
                if tx.gallery(tenant, g.name) != g:           # deleted (or re-created) meanwhile
                    raise NotFound(f"no gallery {g.name!r}", reason="GALLERY_NOT_FOUND")
                policy.check_enrol_consent(tx.consent(req.consent_id), req.consent_id, subject, tenant, g.purpose)
                # measures: an impact assessment first; off the device only with its own consent
                check_assessment(tx, tenant, g.purpose, self.clock.now())
                check_off_device_consent(tx, self.cfg, req.consent_id)
                state = tx.subject(tenant, subject)
                cur_kv, revoked = (state.key_version, state.revoked_upto) if state else (0, 0)
                if kv <= revoked:
                    raise KeyVersionRevoked(f"key version {kv} of this subject was revoked; "
                                            f"re-enrol under version {revoked + 1} or later")
                if len(tx.sample_ids(tenant, g.name, subject)) >= self.cfg.max_samples_per_subject:
                    raise Throttled(f"subject has {self.cfg.max_samples_per_subject} samples in gallery {g.name!r} "
                                    "(max_samples_per_subject): delete one first", reason="TOO_MANY_SAMPLES")
                now = self.clock.now()
                expires = policy.expiry(now, req.retention_days, self.cfg.retention_days, self.cfg.max_retention_days)
                sample_id = "s_" + secrets.token_hex(8)
                tx.insert_template(TemplateRow(tenant, subject, g.purpose, p.spec_key, kv, bytes(req.template), now,
                                               expires, req.consent_id, scope.device, gallery=g.name,
                                               sample_id=sample_id))
                versions = (max(kv, cur_kv), revoked)
                tx.put_subject(SubjectRow(tenant, subject, versions[0], revoked, now))
                result = SampleResult(g.name, subject, sample_id, p.spec_key, kv, now, expires)
                if req.request_id:
                    tx.insert_request(RequestRow(tenant, req.request_id, "AddSample", scope.principal.name,
                                                 req.request_hash, _reply(result), now))
                ev.details["sample_id"] = sample_id
                tx.audit(ev)
                filing = self.filing.check(tx, tenant, self.index.persons_with(tenant, subject), now)
            # committed (durable): now make it searchable
            self.index.add_sample(GalleryKey(tenant, g.purpose, p.spec_key, kv, g.name), subject, sample_id, t,
                                  expires_at=expires, versions=versions)
            self.retention.note_expiry(expires)
            if filing is not None:
                self.filing.committed(filing)
        return result

    def list(self, scope: Scope, g: GalleryRow, page_size: int = 0, page_token: str = "") -> SamplesPage:
        """The gallery's samples (of ``scope.subject`` when set), ordered by (subject, sample id)."""
        size = page_size or 100
        if not 1 <= size <= 1000:
            raise BadRequest("page_size must be in [1, 1000]", reason="BAD_PAGE_SIZE")
        rows = self.store.samples(scope.tenant, g.name, scope.subject, _after(page_token), size + 1)
        more = len(rows) > size
        rows = rows[:size]
        scope.ev.details = {"gallery": g.name, "returned": len(rows)}
        return SamplesPage(rows, _page_token((rows[-1].subject, rows[-1].sample_id)) if more and rows else "")

    def delete(self, scope: Scope, g: GalleryRow, sample_id: str) -> SampleDeleted:
        tenant, subject = scope.tenant, scope.subject
        sample_id = policy.check_id("sample id", sample_id)
        scope.ev.details = {"gallery": g.name, "sample_id": sample_id}
        with self.index.subject_lock(tenant, subject):
            with self.store.transaction() as tx:
                if not tx.delete_sample(tenant, g.name, subject, sample_id):
                    raise NotFound(f"no sample {sample_id!r} of subject {subject!r} in gallery {g.name!r}",
                                   reason="SAMPLE_NOT_FOUND")
                left = len(tx.sample_ids(tenant, g.name, subject))
                scope.ev.details.update({"samples_left": left, "subject_removed": left == 0})
                tx.audit(scope.ev)
            self.index.forget_sample(tenant, subject, g.name, sample_id)
        self.store.checkpoint()       # the deleted template's pages (zeroed) leave the WAL too
        return SampleDeleted(left, left == 0)
