"""What is enrolled and searchable, in memory: the gallery index of the matcher.

:class:`GalleryIndex` owns the galleries (through a :class:`MatchingBackend`), the map of what
each subject has enrolled (purpose, scheme -> key version, expiry), the subjects' key-version
state and the striped per-subject locks. The store is the source of truth; the use cases change
the index only after their transaction committed, holding the subject's lock, so a subject's
entries and its templates in the galleries change together.

Locking: ``index.lock`` guards the maps and the set of open galleries (a gallery is created
or dropped only under it). Slow HE gallery work (an identify-mode add or removal: ~0.3 s) runs
outside it, under the gallery's :class:`SnapshotState` lock instead, which serialises the
gallery's changes with taking its snapshot.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

from ...errors import NotEnrolled
from ...template import Template
from ..encrypted import HEEntry, HERegistry
from .backend import MatchingBackend
from .galleries import SchemeCache
from .keys import Enrolled, GalleryKey


class SnapshotState:
    """Snapshot bookkeeping of one HE identify gallery. ``lock`` serialises the gallery's adds and
    removals with taking its snapshot, so ``seqs`` ({subject: template id}) always describes
    exactly what the gallery's snapshot captures."""

    __slots__ = ("lock", "seqs", "dirty", "added", "removed", "urgent", "since", "closed", "written")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.seqs: dict[str, int] = {}
        self.dirty = 0            # changes since the last stored snapshot
        self.added = 0            # of which adds
        self.removed = False      # a removal since the last stored snapshot
        self.urgent = False       # snapshot at the next chance (the stored one is outdated at start)
        self.since = 0.0          # monotonic time of the first unsaved change
        self.closed = False       # gallery dropped (rotation / decommission): never write again
        self.written = 0          # snapshots stored (tests / status)

    def touch(self, removed: bool = False) -> None:
        if not self.dirty:
            self.since = time.monotonic()
        self.dirty += 1
        self.added += not removed
        self.removed = self.removed or removed

    def saved(self) -> None:
        """A snapshot of the current state is stored (call under ``lock``)."""
        self.dirty, self.added, self.removed, self.urgent = 0, 0, False, False
        self.written += 1


#: ``on_he_change(state, removed)``: an HE identify gallery changed (the snapshot scheduler decides)
ChangeHook = Callable[[SnapshotState, bool], None]
#: ``match(purpose, scheme, enrolled)``: which of a subject's entries :meth:`GalleryIndex.forget` drops
EntryFilter = Callable[[str, str, Enrolled], bool]


