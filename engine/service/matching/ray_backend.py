"""Galleries in Ray actors shared by every matcher replica: :class:`RayMatching`.

The templates of a deployment are partitioned over ``shards`` actors by a hash of (tenant,
subject) (:func:`engine.service.store.shard_of`, the same hash the store keeps in
``templates.shard_hash``). Each shard is a :class:`GalleryShard`: a :class:`LocalMatching` over
its partition, i.e. the native kernels (GIL released) in its own process.

* Verify goes to the subject's shard; Identify scatters the probe to every shard and merges the
  per-shard top-k (a shard returns at most ``k`` candidates, so the merge is exact).
* Add / remove go to the owning shard and are waited for: a use case acknowledges an enrolment
  or withdrawal only after every shard concerned applied it (read-your-writes across replicas).
* Shards are *named, detached* actors in one Ray namespace (``veilface-shard-<i>-of-<n>``), made
  by whichever replica comes first (``get_if_exists``), so every replica talks to the same ones;
  a replica shutting down leaves them running.
* A shard that dies (its node killed) is restarted by Ray (``max_restarts=-1``) and reloads its
  partition from the store in ``__init__``; calls made meanwhile are retried by Ray on the new
  instance (``max_task_retries=-1``; add / remove / search are idempotent), bounded by
  ``timeout_s`` -> ``UNAVAILABLE`` (``MATCHING_UNAVAILABLE``), which the SDK retries.

Encrypted (``he``) galleries are not sharded here (yet): their keys are refused with
``SCHEME_NOT_SUPPORTED``; run HE deployments with the local backend (``docs/deployment.md``).
"""
from __future__ import annotations

import heapq
import logging
import os
import threading
from collections.abc import Sequence

from ...errors import NotEnrolled
from ...gallery import Match
from ...template import Template
from ..status import PreconditionFailed, StatusError
from ..store import shard_of
from .backend import LocalMatching, MatchingBackend
from .galleries import SchemeCache
from .keys import GalleryKey, entry_id, split_entry

log = logging.getLogger("veilface.service")

#: rows a shard reads from the store per query when it (re)loads its partition
LOAD_PAGE = 50_000


class MatchingUnavailable(StatusError):
    """The gallery shards cannot be reached right now (a Ray node lost, a shard restarting): retry."""
    code, reason = "UNAVAILABLE", "MATCHING_UNAVAILABLE"


def parse_ray_url(url: str) -> str:
    """``ray://HOST:PORT`` -> ``HOST:PORT`` (the GCS address of the cluster: ``ray start --head --port``)."""
    if not url.startswith("ray://"):
        raise ValueError(f"not a ray:// URL: {url!r}")
    addr = url[len("ray://"):].strip("/")
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"ray:// needs HOST:PORT, got {url!r}")
    return addr


def _open_store(url: str):
    from ..store import SQLiteStore, open_store
    return open_store("", url=url, pool_size=2) if "://" in url else SQLiteStore(url)


