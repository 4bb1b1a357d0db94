"""Several matcher replicas over one shared store (PostgreSQL) and shared galleries (Ray shards).

The store is the only source of truth; what a replica keeps in memory is a cache that is either
re-read per request or reconciled under a lock that every replica honours. Mechanism per piece
of state (``docs/deployment.md`` explains the choice):

============================  ==========================================================================
state                         how replicas stay correct
============================  ==========================================================================
galleries                     Ray shards shared by all replicas (:mod:`.matching.ray_backend`), changed
                              before a write is acknowledged
subject entries / versions    :class:`SharedGalleryIndex`: re-read from the store on every Verify and
                              whenever a use case takes a subject's lock; that lock is also a
                              PostgreSQL advisory lock (:meth:`Store.subject_lock`), so one replica at
                              a time changes a subject, from its transaction to its shard update
1:N results                   :class:`CheckedMatching`: candidates without a stored template (deleted
                              by a replica that died before updating the shards) are dropped and
                              removed from their shard; a Verify the shard cannot answer although
                              the store holds the template re-adds it from the store (read repair)
devices                       :class:`SharedDeviceRegistry`: a miss is read from the store (devices are
                              insert-only, so a cached entry never goes stale)
consents, request ids,        read inside each transaction already (no cache)
decommission flag
filing alert                  :class:`SharedFilingMonitor`: persons counted in the enrolment's transaction
                              until an alert exists in the store (any replica's)
intrusion counters            :class:`RayIntrusion`: one detector in a named Ray actor for the deployment
                              (replicas without Ray keep per-process counters: one replica)
HE contexts, decision         not shared: encrypted galleries are not sharded on Ray; HE deployments
tickets                       run one replica (tickets go away with issue 9's key service)
============================  ==========================================================================
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import NotEnrolled
from ..template import Template
from .clock import Clock
from .config import ServiceConfig
from .matching import Enrolled, GalleryIndex, GalleryKey, MatchingBackend, entry_id, split_entry
from .ratelimit import Alert, IntrusionDetector
from .status import Throttled
from .store import Store
from .usecases.devices import DeviceRegistry
from .usecases.enrolment import FilingMonitor

log = logging.getLogger("veilface.service")


class SharedGalleryIndex(GalleryIndex):
    """A :class:`GalleryIndex` whose per-subject entries are re-read from the shared store."""

    def __init__(self, store: Store, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.store = store

    def _stored(self, tenant: str, subject: str) -> tuple[dict[tuple[str, str], tuple[Enrolled, int]], tuple | None,
                                                          dict]:
        """(default-gallery entries, key versions, api: named-gallery samples {gallery: (purpose,
        scheme, {sample_id: (Enrolled, template id)})}) as stored now."""
        rows = self.store.subject_index(tenant, subject)
        srow = self.store.subject_row(tenant, subject)
        entries = {(r.purpose, r.scheme): (Enrolled(r.key_version, r.expires_at), r.id) for r in rows if not r.gallery}
        named: dict = {}
        for r in rows:
            if r.gallery:
                named.setdefault(r.gallery, (r.purpose, r.scheme, {}))[2][r.sample_id] = \
                    (Enrolled(r.key_version, r.expires_at), r.id)
        return entries, None if srow is None else (srow.key_version, srow.revoked_upto), named

    def _replace(self, tenant: str, subject: str, entries: dict, versions: tuple | None, named: dict) -> None:
        with self.lock:
            self.replace_person(tenant, subject, {k: e for k, (e, _) in entries.items()},
                                {g: (p, s, {sid: e for sid, (e, _) in smp.items()}) for g, (p, s, smp) in named.items()})
            if versions is None:
                self._versions.pop((tenant, subject), None)
            else:
                self._versions[(tenant, subject)] = versions

    def enrolment(self, tenant: str, subject: str):
        """The subject's entries as stored now (another replica may have enrolled or withdrawn it)."""
        self._replace(tenant, subject, *self._stored(tenant, subject))
        return super().enrolment(tenant, subject)

    def samples_of(self, tenant: str, subject: str, gallery: str):
        """api: the subject's samples in a named gallery as stored now."""
        self._replace(tenant, subject, *self._stored(tenant, subject))
        return super().samples_of(tenant, subject, gallery)

    @contextmanager
    def subject_lock(self, tenant: str, subject: str) -> Iterator[None]:
        """This process's stripe lock, then the subject's lock across replicas; then the subject's
        entries and galleries are reconciled with the store (see :meth:`reconcile`)."""
        with super().subject_lock(tenant, subject), self.store.subject_lock(tenant, subject):
            self.reconcile(tenant, subject)
            yield

    def reconcile(self, tenant: str, subject: str) -> None:
        """Make this subject's galleries match the store: entries this replica knew that are no
        longer stored leave their galleries; stored entries are (re-)added from their stored
        template (idempotent), which repairs a shard that missed an acknowledged enrolment (its
        replica died between the commit and the shard update, and a retry was replayed)."""
        known, _ = super().enrolment(tenant, subject)
        known_named = self.named_of(tenant, subject)
        entries, versions, named = self._stored(tenant, subject)
        for (p, s), m in known.items():
            cur = entries.get((p, s))
            if cur is None or cur[0].key_version != m.key_version:
                key = GalleryKey(tenant, p, s, m.key_version)
                if not key.encrypted:
                    self.backend.remove(key, subject)
        for (p, s), (m, tid) in entries.items():
            key = GalleryKey(tenant, p, s, m.key_version)
            if key.encrypted or (p, s) in known:
                continue
            blob = self.store.template_blob(tid)
            if blob is not None:
                t = Template.from_bytes(blob)
                self.schemes.of(t.spec)
                self.open(key)
                self.backend.add(key, [subject], [t])
        # api: samples of named galleries, the same way (entries are subject/sample ids)
        for g, (p, s, samples) in known_named.items():
            cur = named.get(g, (p, s, {}))[2]
            for sid, m in samples.items():
                if sid not in cur or cur[sid][0].key_version != m.key_version:
                    self.backend.remove(GalleryKey(tenant, p, s, m.key_version, g), entry_id(subject, sid))
        for g, (p, s, samples) in named.items():
            have = known_named.get(g, (p, s, {}))[2]
            for sid, (m, tid) in samples.items():
                blob = None if sid in have else self.store.template_blob(tid)
                if blob is not None:
                    t = Template.from_bytes(blob)
                    self.schemes.of(t.spec)
                    key = GalleryKey(tenant, p, s, m.key_version, g)
                    self.open(key)
                    self.backend.add(key, [entry_id(subject, sid)], [t])
        self._replace(tenant, subject, entries, versions, named)


