"""``veilface.v1.Matcher`` over gRPC: each RPC translates its request, calls a use case of
:class:`~engine.service.app.MatcherApp` and builds the response (the shape of grpc's
``route_guide_server.py``).

Around every RPC, :func:`_rpc` checks the deadline, writes the call's audit entry when the use
case did not write it in its own transaction, and maps any error to a status code with the
machine-readable reason in the ``veilface-reason`` trailing metadata (one table: :mod:`.status`).
Every call, refused or not, leaves one audit entry.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging

import grpc

from .._proto.veilface.v1 import matcher_pb2 as pb
from .._proto.veilface.v1 import matcher_pb2_grpc as pb_grpc
from ..errors import REASON_KEY
from .app import MatcherApp
from .audit import AuditEvent
from .auth import current_principal
from .oversight import SignedBundle  # measures
from .scope import Scope
from .status import BadRequest, DeadlineExceeded, Decommissioned, Throttled, classify
from .usecases.devices import DeviceRegistration
from .usecases.enrolment import EnrolRequest
from .usecases.galleries import GalleryInfo, GallerySearchResult
from .usecases.he_contexts import HEContextInfo
from .usecases.lifecycle import ConsentRequest, Guardian
from .usecases.matching import IdentifyRequest, VerifyRequest
from .usecases.off_device import OffDeviceTerms  # measures
from .usecases.samples import AddSampleRequest

log = logging.getLogger("veilface.service")
SERVICE_NAME = "veilface.v1.Matcher"


def _rpc(fn):
    """Audit + error mapping around a servicer method ``fn(self, request, context, ev)``."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: MatcherServicer, request, context):
        p = current_principal()
        ev = AuditEvent(name, p.role, p.name)
        try:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("deadline expired before the call started")
            resp = fn(self, request, context, ev)
            if not ev.written:
                self.app.audit(ev, "OK")
            return resp
        except Exception as exc:  # noqa: BLE001 - mapped to a status code below
            code, reason, msg = classify(exc)
            if code == "INTERNAL":
                log.exception("internal error in %s", name)
            ev.details = {k: v for k, v in ev.details.items() if k in ("scheme", "key_version")}
            self.app.audit(ev, code, reason)
            context.set_trailing_metadata(((REASON_KEY, reason),))
            context.abort(getattr(grpc.StatusCode, code), f"{reason}: {msg}")
    return wrapper


def _fallback(d: dict) -> pb.Fallback:
    return pb.Fallback(**d)


def _he_context(i: HEContextInfo) -> pb.HEContextInfo:
    return pb.HEContextInfo(tenant=i.tenant, purpose=i.purpose, scheme=i.scheme, mode=i.mode, dim=i.dim, epoch=i.epoch,
                            fingerprint=i.fingerprint, eval_keys=i.eval_keys, registered_at=i.registered_at,
                            retired_epoch=i.retired_epoch, templates_deleted=i.templates_deleted,
                            unchanged=i.unchanged, templates=i.templates)


def report_to_proto(rep: dict) -> pb.ComplianceReportResponse:
    f, r = rep["filing"], rep["retention"]
    return pb.ComplianceReportResponse(
        persons_stored=rep["persons_stored"], templates_stored=rep["templates_stored"],
        filing_alert=pb.FilingAlert(raised=f["raised"], raised_at=f["raised_at"], deadline=f["deadline"],
                                    persons_at_alert=f["persons_at_alert"], threshold=f["threshold"]),
        expired_pending_purge=r["expired_pending_purge"], next_expiry=r["next_expiry"],
        purged_total=r["purged_total"], default_retention_days=r["default_days"],
        max_retention_days=r["max_days"],
        processing=[pb.ProcessingRecord(**p) for p in rep["processing"]],
        devices=rep["devices"], private_space_devices=rep["private_space_devices"],
        alerts=rep["intrusion_alerts"], audit_head_hash=rep["audit"]["head_hash"],
        audit_entries=rep["audit"]["entries"], decommissioned=rep["decommissioned"],
        generated_at=rep["generated_at"], report_json=json.dumps(rep, sort_keys=True))


