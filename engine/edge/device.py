"""``EdgeDevice``: the engine embedded on the capture device -- the default single-site deployment.

The device runs the very matcher code in process (:class:`engine.service.app.MatcherApp` with
``deployment = "edge"``: the SQLite store, the gallery index with local matching, the consent /
enrolment / matching / withdrawal / retention use cases, the hash-chained audit log) over a store
in its own data directory, and protects captures with its own key material
(:mod:`engine.edge.keystore`). Nothing that is face information -- image, embedding or protected
template -- leaves it: there is no network code here. What the operator's central service gets
is :meth:`EdgeDevice.oversight_bundles`: signed audit entries, consent / withdrawal events,
decisions, counts and the stored subject ids (:mod:`engine.edge.uplink`).

Every call leaves one audit entry and raises the typed errors a gRPC client would see (a
:class:`engine.service.status.StatusError` with the status ``code`` name and the ``reason``), because it goes through the same scope and
use cases as an RPC (:meth:`EdgeDevice._call` mirrors the servicer's audit-and-map wrapper).
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..client.keys import KeySource, KeyVersions, as_key_source
from ..client.protection import CancellableProtection
from ..keys import KeyDeriver
from ..schemes import make_scheme
from ..service import policy
from ..service.app import MatcherApp
from ..service.audit import AuditEvent, ChainReport
from ..service.auth import Principal
from ..service.clock import Clock, SystemClock
from ..service.config import ServiceConfig
from ..service.lock import DataDirLock
from ..service.oversight import MAX_ENTRIES, MAX_PERSONS_DELTA, fingerprint, public_key_bytes
from ..service.status import AlreadyExists, BadRequest, StatusError, classify
from ..service.store import OutboxRow, open_store
from ..service.usecases.assessments import AssessmentInfo
from ..service.usecases.devices import DeviceRegistration
from ..service.usecases.enrolment import EnrolRequest, EnrolResult
from ..service.usecases.lifecycle import ConsentRecord, ConsentRequest, Guardian, Revoked, Withdrawn
from ..service.usecases.maintenance import PurgeResult
from ..service.usecases.matching import IdentifyRequest, VerifyRequest, VerifyResult
from ..service.usecases.termination import CancellationInfo
from . import keystore, uplink

VERSIONS_FILE = "key-versions.json"
DEVICE_FILE = "edge-device.json"


class EdgeDevice:
    """The on-device engine over ``data_dir`` (created on first use).

    Parameters
    ----------
    data_dir : the device's own directory: store, key material, key versions
    device_id : this device's (pseudonymous) id; a store belongs to one device
    tenant, purpose : defaults of every call
    scheme : cancellable scheme factory string (encrypted ``he`` schemes belong to a central
        matcher: on the device the key holder and the matcher would be one party)
    location_class, location_kind, signage : where the device is (``policy.PUBLIC_PLACE`` needs
        signage; a private space cannot enrol or identify), registered in its store on first use
    keys : a :class:`engine.client.KeySource` or :class:`engine.keys.KeyDeriver` (a hardware
        keystore); default: the per-device master secret in ``data_dir`` (:mod:`.keystore`)
    clock : time source (tests: ``ManualClock``); ``background``: run the retention thread
    **settings : :class:`engine.service.config.ServiceConfig` fields (retention, thresholds, ...)
    """

    def __init__(self, data_dir: str | Path, device_id: str, *, tenant: str = "default",
                 purpose: str = "access_control", scheme: str = "biohash:bits=256,dim=128",
                 location_class: int = policy.RESTRICTED_AREA, location_kind: str = "", signage: bool = False,
                 keys: KeyDeriver | KeySource | None = None, clock: Clock | None = None, background: bool = False,
                 **settings: Any) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.device_id = policy.check_id("device id", device_id)
        self.tenant = policy.tenant_of(tenant)
        self.purpose = policy.check_purpose(purpose)
        self._bind_store()
        self.scheme = make_scheme(scheme)
        if self.scheme.encrypted:
            raise BadRequest("an edge device uses a cancellable scheme: with HE the device would hold the secret "
                             "key and the ciphertexts together", reason="SCHEME_NOT_ALLOWED")
        self.cfg = ServiceConfig(data_dir=str(self.data_dir), deployment="edge", **settings).validate()
        self.clock = clock or SystemClock()
        # one engine per data dir (its galleries are in this process): the same lock as `veilface serve`
        self._lock = DataDirLock(self.data_dir, what=f"engine.edge.EdgeDevice {self.device_id}").acquire()
        try:
            self.store = open_store(self.data_dir, self.clock)
            self.app = MatcherApp(self.cfg, self.store, self.clock)
        except BaseException:
            self._lock.release()
            raise
        self.versions = KeyVersions(self.data_dir / VERSIONS_FILE)
        source = as_key_source(keys) or as_key_source(KeyDeriver(keystore.master_secret(self.data_dir), self.tenant))
        self.protection = CancellableProtection(self.scheme, source, "purpose", self.versions)
        self._signing = keystore.signing_key(self.data_dir)
        self._outbox_lock = threading.Lock()
        self._device = Principal("device", self.device_id, self.device_id)
        self._console = Principal("operator", f"{self.device_id}-console")
        if self.app.device_registry.location_class(self.tenant, self.device_id) is None:
            self._call("RegisterDevice", self._console, lambda s: self.app.devices.register(s, DeviceRegistration(
                self.device_id, location_class, location_kind, signage)), writes=True)
        if background:
            self.app.start_background()

    def _bind_store(self) -> None:
        """A data directory belongs to one device (its keys and chain are that device's)."""
        path = self.data_dir / DEVICE_FILE
        if path.exists():
            found = json.loads(path.read_text())
            if found.get("device_id") != self.device_id or found.get("tenant") != self.tenant:
                raise AlreadyExists(f"{self.data_dir} belongs to device {found.get('tenant')}/{found.get('device_id')}",
                                    reason="DEVICE_MISMATCH")
        else:
            path.write_text(json.dumps({"device_id": self.device_id, "tenant": self.tenant}))

    # -- the call wrapper ---------------------------------------------------------------------------
    def _call(self, action: str, principal: Principal, fn: Callable, **parts):
        """Run ``fn(scope)`` like an RPC: scope checks, one audit entry, typed errors."""
        ev = AuditEvent(action, principal.role, principal.name)
        try:
            scope = self.app.scopes.open(ev, principal, tenant=self.tenant, **parts)
            out = fn(scope)
            if not ev.written:
                self.app.audit(ev, "OK")
            return out
        except Exception as exc:
            code, reason, msg = classify(exc)
            ev.details = {k: v for k, v in ev.details.items() if k in ("scheme", "key_version")}
            self.app.audit(ev, code, reason)
            if isinstance(exc, StatusError):
                raise
            err = StatusError(msg, reason)      # one error type with a code, as a gRPC client sees it
            err.code = code
            raise err from exc

    def _subject_call(self, action: str, subject: str, purpose: str | None, fn: Callable, op: str | None = None,
                      writes: bool = False):
        return self._call(action, self._device, fn, subject=subject, purpose=purpose or self.purpose,
                          device=self.device_id, device_op=op, writes=writes)

    # -- records ------------------------------------------------------------------------------------
    def register_assessment(self, document: bytes | str | dict) -> AssessmentInfo:
        """Register the impact assessment of a purpose on this device (``deployment.mode`` "edge")."""
        data = json.dumps(document) if isinstance(document, dict) else document
        data = data.encode() if isinstance(data, str) else bytes(data)
        return self._call("RegisterImpactAssessment", self._console, lambda s: self.app.assessments.register(s, data),
                          writes=True)

    def record_consent(self, subject: str, notice_version: str, subject_age: int, purpose: str | None = None,
                       guardian_ref: str = "", guardian_relationship: str = "", consented_at: float = 0.0,
                       separate_consent: bool = True) -> ConsentRecord:
        """The subject's separate consent for ``purpose`` (a guardian's under 14)."""
        g = Guardian(guardian_ref, guardian_relationship) if guardian_ref else None
        req = ConsentRequest(separate_consent, notice_version, subject_age, consented_at, g)
        return self._subject_call("RecordConsent", subject, purpose, lambda s: self.app.lifecycle.record_consent(s, req),
                                  writes=True)

    # -- enrolment and matching (protection happens here, on the device) --------------------------
    def enroll(self, subject: str, embedding, consent_id: str, purpose: str | None = None, retention_days: int = 0,
               request_id: str = "") -> EnrolResult:
        purpose = purpose or self.purpose
        t = self.protection.protect(subject, embedding, None, purpose)
        r = self._subject_call("Enroll", subject, purpose, lambda s: self.app.enrolment.enrol(
            s, EnrolRequest(t.to_bytes(), consent_id, request_id, "", retention_days)), op="enroll", writes=True)
        self.protection.note_enrolled(subject, r.key_version)
        return r

    def verify(self, subject: str, embedding, purpose: str | None = None, threshold: float = 0.0) -> VerifyResult:
        purpose = purpose or self.purpose
        t = self.protection.probe(subject, embedding, None, purpose)
        return self._subject_call("Verify", subject, purpose, lambda s: self.app.matching.verify(
            s, VerifyRequest(t.to_bytes(), threshold)), op="verify")

    def identify(self, embedding, top_k: int = 5, purpose: str | None = None,
                 threshold: float = 0.0) -> list[tuple[str, float]]:
        """1:N on the device: one probe per key version in use, merged best first; [] = no match."""
        purpose = purpose or self.purpose
        hits: dict[str, float] = {}
        for t in self.protection.identify_probes(embedding, purpose):
            r = self._call("Identify", self._device, lambda s, t=t: self.app.matching.identify(
                s, IdentifyRequest(t.to_bytes(), top_k, threshold)), purpose=purpose, device=self.device_id,
                device_op="identify")
            for m in r.candidates:
                hits[m.subject_id] = max(float(m.score), hits.get(m.subject_id, float("-inf")))
        return sorted(hits.items(), key=lambda kv: -kv[1])[:top_k]

    def withdraw(self, subject: str) -> Withdrawn:
        """Withdrawal: every template and consent of the subject goes; its key version is retired."""
        r = self._call("Withdraw", self._device, self.app.lifecycle.withdraw, subject=subject, device=self.device_id)
        self.versions.set(subject, max(r.destroyed_key_version, self.versions.get(subject)) + 1)
        self.versions.enrolled(subject, None)
        return r

    def revoke(self, subject: str, key_version: int = 0) -> Revoked:
        r = self._call("Revoke", self._device, lambda s: self.app.lifecycle.revoke(s, key_version), subject=subject,
                       device=self.device_id)
        self.versions.set(subject, r.next_key_version)
        self.versions.enrolled(subject, None)
        return r

    # -- maintenance and reports --------------------------------------------------------------------
    def purge(self) -> PurgeResult:
        return self._call("PurgeExpired", self._console, lambda s: self.app.maintenance.purge(s.ev))

    def report(self) -> dict:
        """The compliance report of this device (the same sections as ``veilface report``)."""
        return self._call("ComplianceReport", self._console, lambda s: self.app.maintenance.report())

    def verify_audit(self) -> ChainReport:
        return self._call("VerifyAuditChain", self._console, lambda s: self.app.queries.verify_chain(s.ev))

    def decommission(self, reason: str = "") -> dict:
        """Delete every template, key version and consent of the device; the deletion certificate
        states the filing-cancellation deadline. Destroys the device's master secret too (its
        transform keys cannot be derived again: any copy of a template is useless)."""
        cert = self._call("Decommission", Principal("admin", f"{self.device_id}-console"),
                          lambda s: self.app.maintenance.decommission(s.ev, reason))
        secret = self.data_dir / keystore.SECRET_FILE
        if secret.exists():
            secret.write_bytes(b"\0" * secret.stat().st_size)
            secret.unlink()
        return cert

    def record_filing_cancellation(self, reference: str, cancelled_on: str = "") -> CancellationInfo:
        return self._call("RecordFilingCancellation", self._console,
                          lambda s: self.app.termination.record_cancellation(s, reference, cancelled_on))

    # -- oversight ------------------------------------------------------------------------------------
    def oversight_public_key(self) -> bytes:
        """The raw Ed25519 key to register with the central service (``RegisterOversightKey``)."""
        return public_key_bytes(self._signing)

    def oversight_fingerprint(self) -> str:
        return fingerprint(self.oversight_public_key())

    def oversight_bundles(self, max_entries: int = MAX_ENTRIES, max_persons: int = MAX_PERSONS_DELTA) -> list[OutboxRow]:
        """Every bundle not yet acknowledged, after signing new ones for what happened since."""
        with self._outbox_lock:
            uplink.new_bundles(self.store, self.tenant, self.device_id, self._signing, self.clock.now(),
                               max_entries, max_persons)
            return self.store.outbox(pending_only=True)

    def acknowledge(self, seq: int) -> None:
        """The central service accepted bundle ``seq`` (and so every earlier one)."""
        with self.store.transaction() as tx:
            tx.ack_outbox(seq, self.clock.now())

    def send_oversight(self, submit: Callable[[bytes, bytes], object], **limits) -> list:
        """Sign what is new and deliver every pending bundle with ``submit(bundle, signature)``
        (``DeviceClient.submit_oversight`` of this device); returns the receipts."""
        return uplink.deliver(self.oversight_bundles(**limits), submit, self.acknowledge)

    def close(self) -> None:
        self.app.close()
        self.store.close()
        self._lock.release()

    def __enter__(self) -> EdgeDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