class CheckedMatching(MatchingBackend):
    """A backend whose answers are checked against the shared store (read repair)."""

    def __init__(self, inner: MatchingBackend, store: Store) -> None:
        self.inner, self.store = inner, store

    def verify(self, key: GalleryKey, subject_id: str, probe: Template):
        try:
            return self.inner.verify(key, subject_id, probe)
        except NotEnrolled:
            if key.encrypted:
                raise
            if key.gallery:   # api: a sample of a named gallery
                subject, sid = split_entry(subject_id)
                rows = [r for r in self.store.gallery_templates(key.tenant, key.gallery, subject)
                        if r.sample_id == sid and r.key_version == key.key_version]
                blob = rows[0].template if rows else None
            else:
                rows = [r for r in self.store.subject_index(key.tenant, subject_id) if not r.gallery and
                        (r.purpose, r.scheme, r.key_version) == (key.purpose, key.scheme, key.key_version)]
                blob = self.store.template_blob(rows[0].id) if rows else None
            if blob is None:
                raise
            log.warning("gallery shard missed a stored template of %s/%s: re-added", key.tenant, key.purpose)
            self.inner.add(key, [subject_id], [Template.from_bytes(blob)])
            return self.inner.verify(key, subject_id, probe)

    def search(self, key: GalleryKey, probe: Template, k: int, threshold: float | None):
        hits = self.inner.search(key, probe, k, threshold)
        if key.encrypted or not hits:
            return hits
        if key.gallery:   # api: entries are subject/sample ids
            pairs = [split_entry(h.subject_id) for h in hits]
            stored = {entry_id(s, x) for s, x in self.store.present_samples(key.tenant, key.gallery, key.key_version,
                                                                             pairs)}
        else:
            stored = self.store.present_subjects(key.tenant, key.purpose, key.scheme, key.key_version,
                                                 [h.subject_id for h in hits])
        stale = [h.subject_id for h in hits if h.subject_id not in stored]
        for s in stale:                 # deleted in the store, still in a shard: never returned, removed
            log.warning("gallery shard held a deleted template of %s/%s: removed", key.tenant, key.purpose)
            self.inner.remove(key, s)
        return [h for h in hits if h.subject_id in stored] if stale else hits

    # the rest is delegated as is
    def open(self, key, scheme, context=None):
        return self.inner.open(key, scheme, context)

    def is_open(self, key):
        return self.inner.is_open(key)

    def keys(self):
        return self.inner.keys()

    def add(self, key, subject_ids, templates):
        return self.inner.add(key, subject_ids, templates)

    def remove(self, key, subject_id):
        return self.inner.remove(key, subject_id)

    def subjects(self, key):
        return self.inner.subjects(key)

    def size(self, key):
        return self.inner.size(key)

    def can_snapshot(self, key):
        return self.inner.can_snapshot(key)

    def snapshot(self, key):
        return self.inner.snapshot(key)

    def load_snapshot(self, key, blob):
        return self.inner.load_snapshot(key, blob)

    def drop(self, key):
        return self.inner.drop(key)

    def clear(self):
        return self.inner.clear()

    def close(self):
        return self.inner.close()


