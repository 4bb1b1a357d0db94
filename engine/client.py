"""Python clients of the Veilface matching service.

* :class:`DeviceClient` -- the device SDK: takes an embedding (or an image, via
  ``engine.face``), protects it **on the device** with the subject's key (derived locally
  with :class:`engine.keys.KeyDeriver`; keys never leave this process) and calls the service.
* :class:`OperatorClient` -- operator / auditor / admin calls (devices, listing, audit log,
  compliance report, purge, decommission).

Errors come back as :class:`ServiceError` with the gRPC ``code`` and the server's
machine-readable ``reason``.

Encrypted (``he``) templates: pass ``scheme="he:dim=128,mode=verify"`` and the device's
:class:`engine.he.KeyHolder` (``key_holder=``; 1:1, the device decrypts and decides), or
``scheme="he:dim=128,mode=identify"`` with the public device context (``he_context=``) and a
decider (``key_holder=``/``decider=``: anything with ``decide(blob, k, threshold)``). The
matcher only ever returns encrypted scores; the SDK hands them to the key holder, then reports
the decision (a boolean, never a score) with ``ReportDecision`` for the audit log.

Key scopes: with ``key_scope="purpose"`` (default) a subject's template is protected with the
purpose's group key of the subject's key version, so a probe of an unknown person can be
searched 1:N (one probe per key version in use). With ``key_scope="subject"`` every subject
has its own key (strongest unlinkability), which supports 1:1 verification only.
"""
from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from ._proto.veilface.v1 import matcher_pb2 as pb
from ._proto.veilface.v1 import matcher_pb2_grpc as pb_grpc
from .errors import REASON_KEY, VeilfaceError
from .keys import KeyDeriver
from .schemes import make_scheme
from .template import Template

DEFAULT_TIMEOUT = 10.0
LocationClass = pb.LocationClass


