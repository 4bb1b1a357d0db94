"""Verify (1:1) and Identify (1:N), cancellable and encrypted. Intrusion detection is a named
dependency: failed-verify bursts and 1:N enumeration are throttled and raise an alert in the audit
log.

For ``he`` the matcher computes an encrypted, sanitised result and cannot decide: it sends the
result to the key service with a fresh ticket and the device's decision grant
(:class:`~engine.service.encrypted.KeyServiceDecider`), checks the signed decision against the
pinned key, feeds the intrusion counters with it and answers with the decision (no score; the
signed payload goes back to the device). Nothing a device reports reaches the counters: the
former ``ReportDecision`` self-report was removed (issue 9).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import NotEnrolled
from ...gallery import Match
from ..config import ServiceConfig
from ..encrypted import HERegistry, KeyServiceNotConfigured, TicketBook, check_blob, epoch_revoked
from ..matching import GalleryIndex, GalleryKey
from ..ratelimit import IntrusionDetector
from ..scope import Scope
from ..status import BadRequest, KeyVersionRevoked, PreconditionFailed, Throttled
from ..store import Store
from .common import Parsed, TemplateReader, report_intrusion
from .maintenance import Retention


@dataclass(frozen=True)
class VerifyRequest:
    probe: bytes
    threshold: float = 0.0           # 0 = the scheme's default
    grant: str = ""                  # he: the device's decision grant (key service)


@dataclass(frozen=True)
class SignedDecisionOut:
    """What the device gets to check the key service's decision itself."""

    payload: bytes = b""
    signature: bytes = b""
    key_id: str = ""


@dataclass(frozen=True)
class VerifyResult:
    matched: bool
    score: float
    threshold: float
    fallback: dict                   # policy.fallback: {required, methods, message}
    encrypted: bool = False
    decision_ticket: str = ""
    decision: SignedDecisionOut = field(default_factory=SignedDecisionOut)


@dataclass(frozen=True)
class IdentifyRequest:
    probe: bytes
    top_k: int = 0                   # 0 = 5
    threshold: float = 0.0
    grant: str = ""                  # he: the device's decision grant


@dataclass(frozen=True)
class IdentifyResult:
    threshold: float
    gallery_size: int
    fallback: dict
    candidates: list[Match] = field(default_factory=list)
    encrypted: bool = False
    decision_ticket: str = ""
    decision: SignedDecisionOut = field(default_factory=SignedDecisionOut)


