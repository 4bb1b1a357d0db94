"""Named galleries (the Rekognition "collection" / CompreFace "subjects" model): create, list,
describe, delete -- and matching inside one: verify a probe against a subject's samples (1:1,
the best sample), search with a probe (1:N, per-subject best sample, then top-k subjects), search
with an enrolled subject's own samples (no probe upload). ``docs/api-model.md`` maps the calls.

A named gallery is bound to one purpose and one cancellable scheme spec; what is in it obeys the
same rules as Enroll / Verify / Identify: consent for the gallery's purpose, the device location
rules, intrusion detection (the same per-subject and per-caller counters), the audit log. HE
templates stay in the default galleries (one sample per subject): named galleries hold
cancellable templates only.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ...errors import NotEnrolled, SchemeMismatch
from ...schemes import make_scheme
from ...template import SchemeSpec, Template
from .. import policy
from ..audit import AuditEvent
from ..clock import Clock
from ..config import ServiceConfig
from ..encrypted import is_he_spec
from ..matching import GalleryIndex, GalleryKey, entry_id, split_entry
from ..ratelimit import IntrusionDetector
from ..scope import Scope
from ..status import AlreadyExists, BadRequest, KeyVersionRevoked, NotFound, PreconditionFailed, Throttled
from ..store import GalleryRow, GallerySummary, Store
from .common import TemplateReader, report_intrusion
from .maintenance import Retention

_SPEC_KEY = re.compile(r"^([a-z][a-z0-9_]*)/v(\d+):(\{.*\})$")


@dataclass(frozen=True)
class GalleryInfo:
    tenant: str
    name: str
    purpose: str
    scheme: str               # canonical spec key of its samples
    description: str
    created_at: float
    subjects: int = 0
    samples: int = 0


def _info(s: GallerySummary) -> GalleryInfo:
    g = s.gallery
    return GalleryInfo(g.tenant, g.name, g.purpose, g.scheme, g.description, g.created_at, s.subjects, s.samples)


@dataclass(frozen=True)
class GalleryDeleted:
    name: str
    samples_deleted: int
    subjects_removed: int


@dataclass(frozen=True)
class GalleryMatch:
    subject_id: str
    score: float
    sample_id: str            # the subject's best sample


@dataclass(frozen=True)
class GalleryVerifyResult:
    matched: bool
    score: float
    threshold: float
    fallback: dict
    sample_id: str            # the best sample


@dataclass(frozen=True)
class GallerySearchResult:
    threshold: float
    gallery_size: int         # samples searched
    fallback: dict
    candidates: list[GalleryMatch] = field(default_factory=list)


def gallery_scheme(desc: str):
    """The scheme of a gallery: a factory descriptor (``biohash:bits=256,dim=128``) or a canonical
    spec key (``biohash/v1:{...}``)."""
    if not isinstance(desc, str) or not desc or len(desc) > 512:
        raise BadRequest("scheme is required (e.g. 'biohash:bits=256,dim=128')", reason="MISSING_SCHEME")
    m = _SPEC_KEY.match(desc)
    if m:
        try:
            params = json.loads(m.group(3))
        except ValueError:
            raise BadRequest(f"bad scheme spec key {desc[:80]!r}", reason="BAD_SCHEME") from None
        if not isinstance(params, dict):
            raise BadRequest(f"bad scheme spec key {desc[:80]!r}", reason="BAD_SCHEME")
        return make_scheme(SchemeSpec(m.group(1), int(m.group(2)), params))
    return make_scheme(desc)


def check_description(text: str) -> str:
    if len(text) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise BadRequest("description: at most 200 printable characters", reason="BAD_DESCRIPTION")
    return text


class Galleries:
    """CreateGallery, ListGalleries, DescribeGallery, DeleteGallery (and the gallery lookup of
    every call that acts inside one)."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock, index: GalleryIndex,
                 templates: TemplateReader) -> None:
        self.cfg, self.store, self.clock, self.index, self.templates = cfg, store, clock, index, templates

    def resolve(self, ev: AuditEvent, tenant: str, name: str) -> GalleryRow:
        """The named gallery a call acts on; fills the audit event's tenant and purpose.
        NOT_FOUND (``GALLERY_NOT_FOUND``) when there is none."""
        ev.tenant = policy.tenant_of(tenant)
        name = policy.check_id("gallery", name)
        row = self.store.gallery(ev.tenant, name)
        if row is None:
            raise NotFound(f"no gallery {name!r}", reason="GALLERY_NOT_FOUND")
        ev.purpose = row.purpose
        return row

    def create(self, scope: Scope, name: str, scheme_desc: str, description: str = "") -> GalleryInfo:
        name = policy.check_id("gallery", name)
        scope.ev.details = {"gallery": name}
        scheme = gallery_scheme(scheme_desc)
        key = scheme.spec.key()
        if getattr(scheme, "encrypted", False) or is_he_spec(key):
            raise PreconditionFailed("named galleries hold cancellable templates; HE templates use the default "
                                     "gallery of their purpose (Enroll)", reason="SCHEME_NOT_SUPPORTED")
        self.templates.check_allowed(scheme.spec, key)
        self.index.schemes.remember(key, scheme)
        row = GalleryRow(scope.tenant, name, scope.purpose, key, check_description(description), self.clock.now(),
                         scope.principal.name)
        scope.ev.details["scheme"] = scheme.name
        with self.store.transaction() as tx:
            if not tx.insert_gallery(row):
                raise AlreadyExists(f"gallery {name!r} exists", reason="GALLERY_EXISTS")
            tx.audit(scope.ev)
        return GalleryInfo(row.tenant, row.name, row.purpose, row.scheme, row.description, row.created_at)

    def list(self, scope: Scope, purpose: str = "") -> list[GalleryInfo]:
        purpose = policy.check_purpose(purpose) if purpose else ""
        out = [_info(s) for s in self.store.galleries(scope.tenant, purpose)]
        scope.ev.details = {"returned": len(out)}
        return out

    def describe(self, scope: Scope, g: GalleryRow) -> GalleryInfo:
        s = self.store.gallery_summary(scope.tenant, g.name)
        if s is None:
            raise NotFound(f"no gallery {g.name!r}", reason="GALLERY_NOT_FOUND")
        scope.ev.details = {"gallery": g.name}
        return _info(s)

    def delete(self, scope: Scope, g: GalleryRow) -> GalleryDeleted:
        """Delete the gallery and every sample in it (its subjects stay enrolled elsewhere)."""
        with self.store.transaction() as tx:
            gone = tx.delete_gallery(scope.tenant, g.name)
            subjects = sorted({s for s, _ in gone})
            scope.ev.details = {"gallery": g.name, "samples_deleted": len(gone), "subjects_removed": len(subjects)}
            tx.audit(scope.ev)
        # after the commit, each subject under its lock (its samples leave the galleries with its rows)
        for subject in subjects:
            with self.index.subject_lock(scope.tenant, subject):
                self.index.drop_gallery(scope.tenant, g.name, [subject])
        self.index.drop_gallery(scope.tenant, g.name, [])
        self.store.checkpoint()
        return GalleryDeleted(g.name, len(gone), len(subjects))


