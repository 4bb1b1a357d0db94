"""1:N (identify-mode) encrypted gallery: blocks of ``N`` templates packed dimension-wise.

See :mod:`engine.he.gallery` for the layout; the hot loop is :meth:`IdentifyGallery.search_cts`.
"""
from __future__ import annotations

from collections.abc import Sequence

import tenseal.sealapi as seal

from ..errors import InvalidParameter
from ..validation import check_subject_id
from .algorithms import expand, purge_slot
from .errors import HEFormatError
from .gallery import EncryptedGallery, ciphertext_bytes
from .sealio import seal_save
from .wire import blob_of, pack_blob, unpack_blob


class _Block:
    __slots__ = ("dims", "ids", "free")

    def __init__(self, n: int) -> None:
        self.dims: list | None = None
        self.ids: list[str | None] = [None] * n
        self.free = list(range(n - 1, -1, -1))


class IdentifyGallery(EncryptedGallery):
    """1:N encrypted gallery (blocks of ``N`` templates, dimension-wise packing).

    ``keep_templates`` (default False): keep each individually added upload (~256 KB) in memory so
    that removal is a plain subtraction; not needed -- removal purges the slot homomorphically with
    nothing stored per template. ``part=(r, m)``: hold only the dimensions ``i`` with
    ``i % m == r`` (a dimension shard; its scores and norm are *partial* sums that
    :func:`~engine.he.blobops.add_partial_scores` combines).
    """

    mode = "identify"

    def __init__(self, context, *, keep_templates: bool = False, part: tuple[int, int] = (0, 1)) -> None:
        super().__init__(context)
        self.keep_templates = bool(keep_templates)
        r, m = int(part[0]), int(part[1])
        if m < 1 or m & (m - 1) or not 0 <= r < m or m > self.params.expand_width:
            raise InvalidParameter(f"part must be (residue, 2^k) with 2^k <= {self.params.expand_width}")
        self.part = (r, m)
        self._dims = [i for i in range(self.params.dim) if i % m == r]
        self._blobs: dict[str, bytes] = {}       # keep_templates only: subject -> upload
        self._blocks: list[_Block] = []
        self._index: dict[str, tuple[int, int]] = {}   # subject -> (block, slot)

    @property
    def _where(self) -> dict[str, tuple[int, int]]:
        return self._index

    @property
    def dims(self) -> list[int]:
        """The embedding dimensions this gallery holds (all of them unless it is a dimension shard)."""
        return list(self._dims)

    @property
    def bytes_per_template(self) -> float:
        """Ciphertext bytes held in memory per stored template (search layout, full capacity)."""
        p = self.params
        return 2 * p.poly_degree * len(p.data_moduli) * 8 * len(self._dims) / p.poly_degree

    def memory_bytes(self) -> int:
        """Bytes of ciphertext data this gallery holds right now (blocks + kept uploads), i.e. what
        grows with the number of templates; divide by ``len(self)`` for bytes per template."""
        with self._lock:
            total = sum(ciphertext_bytes(ct) for blk in self._blocks if blk.dims is not None for ct in blk.dims)
            return total + sum(len(b) for b in self._blobs.values())

    # -- content ---------------------------------------------------------------------------
    def _store(self, subject_id: str, ct, blob: bytes) -> None:
        """The upload is traced, expanded and placed in a free slot of a block."""
        if subject_id in self._index:
            self._remove(subject_id)
        b, slot = self._alloc()
        self._place(b, slot, ct, +1)
        self._blocks[b].ids[slot] = subject_id
        self._index[subject_id] = (b, slot)
        if self.keep_templates:
            self._blobs[subject_id] = blob

    def _alloc(self) -> tuple[int, int]:
        for b, blk in enumerate(self._blocks):
            if blk.free:
                return b, blk.free.pop()
        self._blocks.append(_Block(self.params.poly_degree))
        return len(self._blocks) - 1, self._blocks[-1].free.pop()

    def _place(self, b: int, slot: int, ct, sign: int) -> None:
        ev, core = self.ctx.core.evaluator, self.ctx.core
        parts = expand(self.ctx, ct, *self.part)
        mono = core.monomial(slot)
        blk = self._blocks[b]
        if blk.dims is None:
            blk.dims = [None] * len(self._dims)
        for k, i in enumerate(self._dims):
            c = parts[i]
            ev.multiply_plain_inplace(c, mono)
            if sign < 0:
                ev.negate_inplace(c)
            if blk.dims[k] is None:
                blk.dims[k] = c
            else:
                ev.add_inplace(blk.dims[k], c)

    def add_block(self, subject_ids: Sequence[str], block_blob: bytes) -> None:
        """Bulk load a block encrypted by :func:`~engine.he.blobops.encrypt_block_blob` (enrolment
        station): ``subject_ids[j]`` is at coefficient ``j``. Its subjects can be removed one by one
        like any other. A dimension shard accepts the whole block blob or one cut by
        :func:`~engine.he.blobops.split_block_blob`."""
        ids = [check_subject_id(s) for s in subject_ids]
        h, parts = unpack_blob(blob_of(block_blob), "block")
        self.ctx.check_header(h, "block")
        held = [int(i) for i in h.get("dims", range(len(parts)))]
        if (len(parts) != len(held) or int(h.get("count", -1)) != len(ids)
                or len(ids) > self.params.poly_degree or len(set(ids)) != len(ids)):
            raise HEFormatError("block blob does not match the subject ids / dimension")
        index = {d: k for k, d in enumerate(held)}
        if any(d not in index for d in self._dims):
            raise HEFormatError("block blob lacks dimensions this gallery holds")
        cts = [self._load_ct(parts[index[d]]) for d in self._dims]
        for ct in cts:
            if ct.size() != 2 or ct.scale != self.params.scale:
                raise HEFormatError("block blob: not fresh encryptions of this context")
        with self._lock:
            for sid in ids:
                if sid in self._index:
                    self._remove(sid)
            blk = _Block(self.params.poly_degree)
            blk.dims = cts
            blk.ids[:len(ids)] = ids
            blk.free = list(range(self.params.poly_degree - 1, len(ids) - 1, -1))
            self._blocks.append(blk)
            b = len(self._blocks) - 1
            for j, sid in enumerate(ids):
                self._index[sid] = (b, j)

    def remove(self, subject_id: str) -> bool:
        """Remove a subject: its contribution is deleted from its block's ciphertexts before this
        returns (exact subtraction of a kept upload, else :func:`purge_slot`), not merely hidden."""
        with self._lock:
            return self._remove(subject_id)

    def _remove(self, subject_id: str) -> bool:
        loc = self._index.get(subject_id)
        if loc is None:
            return False
        b, slot = loc
        blk = self._blocks[b]
        blob = self._blobs.pop(subject_id, None)
        if not any(s is not None and s != subject_id for s in blk.ids):
            blk.dims = None  # last subject of the block: drop its ciphertexts altogether
        elif blob is not None:
            self._place(b, slot, self._load_template(blob), -1)
        else:
            purge_slot(self.ctx, blk.dims, slot)
            self.purged += 1
        del self._index[subject_id]
        blk.ids[slot] = None
        blk.free.append(slot)
        return True

    # -- matching --------------------------------------------------------------------------
    def search(self, probe) -> bytes:
        """1:N: encrypted scores of every stored template + the probe's encrypted norm -> ``scores``
        blob (parts: one score ciphertext per block, then the norm; header ``norm: true``)."""
        probe_ct = self._load_probe(probe)
        if not len(self):
            return pack_blob("scores", dict(self.ctx.header(), blocks=[]), [])
        pieces = self.expand_probe(probe_ct)       # per query, no gallery state: outside the lock
        with self._lock:
            blocks = [blk for blk in self._blocks if blk.dims is not None]
            if not blocks:
                return pack_blob("scores", dict(self.ctx.header(), blocks=[]), [])
            results = self.search_cts(pieces, [blk.dims for blk in blocks])
            table = [[[j for j, s in enumerate(blk.ids) if s is not None],
                      [s for s in blk.ids if s is not None]] for blk in blocks]
        norm = self.search_cts(pieces, [pieces])[0]
        parts = [seal_save(ct) for ct in results] + [seal_save(norm)]
        return pack_blob("scores", dict(self.ctx.header(), blocks=table, norm=True), parts)

    def expand_probe(self, probe_ct) -> list:
        """The uploaded probe traced and expanded into one encrypted constant per held dimension."""
        pieces = expand(self.ctx, probe_ct, *self.part)
        return [pieces[i] for i in self._dims]

    def search_cts(self, pieces: Sequence, blocks: Sequence[Sequence]) -> list:
        """The hot loop: per block ``sum_i pieces[i] * block[i]``, rescaled and relinearised (one
        score ciphertext per block). ``pieces``: :meth:`expand_probe`; ``blocks``: per block the
        ciphertexts of this gallery's dimensions (the probe's own pieces give its norm)."""
        ev, rk = self.ctx.core.evaluator, self.ctx.relin_keys
        out = []
        tmp = seal.Ciphertext()
        for dims in blocks:
            acc = seal.Ciphertext()
            ev.multiply(pieces[0], dims[0], acc)
            for k in range(1, len(pieces)):
                ev.multiply(pieces[k], dims[k], tmp)
                ev.add_inplace(acc, tmp)
            ev.rescale_to_next_inplace(acc)
            ev.relinearize_inplace(acc, rk)
            out.append(acc)
        return out

    # -- snapshot ----------------------------------------------------------------------------
    def _snapshot_state(self) -> tuple[dict, list[bytes]]:
        blocks, parts = [], []
        for blk in self._blocks:
            blocks.append({"ids": list(blk.ids), "cts": blk.dims is not None})
            if blk.dims is not None:
                parts += [seal_save(ct) for ct in blk.dims]
        return {"part": list(self.part), "dims": list(self._dims), "blocks": blocks}, parts

    def _parse_snapshot(self, h: dict, parts: list[bytes]):
        if [int(x) for x in h["part"]] != list(self.part) or [int(d) for d in h["dims"]] != self._dims:
            raise HEFormatError(f"gallery snapshot of dimension part {h.get('part')}, this gallery "
                                f"holds part {list(self.part)}")
        n, nd = self.params.poly_degree, len(self._dims)
        blocks, where, k = [], {}, 0
        for b, spec in enumerate(h["blocks"]):
            ids = spec["ids"]
            if not isinstance(ids, list) or len(ids) != n:
                raise HEFormatError("gallery snapshot: a block's slot table has the wrong size")
            blk = _Block(n)
            blk.ids = [None if s is None else check_subject_id(s) for s in ids]
            blk.free = [j for j in range(n - 1, -1, -1) if blk.ids[j] is None]
            if spec["cts"]:
                if k + nd > len(parts):
                    raise HEFormatError("gallery snapshot: fewer ciphertexts than its blocks need")
                blk.dims = [self._load_ct(p) for p in parts[k:k + nd]]
                k += nd
            elif len(blk.free) != n:
                raise HEFormatError("gallery snapshot: a block without ciphertexts has subjects")
            for j, s in enumerate(blk.ids):
                if s is not None:
                    if s in where:
                        raise HEFormatError(f"gallery snapshot: subject {s!r} appears twice")
                    where[s] = (b, j)
            blocks.append(blk)
        if k != len(parts):
            raise HEFormatError("gallery snapshot: more ciphertexts than its blocks need")
        return blocks, where

    def _install(self, state) -> None:
        self._blocks, self._index = state


__all__ = ["IdentifyGallery"]
