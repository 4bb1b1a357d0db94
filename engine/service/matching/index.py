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
from .keys import Enrolled, GalleryKey, entry_id


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


class _Person:
    """What one (tenant, subject) has enrolled: its default-gallery entries {(purpose, scheme):
    Enrolled} and (api) its samples in named galleries {gallery: _Named}."""

    __slots__ = ("default", "named")

    def __init__(self) -> None:
        self.default: dict[tuple[str, str], Enrolled] = {}
        self.named: dict[str, _Named] = {}

    def __bool__(self) -> bool:
        return bool(self.default or self.named)


class _Named:
    """A subject's samples in one named gallery (purpose and scheme are the gallery's)."""

    __slots__ = ("purpose", "scheme", "samples")

    def __init__(self, purpose: str, scheme: str) -> None:
        self.purpose, self.scheme = purpose, scheme
        self.samples: dict[str, Enrolled] = {}


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
        self._enrolled: dict[tuple[str, str], _Person] = {}
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
            person = self._enrolled.get((tenant, subject))
            return (dict(person.default) if person else {}), self._versions.get((tenant, subject), (0, 0))[1]

    def samples_of(self, tenant: str, subject: str, gallery: str) -> tuple[dict[str, Enrolled], int]:
        """api: a copy of the subject's samples {sample_id: Enrolled} in a named gallery, and its
        revoked-up-to version."""
        with self.lock:
            person = self._enrolled.get((tenant, subject))
            named = person.named.get(gallery) if person else None
            return (dict(named.samples) if named else {}), self._versions.get((tenant, subject), (0, 0))[1]

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
                person = self._enrolled.get((entry.tenant, subject))
                if person is None:
                    continue
                m = person.default.get((entry.purpose, entry.scheme))
                if m is not None and m.key_version < entry.epoch:
                    del person.default[(entry.purpose, entry.scheme)]
                if not person:
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
            self._person(tenant, subject).default[(purpose, scheme)] = enrolled

    def _person(self, tenant: str, subject: str) -> _Person:
        person = self._enrolled.get((tenant, subject))
        if person is None:
            person = self._enrolled[(tenant, subject)] = _Person()
        return person

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
                self._person(key.tenant, subject).default[(key.purpose, key.scheme)] = \
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
            person = self._enrolled.get((tenant, subject))
            if person is None:
                return 0
            entries = person.default
            gone = [(p, s, m) for (p, s), m in entries.items() if match(p, s, m)]
            for p, s, m in gone:
                key = GalleryKey(tenant, p, s, m.key_version)
                if self.backend.is_open(key):
                    if key.encrypted:
                        slow.append((key, self._snap.get(key)))
                    else:
                        self.backend.remove(key, subject)
                del entries[(p, s)]
            n_samples = 0
            for gallery, named in list(person.named.items()):   # api: samples in named galleries
                for sample_id, m in list(named.samples.items()):
                    if match(named.purpose, named.scheme, m):
                        self.backend.remove(GalleryKey(tenant, named.purpose, named.scheme, m.key_version, gallery),
                                            entry_id(subject, sample_id))
                        del named.samples[sample_id]
                        n_samples += 1
                if not named.samples:
                    del person.named[gallery]
            if not person:
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
        return len(gone) + n_samples

    # -- api: samples in named galleries (cancellable schemes only) -----------------------------------
    def note_sample(self, key: GalleryKey, subject: str, sample_id: str, enrolled: Enrolled) -> None:
        """Record a sample without touching galleries (recovery adds templates in bulk)."""
        with self.lock:
            named = self._person(key.tenant, subject).named.setdefault(key.gallery, _Named(key.purpose, key.scheme))
            named.samples[sample_id] = enrolled

    def add_sample(self, key: GalleryKey, subject: str, sample_id: str, template: Template, *, expires_at: float,
                   versions: tuple[int, int]) -> None:
        """Make a committed sample searchable (caller holds the subject lock); ``versions``: the
        subject's new (key_version, revoked_upto)."""
        with self.lock:
            self.open(key)
            self.backend.add(key, [entry_id(subject, sample_id)], [template])
            self._versions[(key.tenant, subject)] = versions
            named = self._person(key.tenant, subject).named.setdefault(key.gallery, _Named(key.purpose, key.scheme))
            named.samples[sample_id] = Enrolled(key.key_version, expires_at)

    def forget_sample(self, tenant: str, subject: str, gallery: str, sample_id: str) -> bool:
        """Drop one sample (caller holds the subject lock); False when it was not there."""
        with self.lock:
            person = self._enrolled.get((tenant, subject))
            named = person.named.get(gallery) if person else None
            m = named.samples.pop(sample_id, None) if named else None
            if m is None:
                return False
            self.backend.remove(GalleryKey(tenant, named.purpose, named.scheme, m.key_version, gallery),
                                entry_id(subject, sample_id))
            if not named.samples:
                del person.named[gallery]
            if not person:
                self._enrolled.pop((tenant, subject), None)
            return True

    def named_of(self, tenant: str, subject: str) -> dict[str, tuple[str, str, dict[str, Enrolled]]]:
        """A copy of the subject's named-gallery samples {gallery: (purpose, scheme, {sample_id: Enrolled})}."""
        with self.lock:
            person = self._enrolled.get((tenant, subject))
            return {g: (n.purpose, n.scheme, dict(n.samples)) for g, n in (person.named.items() if person else ())}

    def replace_person(self, tenant: str, subject: str, default: dict[tuple[str, str], Enrolled],
                       named: dict[str, tuple[str, str, dict[str, Enrolled]]]) -> None:
        """Set everything the index knows of a subject (replicas re-read it from the shared store);
        the galleries are the caller's business."""
        with self.lock:
            person = _Person()
            person.default = dict(default)
            for g, (purpose, scheme, samples) in named.items():
                if samples:
                    person.named[g] = _Named(purpose, scheme)
                    person.named[g].samples = dict(samples)
            if person:
                self._enrolled[(tenant, subject)] = person
            else:
                self._enrolled.pop((tenant, subject), None)

    def drop_gallery(self, tenant: str, gallery: str, subjects: list[str]) -> None:
        """Forget a deleted named gallery: the samples of ``subjects`` (its former members; the
        caller holds their locks), then its backend galleries that are empty (one per key
        version; a gallery re-created meanwhile under the same name keeps what it holds)."""
        with self.lock:
            for subject in subjects:
                person = self._enrolled.get((tenant, subject))
                named = person.named.pop(gallery, None) if person is not None else None
                for sample_id, m in (named.samples.items() if named else ()):
                    self.backend.remove(GalleryKey(tenant, named.purpose, named.scheme, m.key_version, gallery),
                                        entry_id(subject, sample_id))
                if person is not None and not person:
                    self._enrolled.pop((tenant, subject), None)
            empty = [k for k in self.backend.keys()
                     if k.tenant == tenant and k.gallery == gallery and self.backend.size(k) == 0]
            for k in empty:
                self.backend.drop(k)