class GalleryMatching:
    """GalleryVerify (1:1 against a subject's samples), GallerySearch (1:N with a probe),
    SearchBySubject (1:N with an enrolled subject's own samples)."""

    def __init__(self, cfg: ServiceConfig, store: Store, index: GalleryIndex, templates: TemplateReader,
                 intrusion: IntrusionDetector, retention: Retention) -> None:
        self.cfg, self.store, self.index, self.templates = cfg, store, index, templates
        self.intrusion, self.retention = intrusion, retention

    def _probe(self, g: GalleryRow, blob: bytes, ev: AuditEvent):
        p = self.templates.read(blob, "probe")
        ev.details = {"gallery": g.name, "scheme": p.template.spec.name, "key_version": p.template.key_version}
        if p.spec_key != g.scheme:
            raise SchemeMismatch(f"gallery {g.name!r} holds templates of another scheme or parameters")
        return p

    # -- 1:1 ------------------------------------------------------------------------------------------
    def verify(self, scope: Scope, g: GalleryRow, probe: bytes, threshold: float = 0.0) -> GalleryVerifyResult:
        """The probe against each of the subject's samples of the probe's key version: the best one decides."""
        tenant, subject, ev = scope.tenant, scope.subject, scope.ev
        p = self._probe(g, probe, ev)
        t = p.template
        ids_key = f"{tenant}/{subject}"        # the same counter as Verify: a burst is a burst
        self.intrusion.check_verify(ids_key)
        self.retention.maybe_purge()
        samples, revoked = self.index.samples_of(tenant, subject, g.name)
        if not samples:
            raise NotEnrolled(f"subject {subject!r} is not enrolled in gallery {g.name!r}")
        if t.key_version <= revoked:
            raise KeyVersionRevoked(f"key version {t.key_version} was revoked")
        usable = [sid for sid, m in samples.items() if m.key_version == t.key_version]
        if not usable:
            raise PreconditionFailed(f"probe key version {t.key_version} != enrolled "
                                     f"{sorted({m.key_version for m in samples.values()})}",
                                     reason="KEY_VERSION_MISMATCH")
        key = GalleryKey(tenant, g.purpose, g.scheme, t.key_version, g.name)
        scores = []
        for sid in usable:
            try:
                scores.append((float(self.index.backend.verify(key, entry_id(subject, sid), t)), sid))
            except NotEnrolled:        # deleted meanwhile
                continue
        if not scores:
            raise NotEnrolled(f"subject {subject!r} is not enrolled in gallery {g.name!r}")
        score, best = max(scores)
        thr = self.templates.threshold(p.scheme, threshold)
        matched = bool(score >= thr)
        ev.details.update({"matched": matched, "samples": len(scores)})
        alert = self.intrusion.record_verify(ids_key, matched)
        if alert:
            report_intrusion(self.store, alert, tenant, subject, ev.device)
        return GalleryVerifyResult(matched, score, thr, self.templates.fallback(matched), best)

    # -- 1:N ------------------------------------------------------------------------------------------
    def _top_k(self, key: GalleryKey, probe: Template, k: int, thr: float, exclude: str = "") -> list[GalleryMatch]:
        """Per-subject best sample, then the top ``k`` subjects. Exact: subjects in the sorted hit
        list appear in the order of their best score, so the first ``k`` distinct subjects of a
        long enough prefix are the answer; the prefix grows until it holds them or is exhausted."""
        size = self.index.backend.size(key)
        want = min(size, 4 * k + self.cfg.max_samples_per_subject)
        while True:
            hits = self.index.backend.search(key, probe, max(want, 1), thr) if size else []
            best: dict[str, GalleryMatch] = {}
            for h in hits:
                subject, sid = split_entry(h.subject_id)
                if subject != exclude and subject not in best:
                    best[subject] = GalleryMatch(subject, float(h.score), sid)
            if len(best) >= k or len(hits) < want or want >= size:
                return list(best.values())[:k]
            want = min(size, want * 4)

    def _limits(self, scope: Scope, top_k: int, threshold: float, p_scheme) -> tuple[int, float]:
        k = top_k or 5
        if not 1 <= k <= 100:
            raise BadRequest("top_k must be in [1, 100]", reason="BAD_TOP_K")
        thr = self.templates.threshold(p_scheme, threshold)
        alert = self.intrusion.check_identify(scope.caller)
        if alert:
            report_intrusion(self.store, alert, scope.tenant, device=scope.device)
            raise Throttled("1:N search rate limit exceeded", reason="IDENTIFY_THROTTLED")
        self.retention.maybe_purge()
        scope.check_deadline()
        return k, thr

    def _answer(self, scope: Scope, hits: list[GalleryMatch], thr: float, size: int) -> GallerySearchResult:
        scope.ev.details["candidates"] = len(hits)
        alert = self.intrusion.record_identify(scope.caller, bool(hits))
        if alert:
            report_intrusion(self.store, alert, scope.tenant, device=scope.device)
        return GallerySearchResult(thr, size, self.templates.fallback(bool(hits)), hits)

    def search(self, scope: Scope, g: GalleryRow, probe: bytes, top_k: int = 0,
               threshold: float = 0.0) -> GallerySearchResult:
        """1:N with a probe (SearchFacesByImage): the probe's key version's samples."""
        p = self._probe(g, probe, scope.ev)
        k, thr = self._limits(scope, top_k, threshold, p.scheme)
        scope.ev.details["top_k"] = k
        key = GalleryKey(scope.tenant, g.purpose, g.scheme, p.template.key_version, g.name)
        return self._answer(scope, self._top_k(key, p.template, k, thr), thr, self.index.backend.size(key))

    def search_by_subject(self, scope: Scope, g: GalleryRow, top_k: int = 0,
                          threshold: float = 0.0) -> GallerySearchResult:
        """1:N with an enrolled subject's own samples as probes (SearchFaces): other subjects only,
        each sample against the samples of its own key version, best per subject."""
        tenant, subject, ev = scope.tenant, scope.subject, scope.ev
        ev.details = {"gallery": g.name}
        scheme = self.index.schemes.get(g.scheme) or self.index.schemes.remember(g.scheme, gallery_scheme(g.scheme))
        k, thr = self._limits(scope, top_k, threshold, scheme)
        ev.details["top_k"] = k
        samples, _ = self.index.samples_of(tenant, subject, g.name)
        rows = [r for r in self.store.gallery_templates(tenant, g.name, subject) if r.sample_id in samples]
        if not rows:
            raise NotEnrolled(f"subject {subject!r} is not enrolled in gallery {g.name!r}")
        best: dict[str, GalleryMatch] = {}
        size = 0
        for kv in sorted({r.key_version for r in rows}):
            key = GalleryKey(tenant, g.purpose, g.scheme, kv, g.name)
            size += self.index.backend.size(key)
            for r in (r for r in rows if r.key_version == kv):
                for h in self._top_k(key, Template.from_bytes(r.template), k, thr, exclude=subject):
                    if h.subject_id not in best or h.score > best[h.subject_id].score:
                        best[h.subject_id] = h
        hits = sorted(best.values(), key=lambda h: -h.score)[:k]
        ev.details["samples_used"] = len(rows)
        return self._answer(scope, hits, thr, size)
