"""The matching backend interface: galleries by :class:`GalleryKey`, and nothing else.

A backend holds protected templates and matches probes against them; it never touches the
store, the policy or the audit log (the :class:`~engine.service.matching.index.GalleryIndex`
and the use cases do). :class:`LocalMatching` keeps the galleries in this process; a Ray
implementation (issue 12) keeps them in actors behind the same calls.

One interface for both kinds of scheme: for a cancellable scheme ``verify`` returns the
similarity (float) and ``search`` a list of :class:`engine.gallery.Match`; for an encrypted
(``he``) scheme they return the encrypted score blob only the key holder can read (``k`` and
``threshold`` are the key holder's business then).
"""
from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

from ...errors import NotEnrolled
from ...gallery import Match
from ...template import Template
from .galleries import new_gallery
from .keys import GalleryKey

log = logging.getLogger("veilface.service")


class MatchingBackend(ABC):
    """Galleries keyed by :class:`GalleryKey` (thread-safe)."""

    @abstractmethod
    def open(self, key: GalleryKey, scheme, context=None) -> None:
        """Create the gallery of ``key`` for ``scheme`` if it does not exist (``context``: the
        public HE context of an encrypted scheme's epoch)."""

    @abstractmethod
    def is_open(self, key: GalleryKey) -> bool: ...

    @abstractmethod
    def keys(self) -> list[GalleryKey]: ...

    @abstractmethod
    def add(self, key: GalleryKey, subject_ids: Sequence[str], templates: Sequence[Template]) -> None:
        """Add (or replace) templates of an open gallery (an identify-mode HE add expands each
        template: ~0.3 s of CPU)."""

    @abstractmethod
    def remove(self, key: GalleryKey, subject_id: str) -> bool:
        """False when the subject (or the gallery) is not there."""

    @abstractmethod
    def subjects(self, key: GalleryKey) -> list[str]: ...

    @abstractmethod
    def size(self, key: GalleryKey) -> int:
        """Templates in the gallery (0 when it is not open)."""

    @abstractmethod
    def verify(self, key: GalleryKey, subject_id: str, probe: Template) -> float | bytes:
        """1:1; :class:`NotEnrolled` when the subject is not in the gallery."""

    @abstractmethod
    def search(self, key: GalleryKey, probe: Template, k: int, threshold: float | None) -> list[Match] | bytes:
        """1:N (an empty list when the gallery is not open)."""

    @abstractmethod
    def can_snapshot(self, key: GalleryKey) -> bool:
        """Whether the gallery can be saved with :meth:`snapshot` (HE identify mode)."""

    @abstractmethod
    def snapshot(self, key: GalleryKey) -> bytes: ...

    @abstractmethod
    def load_snapshot(self, key: GalleryKey, blob: bytes) -> None: ...

    @abstractmethod
    def drop(self, key: GalleryKey) -> None:
        """Forget the gallery and release what it holds (processes of a sharded HE gallery)."""

    @abstractmethod
    def close(self) -> None:
        """Drop every gallery."""

    def clear(self) -> None:
        """Empty every gallery for good (decommission). A backend whose galleries outlive this
        process (Ray shards shared by replicas) empties them here and only disconnects in close()."""
        self.close()


def _close(g) -> None:
    close = getattr(g, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - closing must not fail a rotation or a shutdown
            log.exception("could not close a gallery")


class LocalMatching(MatchingBackend):
    """In-process galleries (:func:`new_gallery`): native kernels / faiss for cancellable
    schemes, ``engine.he`` galleries (``he_shards`` > 1: in that many processes) for ``he``."""

    def __init__(self, gallery_backend: str = "native", he_shards: int = 1) -> None:
        self.gallery_backend, self.he_shards = gallery_backend, int(he_shards)
        self._g: dict[GalleryKey, object] = {}
        self._lock = threading.Lock()

    def gallery(self, key: GalleryKey):
        """The gallery object of ``key`` or None (introspection in tests)."""
        with self._lock:
            return self._g.get(key)

    def _get(self, key: GalleryKey):
        g = self.gallery(key)
        if g is None:
            raise NotEnrolled(f"no gallery {key.purpose}/{key.scheme}/v{key.key_version}")
        return g

    def open(self, key: GalleryKey, scheme, context=None) -> None:
        with self._lock:
            if key in self._g:
                return
            if context is not None:
                self._g[key] = new_gallery(scheme, self.gallery_backend, context=context, shards=self.he_shards)
            else:
                self._g[key] = new_gallery(scheme, self.gallery_backend)

    def is_open(self, key: GalleryKey) -> bool:
        with self._lock:
            return key in self._g

    def keys(self) -> list[GalleryKey]:
        with self._lock:
            return list(self._g)

    def add(self, key: GalleryKey, subject_ids: Sequence[str], templates: Sequence[Template]) -> None:
        g = self._get(key)
        if key.encrypted:
            for s, t in zip(subject_ids, templates):
                g.add(s, t)
        else:
            g.add_codes(list(subject_ids), g.scheme.codes_of(list(templates)))

    def remove(self, key: GalleryKey, subject_id: str) -> bool:
        g = self.gallery(key)
        return bool(g is not None and g.remove(subject_id))

    def subjects(self, key: GalleryKey) -> list[str]:
        g = self.gallery(key)
        return [] if g is None else list(g.subjects())

    def size(self, key: GalleryKey) -> int:
        g = self.gallery(key)
        return 0 if g is None else len(g)

    def verify(self, key: GalleryKey, subject_id: str, probe: Template) -> float | bytes:
        return self._get(key).verify(subject_id, probe)

    def search(self, key: GalleryKey, probe: Template, k: int, threshold: float | None) -> list[Match] | bytes:
        g = self.gallery(key)
        if g is None:
            return []
        return g.search(probe) if key.encrypted else g.search(probe, k, threshold)

    def can_snapshot(self, key: GalleryKey) -> bool:
        return hasattr(self.gallery(key), "snapshot")

    def snapshot(self, key: GalleryKey) -> bytes:
        return self._get(key).snapshot()

    def load_snapshot(self, key: GalleryKey, blob: bytes) -> None:
        self._get(key).load_snapshot(blob)

    def drop(self, key: GalleryKey) -> None:
        with self._lock:
            g = self._g.pop(key, None)
        if g is not None:
            _close(g)

    def close(self) -> None:
        with self._lock:
            galleries = list(self._g.values())
            self._g.clear()
        for g in galleries:
            _close(g)