class MatcherServicer(pb_grpc.MatcherServicer):
    """Implements ``veilface.v1.Matcher`` over a :class:`MatcherApp`."""

    def __init__(self, app: MatcherApp) -> None:
        self.app = app

    def _scope(self, ev: AuditEvent, context, **parts) -> Scope:
        return self.app.scopes.open(ev, current_principal(), time_remaining=context.time_remaining, **parts)

    # -- devices and consent ------------------------------------------------------------------------
    @_rpc
    def RegisterDevice(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant, writes=True)
        d = self.app.devices.register(scope, DeviceRegistration(req.device_id, int(req.location_class),
                                                                req.location_kind, req.signage_declared))
        return pb.Device(device_id=d.device_id, location_class=d.location_class, location_kind=d.location_kind,
                         signage_declared=d.signage_declared, can_enroll=d.can_enroll, can_identify=d.can_identify,
                         registered_at=d.registered_at, tenant=d.tenant)

    @_rpc
    def RecordConsent(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant, subject=req.subject_id, purpose=req.purpose,
                            device=req.device_id, writes=True)
        g = req.guardian if req.HasField("guardian") else None
        o = req.off_device if req.HasField("off_device") else None   # measures
        c = self.app.lifecycle.record_consent(scope, ConsentRequest(
            req.separate_consent, req.notice_version, req.subject_age, req.consented_at,
            Guardian(g.guardian_ref, g.relationship, g.consented_at) if g is not None else None,
            OffDeviceTerms(o.separate_consent, o.notice_version, o.transferred, o.recipient, o.why, o.consented_at)
            if o is not None else None))
        return pb.ConsentRecord(consent_id=c.consent_id, subject_id=c.subject_id, purpose=c.purpose,
                                notice_version=c.notice_version, consented_at=c.consented_at, minor=c.minor,
                                guardian_consent=c.guardian_consent, withdrawn=False, tenant=c.tenant,
                                off_device=c.off_device)

    # -- enrolment and matching ---------------------------------------------------------------------
    @_rpc
    def Enroll(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant, subject=req.subject_id, purpose=req.purpose,
                            device=req.device_id, device_op="enroll", writes=True)
        digest = hashlib.sha256(req.SerializeToString(deterministic=True)).hexdigest()
        r = self.app.enrolment.enrol(scope, EnrolRequest(bytes(req.template), req.consent_id, req.request_id, digest,
                                                         req.retention_days))
        return pb.EnrollResponse(subject_id=r.subject_id, scheme=r.scheme, key_version=r.key_version,
                                 enrolled_at=r.enrolled_at, expires_at=r.expires_at, replayed=r.replayed)

    @_rpc
    def Verify(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant, subject=req.subject_id, purpose=req.purpose,
                            device=req.device_id, device_op="verify")
        r = self.app.matching.verify(scope, VerifyRequest(req.probe, req.threshold, req.decision_grant))
        return pb.VerifyResponse(matched=r.matched, score=r.score, threshold=r.threshold, fallback=_fallback(r.fallback),
                                 encrypted=r.encrypted, decision_ticket=r.decision_ticket,
                                 decision_payload=r.decision.payload, decision_signature=r.decision.signature,
                                 decision_key_id=r.decision.key_id)

    @_rpc
    def Identify(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant, purpose=req.purpose, device=req.device_id,
                            device_op="identify")
        r = self.app.matching.identify(scope, IdentifyRequest(req.probe, req.top_k, req.threshold, req.decision_grant))
        return pb.IdentifyResponse(candidates=[pb.Candidate(subject_id=h.subject_id, score=h.score) for h in r.candidates],
                                   threshold=r.threshold, gallery_size=r.gallery_size, fallback=_fallback(r.fallback),
                                   encrypted=r.encrypted, decision_ticket=r.decision_ticket,
                                   decision_payload=r.decision.payload, decision_signature=r.decision.signature,
                                   decision_key_id=r.decision.key_id)

    # -- HE contexts --------------------------------------------------------------------------------
    @_rpc
    def RegisterHEContext(self, request_iterator, context, ev):
        if self.app.store.decommissioned():
            raise Decommissioned("this matcher has been decommissioned")
        limit = self.app.cfg.max_he_context_bytes
        scope, buf = None, bytearray()
        for msg in request_iterator:      # the context arrives in chunks (several MB in identify mode)
            if scope is None:
                scope = self._scope(ev, context, tenant=msg.tenant, purpose=msg.purpose)
            buf += msg.chunk
            if len(buf) > limit:
                raise Throttled(f"HE context larger than max_he_context_bytes ({limit})", reason="HE_CONTEXT_TOO_LARGE")
            scope.check_deadline()
        if scope is None or not buf:
            raise BadRequest("no HE context was sent", reason="MISSING_HE_CONTEXT")
        return _he_context(self.app.he_contexts.register(scope, bytes(buf)))

    @_rpc
    def ListHEContexts(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant)
        return pb.ListHEContextsResponse(contexts=[_he_context(i) for i in self.app.he_contexts.list(scope, req.purpose)])

    # -- subject lifecycle --------------------------------------------------------------------------
    @_rpc
    def Withdraw(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant, subject=req.subject_id, device=req.device_id)
        r = self.app.lifecycle.withdraw(scope)
        return pb.WithdrawResponse(templates_deleted=r.templates_deleted, consents_withdrawn=r.consents_withdrawn,
                                   destroyed_key_version=r.destroyed_key_version, withdrawn_at=r.withdrawn_at)

    @_rpc
    def Revoke(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant, subject=req.subject_id, device=req.device_id)
        r = self.app.lifecycle.revoke(scope, req.key_version)
        return pb.RevokeResponse(revoked_key_version=r.revoked_key_version, next_key_version=r.next_key_version,
                                 templates_deleted=r.templates_deleted)

    # -- records, reports, maintenance --------------------------------------------------------------
    @_rpc
    def ListSubjects(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant)
        page = self.app.queries.list_subjects(scope, req.page_size, req.page_token, req.purpose)
        return pb.ListSubjectsResponse(subjects=[
            pb.SubjectInfo(subject_id=s.subject, key_version=s.key_version, schemes=s.schemes, purposes=s.purposes,
                           enrolled_at=s.enrolled_at, expires_at=s.expires_at) for s in page.subjects],
            next_page_token=page.next_page_token, total=page.total)

    @_rpc
    def GetAuditLog(self, req, context, ev):
        page = self.app.queries.audit_log(ev, req.page_size, req.page_token, req.action, req.subject_id)
        return pb.GetAuditLogResponse(entries=[
            pb.AuditEntry(seq=r.seq, ts=r.ts, actor_role=r.actor_role, actor=r.actor, action=r.action, tenant=r.tenant,
                          subject_id=r.subject, purpose=r.purpose, device_id=r.device, result=r.result,
                          reason=r.reason, details_json=r.details, prev_hash=r.prev_hash, hash=r.hash)
            for r in page.entries], next_page_token=page.next_page_token)

    @_rpc
    def VerifyAuditChain(self, req, context, ev):
        r = self.app.queries.verify_chain(ev)
        return pb.VerifyAuditChainResponse(ok=r.ok, entries=r.entries, head_hash=r.head_hash,
                                           first_bad_seq=r.first_bad_seq, problem=r.problem)

    @_rpc
    def ComplianceReport(self, req, context, ev):
        return report_to_proto(self.app.maintenance.report())

    @_rpc
    def PurgeExpired(self, req, context, ev):
        r = self.app.maintenance.purge(ev)
        return pb.PurgeExpiredResponse(templates_purged=r.templates_purged, subjects_purged=r.subjects_purged)

    # harden: lock-outs --------------------------------------------------------------------------------
    @_rpc
    def ResetLockout(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant, subject=req.subject_id or None)
        n = self.app.lockouts.reset(scope, req.token_name, req.reason_code)
        return pb.ResetLockoutResponse(cleared=n > 0, locks_cleared=n)

    # -- pg: bulk enrolment ---------------------------------------------------------------------------
    @_rpc
    def EnrollStream(self, request_iterator, context, ev):
        from .usecases.bulk import BulkRow
        first: list = []

        def rows():
            for msg in request_iterator:
                if not first:
                    first.append(self._scope(ev, context, tenant=msg.tenant, purpose=msg.purpose, device=msg.device_id,
                                             device_op="enroll", writes=True))
                for r in msg.rows:
                    yield BulkRow(r.subject_id, bytes(r.template), r.consent_id, r.retention_days)

        stream = rows()
        head = next(stream, None)          # opens the scope (first message) before any row is checked
        if not first:
            raise BadRequest("no EnrollStream message was sent", reason="MISSING_ROWS")

        def all_rows():
            if head is not None:
                yield head
            yield from stream
        r = self.app.bulk.enrol(first[0], all_rows())
        return pb.EnrollStreamResponse(enrolled=r.enrolled, batches=r.batches, rejected_total=r.rejected_total,
                                       rejected=[pb.BulkRejected(row=i, subject_id=s, reason=why)
                                                 for i, s, why in r.rejected])

    @_rpc
    def Decommission(self, req, context, ev):
        if req.confirm != "DECOMMISSION":
            raise BadRequest('confirm must be "DECOMMISSION"', reason="CONFIRMATION_REQUIRED")
        cert = self.app.maintenance.decommission(ev, req.reason)
        return pb.DecommissionResponse(certificate_json=json.dumps(cert, indent=1, sort_keys=True),
                                       certificate_sha256=cert["certificate_sha256"],
                                       templates_deleted=cert["templates_deleted"],
                                       subjects_deleted=cert["subjects_deleted"])

    # -- measures: impact assessments, off-device consent, fleet oversight, termination -------------
    @_rpc
    def RegisterImpactAssessment(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant, writes=True)
        a = self.app.assessments.register(scope, bytes(req.document))
        return pb.ImpactAssessmentInfo(assessment_id=a.assessment_id, tenant=a.tenant, purpose=a.purpose,
                                       version=a.version, sha256=a.sha256, registered_at=a.registered_at,
                                       assessed_on=a.assessed_on, review_by=a.review_by, audit_seq=a.audit_seq,
                                       unchanged=a.unchanged)

    @_rpc
    def WithdrawOffDeviceConsent(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant, subject=req.subject_id, device=req.device_id)
        r = self.app.off_device.withdraw(scope, req.purpose)
        return pb.WithdrawOffDeviceConsentResponse(templates_deleted=r.templates_deleted,
                                                   off_device_consents_withdrawn=r.off_device_consents_withdrawn,
                                                   withdrawn_at=r.withdrawn_at)

    @_rpc
    def RegisterOversightKey(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant, device=req.device_id)
        k = self.app.oversight.register_key(scope, bytes(req.public_key))
        return pb.RegisterOversightKeyResponse(fingerprint=k.fingerprint, registered_at=k.registered_at,
                                               unchanged=k.unchanged)

    @_rpc
    def SubmitOversight(self, req, context, ev):
        # not a write guarded by decommission: a terminated matcher still receives the devices' final bundles
        scope = self._scope(ev, context, tenant=req.tenant, device=req.device_id)
        r = self.app.oversight.submit(scope, SignedBundle(bytes(req.bundle), bytes(req.signature)))
        return pb.SubmitOversightResponse(seq=r.seq, head_hash=r.head_hash, audit_entries=r.audit_entries,
                                          persons_device=r.persons_device, persons_fleet=r.persons_fleet,
                                          filing_alert_raised=r.filing_alert_raised)

    @_rpc
    def RecordFilingCancellation(self, req, context, ev):
        scope = self._scope(ev, context, tenant="")
        r = self.app.termination.record_cancellation(scope, req.reference, req.cancelled_on)
        return pb.RecordFilingCancellationResponse(reference=r.reference, cancelled_on=r.cancelled_on,
                                                   deadline=r.deadline, on_time=r.on_time, recorded_at=r.recorded_at)

    # -- api: named galleries and samples (docs/api-model.md) ------------------------------------------
    def _in_gallery(self, ev: AuditEvent, context, req, device_op: str | None = None, subject: bool = True,
                    writes: bool = False):
        """The named gallery of ``req`` and the call's scope (purpose = the gallery's)."""
        g = self.app.galleries.resolve(ev, req.tenant, req.gallery)
        scope = self._scope(ev, context, tenant=req.tenant, purpose=g.purpose, writes=writes,
                            subject=req.subject_id if subject else None,
                            device=req.device_id if device_op else None, device_op=device_op)
        return g, scope

    @_rpc
    def CreateGallery(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant, purpose=req.purpose, writes=True)
        return _gallery(self.app.galleries.create(scope, req.name, req.scheme, req.description))

    @_rpc
    def ListGalleries(self, req, context, ev):
        scope = self._scope(ev, context, tenant=req.tenant)
        return pb.ListGalleriesResponse(galleries=[_gallery(i) for i in self.app.galleries.list(scope, req.purpose)])

    @_rpc
    def DescribeGallery(self, req, context, ev):
        g = self.app.galleries.resolve(ev, req.tenant, req.name)
        scope = self._scope(ev, context, tenant=req.tenant, purpose=g.purpose)
        return _gallery(self.app.galleries.describe(scope, g))

    @_rpc
    def DeleteGallery(self, req, context, ev):
        g = self.app.galleries.resolve(ev, req.tenant, req.name)
        scope = self._scope(ev, context, tenant=req.tenant, purpose=g.purpose)
        r = self.app.galleries.delete(scope, g)
        return pb.DeleteGalleryResponse(name=r.name, samples_deleted=r.samples_deleted, subjects_removed=r.subjects_removed)

    @_rpc
    def AddSample(self, req, context, ev):
        g, scope = self._in_gallery(ev, context, req, device_op="enroll", writes=True)
        digest = hashlib.sha256(req.SerializeToString(deterministic=True)).hexdigest()
        r = self.app.samples.add(scope, g, AddSampleRequest(bytes(req.template), req.consent_id, req.request_id, digest,
                                                            req.retention_days))
        return pb.Sample(gallery=r.gallery, subject_id=r.subject_id, sample_id=r.sample_id, scheme=r.scheme,
                         key_version=r.key_version, enrolled_at=r.enrolled_at, expires_at=r.expires_at,
                         replayed=r.replayed)

    @_rpc
    def ListSamples(self, req, context, ev):
        g = self.app.galleries.resolve(ev, req.tenant, req.gallery)
        scope = self._scope(ev, context, tenant=req.tenant, purpose=g.purpose,
                            subject=req.subject_id if req.subject_id else None)
        page = self.app.samples.list(scope, g, req.page_size, req.page_token)
        return pb.ListSamplesResponse(samples=[
            pb.Sample(gallery=r.gallery, subject_id=r.subject, sample_id=r.sample_id, scheme=r.scheme,
                      key_version=r.key_version, enrolled_at=r.enrolled_at, expires_at=r.expires_at)
            for r in page.samples], next_page_token=page.next_page_token)

    @_rpc
    def DeleteSample(self, req, context, ev):
        g, scope = self._in_gallery(ev, context, req, device_op="use")
        r = self.app.samples.delete(scope, g, req.sample_id)
        return pb.DeleteSampleResponse(samples_left=r.samples_left, subject_removed=r.subject_removed)

    @_rpc
    def GalleryVerify(self, req, context, ev):
        g, scope = self._in_gallery(ev, context, req, device_op="verify")
        r = self.app.gallery_matching.verify(scope, g, bytes(req.probe), req.threshold)
        return pb.GalleryVerifyResponse(matched=r.matched, score=r.score, threshold=r.threshold,
                                        fallback=_fallback(r.fallback), sample_id=r.sample_id)

    @_rpc
    def GallerySearch(self, req, context, ev):
        g, scope = self._in_gallery(ev, context, req, device_op="identify", subject=False)
        return _search(self.app.gallery_matching.search(scope, g, bytes(req.probe), req.top_k, req.threshold))

    @_rpc
    def SearchBySubject(self, req, context, ev):
        g, scope = self._in_gallery(ev, context, req, device_op="identify")
        return _search(self.app.gallery_matching.search_by_subject(scope, g, req.top_k, req.threshold))


def _gallery(i: GalleryInfo) -> pb.Gallery:
    return pb.Gallery(tenant=i.tenant, name=i.name, purpose=i.purpose, scheme=i.scheme, description=i.description,
                      created_at=i.created_at, subjects=i.subjects, samples=i.samples)


def _search(r: GallerySearchResult) -> pb.GallerySearchResponse:
    return pb.GallerySearchResponse(
        candidates=[pb.GalleryCandidate(subject_id=h.subject_id, score=h.score, sample_id=h.sample_id)
                    for h in r.candidates],
        threshold=r.threshold, gallery_size=r.gallery_size, fallback=_fallback(r.fallback))
