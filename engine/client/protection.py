"""How a device protects captures and reads match results: one strategy per kind of scheme.

The device client holds one :class:`Protection` and asks it the same questions whatever the
scheme: protect a template, make the probes of a 1:1 / 1:N search, get what a match needs from the
key service (a decision grant), read a Verify / Identify answer, note an enrolment.

* :class:`CancellableProtection` -- a keyed transform (BioHash, IoM, rotation). Keys come from a
  :class:`engine.client.keys.KeySource` for the subject's key version (``key_scope="subject"``)
  or the purpose's group key (``key_scope="purpose"``: the fast 1:N mode). With the key service
  as the source a key is released for one protection and not kept (nor its expanded transform).
  A 1:N search sends **one** probe, under the current version only: one capture under two
  versions would let the matcher link old and new templates. The matcher answers with clear scores.
* :class:`HEProtection` -- CKKS encryption under the public context the key service signed
  (checked against its pinned key). Before each match the device gets a single-use *decision
  grant* for its probe from the key service; the matcher sends the encrypted result to the key
  service, which answers with a signed decision (no score). The device checks that decision too:
  the pinned signature, its grant, its probe's hash, the matcher's ticket.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from .._proto.veilface.v1 import matcher_pb2 as pb
from ..template import Template
from .keys import KeySource, KeyVersions

KEY_SCOPES = ("purpose", "subject")


@dataclass
class VerifyResult:
    matched: bool
    score: float
    threshold: float
    fallback_required: bool
    fallback_methods: list
    fallback_message: str
    encrypted: bool = False      # he: decided by the key service
    decision_audited: bool = True  # the decision is in the matcher's audit log (he: checked by the matcher)
    decision_verified: bool = False  # he: the device checked the key service's signature itself


def _clear_result(r: pb.VerifyResponse) -> VerifyResult:
    return VerifyResult(r.matched, r.score, r.threshold, r.fallback.required, list(r.fallback.methods),
                        r.fallback.message)


class Protection(ABC):
    """The strategy interface (and the clear-score answers both strategies share)."""

    scheme = None
    encrypted = False
    #: the calls of one match must reach the same replica (nothing spans calls any more: False)
    needs_replica_affinity = False

    @abstractmethod
    def protect(self, subject: str | None, embedding, version: int | None, purpose: str) -> Template:
        """The enrolment template of one embedding ``(dim,)`` float."""

    def probe(self, subject: str | None, embedding, version: int | None, purpose: str) -> Template:
        """The 1:1 probe of one embedding."""
        return self.protect(subject, embedding, version, purpose)

    @abstractmethod
    def identify_probes(self, embedding, purpose: str) -> list[Template]:
        """The probes of one 1:N search (one: the current version)."""

    @abstractmethod
    def note_enrolled(self, subject: str, key_version: int) -> None:
        """Bookkeeping after an acknowledged enrolment."""

    def grant(self, kind: str, probe: bytes, subject: str, purpose: str) -> str:
        """The decision grant a match of ``probe`` needs ("" when the matcher decides itself)."""
        return ""

    def verify_result(self, r: pb.VerifyResponse, threshold: float, grant: str = "", probe: bytes = b"",
                      subject: str = "", purpose: str = "") -> VerifyResult:
        return _clear_result(r)

    def identify_hits(self, r: pb.IdentifyResponse, top_k: int, threshold: float, grant: str = "",
                      probe: bytes = b"", purpose: str = "") -> Iterable[tuple[str, float]]:
        return [(c.subject_id, c.score) for c in r.candidates]


def _forget(scheme, key: bytes) -> None:
    """Drop the transform expanded from ``key`` from the scheme's cache (a per-transaction key
    leaves nothing behind in the SDK)."""
    cache = getattr(scheme, "__dict__", {}).get("_material_cache")
    if cache is not None:
        cache.pop(key, None)


class CancellableProtection(Protection):
    """Keyed transform of a cancellable scheme; keys from ``keys`` for ``key_scope``."""

    def __init__(self, scheme, keys: KeySource, key_scope: str, versions: KeyVersions) -> None:
        if key_scope not in KEY_SCOPES:
            raise ValueError("key_scope must be 'purpose' or 'subject'")
        if keys is None:
            raise ValueError(f"scheme {scheme.name!r} needs a key source: keyservice= (deployments), a KeySource "
                             "or a KeyDeriver (deriver=)")
        self.scheme, self.keys, self.key_scope, self.versions = scheme, keys, key_scope, versions

    def _release(self, subject: str | None, version: int | None, purpose: str, op: str) -> tuple[bytes, int]:
        owner = subject if self.key_scope == "subject" else None
        if self.key_scope == "subject" and subject is None:
            raise ValueError("1:N identification needs key_scope='purpose'")
        release = getattr(self.keys, "release", None)
        if release is not None:
            return release(owner, version, self.scheme.spec, purpose, op)
        return self.keys.key_for(owner, int(version), self.scheme.spec, purpose), int(version)

    def _protect(self, subject: str | None, embedding, version: int | None, purpose: str, op: str) -> Template:
        v = version if version is not None else (self.versions.get(subject) if subject else self.versions.current())
        key, v = self._release(subject, v, purpose, op)
        try:
            return self.scheme.protect(key, embedding, key_version=v)
        finally:
            if getattr(self.keys, "per_transaction", False):
                _forget(self.scheme, key)

    def protect(self, subject, embedding, version, purpose) -> Template:
        return self._protect(subject, embedding, version, purpose, "ENROL")

    def probe(self, subject, embedding, version, purpose) -> Template:
        return self._protect(subject, embedding, version, purpose, "VERIFY")

    def identify_probes(self, embedding, purpose) -> list[Template]:
        # keysvc: one probe, current version only (never one capture under two versions)
        return [self._protect(None, embedding, None, purpose, "IDENTIFY_FAST")]

    def note_enrolled(self, subject, key_version) -> None:
        self.versions.enrolled(subject, key_version)


class HEProtection(Protection):
    """CKKS encryption under the key service's public context; decisions by the key service.

    ``keyservice``: a :class:`engine.keyservice.client.KeyServiceClient` with this device's token
    (its pinned key checks contexts and decisions). ``he_context``: a public context (or its bytes)
    to encrypt with instead of fetching it; ``key_holder``: its public half is used the same way
    (the secret key is never used by the SDK: decisions come from the key service).
    """

    encrypted = True

    def __init__(self, scheme, key_holder=None, he_context=None, keyservice=None, tenant: str = "",
                 device_id: str = "") -> None:
        if not getattr(scheme, "encrypted", False):
            raise ValueError("HEProtection is for the he scheme")
        self.scheme, self.keyservice, self.tenant, self.device_id = scheme, keyservice, tenant, device_id
        if he_context is None and key_holder is not None:
            he_context = key_holder.public_context(eval_keys=False)
        if isinstance(he_context, (bytes, bytearray, memoryview)):
            from ..he import PublicContext  # noqa: PLC0415 - tenseal only when HE is used
            he_context = PublicContext.from_bytes(bytes(he_context))
        if he_context is not None and he_context.is_private():
            raise ValueError("he_context must be a public context")
        self.context = he_context
        self._contexts: dict[str, object] = {}

    def _ctx(self, purpose: str):
        if self.context is not None:
            return self.context
        if self.keyservice is None:
            raise ValueError("the he scheme needs keyservice= (or he_context=, the public context)")
        ctx = self._contexts.get(purpose)
        if ctx is None:
            p = self.scheme.params
            ctx, _ = self.keyservice.he_context(purpose, p["mode"], int(p["dim"]), tenant=self.tenant)
            self._contexts[purpose] = ctx
        return ctx

    def refresh(self) -> None:
        """Forget fetched contexts (after a rotation: the next call fetches the new epoch)."""
        self._contexts.clear()

    def protect(self, subject, embedding, version, purpose) -> Template:
        # public-key encryption under the current epoch: no per-subject key, no key version
        return self.scheme.protect(self._ctx(purpose), embedding)

    def probe(self, subject, embedding, version, purpose) -> Template:
        return self.scheme.protect_probe(self._ctx(purpose), embedding)

    def identify_probes(self, embedding, purpose) -> list[Template]:
        return [self.probe(None, embedding, None, purpose)]   # one probe under the current epoch

    def note_enrolled(self, subject, key_version) -> None:
        pass   # an HE key version is the tenant epoch, not the subject's: nothing to record

    def _ks(self):
        if self.keyservice is None:
            raise ValueError("encrypted matches are decided by the key service: pass keyservice=")
        return self.keyservice

    def grant(self, kind, probe, subject, purpose) -> str:
        if self.keyservice is None:      # the matcher refuses the match (no grant / no key service)
            return ""
        return self._ks().grant_decision(purpose, kind, hashlib.sha256(probe).digest(),
                                         subject=subject if kind == "verify" else "", tenant=self.tenant,
                                         device_id=self.device_id)

    def _check(self, r, kind: str, grant: str, probe: bytes, subject: str, purpose: str, top_k: int = 0):
        from ..keyservice.signing import check_decision
        return check_decision(self._ks().verifier(), bytes(r.decision_payload), bytes(r.decision_signature),
                              kind=kind, ticket=r.decision_ticket, grant=grant, subject=subject if kind == "verify" else "",
                              tenant=self.tenant or "default", purpose=purpose, device=self.device_id or None,
                              probe_sha256=hashlib.sha256(probe).hexdigest(),
                              max_ids=top_k if kind == "identify" else None)

    def verify_result(self, r, threshold, grant="", probe=b"", subject="", purpose="") -> VerifyResult:
        if not r.encrypted:
            return _clear_result(r)
        d = self._check(r, "verify", grant, probe, subject, purpose)
        if d.matched != r.matched:
            from ..keyservice.signing import DecisionRejected
            raise DecisionRejected("the matcher's answer contradicts the signed decision", "DECISION_MISMATCH")
        return VerifyResult(d.matched, float("nan"), d.threshold, r.fallback.required, list(r.fallback.methods),
                            r.fallback.message, encrypted=True, decision_audited=True, decision_verified=True)

    def identify_hits(self, r, top_k, threshold, grant="", probe=b"", purpose="") -> list[tuple[str, float]]:
        if not r.encrypted:
            return [(c.subject_id, c.score) for c in r.candidates]
        d = self._check(r, "identify", grant, probe, "", purpose, top_k)
        if [c.subject_id for c in r.candidates] != list(d.subject_ids):
            from ..keyservice.signing import DecisionRejected
            raise DecisionRejected("the matcher's candidates differ from the signed decision", "DECISION_MISMATCH")
        return [(sid, float("nan")) for sid in d.subject_ids]


def make_protection(scheme, keys: KeySource | None, key_scope: str, versions: KeyVersions,
                    key_holder=None, he_context=None, keyservice=None, tenant: str = "",
                    device_id: str = "") -> Protection:
    """The strategy for ``scheme`` (the one place that looks at ``scheme.encrypted``)."""
    if getattr(scheme, "encrypted", False):
        if key_scope not in KEY_SCOPES:
            raise ValueError("key_scope must be 'purpose' or 'subject'")
        return HEProtection(scheme, key_holder, he_context, keyservice, tenant, device_id)
    return CancellableProtection(scheme, keys, key_scope, versions)
