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

Identify blocks are native ``uint64`` arrays scored by the native kernel
(:func:`engine.kernels.ckks_block_mac`); SEAL expands the probe and rescales/relinearises each
block's product (:mod:`engine.he.identify`).

Removal (consent withdrawal) keeps *no per-template data*:
:func:`~engine.he.algorithms.purge_slot_arrays` zeroes coefficient ``j`` of every ciphertext of the
block homomorphically. After ``remove`` returns, the slot of the removed template holds only
key-switching noise (~1e-5 of a unit template); the scores of the other templates change by the
same ~1e-5. Cost: ~0.5 s per removed subject on one core, no extra memory.

Snapshots: :meth:`EncryptedGallery.snapshot` gives bytes (up to :data:`~engine.he.wire.MAX_BLOB_BYTES`,
~250k identify templates at 128-d); :meth:`~EncryptedGallery.save_snapshot` streams the same
bytes to a file without that limit (1M templates: 4 GB) and :meth:`~EncryptedGallery.load_snapshot`
/ :meth:`~EncryptedGallery.restore` read either, a file straight into the block arrays.
"""
from __future__ import annotations

import io
import os
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import ClassVar

import tenseal.sealapi as seal

from ..errors import InvalidParameter
from ..framing import canonical_json, parse_header
from ..validation import check_subject_id
from .context import require_public
from .errors import HEFormatError, HEUnsupported
from .sealio import seal_load
from .wire import FORMAT_VERSION, MAGIC, blob_of, pack_blob, unpack_blob

#: version of the :meth:`EncryptedGallery.snapshot` layout (in the blob header). 2: identify blocks
#: as raw arrays (one part per block); 1: one SEAL serialisation per block ciphertext (still read).
SNAPSHOT_FORMAT = 2
SNAPSHOT_FORMATS_READ = (1, 2)
#: largest snapshot header read from a file (the slot tables: ~20 bytes per subject)
MAX_SNAPSHOT_HEADER = 1 << 31
_FRAME = struct.Struct("<BI")


class SnapshotParts:
    """The parts of a snapshot: from bytes, or from a file read part by part straight into the
    caller's arrays (no copy of the whole snapshot in memory)."""

    def __init__(self, sizes: list[int], data: list[bytes] | None = None, f=None, offset: int = 0) -> None:
        self._sizes, self._data, self._f = sizes, data, f
        self._offsets = [offset + sum(sizes[:k]) for k in range(len(sizes))] if f is not None else []

    def __len__(self) -> int:
        return len(self._sizes)

    def size(self, k: int) -> int:
        return self._sizes[k]

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if self._data is not None:
            return self._data[k]
        self._f.seek(self._offsets[k])
        b = self._f.read(self._sizes[k])
        if len(b) != self._sizes[k]:
            raise HEFormatError("gallery snapshot file is truncated")
        return b

    def read_into(self, k: int, out: memoryview) -> None:
        """Part ``k`` into the writable byte buffer ``out`` (exactly its size)."""
        if len(out) != self._sizes[k]:
            raise HEFormatError("gallery snapshot: a part has the wrong size")
        if self._data is not None:
            out[:] = self._data[k]
            return
        self._f.seek(self._offsets[k])
        got = 0
        while got < len(out):
            n = self._f.readinto(out[got:])
            if not n:
                raise HEFormatError("gallery snapshot file is truncated")
            got += n


