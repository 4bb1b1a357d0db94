"""The device SDK: protects captures on the device, then calls the matcher.

The client itself only makes calls and keeps the device's key-version bookkeeping; how a
capture is protected and how an answer is read belong to its :class:`Protection` strategy
(cancellable transform or HE encryption, :mod:`engine.client.protection`), and keys come from
a :class:`KeySource` (:mod:`engine.client.keys`) -- in a deployment the key service
(``keyservice=``), one key per transaction, never a master secret held here.
"""
from __future__ import annotations

import uuid

from .._proto.veilface.v1 import matcher_pb2 as pb
from ..keys import KeyDeriver
from ..schemes import make_scheme
from ..template import Template
from .base import DEFAULT_TIMEOUT, BaseClient, OffDeviceTerms, consent_request
from .keys import KeyServiceKeys, KeySource, KeyVersions, as_key_source
from .protection import HEProtection, Protection, VerifyResult, make_protection


class DeviceClient(BaseClient):
    """The device SDK. Protection happens here; the service only ever sees templates.

    Parameters
    ----------
    target, token : service address(es) and this device's role token (several addresses:
        a list or ``"a:1,b:2"``, see :func:`engine.client.channel`)
    device_id : the registered device this SDK runs on
    deriver : where transform keys come from when not from the key service: a
        :class:`engine.client.KeySource`, or a :class:`engine.keys.KeyDeriver` (a master secret on
        the device: edge devices, tests -- a stolen device then exposes every subject)
    scheme : factory string, e.g. ``"biohash:bits=256,dim=128"``
    purpose : default purpose of this device's calls
    key_scope : ``"subject"`` (per-subject keys, 1:1) or ``"purpose"`` (group keys: the fast
        cancellable 1:N mode, which the key service enables per purpose)
    tenant : tenant of every call ("" = the server's default)
    versions : :class:`KeyVersions` (pass one with a path to persist it)
    timeout : default deadline of a call in seconds, retries included
    keyservice : a :class:`engine.keyservice.client.KeyServiceClient` with this device's key-service
        token and the pinned verification key: per-transaction keys (cancellable schemes, when no
        ``deriver`` is given), the signed public HE context, decision grants, and the check of
        every HE decision.
    key_holder, he_context : ``he`` only -- a public context to encrypt with instead of the key
        service's (a key holder's public half); the SDK never decrypts.
    decider : removed (issue 9): HE decisions come from the key service; passing one is an error.
    off_device : :class:`OffDeviceTerms` -- the off-device-storage notice of this device's consent
        flow (a central matcher stores templates only with that separate consent). When set,
        :meth:`record_consent` records the subject's agreement to it unless called with
        ``off_device=False`` (the subject did not tick it); like ``separate_consent``, the SDK
        relies on the application to have obtained it.
    **channel_options : ``tls_ca``, ``client_cert``, ``client_key``, ``server_name``, ``retry``,
        ``lb_policy``, message sizes (:func:`engine.client.channel`).
    """

    def __init__(self, target, token: str, device_id: str, deriver: KeyDeriver | KeySource | None = None,
                 scheme: str = "biohash:bits=256,dim=128", purpose: str = "access_control",
                 key_scope: str = "purpose", tenant: str = "", versions: KeyVersions | None = None,
                 timeout: float = DEFAULT_TIMEOUT, key_holder=None, he_context=None, decider=None,
                 keyservice=None, off_device: OffDeviceTerms | None = None, **channel_options) -> None:
        if decider is not None:
            raise ValueError("decider= was removed: encrypted matches are decided by the key service (keyservice=)")
        self.device_id, self.purpose, self.tenant = device_id, purpose, tenant
        self.off_device = off_device or None
        self.scheme = make_scheme(scheme)
        self.key_scope = key_scope
        self.versions = versions or KeyVersions()
        self.keyservice = keyservice
        source = as_key_source(deriver)
        if source is None and keyservice is not None:
            source = KeyServiceKeys(keyservice, tenant, device_id)
        self.protection: Protection = make_protection(self.scheme, source, key_scope, self.versions,
                                                      key_holder=key_holder, he_context=he_context,
                                                      keyservice=keyservice, tenant=tenant, device_id=device_id)
        if self.protection.needs_replica_affinity:
            channel_options.setdefault("lb_policy", "pick_first")
        super().__init__(target, token, timeout, **channel_options)

    @property
    def encrypted(self) -> bool:
        return self.protection.encrypted

    def set_he_keys(self, key_holder=None, he_context=None, keyservice=None) -> None:
        """(Re)configure HE material, e.g. after a rotation: ``he_context`` (public device context or
        its bytes) or ``key_holder`` (its public half), ``keyservice``."""
        self.keyservice = keyservice or self.keyservice
        self.protection = HEProtection(self.scheme, key_holder, he_context, self.keyservice, self.tenant,
                                       self.device_id)

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
        """1:1. For ``he`` the key service decides (signed, checked here against its pinned key);
        ``score`` is NaN then: no score leaves the key service."""
        purpose = purpose or self.purpose
        t = template if template is not None else self.protect_probe(subject_id, embedding, purpose=purpose)
        probe = t.to_bytes()
        grant = self.protection.grant("verify", probe, subject_id, purpose)
        r = self._call("Verify", pb.VerifyRequest(subject_id=subject_id, probe=probe, purpose=purpose,
                                                  device_id=self.device_id, threshold=threshold,
                                                  tenant=self.tenant, decision_grant=grant))
        return self.protection.verify_result(r, threshold, grant, probe, subject_id, purpose)

    def identify(self, embedding=None, top_k: int = 5, purpose: str | None = None, threshold: float = 0.0,
                 templates: list[Template] | None = None) -> list[tuple[str, float]]:
        """1:N with one probe (the current key version / HE epoch): [(subject_id, score)] best
        first (``he``: the ids the key service released, score NaN). [] = no match."""
        purpose = purpose or self.purpose
        if templates is None:
            templates = self.protection.identify_probes(embedding, purpose)
        hits: list[tuple[str, float]] = []
        for t in templates:
            probe = t.to_bytes()
            grant = self.protection.grant("identify", probe, "", purpose)
            r = self._call("Identify", pb.IdentifyRequest(probe=probe, purpose=purpose, device_id=self.device_id,
                                                          top_k=top_k, threshold=threshold, tenant=self.tenant,
                                                          decision_grant=grant))
            hits.extend(self.protection.identify_hits(r, top_k, threshold, grant, probe, purpose))
        return hits[:top_k]

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
        subject (one probe under the current key version: a capture is never sent under two). SearchFacesByImage /
        recognize."""
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