class SharedDeviceRegistry(DeviceRegistry):
    """Devices registered through any replica: a miss is looked up in the store."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store

    def location_class(self, tenant: str, device_id: str) -> int | None:
        cls = super().location_class(tenant, device_id)
        if cls is None:
            row = self.store.device(tenant, device_id)
            if row is not None:
                self.set(tenant, device_id, row.location_class)
                cls = row.location_class
        return cls


class SharedFilingMonitor(FilingMonitor):
    """The filing rule over every replica's enrolments: persons are counted in the enrolment's
    transaction (not from this replica's partial view) until any replica recorded the alert."""

    def check(self, tx, tenant: str, persons: int, now: float):
        if self.raised or tx.filing_raised():
            self.raised = True
            return None
        return super().check(tx, tenant, tx.count_persons(), now)


# -- intrusion counters shared by the replicas ------------------------------------------------------------
class IntrusionActor:
    """The deployment's :class:`IntrusionDetector`, in one named Ray actor (system clock).
    Results are tagged tuples: a lock-out travels back as ``("throttled", message, reason)``."""

    def __init__(self, settings: dict) -> None:
        from .clock import SystemClock
        self.d = IntrusionDetector(SystemClock(), **settings)

    def call(self, method: str, *args):
        try:
            return "ok", getattr(self.d, method)(*args)
        except Throttled as exc:
            return "throttled", str(exc), exc.reason


class RayIntrusion:
    """Same calls as :class:`IntrusionDetector`, answered by the deployment's :class:`IntrusionActor`,
    so an attacker spreading calls over replicas gets one budget, not one per replica. If the actor
    is lost, Ray restarts it with empty counters (a reset, logged by Ray); calls wait for it."""

    METHODS = ("check_verify", "record_verify", "check_identify", "identify_hit", "record_identify",
               "check_unknown", "record_unknown", "reset")     # harden: enrolment probing, ResetLockout

    def __init__(self, cfg: ServiceConfig, namespace: str, timeout_s: float) -> None:
        import ray
        settings = {"verify_fail_limit": cfg.verify_fail_limit, "verify_fail_window_s": cfg.verify_fail_window_s,
                    "verify_lockout_s": cfg.verify_lockout_s, "identify_limit": cfg.identify_limit,
                    "identify_nomatch_limit": cfg.identify_nomatch_limit, "identify_window_s": cfg.identify_window_s,
                    "identify_lockout_s": cfg.identify_lockout_s, "verify_unknown_limit": cfg.verify_unknown_limit}
        self._ray, self.timeout = ray, timeout_s
        self._actor = ray.remote(IntrusionActor).options(
            name="veilface-intrusion", namespace=namespace, lifetime="detached", get_if_exists=True, max_restarts=-1,
            max_task_retries=-1, num_cpus=0).remote(settings)

    def _call(self, method: str, *args):
        from .matching.ray_backend import MatchingUnavailable
        ray = self._ray
        try:
            out = ray.get(self._actor.call.remote(method, *args), timeout=self.timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
            raise MatchingUnavailable(f"intrusion detection unavailable: {type(exc).__name__}") from None
        if out[0] == "throttled":
            raise Throttled(out[1], reason=out[2])
        return out[1]

    def check_verify(self, key: str) -> None:
        self._call("check_verify", key)

    def record_verify(self, key: str, matched: bool) -> Alert | None:
        return self._call("record_verify", key, matched)

    def check_identify(self, caller: str) -> Alert | None:
        return self._call("check_identify", caller)

    def identify_hit(self, caller: str) -> None:
        self._call("identify_hit", caller)

    def record_identify(self, caller: str, matched: bool) -> Alert | None:
        return self._call("record_identify", caller, matched)

    # harden: enrolment probing and the audited ResetLockout
    def check_unknown(self, caller: str) -> None:
        self._call("check_unknown", caller)

    def record_unknown(self, caller: str) -> Alert | None:
        return self._call("record_unknown", caller)

    def reset(self, subject_key: str = "", caller_prefix: str = "") -> int:
        return self._call("reset", subject_key, caller_prefix)


# -- startup --------------------------------------------------------------------------------------------
def make_backend(cfg: ServiceConfig, store: Store) -> MatchingBackend | None:
    """The configured gallery backend (None: the default in-process one)."""
    if cfg.matching == "local":
        return None
    from .matching.ray_backend import RayMatching
    store_url = cfg.store or str(getattr(store, "path", ""))
    return RayMatching(cfg.matching, store_url, cfg.ray_shards, cfg.ray_namespace, cfg.ray_node_ip,
                       cfg.gallery_backend, cfg.ray_timeout_s)


def startup_state(cfg: ServiceConfig, store: Store, clock: Clock) -> dict:
    """What a replica over Ray shards loads at start instead of every template (the shards hold
    those): nothing but the next expiry; entries are read per subject on demand."""
    return {"templates": 0, "galleries": 0, "seconds": 0.0, "shared": True, "next_expiry": store.next_expiry()}
