"""Operator, auditor and admin calls (what a role may call is enforced by the server)."""
from __future__ import annotations

from collections.abc import Iterator

from .._proto.veilface.v1 import matcher_pb2 as pb
from .base import BaseClient, consent_request


class OperatorClient(BaseClient):
    """Devices, consents, subjects, audit log, HE contexts, maintenance.

    ``OperatorClient(target, token, timeout=10.0, **channel_options)``; see
    :class:`engine.client.base.BaseClient` for the target forms and channel options.
    """

    def register_device(self, device_id: str, location_class: int, location_kind: str = "",
                        signage_declared: bool = False, tenant: str = "") -> pb.Device:
        return self._call("RegisterDevice", pb.RegisterDeviceRequest(
            device_id=device_id, location_class=location_class, location_kind=location_kind,
            signage_declared=signage_declared, tenant=tenant))

    def _pages(self, method: str, request, field: str) -> Iterator:
        """Follow ``next_page_token`` until the last page, yielding the items of ``field``."""
        while True:
            resp = self._call(method, request)
            yield from getattr(resp, field)
            if not resp.next_page_token:
                return
            request.page_token = resp.next_page_token

    def list_subjects(self, page_size: int = 100, purpose: str = "", tenant: str = "") -> Iterator[pb.SubjectInfo]:
        return self._pages("ListSubjects", pb.ListSubjectsRequest(
            page_size=page_size, purpose=purpose, tenant=tenant), "subjects")

    def audit_log(self, page_size: int = 500, action: str = "", subject_id: str = "") -> Iterator[pb.AuditEntry]:
        return self._pages("GetAuditLog", pb.GetAuditLogRequest(
            page_size=page_size, action=action, subject_id=subject_id), "entries")

    def verify_audit_chain(self) -> pb.VerifyAuditChainResponse:
        return self._call("VerifyAuditChain", pb.VerifyAuditChainRequest(), timeout=max(self.timeout, 120))

    def withdraw(self, subject_id: str, tenant: str = "") -> pb.WithdrawResponse:
        return self._call("Withdraw", pb.WithdrawRequest(subject_id=subject_id, tenant=tenant))

    def revoke(self, subject_id: str, key_version: int = 0, tenant: str = "") -> pb.RevokeResponse:
        return self._call("Revoke", pb.RevokeRequest(subject_id=subject_id, key_version=key_version, tenant=tenant))

    def record_consent(self, **kw) -> pb.ConsentRecord:
        return self._call("RecordConsent", consent_request(**kw))

    def purge_expired(self) -> pb.PurgeExpiredResponse:
        return self._call("PurgeExpired", pb.PurgeExpiredRequest())

    def decommission(self, reason: str = "", confirm: str = "DECOMMISSION") -> pb.DecommissionResponse:
        return self._call("Decommission", pb.DecommissionRequest(confirm=confirm, reason=reason),
                          timeout=max(self.timeout, 120))

    # -- measures: impact assessments, off-device consent, fleet oversight, termination ------------
    def register_impact_assessment(self, document, tenant: str = "") -> pb.ImpactAssessmentInfo:
        """Register an impact assessment: a dict, JSON bytes / text, or a path to a JSON file."""
        import json  # noqa: PLC0415
        from pathlib import Path  # noqa: PLC0415
        if isinstance(document, dict):
            data = json.dumps(document).encode()
        elif isinstance(document, Path):
            data = document.read_bytes()
        else:
            data = document.encode() if isinstance(document, str) else bytes(document)
        return self._call("RegisterImpactAssessment", pb.RegisterImpactAssessmentRequest(tenant=tenant, document=data))

    def withdraw_off_device_consent(self, subject_id: str, purpose: str = "",
                                    tenant: str = "") -> pb.WithdrawOffDeviceConsentResponse:
        return self._call("WithdrawOffDeviceConsent", pb.WithdrawOffDeviceConsentRequest(
            subject_id=subject_id, purpose=purpose, tenant=tenant))

    def register_oversight_key(self, device_id: str, public_key: bytes, tenant: str = "") -> pb.RegisterOversightKeyResponse:
        """Register an edge device's oversight verification key (raw 32-byte Ed25519)."""
        return self._call("RegisterOversightKey", pb.RegisterOversightKeyRequest(
            device_id=device_id, public_key=public_key, tenant=tenant))

    def submit_oversight(self, device_id: str, bundle: bytes, signature: bytes,
                         tenant: str = "") -> pb.SubmitOversightResponse:
        """Relay a device's signed bundle (collected offline); the signature proves its origin."""
        return self._call("SubmitOversight", pb.SubmitOversightRequest(
            device_id=device_id, bundle=bundle, signature=signature, tenant=tenant))

    def record_filing_cancellation(self, reference: str, cancelled_on: str = "") -> pb.RecordFilingCancellationResponse:
        return self._call("RecordFilingCancellation", pb.RecordFilingCancellationRequest(
            reference=reference, cancelled_on=cancelled_on))

    def register_he_context(self, context, purpose: str, tenant: str = "",
                            chunk_bytes: int = 256 << 10) -> pb.HEContextInfo:
        """Register the *public* HE context of a tenant epoch for ``purpose`` (operator, admin).

        ``context``: an :class:`engine.he.PublicContext`, its bytes, or a :class:`engine.he.KeyHolder`
        (only ``key_holder.public_context(eval_keys=True)`` is sent -- never the secret key). Sent as
        a stream of ``chunk_bytes`` pieces (an identify context is several MB). Registering epoch
        ``e + 1`` rotates: the matcher deletes the epoch-``e`` templates and refuses its ciphertexts.
        """
        blob = _public_context_bytes(context, eval_keys=True)
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")

        def stream():
            for off in range(0, len(blob), chunk_bytes):
                yield pb.RegisterHEContextRequest(tenant=tenant if off == 0 else "",
                                                  purpose=purpose if off == 0 else "",
                                                  chunk=blob[off:off + chunk_bytes])
        return self._call("RegisterHEContext", stream(), timeout=max(self.timeout, 120))

    # -- api: named galleries and samples (docs/api-model.md) -----------------------------------------
    def create_gallery(self, name: str, purpose: str, scheme: str, description: str = "",
                       tenant: str = "") -> pb.Gallery:
        """A named gallery for ``purpose`` holding templates of ``scheme`` (a descriptor such as
        ``"biohash:bits=256,dim=128"``); CreateCollection / a CompreFace service."""
        return self._call("CreateGallery", pb.CreateGalleryRequest(name=name, purpose=purpose, scheme=scheme,
                                                                   description=description, tenant=tenant))

    def delete_gallery(self, name: str, tenant: str = "") -> pb.DeleteGalleryResponse:
        """Delete the gallery and every sample in it."""
        return self._call("DeleteGallery", pb.DeleteGalleryRequest(name=name, tenant=tenant))

    def list_samples(self, gallery: str, subject_id: str = "", page_size: int = 100,
                     tenant: str = "") -> Iterator[pb.Sample]:
        """Samples of a gallery (of one subject when given), every page; ListFaces."""
        return self._pages("ListSamples", pb.ListSamplesRequest(
            gallery=gallery, subject_id=subject_id, page_size=page_size, tenant=tenant), "samples")

    def delete_sample(self, gallery: str, subject_id: str, sample_id: str,
                      tenant: str = "") -> pb.DeleteSampleResponse:
        return self._call("DeleteSample", pb.DeleteSampleRequest(gallery=gallery, subject_id=subject_id,
                                                                 sample_id=sample_id, tenant=tenant))

    def search_by_subject(self, gallery: str, subject_id: str, top_k: int = 5, threshold: float = 0.0,
                          tenant: str = "") -> list[pb.GalleryCandidate]:
        """Other subjects of the gallery most similar to an enrolled one (its stored samples are
        the probes; nothing is uploaded); SearchFaces."""
        return list(self._call("SearchBySubject", pb.SearchBySubjectRequest(
            gallery=gallery, subject_id=subject_id, top_k=top_k, threshold=threshold, tenant=tenant)).candidates)


def _public_context_bytes(context, eval_keys: bool) -> bytes:
    if isinstance(context, (bytes, bytearray, memoryview)):
        return bytes(context)
    if getattr(context, "is_private", lambda: False)():   # a KeyHolder: send its public half only
        return context.public_context(eval_keys=eval_keys).to_bytes()
    return context.to_bytes()
