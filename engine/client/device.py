"""The device SDK: protects captures on the device, then calls the matcher.

The client itself only makes calls and keeps the device's key-version bookkeeping; how a
capture is protected and how an answer is read belong to its :class:`Protection` strategy
(cancellable transform or HE encryption, :mod:`engine.client.protection`), and keys come from
a :class:`KeySource` (:mod:`engine.client.keys`), never from a master secret held here.
"""
from __future__ import annotations

import uuid

from .._proto.veilface.v1 import matcher_pb2 as pb
from ..keys import KeyDeriver
from ..schemes import make_scheme
from ..template import Template
from .base import DEFAULT_TIMEOUT, BaseClient, OffDeviceTerms, consent_request
from .errors import ServiceError
from .keys import KeySource, KeyVersions, as_key_source
from .protection import HEProtection, Protection, VerifyResult, make_protection


class DeviceClient(BaseClient):
    """The device SDK. Protection happens here; the service only ever sees templates.

    Parameters
    ----------
    target, token : service address(es) and this device's role token (several addresses:
        a list or ``"a:1,b:2"``, see :func:`engine.client.channel`)
    device_id : the registered device this SDK runs on
    deriver : where transform keys come from: a :class:`engine.keys.KeyDeriver` (the tenant
        master secret in the device keystore) or any :class:`engine.client.KeySource`
    scheme : factory string, e.g. ``"biohash:bits=256,dim=128"``
    purpose : default purpose of this device's calls
    key_scope : ``"purpose"`` (1:N-capable group keys per key version) or ``"subject"``
    tenant : tenant of every call ("" = the server's default)
    versions : :class:`KeyVersions` (pass one with a path to persist it)
    timeout : default deadline of a call in seconds, retries included
    key_holder : ``he`` only -- :class:`engine.he.KeyHolder`. Verify mode: the device's own key
        holder (encrypts with its public half, decrypts the score and decides). Identify mode:
        the decider (or pass ``decider=``); ``he_context`` then defaults to its public half.
    he_context : ``he`` only -- the public (device) context to encrypt with, when the key holder
        is elsewhere (identify mode). Get it from the key holder, not from the matcher.
    decider : ``he`` identify mode -- any object with ``decide(blob, k, threshold) -> [Match]``
        (e.g. a client of a remote decider service); defaults to ``key_holder``.
    off_device : :class:`OffDeviceTerms` -- the off-device-storage notice of this device's consent
        flow (a central matcher stores templates only with that separate consent). When set,
        :meth:`record_consent` records the subject's agreement to it unless called with
        ``off_device=False`` (the subject did not tick it); like ``separate_consent``, the SDK
        relies on the application to have obtained it.
    **channel_options : ``tls_ca``, ``client_cert``, ``client_key``, ``server_name``, ``retry``,
        ``lb_policy``, message sizes (:func:`engine.client.channel`).

    With the ``he`` scheme every call goes to one replica (``pick_first``) unless
    ``lb_policy=`` says otherwise: the decision report must reach the replica that issued the
    decision ticket.
    """

    def __init__(self, target, token: str, device_id: str, deriver: KeyDeriver | KeySource | None = None,
                 scheme: str = "biohash:bits=256,dim=128", purpose: str = "access_control",
                 key_scope: str = "purpose", tenant: str = "", versions: KeyVersions | None = None,
                 timeout: float = DEFAULT_TIMEOUT, key_holder=None, he_context=None, decider=None,
                 off_device: OffDeviceTerms | None = None, **channel_options) -> None:
        self.device_id, self.purpose, self.tenant = device_id, purpose, tenant
        self.off_device = off_device or None
        self.scheme = make_scheme(scheme)
        self.key_scope = key_scope
        self.versions = versions or KeyVersions()
        self.protection: Protection = make_protection(self.scheme, as_key_source(deriver), key_scope, self.versions,
                                                      key_holder=key_holder, he_context=he_context, decider=decider)
        if self.protection.needs_replica_affinity:
            channel_options.setdefault("lb_policy", "pick_first")
        super().__init__(target, token, timeout, **channel_options)

    @property
    def encrypted(self) -> bool:
        return self.protection.encrypted

    def set_he_keys(self, key_holder=None, he_context=None, decider=None) -> None:
        """(Re)configure HE material, e.g. after a rotation: ``key_holder`` (secret, stays on this
        device / decider), ``he_context`` (public device context or its bytes), ``decider``."""
        self.protection = HEProtection(self.scheme, key_holder, he_context, decider)

    # -- protection (local) ------------------------------------------------------------
    def protect(self, subject_id: str | None, embedding, version: int | None = None,
                purpose: str | None = None) -> Template:
        """Protect one embedding ``(dim,)`` float for ``subject_id`` at its current key version
        (``he``: encrypt under the current epoch)."""
        return self.protection.protect(subject_id, embedding, version, purpose or self.purpose)

    def protect_probe(self, subject_id: str | None, embedding, version: int | None = None,
                      purpose: str | None = None) -> Template:
        """A probe: :meth:`protect` for cancellable schemes; the probe layout for ``he``."""
        return self.protection.probe(subject_id, embedding, version, purpose or self.purpose)

    def protect_image(self, path: str, subject_id: str | None = None, version: int | None = None,
                      purpose: str | None = None) -> Template:
        """Detect, align and embed a face image with ``engine.face`` on the device, then protect it."""
        from ..face import embed_image  # noqa: PLC0415 - optional, heavy (onnxruntime)
        return self.protect(subject_id, embed_image(path), version, purpose)

    # -- calls -------------------------------------------------------------------------
    def _report(self, ticket: str, matched: bool, threshold: float, candidates: int = 0):
        """Tell the matcher the key holder's decision (boolean only) for its audit log."""
        try:
            return self._call("ReportDecision", pb.ReportDecisionRequest(
                decision_ticket=ticket, matched=matched, candidates=candidates, threshold=threshold,
                device_id=self.device_id, tenant=self.tenant))
        except ServiceError:
            return None

    def record_consent(self, subject_id: str, notice_version: str, subject_age: int,
                       purpose: str | None = None, off_device: OffDeviceTerms | bool | None = None,
                       **kw) -> pb.ConsentRecord:
        """Record the subject's separate consent for ``purpose`` (not retried: each call is a record).

        ``off_device``: the separate off-device-storage consent recorded with it -- terms, or
        None for this client's ``off_device`` terms, or False for none (the subject declined)."""
        terms = (self.off_device if off_device is None or off_device is True else off_device) or None
        return self._call("RecordConsent", consent_request(
            subject_id=subject_id, purpose=purpose or self.purpose, notice_version=notice_version,
            subject_age=subject_age, device_id=self.device_id, tenant=self.tenant, off_device=terms, **kw))

    def enroll(self, subject_id: str, embedding=None, consent_id: str = "", purpose: str | None = None,
               template: Template | None = None, request_id: str | None = None,
               retention_days: int = 0) -> pb.EnrollResponse:
        """Protect ``embedding`` locally and enrol it. ``request_id`` makes retries idempotent
        (a fresh UUID is used when omitted; pass your own to retry safely across calls)."""
        purpose = purpose or self.purpose
        t = template if template is not None else self.protect(subject_id, embedding, purpose=purpose)
        r = self._call("Enroll", pb.EnrollRequest(
            request_id=request_id or uuid.uuid4().hex, subject_id=subject_id, template=t.to_bytes(),
            consent_id=consent_id, purpose=purpose, device_id=self.device_id,
            retention_days=retention_days, tenant=self.tenant))
        self.protection.note_enrolled(subject_id, r.key_version)
        return r

    def verify(self, subject_id: str, embedding=None, purpose: str | None = None,
               template: Template | None = None, threshold: float = 0.0) -> VerifyResult:
        """1:1. For ``he`` the matcher returns an encrypted score; the key holder decides here
        (against ``threshold`` or the server's) and the decision is reported for the audit log."""
        purpose = purpose or self.purpose
        t = template if template is not None else self.protect_probe(subject_id, embedding, purpose=purpose)
        r = self._call("Verify", pb.VerifyRequest(subject_id=subject_id, probe=t.to_bytes(), purpose=purpose,
                                                  device_id=self.device_id, threshold=threshold,
                                                  tenant=self.tenant))
        return self.protection.verify_result(r, threshold, self._report)

    def identify(self, embedding=None, top_k: int = 5, purpose: str | None = None, threshold: float = 0.0,
                 templates: list[Template] | None = None) -> list[tuple[str, float]]:
        """1:N: probes under every key version in use, merged best first. [] = no match."""
        purpose = purpose or self.purpose
        if templates is None:
            templates = self.protection.identify_probes(embedding, purpose)
        hits: dict[str, float] = {}
        for t in templates:
            r = self._call("Identify", pb.IdentifyRequest(probe=t.to_bytes(), purpose=purpose, device_id=self.device_id,
                                                          top_k=top_k, threshold=threshold, tenant=self.tenant))
            for sid, score in self.protection.identify_hits(r, top_k, threshold, self._report):
                hits[sid] = max(score, hits.get(sid, float("-inf")))
        return sorted(hits.items(), key=lambda kv: -kv[1])[:top_k]

    def withdraw(self, subject_id: str) -> pb.WithdrawResponse:
        """Consent withdrawal: the server deletes everything; the device moves the subject
        past the destroyed key version so it can never be used again. Not retried
        automatically; after UNAVAILABLE calling it again is safe (it answers with zero counts)."""
        r = self._call("Withdraw", pb.WithdrawRequest(subject_id=subject_id, device_id=self.device_id,
                                                      tenant=self.tenant))
        self.versions.set(subject_id, max(r.destroyed_key_version, self.versions.get(subject_id)) + 1)
        self.versions.enrolled(subject_id, None)
        return r

    # -- measures: off-device consent --------------------------------------------------
    def withdraw_off_device_consent(self, subject_id: str, purpose: str = "") -> pb.WithdrawOffDeviceConsentResponse:
        """Withdraw only the off-device-storage consent ("" = every purpose): the matcher deletes its
        copy; the subject's consent to face processing (and an edge copy) may remain."""
        return self._call("WithdrawOffDeviceConsent", pb.WithdrawOffDeviceConsentRequest(
            subject_id=subject_id, purpose=purpose, device_id=self.device_id, tenant=self.tenant))

    def revoke(self, subject_id: str, key_version: int = 0) -> pb.RevokeResponse:
        """Re-key: invalidate the current (or given) key version; later protections use the next."""
        r = self._call("Revoke", pb.RevokeRequest(subject_id=subject_id, key_version=key_version,
                                                  device_id=self.device_id, tenant=self.tenant))
        self.versions.set(subject_id, r.next_key_version)
        self.versions.enrolled(subject_id, None)
        return r

    # -- api: named galleries and samples (docs/api-model.md) ------------------------------------------
    def _gallery_purpose(self, gallery: str) -> str:
        """The purpose of a named gallery (asked once): transform keys are derived per purpose."""
        cache = self.__dict__.setdefault("_gallery_purposes", {})
        if gallery not in cache:
            cache[gallery] = self.describe_gallery(gallery).purpose
        return cache[gallery]

    def add_sample(self, gallery: str, subject_id: str, embedding=None, consent_id: str = "",
                   template: Template | None = None, request_id: str | None = None,
                   retention_days: int = 0) -> pb.Sample:
        """Protect ``embedding`` locally and add it as one more sample of ``subject_id`` in a named
        gallery (an enrolment: ``consent_id`` for the gallery's purpose). IndexFaces / add example."""
        purpose = self._gallery_purpose(gallery)
        t = template if template is not None else self.protect(subject_id, embedding, purpose=purpose)
        r = self._call("AddSample", pb.AddSampleRequest(
            request_id=request_id or uuid.uuid4().hex, gallery=gallery, subject_id=subject_id,
            template=t.to_bytes(), consent_id=consent_id, device_id=self.device_id,
            retention_days=retention_days, tenant=self.tenant))
        self.protection.note_enrolled(subject_id, r.key_version)
        return r

    def delete_sample(self, gallery: str, subject_id: str, sample_id: str) -> pb.DeleteSampleResponse:
        return self._call("DeleteSample", pb.DeleteSampleRequest(gallery=gallery, subject_id=subject_id,
                                                                 sample_id=sample_id, device_id=self.device_id,
                                                                 tenant=self.tenant))

    def verify_in_gallery(self, gallery: str, subject_id: str, embedding=None, template: Template | None = None,
                          threshold: float = 0.0) -> pb.GalleryVerifyResponse:
        """1:1 against the subject's samples in the gallery (the best sample decides)."""
        purpose = self._gallery_purpose(gallery)
        t = template if template is not None else self.protect_probe(subject_id, embedding, purpose=purpose)
        return self._call("GalleryVerify", pb.GalleryVerifyRequest(
            gallery=gallery, subject_id=subject_id, probe=t.to_bytes(), device_id=self.device_id,
            threshold=threshold, tenant=self.tenant))

    def search_gallery(self, gallery: str, embedding=None, top_k: int = 5, threshold: float = 0.0,
                       templates: list[Template] | None = None) -> list[tuple[str, float, str]]:
        """1:N in a named gallery: ``[(subject_id, score, best sample_id)]`` best first, one per
        subject (probes under every key version in use, merged). SearchFacesByImage / recognize."""
        purpose = self._gallery_purpose(gallery)
        if templates is None:
            templates = self.protection.identify_probes(embedding, purpose)
        hits: dict[str, tuple[float, str]] = {}
        for t in templates:
            r = self._call("GallerySearch", pb.GallerySearchRequest(
                gallery=gallery, probe=t.to_bytes(), device_id=self.device_id, top_k=top_k, threshold=threshold,
                tenant=self.tenant))
            for c in r.candidates:
                if c.subject_id not in hits or c.score > hits[c.subject_id][0]:
                    hits[c.subject_id] = (c.score, c.sample_id)
        return sorted(((s, sc, sid) for s, (sc, sid) in hits.items()), key=lambda h: -h[1])[:top_k]
