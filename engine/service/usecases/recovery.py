"""Startup: rebuild the gallery index from the store (after a clean stop or a SIGKILL).

The store is the source of truth. Cancellable galleries are rebuilt from the stored codes in
bulk. An HE identify gallery starts from its stored snapshot, then is reconciled with the
templates table: a template whose id is not in the snapshot (enrolled or re-enrolled after it)
is expanded and added, a subject of the snapshot with no stored template any more (withdrawn,
revoked, purged after it) is purged from its slot.
"""
from __future__ import annotations

import logging
import time

from ...template import Template
from ..config import ServiceConfig
from ..encrypted import HERegistry
from ..matching import Enrolled, GalleryIndex, GalleryKey, entry_id
from ..store import Store
from .devices import DeviceRegistry
from .he_snapshots import HESnapshots
from .maintenance import Retention

log = logging.getLogger("veilface.service")


class Recovery:
    """``load()`` once, before the server starts serving."""

    def __init__(self, cfg: ServiceConfig, store: Store, index: GalleryIndex, contexts: HERegistry,
                 devices: DeviceRegistry, retention: Retention, snapshots: HESnapshots) -> None:
        self.cfg, self.store, self.index, self.contexts = cfg, store, index, contexts
        self.devices, self.retention, self.snapshots = devices, retention, snapshots

    def load(self) -> dict:
        """Rebuild everything; returns what was loaded (``templates``, ``galleries``, ``seconds``,
        ``he_restored`` / ``he_added`` / ``he_removed`` templates, ``he_snapshots`` used)."""
        t0 = time.perf_counter()
        codes: dict[GalleryKey, tuple[list, list]] = {}
        he_rows: dict[GalleryKey, dict[str, int]] = {}
        n = 0
        stats = {"he_restored": 0, "he_added": 0, "he_removed": 0, "he_snapshots": 0}
        with self.index.lock:
            self.contexts.load(self.store.current_he_contexts())
            if not self.snapshots.enabled:   # disabled: no stale ciphertexts left behind in the store
                with self.store.transaction() as tx:
                    tx.delete_all_he_snapshots()
            for row in self.store.template_index():
                key = GalleryKey(row.tenant, row.purpose, row.scheme, row.key_version, row.gallery)
                if key.encrypted:
                    entry = self.contexts.get(*key.scope)
                    if entry is None or entry.epoch != key.key_version:
                        log.warning("skipping an HE template of a retired or unregistered epoch")
                        continue
                if self.index.schemes.get(row.scheme) is None:
                    blob = row.template if row.template is not None else self.store.template_blob(row.id)
                    self.index.schemes.of(Template.from_bytes(blob).spec)
                if key.encrypted:
                    he_rows.setdefault(key, {})[row.subject] = row.id
                else:
                    ids, templates = codes.setdefault(key, ([], []))
                    ids.append(entry_id(row.subject, row.sample_id) if row.gallery else row.subject)
                    templates.append(Template.from_bytes(row.template))
                if row.gallery:       # api: a sample of a named gallery
                    self.index.note_sample(key, row.subject, row.sample_id, Enrolled(row.key_version, row.expires_at))
                else:
                    self.index.note(row.tenant, row.subject, row.purpose, row.scheme,
                                    Enrolled(row.key_version, row.expires_at))
                self.retention.note_expiry(row.expires_at)
                n += 1
            for key, (ids, templates) in codes.items():
                self.index.open(key)
                self.index.backend.add(key, ids, templates)
            for key, table in he_rows.items():
                self._load_he_gallery(key, table, stats)
            # snapshots of galleries that have no stored template left (every subject deleted after
            # the snapshot, or an epoch no longer current): nothing to restore, delete the ciphertexts
            orphans = [k for k in self.store.he_snapshot_keys() if GalleryKey(*k) not in he_rows]
            if orphans:
                with self.store.transaction() as tx:
                    for k in orphans:
                        tx.delete_he_snapshot(*k)
            self.index.load_versions({(r.tenant, r.subject): (r.key_version, r.revoked_upto)
                                      for r in self.store.subjects()})
            self.devices.load(self.store.devices())
        loaded = {"templates": n, "galleries": len(codes) + len(he_rows), "seconds": time.perf_counter() - t0, **stats}
        self.retention.maybe_purge(force=True)
        return loaded

    def _load_he_gallery(self, key: GalleryKey, table: dict[str, int], stats: dict) -> None:
        """One HE gallery: restore its snapshot (identify mode), then reconcile it with ``table``
        ({subject: template id}, the source of truth)."""
        entry = self.contexts.get(*key.scope)
        self.index.open(key)
        st = self.index.snapshot_state(key)
        backend = self.index.backend
        seqs: dict[str, int] = {}
        restored = False
        if st is not None and self.snapshots.enabled:
            snap = self.store.he_snapshot(*key.stored)
            if snap is not None and snap.fingerprint == entry.fingerprint:
                try:
                    backend.load_snapshot(key, snap.snapshot)
                    seqs = dict(snap.subjects)
                    restored = True
                    stats["he_snapshots"] += 1
                except Exception as exc:  # noqa: BLE001 -- e.g. he_shards changed: rebuild instead
                    log.warning("HE gallery snapshot of %s not usable (%s); rebuilding from templates", key.scope, exc)
                    self.index.reopen(key)
                    st = self.index.snapshot_state(key)
                    seqs = {}
        held = set(backend.subjects(key)) if restored else set()
        stale = [s for s in held if s not in table]
        add = sorted((tid, s) for s, tid in table.items() if s not in held or seqs.get(s) != tid)
        for s in stale:                       # deleted after the snapshot: purge its slot
            backend.remove(key, s)
        for tid, s in add:
            blob = self.store.template_blob(tid)
            if blob is not None:              # ciphertext blob: identify mode expands it here
                backend.add(key, [s], [Template.from_bytes(blob)])
        stats["he_removed"] += len(stale)
        stats["he_added"] += len(add)
        stats["he_restored"] += len(table) - len(add)
        if st is not None:
            held_now = set(backend.subjects(key))
            with st.lock:
                st.seqs = {s: tid for s, tid in table.items() if s in held_now}
                if add or stale or (self.snapshots.enabled and not restored):
                    st.touch(removed=bool(stale))
                    st.urgent = True
                    self.snapshots.wake.set()
