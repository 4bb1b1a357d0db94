"""Galleries in Ray actors shared by every matcher replica: :class:`RayMatching`.

(Past 400 lines because it holds both sides of one seam -- the shard actor and the backend that
calls it -- whose calls and tagged results must change together.)

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

* pg2: shards run in the bundles of one detached placement group (SPREAD): Ray spreads them over
  the nodes, records which bundle is where, and reschedules a dead node's bundles (so restarts its
  shards) on live nodes. (A *soft* node-affinity strategy was not honoured by Ray 2.60 for
  zero-CPU actors, a hard one would pin a restarted shard to its dead node.)

Encrypted (``he``) galleries (pg2): the same subject-hash partition. Every shard opens the gallery
with the epoch's *public* context (the replica sends it once; a restarted shard reads the
current contexts from the store); an identify-mode shard packs its own subjects into its own
blocks, so the shards own disjoint blocks. Identify scatters the encrypted probe, each shard
returns its ``scores`` blob (ciphertexts, one per block, + the probe's encrypted norm) and the
replica concatenates them (:func:`engine.he.merge_scores`): the key holder decrypts one blob laid
out like a single gallery's. Nothing is decrypted on a shard or a replica. HE Verify goes to the
owning shard. A shard reloads HE templates by re-adding them (an identify-mode add expands each
template: ~0.3 s); HE galleries on shards are not snapshotted.
"""
from __future__ import annotations

import heapq
import json
import logging
import os
import threading
import time
from collections.abc import Sequence

import numpy as np

from ...errors import NotEnrolled
from ...gallery import Match
from ...template import MAGIC, SchemeSpec, Template
from ..status import PreconditionFailed, StatusError
from ..store import shard_of
from .backend import LocalMatching, MatchingBackend
from .galleries import SchemeCache
from .keys import GalleryKey, entry_id, split_entry

log = logging.getLogger("veilface.service")