class Matching:
    """Verify, Identify (the key service decides encrypted matches: ``decider``)."""

    def __init__(self, cfg: ServiceConfig, store: Store, index: GalleryIndex, templates: TemplateReader,
                 contexts: HERegistry, tickets: TicketBook, intrusion: IntrusionDetector, retention: Retention,
                 decider=None) -> None:
        self.cfg, self.store, self.index, self.templates = cfg, store, index, templates
        self.contexts, self.tickets, self.intrusion, self.retention = contexts, tickets, intrusion, retention
        self.decider = decider   # keysvc: engine.service.encrypted.KeyServiceDecider (None: no he matching)

    def _he_entry(self, scope: Scope, p: Parsed, mode: str):
        return check_blob(self.contexts.get(scope.tenant, scope.purpose, p.spec_key), scope.tenant, p.he_header, mode)

    # -- 1:1 ------------------------------------------------------------------------------------------
    def verify(self, scope: Scope, req: VerifyRequest) -> VerifyResult:
        tenant, subject, purpose, ev = scope.tenant, scope.subject, scope.purpose, scope.ev
        p = self.templates.read(req.probe, "probe")
        t = p.template
        ev.details = {"scheme": t.spec.name, "key_version": t.key_version}
        if p.encrypted:   # old-epoch probes are refused before any enrolment lookup (tenant-wide, no leak)
            self._he_entry(scope, p, "verify")
        ids_key = f"{tenant}/{subject}"
        self.intrusion.check_verify(ids_key)
        self.intrusion.check_unknown(scope.caller)
        self.retention.maybe_purge()
        entries, revoked = self.index.enrolment(tenant, subject)
        meta = entries.get((purpose, p.spec_key)) if entries else None
        if meta is None:     # not enrolled, or enrolled for another purpose / scheme: one answer for all
            self._not_enrolled(scope)
        if t.key_version <= revoked and not p.encrypted:
            raise KeyVersionRevoked(f"key version {t.key_version} was revoked")
        if t.key_version != meta.key_version:
            raise PreconditionFailed(f"probe key version {t.key_version} != enrolled {meta.key_version}",
                                     reason="KEY_VERSION_MISMATCH")
        key = GalleryKey(tenant, purpose, p.spec_key, meta.key_version)
        if not self.index.backend.is_open(key):
            self._not_enrolled(scope)
        if p.encrypted:
            return self._verify_encrypted(scope, p, key, req, ids_key)
        score = self.index.backend.verify(key, subject, t)
        thr = self.templates.threshold(p.scheme, req.threshold)
        matched = bool(score >= thr)
        ev.details["matched"] = matched
        alert = self.intrusion.record_verify(ids_key, matched)
        if alert:
            report_intrusion(self.store, alert, tenant, subject, ev.device)
        return VerifyResult(matched, score, thr, self.templates.fallback(matched))

    def _not_enrolled(self, scope: Scope) -> None:
        """The one answer to "who is enrolled, for what?" a device gets: NOT_ENROLLED, the same
        code, reason and message whether the subject is unknown or enrolled for another purpose or
        scheme; each is counted per caller, and probing many subjects is throttled and alerted."""
        alert = self.intrusion.record_unknown(scope.caller)
        if alert:
            report_intrusion(self.store, alert, scope.tenant, device=scope.ev.device)
        raise NotEnrolled("no enrolment of this subject matches this purpose and scheme")

    def _decider(self):
        if self.decider is None:
            raise KeyServiceNotConfigured("encrypted matches are decided by the key service: configure keyservice, "
                                          "keyservice_token and keyservice_key")
        return self.decider

    def _verify_encrypted(self, scope: Scope, p: Parsed, key: GalleryKey, req: VerifyRequest, ids_key: str) -> VerifyResult:
        """keysvc: sanitised result (score + probe norm) -> the key service decides -> checked, counted, audited."""
        decider = self._decider()
        if not req.grant:
            raise BadRequest("an encrypted Verify needs the device's decision grant (KeyService.GrantDecision)",
                             reason="DECISION_GRANT_REQUIRED")
        scope.check_deadline()
        blob = self.index.backend.verify(key, scope.subject, p.template)   # sanitised result with the probe norm
        thr = self.templates.threshold(p.scheme, req.threshold)
        token, tk = self.tickets.issue("verify", scope.tenant, scope.subject, scope.purpose, scope.ev.device,
                                       scope.principal.name, ids_key)
        scope.ev.details.update({"encrypted": True, "decision_ref": tk.ref})
        try:
            d = decider.decide(ticket=token, grant=req.grant, kind="verify", tenant=scope.tenant,
                               purpose=scope.purpose, subject=scope.subject, device=scope.ev.device, probe=req.probe,
                               threshold=thr, top_k=0, result=blob)
        except Exception as exc:
            if getattr(exc, "code", "") != "UNAVAILABLE":    # a refused probe counts as a failed attempt
                self._count_verify(scope, ids_key, False)
            raise
        finally:
            self.tickets.discard(token)
        self._count_verify(scope, ids_key, d.matched)
        scope.ev.details.update({"matched": d.matched, "threshold": d.threshold, "signed_decision": d.ref,
                                 "result_ref": d.result_sha256[:16]})
        return VerifyResult(d.matched, 0.0, d.threshold, self.templates.fallback(d.matched), encrypted=True,
                            decision_ticket=token, decision=_signed(d))

    def _count_verify(self, scope: Scope, ids_key: str, matched: bool) -> None:
        alert = self.intrusion.record_verify(ids_key, matched)
        if alert:
            report_intrusion(self.store, alert, scope.tenant, scope.subject, scope.ev.device)

    # -- 1:N ------------------------------------------------------------------------------------------
    def identify(self, scope: Scope, req: IdentifyRequest) -> IdentifyResult:
        tenant, ev = scope.tenant, scope.ev
        p = self.templates.read(req.probe, "probe")
        t = p.template
        if p.encrypted:
            self._he_entry(scope, p, "identify")
        k = req.top_k or 5
        if not 1 <= k <= 100:
            raise BadRequest("top_k must be in [1, 100]", reason="BAD_TOP_K")
        thr = self.templates.threshold(p.scheme, req.threshold)
        ev.details = {"scheme": t.spec.name, "key_version": t.key_version, "top_k": k}
        caller = scope.caller
        alert = self.intrusion.check_identify(caller)
        if alert:
            report_intrusion(self.store, alert, tenant, device=scope.device)
            raise Throttled("1:N search rate limit exceeded", reason="IDENTIFY_THROTTLED")
        self.retention.maybe_purge()
        scope.check_deadline()
        key = GalleryKey(tenant, scope.purpose, p.spec_key, t.key_version)
        if p.encrypted:
            return self._identify_encrypted(scope, p, key, thr, caller, req, k)
        hits = self.index.backend.search(key, t, k, thr)
        ev.details["candidates"] = len(hits)
        alert = self.intrusion.record_identify(caller, bool(hits))
        if alert:
            report_intrusion(self.store, alert, tenant, device=scope.device)
        return IdentifyResult(thr, self.index.backend.size(key), self.templates.fallback(bool(hits)), candidates=hits)

    def _identify_encrypted(self, scope: Scope, p: Parsed, key: GalleryKey, thr: float, caller: str,
                            req: IdentifyRequest, k: int) -> IdentifyResult:
        """keysvc: encrypted scores + probe norm -> the key service releases ids (no score) -> checked."""
        decider = self._decider()
        if not req.grant:
            raise BadRequest("an encrypted Identify needs the device's decision grant (KeyService.GrantDecision)",
                             reason="DECISION_GRANT_REQUIRED")
        if not self.index.open(key):
            raise epoch_revoked("the HE context changed meanwhile; encrypt again")
        blob = self.index.backend.search(key, p.template, 0, None)   # one encrypted score per stored template
        size = self.index.backend.size(key)
        limit = max(self.cfg.max_message_bytes, self.cfg.max_response_bytes) - 4096
        if len(blob) > limit:
            raise Throttled(f"the encrypted result ({len(blob)} bytes) exceeds max_response_bytes; split "
                            f"the gallery by purpose or raise the limit", reason="HE_RESULT_TOO_LARGE")
        token, tk = self.tickets.issue("identify", scope.tenant, "", scope.purpose, scope.ev.device,
                                       scope.principal.name, caller)
        scope.ev.details.update({"encrypted": True, "gallery_size": size, "decision_ref": tk.ref})
        try:
            d = decider.decide(ticket=token, grant=req.grant, kind="identify", tenant=scope.tenant,
                               purpose=scope.purpose, subject="", device=scope.ev.device, probe=req.probe,
                               threshold=thr, top_k=k, result=blob)
        except Exception as exc:
            if getattr(exc, "code", "") != "UNAVAILABLE":
                self._count_identify(scope, caller, False)
            raise
        finally:
            self.tickets.discard(token)
        self._count_identify(scope, caller, d.matched)
        scope.ev.details.update({"candidates": len(d.subject_ids), "threshold": d.threshold,
                                 "signed_decision": d.ref, "result_ref": d.result_sha256[:16]})
        hits = [Match(sid, float("nan")) for sid in d.subject_ids]
        return IdentifyResult(d.threshold, size, self.templates.fallback(d.matched), candidates=hits, encrypted=True,
                              decision_ticket=token, decision=_signed(d))

    def _count_identify(self, scope: Scope, caller: str, matched: bool) -> None:
        alert = self.intrusion.record_identify(caller, matched)
        if alert:
            report_intrusion(self.store, alert, scope.tenant, device=scope.ev.device)


def _signed(d) -> SignedDecisionOut:
    return SignedDecisionOut(d.payload, d.signature, str(d.body.get("key_id", "")))
