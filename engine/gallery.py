"""In-memory galleries of protected templates for 1:1 verify and 1:N search.

One gallery holds the templates of one (tenant, scheme) pair. Two interchangeable backends,
chosen by name like a faiss factory string:

* ``"native"`` -- contiguous code buffer scored by Veilface's C++ kernels (exact);
* ``"faiss"`` / ``"faiss-hnsw"`` -- faiss IndexBinaryFlat/IndexBinaryHNSW for Hamming codes,
  IndexFlatIP/IndexHNSWFlat for float32 rotation codes (HNSW is approximate, for very large
  galleries).

Results carry pseudonymous subject ids and similarities (higher = more similar).
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ._optional import require
from .errors import InvalidParameter, NotEnrolled
from .schemes import CodeMatching, Scheme
from .template import Template
from .validation import check_int, check_subject_id

GALLERY_BACKENDS = ("native", "faiss", "faiss-hnsw")


class Match(NamedTuple):
    """One search hit: a pseudonymous subject id and its similarity to the probe."""

    subject_id: str
    score: float



class Gallery(ABC):
    """Common interface of every gallery backend (thread-safe)."""

    def __init__(self, scheme: Scheme) -> None:
        if not isinstance(scheme, CodeMatching):
            raise InvalidParameter(f"scheme {scheme.name!r} has no clear codes to compare; it needs an "
                                   "encrypted gallery (scheme.make_gallery, engine.he)")
        self.scheme = scheme
        self._lock = threading.RLock()

    # -- content -------------------------------------------------------------------------
    def add(self, subject_id: str, template: Template) -> None:
        """Add (or replace) the template of ``subject_id``; the template must match the scheme."""
        self.add_codes([subject_id], self.scheme.codes_of(template))

    def add_codes(self, subject_ids: Sequence[str], codes: np.ndarray) -> None:
        """Bulk add (or replace) raw codes ``(n, *code_shape)``, e.g. when loading from a store."""
        ids = [check_subject_id(s) for s in subject_ids]
        codes = self.scheme.check_codes(codes)
        if len(ids) != len(codes):
            raise InvalidParameter(f"{len(ids)} subject ids for {len(codes)} codes")
        if len(set(ids)) != len(ids):
            raise InvalidParameter("duplicate subject ids in one batch")
        with self._lock:
            self._add(ids, codes)

    def remove(self, subject_id: str) -> bool:
        """Remove ``subject_id``; returns False if it was not there. No full rebuild."""
        with self._lock:
            return self._remove(subject_id)

    @abstractmethod
    def _add(self, ids: list[str], codes: np.ndarray) -> None: ...

    @abstractmethod
    def _remove(self, subject_id: str) -> bool: ...

    @abstractmethod
    def _get(self, subject_id: str) -> np.ndarray | None: ...

    @abstractmethod
    def subjects(self) -> list[str]:
        """All subject ids in the gallery."""

    @abstractmethod
    def __len__(self) -> int: ...

    def __contains__(self, subject_id: object) -> bool:
        with self._lock:
            return isinstance(subject_id, str) and self._get(subject_id) is not None

    # -- matching ------------------------------------------------------------------------
    def verify(self, subject_id: str, probe: Template) -> float:
        """1:1: similarity of ``probe`` to the enrolled template of ``subject_id``.

        Raises :class:`NotEnrolled` when the subject has no template here.
        """
        q = self.scheme.codes_of(probe)
        with self._lock:
            ref = self._get(subject_id)
            if ref is None:
                raise NotEnrolled(f"subject {subject_id!r} is not enrolled")
            ref = ref.copy()
        return float(self.scheme.similarities(q, ref[None])[0, 0])

    def search(self, probe: Template, k: int = 10, threshold: float | None = None) -> list[Match]:
        """1:N: the ``k`` most similar subjects, best first, optionally only those
        with similarity ``>= threshold``. An empty list means "no match"."""
        return self.search_codes(self.scheme.codes_of(probe), k, threshold)[0]

    def search_codes(self, queries: np.ndarray, k: int = 10,
                     threshold: float | None = None) -> list[list[Match]]:
        """Batched 1:N over raw probe codes ``(nq, *code_shape)``."""
        queries = self.scheme.check_codes(queries)
        k = check_int("k", k, 1, 1 << 20)
        if threshold is not None and not np.isfinite(threshold):
            raise InvalidParameter("threshold must be finite")
        with self._lock:
            if len(self) == 0:
                return [[] for _ in range(len(queries))]
            sims, ids = self._search(queries, min(k, len(self)))
        out = []
        for srow, irow in zip(sims, ids):
            out.append([Match(s, float(v)) for v, s in zip(srow, irow)
                        if s is not None and (threshold is None or v >= threshold)])
        return out

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str | None]]]:
        """(similarities (nq,k), subject ids) under the lock."""


class NativeGallery(Gallery):
    """Exact search with Veilface's kernels over a growable contiguous code buffer.

    Removal moves the last row into the hole (O(1)), so deletes never rebuild the buffer.
    """

    def __init__(self, scheme: Scheme, capacity: int = 1024) -> None:
        super().__init__(scheme)
        self._codes = np.empty((max(1, capacity), *scheme.code_shape), dtype=scheme.code_dtype)
        self._ids: list[str] = []
        self._row: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def subjects(self) -> list[str]:
        with self._lock:
            return list(self._ids)

    def _reserve(self, n: int) -> None:
        if n > len(self._codes):
            grown = np.empty((max(n, 2 * len(self._codes)), *self._codes.shape[1:]), self._codes.dtype)
            grown[:len(self._ids)] = self._codes[:len(self._ids)]
            self._codes = grown

    def _add(self, ids: list[str], codes: np.ndarray) -> None:
        new = [i for i in ids if i not in self._row]
        self._reserve(len(self._ids) + len(new))
        for sid, code in zip(ids, codes):
            row = self._row.get(sid)
            if row is None:
                row = self._row[sid] = len(self._ids)
                self._ids.append(sid)
            self._codes[row] = code

    def _remove(self, subject_id: str) -> bool:
        row = self._row.pop(subject_id, None)
        if row is None:
            return False
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._codes[row] = self._codes[last]
            self._ids[row] = moved
            self._row[moved] = row
        self._ids.pop()
        # Overwrite the vacated row so no removed template lingers in memory.
        self._codes[last] = 0
        return True

    def _get(self, subject_id: str) -> np.ndarray | None:
        row = self._row.get(subject_id)
        return None if row is None else self._codes[row]

    def _search(self, queries, k):
        raw, idx = self.scheme.topk_raw(queries, self._codes[:len(self._ids)], k)
        return self.scheme.to_similarity(raw), [[self._ids[i] for i in row] for row in idx]


class FaissGallery(Gallery):
    """faiss-backed gallery: IndexBinaryFlat/HNSW (Hamming codes) or IndexFlatIP/HNSW (float32).

    faiss ids are stable integers (IndexIDMap/IndexBinaryIDMap2); removal uses
    ``remove_ids`` for flat indexes. HNSW indexes cannot delete, so removed ids are
    tombstoned (filtered from results and never returned) and the index is rebuilt once
    tombstones exceed a quarter of it.
    """

    def __init__(self, scheme: Scheme, hnsw: bool = False, hnsw_m: int = 32, ef_search: int = 128) -> None:
        super().__init__(scheme)
        faiss = require("faiss", feature="gallery backend 'faiss'/'faiss-hnsw' ('native' needs no faiss)")

        if scheme.metric not in ("hamming", "ip_f32"):
            raise InvalidParameter(f"the faiss backend supports Hamming and float32 schemes, not {scheme.metric}")
        self._faiss = faiss
        self.hnsw, self.hnsw_m, self.ef_search = hnsw, check_int("hnsw_m", hnsw_m, 4, 128), check_int("ef_search", ef_search, 1, 1 << 16)
        self._next = 0
        self._id_of: dict[str, int] = {}
        self._sid_of: dict[int, str] = {}
        self._codes: dict[int, np.ndarray] = {}
        self._dead: set[int] = set()
        self._index = self._new_index()

    def _new_index(self):
        f = self._faiss
        if self.scheme.metric == "hamming":
            bits = self.scheme.code_shape[0] * 8
            if self.hnsw:
                base = f.IndexBinaryHNSW(bits, self.hnsw_m)
                base.hnsw.efSearch = self.ef_search
                return f.IndexBinaryIDMap2(base)
            return f.IndexBinaryIDMap2(f.IndexBinaryFlat(bits))
        d = self.scheme.code_shape[0]
        if self.hnsw:
            base = f.IndexHNSWFlat(d, self.hnsw_m, f.METRIC_INNER_PRODUCT)
            base.hnsw.efSearch = self.ef_search
            return f.IndexIDMap2(base)
        return f.IndexIDMap2(f.IndexFlatIP(d))

    def __len__(self) -> int:
        return len(self._id_of)

    def subjects(self) -> list[str]:
        with self._lock:
            return list(self._id_of)

    def _add(self, ids, codes):
        for sid in ids:
            if sid in self._id_of:
                self._remove(sid)
        fids = np.arange(self._next, self._next + len(ids), dtype=np.int64)
        self._next += len(ids)
        self._index.add_with_ids(np.ascontiguousarray(codes), fids)
        for sid, fid, code in zip(ids, fids.tolist(), codes):
            self._id_of[sid], self._sid_of[fid], self._codes[fid] = fid, sid, code.copy()

    def _remove(self, subject_id):
        fid = self._id_of.pop(subject_id, None)
        if fid is None:
            return False
        del self._sid_of[fid], self._codes[fid]
        if self.hnsw:
            self._dead.add(fid)
            if len(self._dead) * 4 > self._index.ntotal:
                self._rebuild()
        else:
            self._index.remove_ids(np.array([fid], dtype=np.int64))
        return True

    def _rebuild(self) -> None:
        self._index, self._dead = self._new_index(), set()
        if self._codes:
            fids = np.fromiter(self._codes, dtype=np.int64)
            self._index.add_with_ids(np.stack([self._codes[i] for i in fids]), fids)

    def _get(self, subject_id):
        fid = self._id_of.get(subject_id)
        return None if fid is None else self._codes[fid]

    def _search(self, queries, k):
        kk = min(k + len(self._dead), self._index.ntotal)
        raw, fids = self._index.search(np.ascontiguousarray(queries), kk)
        sims = self.scheme.to_similarity(raw)
        out_s = np.full((len(queries), k), -np.inf)
        out_i: list[list[str | None]] = []
        for r in range(len(queries)):
            row = [(s, self._sid_of[f]) for s, f in zip(sims[r], fids[r]) if f >= 0 and f in self._sid_of][:k]
            out_s[r, :len(row)] = [s for s, _ in row]
            out_i.append([sid for _, sid in row] + [None] * (k - len(row)))
        return out_s, out_i


def make_gallery(scheme: Scheme, backend: str = "native", **options) -> Gallery:
    """Create an empty gallery for ``scheme`` with the named backend (see ``GALLERY_BACKENDS``)."""
    if backend == "native":
        return NativeGallery(scheme, **options)
    if backend in ("faiss", "faiss-hnsw"):
        return FaissGallery(scheme, hnsw=backend == "faiss-hnsw", **options)
    raise InvalidParameter(f"unknown gallery backend {backend!r}; choose one of {', '.join(GALLERY_BACKENDS)}")