class ServiceError(VeilfaceError):
    """A failed call: ``code`` (grpc.StatusCode), ``reason`` (machine-readable), message."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code, self.reason, self.details = code, reason, message

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> ServiceError:
        reason = ""
        for k, v in (err.trailing_metadata() or ()):
            if k == REASON_KEY:
                reason = v
        code = err.code()
        details = err.details() or ""
        if reason and details.startswith(reason + ": "):
            details = details[len(reason) + 2:]
        return cls(code, reason or code.name, details)


def channel(target: str, tls_ca: str | bytes | None = None, client_cert: str | bytes | None = None,
            client_key: str | bytes | None = None, server_name: str | None = None,
            max_message_bytes: int = 4 << 20, max_receive_bytes: int = 64 << 20) -> grpc.Channel:
    """A channel to ``target``; TLS when ``tls_ca`` is given (mTLS with cert + key).

    ``max_message_bytes`` caps what this client sends (the server enforces its own
    ``max_message_bytes``); ``max_receive_bytes`` admits large encrypted 1:N results
    (~16-30 bytes per stored template)."""
    opts = [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max(max_message_bytes, max_receive_bytes))]
    if tls_ca is None:
        return grpc.insecure_channel(target, options=opts)

    def read(x):
        return None if x is None else (x if isinstance(x, bytes) else Path(x).read_bytes())
    creds = grpc.ssl_channel_credentials(read(tls_ca), read(client_key), read(client_cert))
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, creds, options=opts)


class _Base:
    def __init__(self, target: str | grpc.Channel, token: str, timeout: float = DEFAULT_TIMEOUT,
                 **tls) -> None:
        self._own = isinstance(target, str)
        self.channel = channel(target, **tls) if isinstance(target, str) else target
        self.stub = pb_grpc.MatcherStub(self.channel)
        self._md = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout

    def _call(self, method: str, request, timeout: float | None = None):
        try:
            return getattr(self.stub, method)(request, metadata=self._md,
                                              timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise ServiceError.from_rpc(err) from None

    def close(self) -> None:
        if self._own:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def compliance_report(self, tenant: str = "") -> dict:
        """The compliance report as a dict (operator, auditor, admin)."""
        return json.loads(self._call("ComplianceReport", pb.ComplianceReportRequest(tenant=tenant)).report_json)

    def list_he_contexts(self, purpose: str = "", tenant: str = "") -> list:
        """Current public HE contexts (epoch, fingerprint, mode, template count); no key material."""
        return list(self._call("ListHEContexts", pb.ListHEContextsRequest(
            tenant=tenant or getattr(self, "tenant", ""), purpose=purpose)).contexts)


class OperatorClient(_Base):
    """Operator, auditor and admin calls (what a role may call is enforced by the server)."""

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
        return self._call("RecordConsent", _consent_request(**kw))

    def purge_expired(self) -> pb.PurgeExpiredResponse:
        return self._call("PurgeExpired", pb.PurgeExpiredRequest())

    def decommission(self, reason: str = "", confirm: str = "DECOMMISSION") -> pb.DecommissionResponse:
        return self._call("Decommission", pb.DecommissionRequest(confirm=confirm, reason=reason),
                          timeout=max(self.timeout, 120))

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


def _public_context_bytes(context, eval_keys: bool) -> bytes:
    if isinstance(context, (bytes, bytearray, memoryview)):
        return bytes(context)
    if getattr(context, "is_private", lambda: False)():   # a KeyHolder: send its public half only
        return context.public_context(eval_keys=eval_keys).to_bytes()
    return context.to_bytes()


def _consent_request(subject_id: str, purpose: str, notice_version: str, subject_age: int,
                     separate_consent: bool = True, guardian_ref: str = "", guardian_relationship: str = "",
                     device_id: str = "", tenant: str = "", consented_at: float = 0.0) -> pb.RecordConsentRequest:
    req = pb.RecordConsentRequest(subject_id=subject_id, purpose=purpose, notice_version=notice_version,
                                  separate_consent=separate_consent, subject_age=subject_age,
                                  device_id=device_id, tenant=tenant, consented_at=consented_at)
    if guardian_ref:
        req.guardian.CopyFrom(pb.GuardianConsent(guardian_ref=guardian_ref, relationship=guardian_relationship))
    return req


@dataclass
class VerifyResult:
    matched: bool
    score: float
    threshold: float
    fallback_required: bool
    fallback_methods: list
    fallback_message: str
    encrypted: bool = False      # he: decided on the device by the key holder
    decision_audited: bool = True  # he: the decision report reached the matcher's audit log


class KeyVersions:
    """The device's record of each subject's current key version and of the versions its
    enrolled subjects use (optionally persisted as JSON). Versions only go up: revocation and
    withdrawal move a subject to a fresh version."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else None
        self._v: dict[str, int] = {}
        self._enrolled: dict[str, int] = {}
        self._lock = threading.Lock()
        if self.path and self.path.exists():
            data = json.loads(self.path.read_text())
            self._v = {k: int(v) for k, v in data.get("current", {}).items()}
            self._enrolled = {k: int(v) for k, v in data.get("enrolled", {}).items()}

    def get(self, subject: str) -> int:
        with self._lock:
            return self._v.get(subject, 1)

    def set(self, subject: str, version: int) -> None:
        with self._lock:
            self._v[subject] = max(int(version), self._v.get(subject, 1))
            self._save()

    def enrolled(self, subject: str, version: int | None) -> None:
        """Record that ``subject`` is enrolled under ``version`` (None: no longer enrolled)."""
        with self._lock:
            if version is None:
                self._enrolled.pop(subject, None)
            else:
                self._enrolled[subject] = int(version)
            self._save()

    def in_use(self) -> list[int]:
        """Key versions of currently enrolled subjects (1:N needs one probe per version)."""
        with self._lock:
            return sorted(set(self._enrolled.values())) or [1]

    def _save(self) -> None:
        if self.path:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"current": self._v, "enrolled": self._enrolled}))
            os.replace(tmp, self.path)


