"""Startup: rebuild the gallery index from the store (after a clean stop or a SIGKILL).

The store is the source of truth. Cancellable galleries are rebuilt from the stored codes in
bulk. An HE identify gallery starts from its stored snapshot, then is reconciled with the
templates table: a template whose id is not in the snapshot (enrolled or re-enrolled after it)
is expanded and added, a subject of the snapshot with no stored template any more (withdrawn,
revoked, purged after it) is purged from its slot.

Startup never dies on one bad row: every stored template passes the validation layer again
(:func:`engine.service.validation.templates.check_stored_template`: frame, header, scheme, code
values, HE blob structure) and every current HE context must parse; a row that does not is
*quarantined* -- moved to the ``quarantine`` table in one transaction with a ``QUARANTINE`` audit
entry (reason, row identity; never its bytes) -- and the rest is served. ``veilface report``
lists quarantined rows. A device whose stored location kind is a private space under today's
rules (any spelling) is loaded as PRIVATE_SPACE.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from ...errors import TemplateFormatError
from ...template import Template
from .. import policy
from ..audit import AuditEvent
from ..config import ServiceConfig
from ..encrypted import HERegistry
from ..matching import Enrolled, GalleryIndex, GalleryKey, entry_id
from ..store import Store
from ..validation.templates import check_stored_template
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
        ``he_restored`` / ``he_added`` / ``he_removed`` templates, ``he_snapshots`` used,
        ``quarantined`` rows)."""
        t0 = time.perf_counter()
        codes: dict[GalleryKey, tuple[list, list]] = {}
        he_rows: dict[GalleryKey, dict[str, int]] = {}
        he_meta: dict = {}
        n = 0
        stats = {"he_restored": 0, "he_added": 0, "he_removed": 0, "he_snapshots": 0, "quarantined": 0}
        self._stats = stats
        with self.index.lock:
            self._load_contexts()
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
                if key.encrypted:
                    # ciphertexts (~262 KB each in identify mode) are read and checked only when a
                    # gallery needs them (_load_he_gallery); the scheme is made once per spec
                    if self.index.schemes.get(row.scheme) is None and not self._scheme_of(row):
                        continue
                    he_rows.setdefault(key, {})[row.subject] = row.id
                    he_meta[(key, row.subject)] = row
                    continue
                try:
                    t, _ = check_stored_template(row.template, self.index.schemes.of)
                    if t.spec.key() != row.scheme or t.key_version != row.key_version:
                        raise TemplateFormatError("the template does not match its row (scheme / key version)")
                except Exception as exc:  # noqa: BLE001 -- any failure of one row: set it aside, serve the rest
                    self._quarantine_template(row, exc)
                    continue
                ids, templates = codes.setdefault(key, ([], []))
                ids.append(entry_id(row.subject, row.sample_id) if row.gallery else row.subject)
                templates.append(t)
                self._note(row)
                n += 1
            for key, (ids, templates) in codes.items():
                self.index.open(key)
                self.index.backend.add(key, ids, templates)
            for key, table in he_rows.items():
                self._load_he_gallery(key, table, stats)       # drops quarantined subjects from ``table``
                for subject in table:
                    self._note(he_meta[(key, subject)])
                    n += 1
            # snapshots of galleries that have no stored template left (every subject deleted after
            # the snapshot, or an epoch no longer current): nothing to restore, delete the ciphertexts
            orphans = [k for k in self.store.he_snapshot_keys() if GalleryKey(*k) not in he_rows]
            if orphans:
                with self.store.transaction() as tx:
                    for k in orphans:
                        tx.delete_he_snapshot(*k)
            self.index.load_versions({(r.tenant, r.subject): (r.key_version, r.revoked_upto)
                                      for r in self.store.subjects()})
            self.devices.load([dataclasses.replace(d, location_class=policy.effective_class(d.location_class,
                                                                                            d.location_kind))
                               for d in self.store.devices()])
        loaded = {"templates": n, "galleries": len(codes) + len(he_rows), "seconds": time.perf_counter() - t0, **stats}
        self.retention.maybe_purge(force=True)
        return loaded

    def _note(self, row) -> None:
        meta = Enrolled(row.key_version, row.expires_at)
        if row.gallery:       # api: a sample of a named gallery
            key = GalleryKey(row.tenant, row.purpose, row.scheme, row.key_version, row.gallery)
            self.index.note_sample(key, row.subject, row.sample_id, meta)
        else:
            self.index.note(row.tenant, row.subject, row.purpose, row.scheme, meta)
        self.retention.note_expiry(row.expires_at)

    def _scheme_of(self, row) -> bool:
        """Make the scheme of an HE row from its stored blob; False (row quarantined) if it cannot be."""
        try:
            self.index.schemes.of(Template.from_bytes(self.store.template_blob(row.id) or b"").spec)
            return True
        except Exception as exc:  # noqa: BLE001
            self._quarantine_template(row, exc)
            return False

    # -- quarantine ---------------------------------------------------------------------------------------
    def _load_contexts(self) -> None:
        """The current public HE contexts, one by one: one that does not parse is quarantined."""
        entries = []
        for r in self.store.current_he_contexts():
            try:
                entries.append(self.contexts.entry_of(r))
            except Exception as exc:  # noqa: BLE001
                self._quarantine(lambda tx, exc=exc, r=r: tx.quarantine_he_context(
                    r.tenant, r.purpose, r.scheme, r.epoch, _reason(exc), str(exc)[:200], self.store.clock.now()))
        self.contexts.replace(entries)

    def _quarantine_template(self, row, exc: Exception) -> None:
        self._quarantine(lambda tx: tx.quarantine_template(row.id, _reason(exc), str(exc)[:200], self.store.clock.now()))

    def _quarantine(self, move) -> None:
        with self.store.transaction() as tx:
            q = move(tx)
            if q is None:
                return
            tx.audit(AuditEvent("QUARANTINE", "system", "recovery", q.tenant, q.subject, q.purpose,
                                details={"kind": q.kind, "quarantine_id": q.id, "source_id": q.source_id,
                                         "scheme": q.scheme[:64], "key_version": q.key_version}), "ALERT", q.reason)
        self._stats["quarantined"] += 1
        log.error("quarantined stored %s #%d (%s/%s %s): %s -- see `veilface report`", q.kind, q.source_id, q.tenant,
                  q.subject or "-", q.purpose, q.detail)

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
        restored_n = len(table) - len(add)
        for tid, s in add:
            blob = self.store.template_blob(tid)
            if blob is not None:              # ciphertext blob: identify mode expands it here
                try:
                    t, _ = check_stored_template(blob, self.index.schemes.of)
                    backend.add(key, [s], [t])
                except Exception as exc:  # noqa: BLE001 -- malformed, or SEAL refused it: set it aside
                    self._quarantine(lambda tx, tid=tid, exc=exc: tx.quarantine_template(
                        tid, _reason(exc), str(exc)[:200], self.store.clock.now()))
                    table.pop(s, None)
                    if s in held:             # the snapshot still holds an older template of it
                        backend.remove(key, s)
        stats["he_removed"] += len(stale)
        stats["he_added"] += len(table) - restored_n
        stats["he_restored"] += restored_n
        if st is not None:
            held_now = set(backend.subjects(key))
            with st.lock:
                st.seqs = {s: tid for s, tid in table.items() if s in held_now}
                if add or stale or (self.snapshots.enabled and not restored):
                    st.touch(removed=bool(stale))
                    st.urgent = True
                    self.snapshots.wake.set()


def _reason(exc: Exception) -> str:
    """The machine-readable reason of a quarantine (the error's ``reason``, else its class)."""
    return str(getattr(exc, "reason", "") or type(exc).__name__)[:64]
