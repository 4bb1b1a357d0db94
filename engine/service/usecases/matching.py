"""Verify (1:1) and Identify (1:N), cancellable and encrypted, and the key holder's decision
reports. Intrusion detection is a named dependency: failed-verify bursts and 1:N enumeration
are throttled and raise an alert in the audit log.

For ``he`` the matcher computes an encrypted score blob and cannot decide: the reply carries the
blob and a single-use decision ticket; the key holder reports its decision (a boolean, never a
score) with :meth:`Matching.report_decision`. Until then a 1:1 attempt counts as a failure and a
1:N search as a no-match.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import NotEnrolled
from ...gallery import Match
from .. import policy
from ..config import ServiceConfig
from ..encrypted import HERegistry, TicketBook, check_blob, epoch_revoked
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


@dataclass(frozen=True)
class VerifyResult:
    matched: bool
    score: float
    threshold: float
    fallback: dict                   # policy.fallback: {required, methods, message}
    encrypted: bool = False
    encrypted_score: bytes = b""
    decision_ticket: str = ""


@dataclass(frozen=True)
class IdentifyRequest:
    probe: bytes
    top_k: int = 0                   # 0 = 5
    threshold: float = 0.0


@dataclass(frozen=True)
class IdentifyResult:
    threshold: float
    gallery_size: int
    fallback: dict
    candidates: list[Match] = field(default_factory=list)
    encrypted: bool = False
    encrypted_scores: bytes = b""
    decision_ticket: str = ""


@dataclass(frozen=True)
class DecisionReport:
    ticket: str
    matched: bool
    threshold: float = 0.0
    candidates: int = 0


class Matching:
    """Verify, Identify, ReportDecision."""

    def __init__(self, cfg: ServiceConfig, store: Store, index: GalleryIndex, templates: TemplateReader,
                 contexts: HERegistry, tickets: TicketBook, intrusion: IntrusionDetector, retention: Retention) -> None:
        self.cfg, self.store, self.index, self.templates = cfg, store, index, templates
        self.contexts, self.tickets, self.intrusion, self.retention = contexts, tickets, intrusion, retention

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

    def _verify_encrypted(self, scope: Scope, p: Parsed, key: GalleryKey, req: VerifyRequest, ids_key: str) -> VerifyResult:
        scope.check_deadline()
        blob = self.index.backend.verify(key, scope.subject, p.template)   # encrypted score (masked product)
        thr = self.templates.threshold(p.scheme, req.threshold)
        token, tk = self.tickets.issue("verify", scope.tenant, scope.subject, scope.purpose, scope.ev.device,
                                       scope.principal.name, ids_key)
        # pending until the key holder reports a match: an unreported attempt counts as a failure
        alert = self.intrusion.record_verify(ids_key, False)
        if alert:
            report_intrusion(self.store, alert, scope.tenant, scope.subject, scope.ev.device)
        scope.ev.details.update({"encrypted": True, "outcome": "encrypted_score_returned", "decision_ref": tk.ref})
        return VerifyResult(False, 0.0, thr, policy.fallback_pending(self.cfg.fallback_methods), encrypted=True,
                            encrypted_score=blob, decision_ticket=token)

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
            return self._identify_encrypted(scope, p, key, thr, caller)
        hits = self.index.backend.search(key, t, k, thr)
        ev.details["candidates"] = len(hits)
        alert = self.intrusion.record_identify(caller, bool(hits))
        if alert:
            report_intrusion(self.store, alert, tenant, device=scope.device)
        return IdentifyResult(thr, self.index.backend.size(key), self.templates.fallback(bool(hits)), candidates=hits)

    def _identify_encrypted(self, scope: Scope, p: Parsed, key: GalleryKey, thr: float, caller: str) -> IdentifyResult:
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
        alert = self.intrusion.record_identify(caller, False)   # a no-match until the decider reports one
        if alert:
            report_intrusion(self.store, alert, scope.tenant, device=scope.ev.device)
        scope.ev.details.update({"encrypted": True, "outcome": "encrypted_scores_returned", "gallery_size": size,
                                 "decision_ref": tk.ref})
        return IdentifyResult(thr, size, policy.fallback_pending(self.cfg.fallback_methods), encrypted=True,
                              encrypted_scores=blob, decision_ticket=token)

    # -- the key holder's decision ----------------------------------------------------------------------
    def report_decision(self, scope: Scope, req: DecisionReport) -> dict:
        """Record the key holder's decision on an encrypted Verify/Identify; returns the fallback."""
        if req.candidates < 0 or not (-1e9 < req.threshold < 1e9):
            raise BadRequest("bad candidates / threshold", reason="BAD_DECISION")
        tk = self.tickets.redeem(req.ticket, scope.tenant, scope.principal.name, scope.device)
        ev = scope.ev
        ev.subject, ev.purpose = tk.subject, tk.purpose
        matched = bool(req.matched)
        ev.details = {"kind": tk.kind, "matched": matched, "decision_ref": tk.ref, "threshold": float(req.threshold)}
        if tk.kind == "identify":
            ev.details["candidates"] = int(req.candidates)
            if matched:
                self.intrusion.identify_hit(tk.ids_key)
        elif matched:
            self.intrusion.record_verify(tk.ids_key, True)
        return self.templates.fallback(matched)
