"""Snapshots of HE identify galleries: their packed ciphertexts stored, so a restart does not
expand every template again (``engine/service/README.md``, "Restart: gallery snapshots").

A changed gallery is snapshotted by a background thread as soon as ``he_snapshot_batch``
templates were added, right after a removal (``he_snapshot_after_removal``), at the latest
``he_snapshot_interval_s`` after its first unsaved change, and at clean shutdown. A snapshot is
written only for the current epoch of a live (not decommissioned) matcher.
"""
from __future__ import annotations

import logging
import threading
import time

from ...errors import NotEnrolled
from ..clock import Clock
from ..config import ServiceConfig
from ..matching import GalleryIndex, GalleryKey, SnapshotState
from ..store import HESnapshotRow, Store

log = logging.getLogger("veilface.service")


class HESnapshots:
    """Schedules and writes HE identify gallery snapshots."""

    def __init__(self, cfg: ServiceConfig, store: Store, clock: Clock, index: GalleryIndex) -> None:
        self.cfg, self.store, self.clock, self.index = cfg, store, clock, index
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.he_snapshot_interval_s > 0

    def on_change(self, state: SnapshotState, removed: bool) -> None:
        """The index's hook: wake the writer when a batch is full or after a removal."""
        if (removed and self.cfg.he_snapshot_after_removal) or state.added >= self.cfg.he_snapshot_batch:
            self.wake.set()

    def snapshot_due(self, force: bool = False) -> int:
        """Store a snapshot of every HE identify gallery that is due: changed and (``force``, or
        ``he_snapshot_batch`` adds, or a removal with ``he_snapshot_after_removal``, or the first
        unsaved change older than ``he_snapshot_interval_s``). Returns how many were stored."""
        if not self.enabled:
            return 0
        now, done = time.monotonic(), 0
        for key, st in self.index.snapshot_states():
            if st.closed or not st.dirty or not self.index.backend.is_open(key):
                continue
            due = (force or st.urgent or st.added >= self.cfg.he_snapshot_batch
                   or (st.removed and self.cfg.he_snapshot_after_removal)
                   or now - st.since >= self.cfg.he_snapshot_interval_s)
            if due and self._write(key, st):
                done += 1
        return done

    def _write(self, key: GalleryKey, st: SnapshotState) -> bool:
        with st.lock:   # no add / removal of this gallery between the capture and the write
            if st.closed or not st.dirty:
                return False
            t0 = time.perf_counter()
            try:
                blob = self.index.backend.snapshot(key)
            except NotEnrolled:       # dropped meanwhile (rotation / decommission)
                st.closed = True
                return False
            seqs = dict(st.seqs)
            removed = st.removed
            with self.store.transaction() as tx:
                # only for the current epoch of a live matcher: a rotation / decommission that
                # committed meanwhile deleted the snapshots and must not see one come back
                cur = tx.current_he_epoch(*key.scope)
                if cur is None or cur.epoch != key.key_version or tx.decommissioned():
                    st.closed = True
                    return False
                tx.put_he_snapshot(HESnapshotRow(*key.stored, cur.fingerprint, max(seqs.values(), default=0), seqs, blob,
                                                 self.clock.now()))
            st.saved()
        if removed:
            self.store.checkpoint()   # the replaced snapshot's pages (zeroed) leave the WAL too
        log.info("HE gallery snapshot %s/%s epoch %d: %d subjects, %.1f MB in %.2f s", key.tenant, key.purpose,
                 key.key_version, len(seqs), len(blob) / 1e6, time.perf_counter() - t0)
        return True

    # -- background writer ------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.enabled:
            return
        self._thread = threading.Thread(target=self._loop, name="veilface-he-snapshot", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        period = min(self.cfg.he_snapshot_interval_s, 5.0)
        while not self._stop.is_set():
            self.wake.wait(period)
            self.wake.clear()
            if self._stop.is_set():
                return
            try:
                self.snapshot_due()
            except Exception:  # noqa: BLE001
                log.exception("HE gallery snapshot failed")

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()

    def close(self) -> None:
        """Stop the writer and store a last snapshot of every changed gallery (clean shutdown)."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=120)
        if self.enabled:
            try:
                self.snapshot_due(force=True)
            except Exception:  # noqa: BLE001
                log.exception("could not store HE gallery snapshots at shutdown")
