"""Matching in the matcher: galleries of protected templates and what is enrolled in them.

* :mod:`.keys`      -- :class:`GalleryKey` (tenant, purpose, scheme, key version), :class:`Enrolled`;
* :mod:`.galleries` -- gallery types per scheme (:func:`new_gallery`) and the :class:`SchemeCache`;
* :mod:`.backend`   -- the :class:`MatchingBackend` interface and :class:`LocalMatching` (in-process);
* :mod:`.index`     -- :class:`GalleryIndex`: galleries + enrolled / version maps + subject locks.
"""
from __future__ import annotations

from .backend import LocalMatching, MatchingBackend
from .galleries import SchemeCache, has_gallery_type, new_gallery, register_gallery_factory
from .index import GalleryIndex, SnapshotState
from .keys import Enrolled, GalleryKey, entry_id, split_entry

__all__ = ["GalleryKey", "Enrolled", "MatchingBackend", "LocalMatching", "GalleryIndex", "SnapshotState",
           "SchemeCache", "new_gallery", "register_gallery_factory", "has_gallery_type", "entry_id", "split_entry"]
