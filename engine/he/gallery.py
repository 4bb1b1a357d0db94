"""Matcher side of HE matching: encrypted galleries that compute encrypted results.

The matcher holds a :class:`~engine.he.context.PublicContext` only (a private context is refused)
and never sees a probe, a template or a score in the clear. Two storage models, two classes behind
one factory (``EncryptedGallery(ctx)`` / :func:`make_encrypted_gallery` pick by the context's mode):

* :class:`VerifyGallery` (1:1): one ciphertext per subject; :meth:`~VerifyGallery.verify` is one
  ct x ct product, relinearised and sanitised (:mod:`engine.he.sanitize`): the key holder learns
  the inner product and nothing else. Result: a ``score`` blob.
* :class:`IdentifyGallery` (1:N): templates packed dimension-wise, ``N = 8192`` per block: block
  ``b`` is ``dim`` ciphertexts; ciphertext ``i`` holds component ``i`` of template ``j`` at
  coefficient ``j``. A search traces and expands the uploaded probe into ``dim`` encrypted
  constants (:func:`~engine.he.algorithms.expand`, once per query) and scores each block with
  ``dim`` ct x ct products accumulated as size-3 ciphertexts, one rescale and one relinearisation
  (:meth:`~IdentifyGallery.search_cts`, the hot loop). The same loop over the probe itself gives
  its encrypted norm ``<probe, probe>``, shipped with the scores so the decider can refuse scaled
  probes (:mod:`engine.he.decisions`). Result: a ``scores`` blob.

Removal (consent withdrawal) keeps *no per-template data*: :func:`~engine.he.algorithms.purge_slot`
zeroes coefficient ``j`` of every ciphertext of the block homomorphically. After ``remove``
returns, the slot of the removed template holds only key-switching noise (~1e-5 of a unit
template); the scores of the other templates change by the same ~1e-5. Cost: ~0.5 s per removed
subject on one core (~0.25 s on each of two dimension shards), no extra memory.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import ClassVar

import tenseal.sealapi as seal

from ..errors import InvalidParameter
from ..validation import check_subject_id
from .context import require_public
from .errors import HEFormatError, HEUnsupported
from .sealio import seal_load
from .wire import blob_of, pack_blob, unpack_blob

#: version of the :meth:`EncryptedGallery.snapshot` layout (in the blob header)
SNAPSHOT_FORMAT = 1


def ciphertext_bytes(ct) -> int:
    """Bytes of the polynomial data of a SEAL ciphertext (what it occupies in memory)."""
    return ct.size() * ct.poly_modulus_degree() * ct.coeff_modulus_size() * 8


class EncryptedGallery(ABC):
    """Encrypted gallery of one tenant epoch (thread-safe; one process).

    ``EncryptedGallery(context, **options)`` returns a :class:`VerifyGallery` or an
    :class:`IdentifyGallery` according to the context's mode (``context``: a
    :class:`PublicContext` or its bytes; a private context raises
    :class:`~engine.he.errors.HEPrivateContext`). For both cores in identify mode use
    :class:`engine.he.shards.ShardedEncryptedGallery` (same API).
    """

    mode: ClassVar[str]
    _by_mode: ClassVar[dict[str, type[EncryptedGallery]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        EncryptedGallery._by_mode[cls.mode] = cls

    def __new__(cls, context, **options):
        if cls is EncryptedGallery:
            if len(EncryptedGallery._by_mode) < 2:
                from . import identify, verify  # noqa: F401 -- register both storage models
            cls = EncryptedGallery._by_mode[require_public(context).params.mode]
        return super().__new__(cls)

    def __init__(self, context) -> None:
        self.ctx = require_public(context)
        if self.ctx.params.mode != self.mode:
            raise HEUnsupported(f"{type(self).__name__} needs a {self.mode}-mode context, got "
                                f"{self.ctx.params.mode}")
        self.ctx.require_eval_keys()
        self.params = self.ctx.params
        self._lock = threading.RLock()
        self.purged = 0                          # slots purged so far (audit / tests)

    # -- content (subclasses keep ``_index``: subject -> where its template is) ----------------
    _index: dict

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def __contains__(self, subject_id: object) -> bool:
        with self._lock:
            return subject_id in self._index

    def subjects(self) -> list[str]:
        with self._lock:
            return list(self._index)

    def add_many(self, subject_ids: Sequence[str], templates: Iterable) -> None:
        for sid, t in zip(subject_ids, templates, strict=True):
            self.add(sid, t)

    def _load_template(self, blob: bytes):
        _, cts = self.ctx.load_ciphertexts(blob, "template")
        if len(cts) != 1:
            raise HEFormatError("a template blob holds exactly one ciphertext")
        return cts[0]

    def _load_probe(self, probe):
        _, cts = self.ctx.load_ciphertexts(blob_of(probe), "probe")
        if len(cts) != 1:
            raise HEFormatError("a probe blob holds exactly one ciphertext")
        return cts[0]

    # -- snapshot / restore ------------------------------------------------------------------
    def snapshot(self) -> bytes:
        """The gallery's state as one versioned ``gallery_snapshot`` blob (no secret material).

        The header carries the context fingerprint and epoch, the format version
        (:data:`SNAPSHOT_FORMAT`) and the purge counter; :meth:`restore` / :meth:`load_snapshot`
        rebuild the gallery without re-expanding any template."""
        with self._lock:
            head = dict(self.ctx.header(), snapshot_format=SNAPSHOT_FORMAT, gallery_mode=self.mode,
                        purged=int(self.purged))
            extra, parts = self._snapshot_state()
            return pack_blob("gallery_snapshot", dict(head, **extra), parts)

    @classmethod
    def restore(cls, context, snapshot, **options) -> EncryptedGallery:
        """A new gallery for ``context`` holding the state of :meth:`snapshot` bytes.

        A snapshot of another context or epoch raises :class:`~engine.he.errors.HEContextMismatch`
        / :class:`~engine.he.errors.HEEpochRevoked` (like any ciphertext); a corrupt one, another
        format version or another dimension part :class:`~engine.he.errors.HEFormatError`."""
        g = cls(context, **options)
        g.load_snapshot(snapshot)
        return g

    def load_snapshot(self, snapshot) -> None:
        """Load :meth:`snapshot` bytes into this (empty) gallery; see :meth:`restore`."""
        if len(self):
            raise InvalidParameter("load_snapshot needs an empty gallery")
        h, parts = unpack_blob(blob_of(snapshot), "gallery_snapshot")
        self.ctx.check_header(h, "gallery snapshot")
        if h.get("snapshot_format") != SNAPSHOT_FORMAT:
            raise HEFormatError(f"unknown gallery snapshot format {h.get('snapshot_format')!r} "
                                f"(this build reads {SNAPSHOT_FORMAT})")
        if h.get("gallery_mode") != self.mode:
            raise HEFormatError("gallery snapshot of another mode")
        try:
            purged = int(h.get("purged", 0))
            state = self._parse_snapshot(h, parts)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, (HEFormatError, InvalidParameter)):
                raise
            raise HEFormatError(f"corrupt gallery snapshot: {exc}") from None
        with self._lock:
            if len(self):
                raise InvalidParameter("load_snapshot needs an empty gallery")
            self._install(state)
            self.purged = purged

    def _load_ct(self, data: bytes):
        return seal_load(seal.Ciphertext, self.ctx.core.ctx, data)

    def add(self, subject_id: str, template) -> None:
        """Add (or replace) the encrypted template of ``subject_id`` (a ``template`` blob or he
        :class:`~engine.template.Template` of this context)."""
        check_subject_id(subject_id)
        blob = blob_of(template)
        ct = self._load_template(blob)
        with self._lock:
            self._store(subject_id, ct, blob)

    # -- per storage model ---------------------------------------------------------------------
    @abstractmethod
    def _store(self, subject_id: str, ct, blob: bytes) -> None:
        """Store a loaded template ciphertext (called under the lock)."""

    @abstractmethod
    def remove(self, subject_id: str) -> bool:
        """Remove a subject's template; False if it was not there."""

    @property
    @abstractmethod
    def bytes_per_template(self) -> float:
        """Ciphertext bytes held in memory per stored template."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes of ciphertext data held right now."""

    @abstractmethod
    def _snapshot_state(self) -> tuple[dict, list[bytes]]:
        """Header fields and parts of :meth:`snapshot` (called under the lock)."""

    @abstractmethod
    def _parse_snapshot(self, h: dict, parts: list[bytes]):
        """Validate and load the state of a snapshot (not yet installed)."""

    @abstractmethod
    def _install(self, state) -> None:
        """Install a parsed state (called under the lock, into an empty gallery)."""


def make_encrypted_gallery(context, **options) -> EncryptedGallery:
    """The gallery for ``context``'s mode: :class:`~engine.he.verify.VerifyGallery` or
    :class:`~engine.he.identify.IdentifyGallery` (``options`` go to its constructor)."""
    return EncryptedGallery(context, **options)


# Names that lived here before the split, re-exported for older import paths (drop once every
# caller imports from engine.he or the new modules).
from .algorithms import expand, extract_coefficient, purge_slot  # noqa: E402,F401
from .blobops import add_partial_scores, encrypt_block_blob, merge_scores, split_block_blob  # noqa: E402,F401

__all__ = ["EncryptedGallery", "make_encrypted_gallery", "ciphertext_bytes", "SNAPSHOT_FORMAT"]