class GalleryShard:
    """One partition of every cancellable gallery (runs as a Ray actor; plain class for tests).

    Arguments and results are bytes / builtins only (``Template.to_bytes()`` in, subject ids and
    floats out), so nothing but protected templates crosses the wire.
    """

    def __init__(self, shard: int, shards: int, store_url: str, gallery_backend: str = "native") -> None:
        self.shard, self.shards = int(shard), int(shards)
        self.local = LocalMatching(gallery_backend)
        self.schemes = SchemeCache()
        self.loaded = self._load(store_url) if store_url else 0

    def _load(self, store_url: str) -> int:
        """Read this shard's partition of the stored templates (cancellable ones) page by page."""
        store = _open_store(store_url)
        n, after = 0, 0
        try:
            while True:
                page = store.shard_templates(self.shards, self.shard, after, LOAD_PAGE)
                if not page:
                    break
                after = page[-1].id
                groups: dict[GalleryKey, tuple[list, list]] = {}
                for row in page:
                    key = GalleryKey(row.tenant, row.purpose, row.scheme, row.key_version, row.gallery)
                    if key.encrypted:
                        continue
                    ids, ts = groups.setdefault(key, ([], []))
                    ids.append(entry_id(row.subject, row.sample_id) if row.gallery else row.subject)   # api
                    ts.append(Template.from_bytes(row.template))
                for key, (ids, ts) in groups.items():
                    self._open(key, ts[0])
                    self.local.add(key, ids, ts)
                    n += len(ids)
        finally:
            store.close()
        log.info("gallery shard %d/%d loaded %d templates", self.shard, self.shards, n)
        return n

    def _open(self, key: GalleryKey, template: Template) -> None:
        if not self.local.is_open(key):
            self.local.open(key, self.schemes.of(template.spec))

    # -- calls (results are tagged tuples: exceptions do not cross Ray as themselves) -----------------
    def ping(self) -> tuple[int, int, int]:
        return self.shard, self.shards, os.getpid()

    def add(self, key: tuple, subject_ids: list[str], blobs: list[bytes]) -> int:
        key = GalleryKey(*key)
        ts = [Template.from_bytes(b) for b in blobs]
        self._open(key, ts[0])
        self.local.add(key, subject_ids, ts)
        return len(ts)

    def remove(self, key: tuple, subject_id: str) -> bool:
        return self.local.remove(GalleryKey(*key), subject_id)

    def verify(self, key: tuple, subject_id: str, probe: bytes) -> tuple[str, float]:
        try:
            return "ok", float(self.local.verify(GalleryKey(*key), subject_id, Template.from_bytes(probe)))
        except NotEnrolled:
            return "not_enrolled", 0.0

    def search(self, key: tuple, probe: bytes, k: int, threshold: float | None) -> tuple[list[tuple[str, float]], int]:
        key = GalleryKey(*key)
        hits = self.local.search(key, Template.from_bytes(probe), k, threshold)
        return [(m.subject_id, float(m.score)) for m in hits], self.local.size(key)

    def size(self, key: tuple) -> int:
        return self.local.size(GalleryKey(*key))

    def subjects(self, key: tuple) -> list[str]:
        return self.local.subjects(GalleryKey(*key))

    def keys(self) -> list[tuple]:
        return [tuple(k) for k in self.local.keys()]

    def drop(self, key: tuple) -> None:
        self.local.drop(GalleryKey(*key))

    def clear(self) -> None:
        self.local.close()


