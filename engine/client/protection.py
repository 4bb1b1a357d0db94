"""How a device protects captures and reads match results: one strategy per kind of scheme.

The device client holds one :class:`Protection` and asks it the same questions whatever the
scheme: protect a template, make the probes of a 1:1 / 1:N search, read a Verify / Identify
answer, note an enrolment.

* :class:`CancellableProtection` -- a keyed transform (BioHash, IoM, rotation). Keys come from a
  :class:`engine.client.keys.KeySource` for the subject's key version (``key_scope="subject"``)
  or the purpose's group key of that version (``key_scope="purpose"``, 1:N-capable: one probe
  per key version in use). The matcher answers with clear scores.
* :class:`HEProtection` -- CKKS encryption under the tenant epoch's public context. The matcher
  answers with encrypted scores; the key holder (1:1, on the device) or the decider (1:N)
  decrypts and decides, and the decision (a boolean, never a score) is reported back for the
  audit log with the single-use ticket -- which only the replica that issued it knows, hence
  :attr:`Protection.needs_replica_affinity`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .._proto.veilface.v1 import matcher_pb2 as pb
from ..template import Template
from .keys import KeySource, KeyVersions

#: ``report(ticket, matched, threshold, candidates) -> ReportDecisionResponse | None``
Reporter = Callable[[str, bool, float, int], "pb.ReportDecisionResponse | None"]

KEY_SCOPES = ("purpose", "subject")


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


def _clear_result(r: pb.VerifyResponse) -> VerifyResult:
    return VerifyResult(r.matched, r.score, r.threshold, r.fallback.required, list(r.fallback.methods),
                        r.fallback.message)


class Protection(ABC):
    """The strategy interface (and the clear-score answers both strategies share)."""

    scheme = None
    encrypted = False
    #: the calls of one match (search + decision report) must reach the same replica
    needs_replica_affinity = False

    @abstractmethod
    def protect(self, subject: str | None, embedding, version: int | None, purpose: str) -> Template:
        """The enrolment template of one embedding ``(dim,)`` float."""

    def probe(self, subject: str | None, embedding, version: int | None, purpose: str) -> Template:
        """The 1:1 probe of one embedding."""
        return self.protect(subject, embedding, version, purpose)

    @abstractmethod
    def identify_probes(self, embedding, purpose: str) -> list[Template]:
        """The probes of one 1:N search (their results are merged)."""

    @abstractmethod
    def note_enrolled(self, subject: str, key_version: int) -> None:
        """Bookkeeping after an acknowledged enrolment."""

    def verify_result(self, r: pb.VerifyResponse, threshold: float, report: Reporter) -> VerifyResult:
        return _clear_result(r)

    def identify_hits(self, r: pb.IdentifyResponse, top_k: int, threshold: float,
                      report: Reporter) -> Iterable[tuple[str, float]]:
        return [(c.subject_id, c.score) for c in r.candidates]


class CancellableProtection(Protection):
    """Keyed transform of a cancellable scheme; keys from ``keys`` for ``key_scope``."""

    def __init__(self, scheme, keys: KeySource, key_scope: str, versions: KeyVersions) -> None:
        if key_scope not in KEY_SCOPES:
            raise ValueError("key_scope must be 'purpose' or 'subject'")
        if keys is None:
            raise ValueError(f"scheme {scheme.name!r} needs a KeyDeriver (deriver=) or a KeySource")
        self.scheme, self.keys, self.key_scope, self.versions = scheme, keys, key_scope, versions

    def _key(self, subject: str | None, version: int, purpose: str) -> bytes:
        if self.key_scope == "subject":
            if subject is None:
                raise ValueError("1:N identification needs key_scope='purpose'")
            return self.keys.key_for(subject, version, self.scheme.spec, purpose)
        return self.keys.key_for(None, version, self.scheme.spec, purpose)

    def protect(self, subject, embedding, version, purpose) -> Template:
        v = version if version is not None else (self.versions.get(subject) if subject else 1)
        return self.scheme.protect(self._key(subject, v, purpose), embedding, key_version=v)

    def identify_probes(self, embedding, purpose) -> list[Template]:
        return [self.protect(None, embedding, v, purpose) for v in self.versions.in_use()]

    def note_enrolled(self, subject, key_version) -> None:
        self.versions.enrolled(subject, key_version)


class HEProtection(Protection):
    """CKKS encryption under the public context; decisions by the key holder / decider.

    ``key_holder``: :class:`engine.he.KeyHolder` (verify mode: the device's own, it decrypts the
    score; identify mode: the decider). ``he_context``: the public device context (or its bytes)
    when the key holder is elsewhere; defaults to the key holder's public half. ``decider``:
    anything with ``decide(blob, k, threshold) -> [Match]``; defaults to ``key_holder``.
    """

    encrypted = True
    needs_replica_affinity = True

    def __init__(self, scheme, key_holder=None, he_context=None, decider=None) -> None:
        if not getattr(scheme, "encrypted", False):
            raise ValueError("set_he_keys is for the he scheme")
        self.scheme = scheme
        self.key_holder = key_holder
        self.decider = decider or key_holder
        if he_context is None and key_holder is not None:
            he_context = key_holder.public_context(eval_keys=False)
        if isinstance(he_context, (bytes, bytearray, memoryview)):
            from ..he import PublicContext  # noqa: PLC0415 - tenseal only when HE is used
            he_context = PublicContext.from_bytes(bytes(he_context))
        if he_context is not None and he_context.is_private():
            raise ValueError("he_context must be a public context")
        self.context = he_context

    def _ctx(self):
        if self.context is None:
            raise ValueError("the he scheme needs key_holder= or he_context= (the public context)")
        return self.context

    def protect(self, subject, embedding, version, purpose) -> Template:
        # public-key encryption under the current epoch: no per-subject key, no key version
        return self.scheme.protect(self._ctx(), embedding)

    def probe(self, subject, embedding, version, purpose) -> Template:
        return self.scheme.protect_probe(self._ctx(), embedding)

    def identify_probes(self, embedding, purpose) -> list[Template]:
        return [self.probe(None, embedding, None, purpose)]   # one probe under the current epoch

    def note_enrolled(self, subject, key_version) -> None:
        pass   # an HE key version is the tenant epoch, not the subject's: nothing to record

    def verify_result(self, r, threshold, report) -> VerifyResult:
        if not r.encrypted:
            return _clear_result(r)
        if self.key_holder is None:
            raise ValueError("an encrypted verify is decided by the device's KeyHolder (key_holder=)")
        thr = threshold or r.threshold
        matched, score = self.key_holder.verify_decision(r.encrypted_score, thr)
        rep = report(r.decision_ticket, matched, thr, 0)
        fb = rep.fallback if rep is not None else r.fallback   # the report's answer is definitive
        required = fb.required if rep is not None else not matched
        return VerifyResult(matched, score, thr, required, list(fb.methods), fb.message,
                            encrypted=True, decision_audited=rep is not None)

    def identify_hits(self, r, top_k, threshold, report) -> list[tuple[str, float]]:
        hits = [(c.subject_id, c.score) for c in r.candidates]
        if r.encrypted:
            if self.decider is None:
                raise ValueError("an encrypted 1:N result is decided by the key holder (key_holder= or decider=)")
            thr = threshold or r.threshold
            matches = self.decider.decide(r.encrypted_scores, k=top_k, threshold=thr)
            report(r.decision_ticket, bool(matches), thr, len(matches))
            hits += [(m.subject_id, float(m.score)) for m in matches]
        return hits


def make_protection(scheme, keys: KeySource | None, key_scope: str, versions: KeyVersions,
                    key_holder=None, he_context=None, decider=None) -> Protection:
    """The strategy for ``scheme`` (the one place that looks at ``scheme.encrypted``)."""
    if getattr(scheme, "encrypted", False):
        if key_scope not in KEY_SCOPES:
            raise ValueError("key_scope must be 'purpose' or 'subject'")
        return HEProtection(scheme, key_holder, he_context, decider)
    return CancellableProtection(scheme, keys, key_scope, versions)