#: rows a shard reads from the store per query when it (re)loads its partition
LOAD_PAGE = 50_000
#: how long a replica waits at start for shards loading their partitions (a call waits ``timeout_s``)
LOAD_TIMEOUT_S = 3600.0
#: what each shard's placement-group bundle reserves (a token amount: shards declare no CPUs)
PLACEMENT_BUNDLE = {"CPU": 0.001}


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
        self._open_lock = threading.Lock()
        self.loaded = self._load(store_url) if store_url else 0

    def _load(self, store_url: str) -> int:
        """Read this shard's partition of the stored templates page by page (HE ones for the
        current epochs, whose public contexts are read first)."""
        store = _open_store(store_url)
        n, after = 0, 0
        try:
            for row in store.current_he_contexts():      # pg2
                self._open_he(GalleryKey(row.tenant, row.purpose, row.scheme, row.epoch), _spec_of(row.scheme),
                              row.context)
            while True:
                page = store.shard_templates(self.shards, self.shard, after, LOAD_PAGE)
                if not page:
                    break
                after = page[-1].id
                groups: dict[GalleryKey, tuple[list, list]] = {}
                for row in page:
                    key = GalleryKey(row.tenant, row.purpose, row.scheme, row.key_version, row.gallery)
                    if key.encrypted and not self.local.is_open(key):
                        continue                      # an HE template of a retired epoch
                    ids, blobs = groups.setdefault(key, ([], []))
                    ids.append(entry_id(row.subject, row.sample_id) if row.gallery else row.subject)   # api
                    blobs.append(row.template)
                del page
                for key, (ids, blobs) in groups.items():
                    n += self._add_blobs(key, ids, blobs)
        finally:
            store.close()
        log.info("gallery shard %d/%d loaded %d templates", self.shard, self.shards, n)
        return n

    def _open(self, key: GalleryKey, template: Template) -> None:
        if not self.local.is_open(key):
            if key.encrypted:
                raise NotEnrolled(f"no open HE gallery {key.purpose}/v{key.key_version}")
            self.local.open(key, self.schemes.of(template.spec))

    def _open_he(self, key: GalleryKey, spec: SchemeSpec, context: bytes) -> None:
        """pg2: the gallery of an HE epoch, for its public context (bytes: never a private one)."""
        with self._open_lock:
            if self.local.is_open(key):
                return
            from ...he import PublicContext
            self.local.open(key, self.schemes.of(spec), PublicContext.from_bytes(context))

    # -- calls (results are tagged tuples: exceptions do not cross Ray as themselves) -----------------
    def ping(self) -> tuple[int, int, int, str]:
        """(shard, shards, process id, node address) -- where this shard runs."""
        import ray
        return self.shard, self.shards, os.getpid(), ray.util.get_node_ip_address()

    def open_he(self, key: tuple, spec: SchemeSpec, context: bytes) -> bool:
        self._open_he(GalleryKey(*key), spec, context)
        return True

    def is_open(self, key: tuple) -> bool:
        return self.local.is_open(GalleryKey(*key))

    def add(self, key: tuple, subject_ids: list[str], blobs: list[bytes]) -> int:
        return self._add_blobs(GalleryKey(*key), list(subject_ids), blobs)

    def _add_blobs(self, key: GalleryKey, ids: list[str], blobs: list[bytes]) -> int:
        """Add serialised templates. pg2: cancellable ones sharing a frame header (all of a gallery,
        as a rule) are parsed once per header and stacked straight from their payloads (a 5M-row
        reload parsed 5M frames one by one); anything else goes template by template."""
        if key.encrypted:
            ts = [Template.from_bytes(b) for b in blobs]
            self._open(key, ts[0])
            self.local.add(key, ids, ts)
            return len(ts)
        head = len(MAGIC) + 5                              # magic | version u8 | header length u32
        by_head: dict[bytes, tuple[list, list]] = {}
        for sid, b in zip(ids, blobs):
            b = bytes(b)
            cut = head + int.from_bytes(b[head - 4:head], "little") if len(b) > head else len(b)
            sids, payloads = by_head.setdefault(b[:cut], ([], []))
            sids.append(sid)
            payloads.append(b[cut:])
        for prefix, (sids, payloads) in by_head.items():
            t0 = Template.from_bytes(prefix + payloads[0])   # the frame and header, checked once
            if any(len(pl) != len(payloads[0]) for pl in payloads):
                for pl in payloads:
                    Template.from_bytes(prefix + pl)        # raises TemplateFormatError on the first bad one
            self._open(key, t0)
            g = self.local.gallery(key)
            t0.require(g.scheme.spec)
            codes = np.frombuffer(bytearray(b"".join(payloads)), dtype=t0.data.dtype)
            g.add_codes(sids, g.scheme.check_codes(codes.reshape((len(payloads), *t0.data.shape))))
        return len(ids)

    def remove(self, key: tuple, subject_id: str) -> bool:
        return self.local.remove(GalleryKey(*key), subject_id)

    def verify(self, key: tuple, subject_id: str, probe: bytes) -> tuple[str, float | bytes]:
        try:
            out = self.local.verify(GalleryKey(*key), subject_id, Template.from_bytes(probe))
        except NotEnrolled:
            return "not_enrolled", 0.0
        return "ok", out if isinstance(out, bytes) else float(out)   # HE: the encrypted score blob

    def search(self, key: tuple, probe: bytes, k: int, threshold: float | None) -> tuple[list | bytes | None, int]:
        key = GalleryKey(*key)
        if key.encrypted:                 # pg2: this shard's ``scores`` blob (None: nothing stored here)
            n = self.local.size(key)
            return (self.local.search(key, Template.from_bytes(probe), k, threshold) if n else None), n
        hits = self.local.search(key, Template.from_bytes(probe), k, threshold)
        return [(m.subject_id, float(m.score)) for m in hits], self.local.size(key)

    def empty_scores(self, key: tuple) -> tuple[str, bytes]:
        """The ``scores`` blob of this (empty) HE gallery: what a single empty gallery answers."""
        g = self.local.gallery(GalleryKey(*key))
        if g is None:
            raise NotEnrolled("no open HE gallery")
        from ...he import pack_blob
        return "ok", pack_blob("scores", dict(g.ctx.header(), blocks=[]), [])

    def add_he_block(self, key: tuple, subject_ids: list[str], block: bytes) -> int:
        """pg2: a block of up to N encrypted templates (:func:`engine.he.encrypt_block_blob`, an
        enrolment station's bulk upload) straight into this shard's identify gallery."""
        g = self.local.gallery(GalleryKey(*key))
        if g is None:
            raise NotEnrolled("no open HE gallery")
        g.add_block(subject_ids, block)
        return len(subject_ids)

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
        placement = self._placement()
        self._shards = [actor.options(
            name=f"veilface-shard-{i}-of-{self.shards}", namespace=namespace, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_task_retries=-1, max_concurrency=shard_concurrency, num_cpus=0,
            scheduling_strategy=placement(i)).remote(i, self.shards, store_url, gallery_backend)
            for i in range(self.shards)]
        self._wait_loaded([s.ping.remote() for s in self._shards])   # every shard loaded (or reloaded)
        self._last = threading.local()
        self._he_open: set[GalleryKey] = set()                   # HE galleries known open on the shards

    def _wait_loaded(self, refs) -> None:
        """pg2: wait for shards that are (re)loading their partitions (~2 min per 5M templates on a
        2-core node) up to :data:`LOAD_TIMEOUT_S`, logging progress, instead of the per-call timeout."""
        deadline = time.monotonic() + max(self.timeout, LOAD_TIMEOUT_S)
        while True:
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=max(1.0, min(60.0, deadline - time.monotonic())))
            if len(ready) == len(refs) or time.monotonic() >= deadline:
                self._get(refs)
                return
            log.info("waiting for %d of %d gallery shards to load their partitions", len(refs) - len(ready), len(refs))

    def _placement(self):
        """pg2: a detached placement group ``veilface-shards-<n>`` (one small bundle per shard,
        SPREAD over the nodes, shared by every replica); shard ``i`` runs in bundle ``i``. Ray
        records where each bundle is (:meth:`placement`), and when a node dies it reschedules that
        node's bundles -- and so restarts their shards -- on the live nodes. Falls back to Ray's
        SPREAD strategy when the group cannot be placed."""
        from ray.util.placement_group import get_placement_group, placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        name = f"veilface-shards-{self.shards}"
        try:
            try:
                pg = get_placement_group(name)
            except ValueError:
                try:
                    pg = placement_group([dict(PLACEMENT_BUNDLE)] * self.shards, strategy="SPREAD", name=name,
                                         lifetime="detached")
                except Exception:  # noqa: BLE001 - another replica made it meanwhile
                    pg = get_placement_group(name)
            self._ray.get(pg.ready(), timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - placement is best effort; the shards still run
            log.warning("gallery shards: no placement group (%s); using Ray's SPREAD", exc)
            return lambda i: "SPREAD"
        self._pg = pg
        return lambda i: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)

    def placement(self) -> dict[int, str]:
        """{shard: node id} of the placement group's bundles now (empty without one)."""
        from ray.util.placement_group import placement_group_table
        pg = getattr(self, "_pg", None)
        return {} if pg is None else {int(b): n for b, n in placement_group_table(pg)["bundles_to_node_id"].items()}

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

    # -- MatchingBackend ------------------------------------------------------------------------------
    def open(self, key: GalleryKey, scheme, context=None) -> None:
        """A cancellable gallery is made by each shard on its first add; an HE gallery is opened
        on every shard now, with the epoch's public context (pg2)."""
        if not key.encrypted or key in self._he_open:
            return
        if context is None:
            raise PreconditionFailed("an HE gallery needs its public context", reason="HE_CONTEXT_REQUIRED")
        ctx = self._ray.put(context.to_bytes())
        self._get([s.open_he.remote(tuple(key), scheme.spec, ctx) for s in self._shards])
        self._he_open.add(key)

    def is_open(self, key: GalleryKey) -> bool:
        if not key.encrypted:
            return True                   # cancellable galleries exist on every shard, possibly empty
        if key not in self._he_open and self._get(self._shards[0].is_open.remote(tuple(key))):
            self._he_open.add(key)        # opened by a (restarted) shard from the store
        return key in self._he_open

    def keys(self) -> list[GalleryKey]:
        return sorted({GalleryKey(*k) for part in self._get([s.keys.remote() for s in self._shards]) for k in part})

    def add(self, key: GalleryKey, subject_ids: Sequence[str], templates: Sequence[Template]) -> None:
        parts: dict[int, tuple[list, list]] = {}
        for s, t in zip(subject_ids, templates):
            ids, blobs = parts.setdefault(shard_of(key.tenant, split_entry(s)[0], self.shards), ([], []))
            ids.append(s)
            blobs.append(t.to_bytes())
        self._get([self._shards[i].add.remote(tuple(key), ids, blobs) for i, (ids, blobs) in parts.items()])

    def remove(self, key: GalleryKey, subject_id: str) -> bool:
        return bool(self._get(self.shard(key.tenant, subject_id).remove.remote(tuple(key), subject_id)))

    def subjects(self, key: GalleryKey) -> list[str]:
        return [s for part in self._get([sh.subjects.remote(tuple(key)) for sh in self._shards]) for s in part]

    def size(self, key: GalleryKey) -> int:
        last = getattr(self._last, "size", None)     # Identify asks right after its search: no second scatter
        if last is not None and last[0] == key:
            self._last.size = None
            return last[1]
        return sum(self._get([s.size.remote(tuple(key)) for s in self._shards]))

    def verify(self, key: GalleryKey, subject_id: str, probe: Template) -> float | bytes:
        tag, score = self._get(self.shard(key.tenant, subject_id).verify.remote(tuple(key), subject_id, probe.to_bytes()))
        if tag != "ok":
            raise NotEnrolled(f"subject {subject_id!r} is not enrolled")
        return score

    def search(self, key: GalleryKey, probe: Template, k: int, threshold: float | None) -> list[Match] | bytes:
        blob = self._ray.put(probe.to_bytes()) if key.encrypted else probe.to_bytes()
        parts = self._get([s.search.remote(tuple(key), blob, k, threshold) for s in self._shards])
        self._last.size = (key, sum(n for _, n in parts))
        if key.encrypted:                 # pg2: concatenate the shards' encrypted scores (no decryption)
            blobs = [b for b, _ in parts if b is not None]
            if not blobs:
                return self._empty_scores(key)
            from ...he import merge_scores
            return blobs[0] if len(blobs) == 1 else merge_scores(blobs)
        best = heapq.nlargest(k, (hit for hits, _ in parts for hit in hits), key=lambda h: h[1])
        return [Match(s, score) for s, score in best]

    def _empty_scores(self, key: GalleryKey) -> bytes:
        """The ``scores`` blob of an empty HE gallery (what a single empty gallery answers)."""
        tag, blob = self._get(self._shards[0].empty_scores.remote(tuple(key)))
        return blob

    def add_he_block(self, key: GalleryKey, subject_ids: Sequence[str], block: bytes) -> None:
        """pg2: bulk-load one HE identify block (:func:`engine.he.encrypt_block_blob`) of subjects
        that all hash to one shard (the bench; an enrolment station's bulk upload)."""
        owners = {shard_of(key.tenant, s, self.shards) for s in subject_ids}
        if len(owners) != 1:
            raise PreconditionFailed("a block's subjects must belong to one shard", reason="BAD_BLOCK")
        self._get(self._shards[owners.pop()].add_he_block.remote(tuple(key), list(subject_ids), block))

    def can_snapshot(self, key: GalleryKey) -> bool:
        return False                      # shards reload from the store instead

    def snapshot(self, key: GalleryKey) -> bytes:
        raise PreconditionFailed("Ray gallery shards are not snapshotted", reason="SCHEME_NOT_SUPPORTED")

    def load_snapshot(self, key: GalleryKey, blob: bytes) -> None:
        self.snapshot(key)

    def drop(self, key: GalleryKey) -> None:
        self._he_open.discard(key)
        self._get([s.drop.remote(tuple(key)) for s in self._shards])

    def clear(self) -> None:
        """Empty every shard (decommission)."""
        self._he_open.clear()
        self._get([s.clear.remote() for s in self._shards])

    def close(self) -> None:
        """Forget the shard handles; the shards keep serving the other replicas."""
        self._shards = []

    def pids(self) -> list[tuple[int, int, int, str]]:
        """(shard, shards, process id, node address) of every shard (tests, status)."""
        return self._get([s.ping.remote() for s in self._shards])


def _spec_of(spec_key: str) -> SchemeSpec:
    """The :class:`SchemeSpec` of a canonical spec key (``name/vN:{params}``, ``SchemeSpec.key()``)."""
    name, _, rest = spec_key.partition("/v")
    version, _, params = rest.partition(":")
    return SchemeSpec(name, int(version), json.loads(params))