def _read_snapshot_file(f) -> tuple[dict, SnapshotParts]:
    """Header and parts of a snapshot file (the VFHE frame of :func:`~engine.he.wire.pack_blob`)."""
    head = f.read(len(MAGIC) + _FRAME.size)
    if len(head) != len(MAGIC) + _FRAME.size or head[:len(MAGIC)] != MAGIC:
        raise HEFormatError("not a Veilface HE gallery snapshot (bad magic)")
    fmt, hlen = _FRAME.unpack_from(head, len(MAGIC))
    if fmt != FORMAT_VERSION or hlen > MAX_SNAPSHOT_HEADER:
        raise HEFormatError(f"unknown HE blob format version {fmt} or oversized header")
    hb = f.read(hlen)
    try:
        h = parse_header(hb)           # the bounded parser every VFHE header goes through
        sizes = [int(x) for x in h["parts"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise HEFormatError(f"corrupt gallery snapshot header: {exc}") from None
    if h.get("kind") != "gallery_snapshot":
        raise HEFormatError("expected an HE blob of kind gallery_snapshot")
    start = len(head) + hlen
    end = f.seek(0, io.SEEK_END)
    if any(s < 0 for s in sizes) or start + sum(sizes) != end:
        raise HEFormatError("HE blob payload does not match its header")
    return h, SnapshotParts(sizes, f=f, offset=start)


def ciphertext_bytes(ct) -> int:
    """Bytes of the polynomial data of a SEAL ciphertext (what it occupies in memory)."""
    return ct.size() * ct.poly_modulus_degree() * ct.coeff_modulus_size() * 8


class EncryptedGallery(ABC):
    """Encrypted gallery of one tenant epoch (thread-safe; one process).

    ``EncryptedGallery(context, **options)`` returns a :class:`VerifyGallery` or an
    :class:`IdentifyGallery` according to the context's mode (``context``: a
    :class:`PublicContext` or its bytes; a private context raises
    :class:`~engine.he.errors.HEPrivateContext`). An identify gallery's kernel uses every core
    already (``expand_processes=1`` adds a helper process for the probe expansion);
    :class:`engine.he.shards.ShardedEncryptedGallery` (same API) splits it over processes.
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
        rebuild the gallery without re-expanding any template. Past
        :data:`~engine.he.wire.MAX_BLOB_BYTES` use :meth:`save_snapshot`."""
        with self._lock:
            head, parts = self._snapshot_parts()
            return pack_blob("gallery_snapshot", head, parts)

    def save_snapshot(self, path) -> int:
        """Write the bytes :meth:`snapshot` would return to the file ``path`` (or a binary file
        object), streamed from the gallery's memory: no size limit, no copy. Returns the bytes
        written."""
        with self._lock:
            head, parts = self._snapshot_parts()
            hb = canonical_json(dict(head, kind="gallery_snapshot", parts=[len(p) for p in parts]))
            if isinstance(path, (str, os.PathLike)):
                with open(path, "wb") as f:
                    return self._write_frame(f, hb, parts)
            return self._write_frame(path, hb, parts)

    @staticmethod
    def _write_frame(f, hb: bytes, parts) -> int:
        f.write(MAGIC + _FRAME.pack(FORMAT_VERSION, len(hb)) + hb)
        for p in parts:
            f.write(p)
        return len(MAGIC) + _FRAME.size + len(hb) + sum(len(p) for p in parts)

    def _snapshot_parts(self) -> tuple[dict, list]:
        head = dict(self.ctx.header(), snapshot_format=SNAPSHOT_FORMAT, gallery_mode=self.mode,
                    purged=int(self.purged))
        extra, parts = self._snapshot_state()
        return dict(head, **extra), parts

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
        """Load :meth:`snapshot` bytes, or a file written by :meth:`save_snapshot` (a path or a
        binary file object), into this (empty) gallery; see :meth:`restore`."""
        if len(self):
            raise InvalidParameter("load_snapshot needs an empty gallery")
        if isinstance(snapshot, (str, os.PathLike)):
            with open(snapshot, "rb") as f:
                return self._load_snapshot(*_read_snapshot_file(f))
        if hasattr(snapshot, "readinto"):
            return self._load_snapshot(*_read_snapshot_file(snapshot))
        h, parts = unpack_blob(blob_of(snapshot), "gallery_snapshot")
        return self._load_snapshot(h, SnapshotParts([len(p) for p in parts], data=parts))

    def _load_snapshot(self, h: dict, parts: SnapshotParts) -> None:
        self.ctx.check_header(h, "gallery snapshot")
        if h.get("snapshot_format") not in SNAPSHOT_FORMATS_READ:
            raise HEFormatError(f"unknown gallery snapshot format {h.get('snapshot_format')!r} "
                                f"(this build reads {', '.join(map(str, SNAPSHOT_FORMATS_READ))})")
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
    def _parse_snapshot(self, h: dict, parts: SnapshotParts):
        """Validate and load the state of a snapshot (not yet installed); ``parts[k]`` gives
        bytes, ``parts.read_into(k, buffer)`` reads a part into an array's memory."""

    @abstractmethod
    def _install(self, state) -> None:
        """Install a parsed state (called under the lock, into an empty gallery)."""


def make_encrypted_gallery(context, **options) -> EncryptedGallery:
    """The gallery for ``context``'s mode: :class:`~engine.he.verify.VerifyGallery` or
    :class:`~engine.he.identify.IdentifyGallery` (``options`` go to its constructor)."""
    return EncryptedGallery(context, **options)


# Names that lived here before the split, re-exported for older import paths (drop once every
# caller imports from engine.he or the new modules).
from .algorithms import expand, extract_coefficient, purge_slot, purge_slot_arrays  # noqa: E402,F401
from .blobops import add_partial_scores, encrypt_block_blob, merge_scores, split_block_blob  # noqa: E402,F401

__all__ = ["EncryptedGallery", "make_encrypted_gallery", "ciphertext_bytes", "SNAPSHOT_FORMAT",
           "SNAPSHOT_FORMATS_READ", "SnapshotParts"]