class RayMatching(MatchingBackend):
    """Galleries sharded over Ray actors (see the module docstring)."""

    def __init__(self, url: str, store_url: str, shards: int = 2, namespace: str = "veilface", node_ip: str = "",
                 gallery_backend: str = "native", timeout_s: float = 60.0, shard_concurrency: int = 4) -> None:
        import ray
        self._ray = ray
        self.address, self.shards, self.timeout = parse_ray_url(url), int(shards), float(timeout_s)
        if not ray.is_initialized():
            kw = {"_node_ip_address": node_ip} if node_ip else {}
            ray.init(address=self.address, namespace=namespace, log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=False, **kw)
        actor = ray.remote(GalleryShard)
        self._shards = [actor.options(
            name=f"veilface-shard-{i}-of-{self.shards}", namespace=namespace, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_task_retries=-1, max_concurrency=shard_concurrency, num_cpus=0,
            scheduling_strategy="SPREAD").remote(i, self.shards, store_url, gallery_backend)
            for i in range(self.shards)]
        self._get([s.ping.remote() for s in self._shards])       # every shard loaded (or reloaded)
        self._last = threading.local()

    # -- plumbing -----------------------------------------------------------------------------------
    def _get(self, refs):
        ray = self._ray
        try:
            return ray.get(refs, timeout=self.timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.ObjectLostError) as exc:
            raise MatchingUnavailable(f"gallery shards unavailable: {type(exc).__name__}") from None

    def shard(self, tenant: str, subject: str):
        """The shard of a gallery entry: its subject's (api: a named-gallery sample ``subject/sample``
        lives with its subject, as the loader reads it)."""
        return self._shards[shard_of(tenant, split_entry(subject)[0], self.shards)]

    @staticmethod
    def _check(key: GalleryKey) -> None:
        if key.encrypted:
            raise PreconditionFailed("encrypted (he) galleries are not sharded on Ray; use matching = \"local\"",
                                     reason="SCHEME_NOT_SUPPORTED")

    # -- MatchingBackend ------------------------------------------------------------------------------
    def open(self, key: GalleryKey, scheme, context=None) -> None:
        self._check(key)                  # a shard makes its part of a gallery on its first add

    def is_open(self, key: GalleryKey) -> bool:
        return not key.encrypted          # cancellable galleries exist on every shard, possibly empty

    def keys(self) -> list[GalleryKey]:
        return sorted({GalleryKey(*k) for part in self._get([s.keys.remote() for s in self._shards]) for k in part})

    def add(self, key: GalleryKey, subject_ids: Sequence[str], templates: Sequence[Template]) -> None:
        self._check(key)
        parts: dict[int, tuple[list, list]] = {}
        for s, t in zip(subject_ids, templates):
            ids, blobs = parts.setdefault(shard_of(key.tenant, split_entry(s)[0], self.shards), ([], []))
            ids.append(s)
            blobs.append(t.to_bytes())
        self._get([self._shards[i].add.remote(tuple(key), ids, blobs) for i, (ids, blobs) in parts.items()])

    def remove(self, key: GalleryKey, subject_id: str) -> bool:
        if key.encrypted:
            return False
        return bool(self._get(self.shard(key.tenant, subject_id).remove.remote(tuple(key), subject_id)))

    def subjects(self, key: GalleryKey) -> list[str]:
        return [s for part in self._get([sh.subjects.remote(tuple(key)) for sh in self._shards]) for s in part]

    def size(self, key: GalleryKey) -> int:
        last = getattr(self._last, "size", None)     # Identify asks right after its search: no second scatter
        if last is not None and last[0] == key:
            self._last.size = None
            return last[1]
        return sum(self._get([s.size.remote(tuple(key)) for s in self._shards]))

    def verify(self, key: GalleryKey, subject_id: str, probe: Template) -> float:
        self._check(key)
        tag, score = self._get(self.shard(key.tenant, subject_id).verify.remote(tuple(key), subject_id, probe.to_bytes()))
        if tag != "ok":
            raise NotEnrolled(f"subject {subject_id!r} is not enrolled")
        return score

    def search(self, key: GalleryKey, probe: Template, k: int, threshold: float | None) -> list[Match]:
        self._check(key)
        blob = probe.to_bytes()
        parts = self._get([s.search.remote(tuple(key), blob, k, threshold) for s in self._shards])
        self._last.size = (key, sum(n for _, n in parts))
        best = heapq.nlargest(k, (hit for hits, _ in parts for hit in hits), key=lambda h: h[1])
        return [Match(s, score) for s, score in best]

    def can_snapshot(self, key: GalleryKey) -> bool:
        return False                      # shards reload from the store instead

    def snapshot(self, key: GalleryKey) -> bytes:
        raise PreconditionFailed("Ray gallery shards are not snapshotted", reason="SCHEME_NOT_SUPPORTED")

    def load_snapshot(self, key: GalleryKey, blob: bytes) -> None:
        self.snapshot(key)

    def drop(self, key: GalleryKey) -> None:
        self._get([s.drop.remote(tuple(key)) for s in self._shards])

    def clear(self) -> None:
        """Empty every shard (decommission)."""
        self._get([s.clear.remote() for s in self._shards])

    def close(self) -> None:
        """Forget the shard handles; the shards keep serving the other replicas."""
        self._shards = []

    def pids(self) -> list[tuple[int, int, int]]:
        """(shard, shards, process id) of every shard (tests, status)."""
        return self._get([s.ping.remote() for s in self._shards])