class GalleryIndex:
    """Galleries + enrolled map + key-version map + subject locks (see the module docstring)."""

    def __init__(self, backend: MatchingBackend, contexts: HERegistry, schemes: SchemeCache,
                 on_he_change: ChangeHook | None = None, stripes: int = 256) -> None:
        self.backend, self.contexts, self.schemes = backend, contexts, schemes
        self.on_he_change: ChangeHook = on_he_change or (lambda state, removed: None)
        self.lock = threading.RLock()
        self._enrolled: dict[tuple[str, str], dict[tuple[str, str], Enrolled]] = {}
        self._versions: dict[tuple[str, str], tuple[int, int]] = {}
        self._snap: dict[GalleryKey, SnapshotState] = {}
        self._locks = [threading.Lock() for _ in range(stripes)]

    def subject_lock(self, tenant: str, subject: str) -> threading.Lock:
        """The lock a use case holds from its transaction until the index reflects it."""
        h = hashlib.blake2b(f"{tenant}\0{subject}".encode(), digest_size=2).digest()
        return self._locks[int.from_bytes(h, "little") % len(self._locks)]

    # -- reads ---------------------------------------------------------------------------------------
    def enrolment(self, tenant: str, subject: str) -> tuple[dict[tuple[str, str], Enrolled], int]:
        """A copy of the subject's entries {(purpose, scheme): Enrolled} and its revoked-up-to version."""
        with self.lock:
            return dict(self._enrolled.get((tenant, subject), {})), self._versions.get((tenant, subject), (0, 0))[1]

    def persons(self) -> int:
        """Distinct (tenant, subject) pairs with a searchable template."""
        with self.lock:
            return len(self._enrolled)

    def persons_with(self, tenant: str, subject: str) -> int:
        """:meth:`persons` once this subject is enrolled too."""
        with self.lock:
            return len(self._enrolled) + (0 if (tenant, subject) in self._enrolled else 1)

    def snapshot_state(self, key: GalleryKey) -> SnapshotState | None:
        with self.lock:
            return self._snap.get(key)

    def snapshot_states(self) -> list[tuple[GalleryKey, SnapshotState]]:
        with self.lock:
            return list(self._snap.items())

    # -- galleries -----------------------------------------------------------------------------------
    def open(self, key: GalleryKey) -> bool:
        """Make sure the gallery of ``key`` exists. An HE gallery is made only for the current
        epoch of its scope: False when that epoch was rotated away meanwhile."""
        with self.lock:
            if self.backend.is_open(key):
                return True
            scheme = self.schemes.get(key.scheme)
            if not key.encrypted:
                self.backend.open(key, scheme)
                return True
            entry = self.contexts.get(*key.scope)
            if entry is None or entry.epoch != key.key_version:
                return False
            self.backend.open(key, scheme, entry.context)
            if entry.mode == "identify" and self.backend.can_snapshot(key):
                self._snap[key] = SnapshotState()
            return True

    def reopen(self, key: GalleryKey) -> bool:
        """Drop the gallery of ``key`` and make an empty one (a snapshot that could not be loaded)."""
        with self.lock:
            self._snap.pop(key, None)
            self.backend.drop(key)
            return self.open(key)

    def rotate(self, entry: HEEntry, gone: list[str]) -> None:
        """``entry`` is the new current HE context of its scope: drop the galleries of older epochs
        and the entries of ``gone`` (the subjects whose old-epoch templates were deleted)."""
        scope = (entry.tenant, entry.purpose, entry.scheme)
        with self.lock:
            self.contexts.set(entry)
            old = [k for k in self.backend.keys() if k.scope == scope and k.key_version < entry.epoch]
            for k in old:
                st = self._snap.pop(k, None)
                if st is not None:
                    st.closed = True
            for subject in gone:
                entries = self._enrolled.get((entry.tenant, subject), {})
                m = entries.get((entry.purpose, entry.scheme))
                if m is not None and m.key_version < entry.epoch:
                    del entries[(entry.purpose, entry.scheme)]
                if not entries:
                    self._enrolled.pop((entry.tenant, subject), None)
        for k in old:
            self.backend.drop(k)

    def clear(self) -> None:
        """Forget everything (decommission): galleries, entries, versions, HE contexts."""
        with self.lock:
            self._enrolled.clear()
            self._versions.clear()
            self.contexts.clear()
            for st in self._snap.values():
                st.closed = True
            self._snap.clear()
        self.backend.clear()

    # -- changes -------------------------------------------------------------------------------------
    def note(self, tenant: str, subject: str, purpose: str, scheme: str, enrolled: Enrolled) -> None:
        """Record an entry without touching galleries (recovery adds templates in bulk)."""
        with self.lock:
            self._enrolled.setdefault((tenant, subject), {})[(purpose, scheme)] = enrolled

    def set_versions(self, tenant: str, subject: str, key_version: int, revoked_upto: int) -> None:
        with self.lock:
            self._versions[(tenant, subject)] = (key_version, revoked_upto)

    def load_versions(self, versions: dict[tuple[str, str], tuple[int, int]]) -> None:
        with self.lock:
            self._versions = dict(versions)

    def enrol(self, key: GalleryKey, subject: str, template: Template, *, template_id: int, expires_at: float,
              versions: tuple[int, int] | None = None) -> None:
        """Make a committed enrolment searchable (caller holds the subject lock). ``versions``:
        the subject's new (key_version, revoked_upto) for a cancellable scheme."""
        added = True
        if key.encrypted:            # outside the map lock: an identify-mode add expands the template
            added = self.open(key) and self._add_encrypted(key, subject, template, template_id)
        with self.lock:
            if not key.encrypted:
                self.open(key)
                self.backend.add(key, [subject], [template])
                if versions is not None:
                    self._versions[(key.tenant, subject)] = versions
            current = self.contexts.get(*key.scope) if key.encrypted else None
            if not key.encrypted or (added and getattr(current, "epoch", 0) == key.key_version):
                self._enrolled.setdefault((key.tenant, subject), {})[(key.purpose, key.scheme)] = \
                    Enrolled(key.key_version, expires_at)

    def _add_encrypted(self, key: GalleryKey, subject: str, template: Template, template_id: int) -> bool:
        st = self.snapshot_state(key)
        try:
            if st is None:
                self.backend.add(key, [subject], [template])
                return True
            with st.lock:
                self.backend.add(key, [subject], [template])
                st.seqs[subject] = template_id
                st.touch()
        except NotEnrolled:
            if self.backend.is_open(key):
                raise
            return False             # the epoch was rotated away (and its templates deleted) meanwhile
        self.on_he_change(st, False)
        return True

    def forget(self, tenant: str, subject: str, match: EntryFilter) -> int:
        """Drop the subject's entries for which ``match(purpose, scheme, enrolled)`` and its
        templates from their galleries (caller holds the subject lock). Returns how many."""
        slow = []
        with self.lock:
            entries = self._enrolled.get((tenant, subject), {})
            gone = [(p, s, m) for (p, s), m in entries.items() if match(p, s, m)]
            for p, s, m in gone:
                key = GalleryKey(tenant, p, s, m.key_version)
                if self.backend.is_open(key):
                    if key.encrypted:
                        slow.append((key, self._snap.get(key)))
                    else:
                        self.backend.remove(key, subject)
                del entries[(p, s)]
            if not entries:
                self._enrolled.pop((tenant, subject), None)
        for key, st in slow:       # an identify-mode removal subtracts expanded ciphertexts: ~0.3 s
            if st is None:
                self.backend.remove(key, subject)
                continue
            with st.lock:
                self.backend.remove(key, subject)
                st.seqs.pop(subject, None)
                st.touch(removed=True)
            self.on_he_change(st, True)
        return len(gone)