class DeviceClient(_Base):
    """The device SDK. Protection happens here; the service only ever sees templates.

    Parameters
    ----------
    target, token : service address and this device's role token
    device_id : the registered device this SDK runs on
    deriver : :class:`KeyDeriver` holding the tenant master secret (device keystore)
    scheme : factory string, e.g. ``"biohash:bits=256,dim=128"``
    purpose : default purpose of this device's calls
    key_scope : ``"purpose"`` (1:N-capable group keys per key version) or ``"subject"``
    key_holder : ``he`` only -- :class:`engine.he.KeyHolder`. Verify mode: the device's own key
        holder (encrypts with its public half, decrypts the score and decides). Identify mode:
        the decider (or pass ``decider=``); ``he_context`` then defaults to its public half.
    he_context : ``he`` only -- the public (device) context to encrypt with, when the key holder
        is elsewhere (identify mode). Get it from the key holder, not from the matcher.
    decider : ``he`` identify mode -- any object with ``decide(blob, k, threshold) -> [Match]``
        (e.g. a client of a remote decider service); defaults to ``key_holder``.
    """

    def __init__(self, target, token: str, device_id: str, deriver: KeyDeriver | None = None,
                 scheme: str = "biohash:bits=256,dim=128", purpose: str = "access_control",
                 key_scope: str = "purpose", tenant: str = "", versions: KeyVersions | None = None,
                 timeout: float = DEFAULT_TIMEOUT, key_holder=None, he_context=None, decider=None,
                 **tls) -> None:
        super().__init__(target, token, timeout, **tls)
        if key_scope not in ("purpose", "subject"):
            raise ValueError("key_scope must be 'purpose' or 'subject'")
        self.device_id, self.deriver, self.purpose = device_id, deriver, purpose
        self.scheme = make_scheme(scheme)
        self.key_scope, self.tenant = key_scope, tenant
        self.versions = versions or KeyVersions()
        self.encrypted = bool(getattr(self.scheme, "encrypted", False))
        self.key_holder = self.decider = self._he_ctx = None
        if self.encrypted:
            self.set_he_keys(key_holder=key_holder, he_context=he_context, decider=decider)
        elif deriver is None:
            raise ValueError(f"scheme {self.scheme.name!r} needs a KeyDeriver (deriver=)")

    # -- HE key material (device side) ----------------------------------------------------
    def set_he_keys(self, key_holder=None, he_context=None, decider=None) -> None:
        """(Re)configure HE material, e.g. after a rotation: ``key_holder`` (secret, stays on this
        device / decider), ``he_context`` (public device context or its bytes), ``decider``."""
        if not self.encrypted:
            raise ValueError("set_he_keys is for the he scheme")
        self.key_holder = key_holder
        self.decider = decider or key_holder
        if he_context is None and key_holder is not None:
            he_context = key_holder.public_context(eval_keys=False)
        if isinstance(he_context, (bytes, bytearray, memoryview)):
            from .he import PublicContext
            he_context = PublicContext.from_bytes(bytes(he_context))
        if he_context is not None and he_context.is_private():
            raise ValueError("he_context must be a public context")
        self._he_ctx = he_context

    def _require_he_ctx(self):
        if self._he_ctx is None:
            raise ValueError("the he scheme needs key_holder= or he_context= (the public context)")
        return self._he_ctx

    def _report(self, ticket: str, matched: bool, threshold: float, candidates: int = 0):
        """Tell the matcher the key holder's decision (boolean only) for its audit log."""
        try:
            return self._call("ReportDecision", pb.ReportDecisionRequest(
                decision_ticket=ticket, matched=matched, candidates=candidates, threshold=threshold,
                device_id=self.device_id, tenant=self.tenant))
        except ServiceError:
            return None

    # -- protection (local) ------------------------------------------------------------
    def _key(self, subject: str | None, version: int, purpose: str) -> bytes:
        owner = f"group.{purpose}" if self.key_scope == "purpose" else subject
        if owner is None:
            raise ValueError("1:N identification needs key_scope='purpose'")
        return self.deriver.derive(owner, version, self.scheme.spec)

    def protect(self, subject_id: str | None, embedding, version: int | None = None,
                purpose: str | None = None) -> Template:
        """Protect one embedding ``(dim,)`` float for ``subject_id`` at its current key version."""
        purpose = purpose or self.purpose
        if self.encrypted:   # public-key encryption under the current epoch: no per-subject key
            return self.scheme.protect(self._require_he_ctx(), embedding)
        v = version if version is not None else (self.versions.get(subject_id) if subject_id else 1)
        return self.scheme.protect(self._key(subject_id, v, purpose), embedding, key_version=v)

    def protect_probe(self, subject_id: str | None, embedding, version: int | None = None,
                      purpose: str | None = None) -> Template:
        """A probe: :meth:`protect` for cancellable schemes; the probe layout for ``he``."""
        if self.encrypted:
            return self.scheme.protect_probe(self._require_he_ctx(), embedding)
        return self.protect(subject_id, embedding, version, purpose)

    def protect_image(self, path: str, subject_id: str | None = None, version: int | None = None,
                      purpose: str | None = None) -> Template:
        """Detect, align and embed a face image with ``engine.face`` on the device, then protect it."""
        from .face import embed_image  # noqa: PLC0415 - optional, heavy (onnxruntime)
        return self.protect(subject_id, embed_image(path), version, purpose)

    # -- calls -------------------------------------------------------------------------
    def record_consent(self, subject_id: str, notice_version: str, subject_age: int,
                       purpose: str | None = None, **kw) -> pb.ConsentRecord:
        return self._call("RecordConsent", _consent_request(
            subject_id=subject_id, purpose=purpose or self.purpose, notice_version=notice_version,
            subject_age=subject_age, device_id=self.device_id, tenant=self.tenant, **kw))

    def enroll(self, subject_id: str, embedding=None, consent_id: str = "", purpose: str | None = None,
               template: Template | None = None, request_id: str | None = None,
               retention_days: int = 0) -> pb.EnrollResponse:
        """Protect ``embedding`` locally and enrol it. ``request_id`` makes retries idempotent
        (a fresh UUID is used when omitted; pass your own to retry safely)."""
        purpose = purpose or self.purpose
        t = template if template is not None else self.protect(subject_id, embedding, purpose=purpose)
        r = self._call("Enroll", pb.EnrollRequest(
            request_id=request_id or uuid.uuid4().hex, subject_id=subject_id, template=t.to_bytes(),
            consent_id=consent_id, purpose=purpose, device_id=self.device_id,
            retention_days=retention_days, tenant=self.tenant))
        if not self.encrypted:   # an HE key version is the tenant epoch, not the subject's version
            self.versions.enrolled(subject_id, r.key_version)
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
        if not r.encrypted:
            return VerifyResult(r.matched, r.score, r.threshold, r.fallback.required, list(r.fallback.methods),
                                r.fallback.message)
        if self.key_holder is None:
            raise ValueError("an encrypted verify is decided by the device's KeyHolder (key_holder=)")
        thr = threshold or r.threshold
        matched, score = self.key_holder.verify_decision(r.encrypted_score, thr)
        rep = self._report(r.decision_ticket, matched, thr)
        fb = rep.fallback if rep is not None else r.fallback   # the report's answer is definitive
        required = fb.required if rep is not None else not matched
        return VerifyResult(matched, score, thr, required, list(fb.methods), fb.message,
                            encrypted=True, decision_audited=rep is not None)

    def identify(self, embedding=None, top_k: int = 5, purpose: str | None = None, threshold: float = 0.0,
                 templates: list[Template] | None = None) -> list[tuple[str, float]]:
        """1:N: probes under every key version in use, merged best first. [] = no match."""
        purpose = purpose or self.purpose
        if templates is None:
            if self.encrypted:   # one probe under the current epoch
                templates = [self.protect_probe(None, embedding, purpose=purpose)]
            else:
                templates = [self.protect(None, embedding, version=v, purpose=purpose)
                             for v in self.versions.in_use()]
        hits: dict[str, float] = {}
        for t in templates:
            r = self._call("Identify", pb.IdentifyRequest(probe=t.to_bytes(), purpose=purpose, device_id=self.device_id,
                                                          top_k=top_k, threshold=threshold, tenant=self.tenant))
            for c in r.candidates:
                hits[c.subject_id] = max(c.score, hits.get(c.subject_id, float("-inf")))
            if r.encrypted:
                if self.decider is None:
                    raise ValueError("an encrypted 1:N result is decided by the key holder (key_holder= or decider=)")
                thr = threshold or r.threshold
                matches = self.decider.decide(r.encrypted_scores, k=top_k, threshold=thr)
                self._report(r.decision_ticket, bool(matches), thr, candidates=len(matches))
                for m in matches:
                    hits[m.subject_id] = max(float(m.score), hits.get(m.subject_id, float("-inf")))
        return sorted(hits.items(), key=lambda kv: -kv[1])[:top_k]

    def withdraw(self, subject_id: str) -> pb.WithdrawResponse:
        """Consent withdrawal: the server deletes everything; the device moves the subject
        past the destroyed key version so it can never be used again."""
        r = self._call("Withdraw", pb.WithdrawRequest(subject_id=subject_id, device_id=self.device_id,
                                                      tenant=self.tenant))
        self.versions.set(subject_id, max(r.destroyed_key_version, self.versions.get(subject_id)) + 1)
        self.versions.enrolled(subject_id, None)
        return r

    def revoke(self, subject_id: str, key_version: int = 0) -> pb.RevokeResponse:
        """Re-key: invalidate the current (or given) key version; later protections use the next."""
        r = self._call("Revoke", pb.RevokeRequest(subject_id=subject_id, key_version=key_version,
                                                  device_id=self.device_id, tenant=self.tenant))
        self.versions.set(subject_id, r.next_key_version)
        self.versions.enrolled(subject_id, None)
        return r
