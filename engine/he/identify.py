"""1:N (identify-mode) encrypted gallery: blocks of ``N`` templates packed dimension-wise, held as
native arrays and scored by the native CKKS kernel.

Storage: block ``b`` is **one** 64-byte aligned ``uint64`` array ``(d, 2, L, N)`` that the gallery
owns (``d`` held dimensions; ciphertext ``i`` of the block in SEAL's NTT/RNS layout at the first
data level, scale ``params.scale``): 4,096 bytes per template at 128-d (``L = 2``), no SEAL object
per ciphertext. Only the slot tables (which subject sits at which coefficient) are Python objects.

Search (:meth:`IdentifyGallery.search`), per probe:

1. SEAL traces and expands the uploaded probe into ``d`` encrypted constants
   (:func:`~engine.he.algorithms.expand`; the fixed per-query cost) and they are copied to one
   ``(d, 2, L, N)`` array (:func:`engine.he.raw.to_arrays`, ~30 us per ciphertext);
2. the native kernel :func:`engine.kernels.ckks_block_mac` computes the size-3 product
   ``sum_i probe_i * block_i`` of every block (bit-equal to SEAL's ``multiply`` + ``add_inplace``;
   GIL released, all cores), four blocks per call on a worker thread;
3. meanwhile the calling thread hands each finished product back to SEAL (copied into a reused
   ciphertext, :func:`engine.he.raw.from_array` with ``into=``), which rescales and relinearises
   it exactly as before; the result part is its uncompressed SEAL serialisation.

So SEAL's per-block work (rescale + relinearisation, ~1.5 ms, under the GIL) overlaps the kernel of
the next blocks, and the result the key holder receives is bit-for-bit what the SEAL-only loop
(:meth:`IdentifyGallery.search_cts`, kept as the reference and benchmark baseline) produces.
Relinearisation is kept, not skipped: a size-3 result would hand the decider ``c2 = sum_i p_i1
b_i1`` apart from ``c0, c1`` -- three exact linear relations per NTT coefficient in the gallery's
ciphertext components for every probe whose upload it knows, where the relinearised, rescaled
pair gives it two, rounded ones (``docs/he-parameters.md``, "1:N: what the matcher returns").

Removal (consent withdrawal) purges the slot on the arrays
(:func:`~engine.he.algorithms.purge_slot_arrays`): nothing is kept per subject.

Over 400 lines: the gallery's block arrays, slot table, search, removal and snapshot format share
one layout; the algorithms themselves live in :mod:`engine.he.algorithms` and the kernel in C++.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tenseal.sealapi as seal

from .. import kernels as K
from ..errors import InvalidParameter
from ..validation import check_subject_id
from . import raw
from .algorithms import add_mod, expand, purge_slot_arrays, sub_mod
from .errors import HEError, HEFormatError
from .gallery import EncryptedGallery
from .wire import blob_of, pack_blob, unpack_blob

log = logging.getLogger("veilface.he")

#: blocks per kernel call in the search pipeline (the probe slice is reused across them; SEAL's
#: work on one group overlaps the kernel of the next)
BLOCKS_PER_CALL = 4

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1


def _kernel_pool() -> ThreadPoolExecutor:
    """The worker threads that run kernel calls while the caller talks to SEAL (shared; a forked
    child makes its own)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool, _pool_pid = ThreadPoolExecutor(max_workers=2, thread_name_prefix="veilface-he-kernel"), os.getpid()
        return _pool


class _Block:
    __slots__ = ("data", "ids", "free")

    def __init__(self, n: int) -> None:
        self.data: np.ndarray | None = None     # (d, 2, L, N) uint64, aligned; None when empty
        self.ids: list[str | None] = [None] * n
        self.free = list(range(n - 1, -1, -1))


class IdentifyGallery(EncryptedGallery):
    """1:N encrypted gallery (blocks of ``N`` templates, dimension-wise packing, native arrays).

    ``keep_templates`` (default False): keep each individually added upload (~256 KB) in memory so
    that removal is a plain subtraction; not needed -- removal purges the slot homomorphically with
    nothing stored per template. ``part=(r, m)``: hold only the dimensions ``i`` with
    ``i % m == r`` (a dimension shard; its scores and norm are *partial* sums that
    :func:`~engine.he.blobops.add_partial_scores` combines). ``n_threads``: kernel threads
    (0 = all cores). ``expand_processes=1``: a helper process
    (:class:`~engine.he.shards.ExpansionHelper`) expands half of each probe's dimensions while this
    process expands the other half (the expansion is SEAL work under the GIL and the fixed cost of
    every search); call :meth:`close` to stop it.
    """

    mode = "identify"

    def __init__(self, context, *, keep_templates: bool = False, part: tuple[int, int] = (0, 1),
                 n_threads: int = 0, expand_processes: int = 0) -> None:
        super().__init__(context)
        self.keep_templates = bool(keep_templates)
        r, m = int(part[0]), int(part[1])
        if m < 1 or m & (m - 1) or not 0 <= r < m or m > self.params.expand_width:
            raise InvalidParameter(f"part must be (residue, 2^k) with 2^k <= {self.params.expand_width}")
        self.part = (r, m)
        self.n_threads = int(n_threads)
        self._dims = [i for i in range(self.params.dim) if i % m == r]
        core = self.ctx.core
        self._pid = list(core.first_parms_id)
        self._q = raw.moduli(core.ctx, self._pid)
        self._qcol = self._q[:, None]
        self._shape = (len(self._dims), 2, len(self._q), self.params.poly_degree)
        self._blobs: dict[str, bytes] = {}       # keep_templates only: subject -> upload
        self._blocks: list[_Block] = []
        self._index: dict[str, tuple[int, int]] = {}   # subject -> (block, slot)
        self._helper = None
        if int(expand_processes) not in (0, 1):
            raise InvalidParameter("expand_processes must be 0 or 1")
        if expand_processes and len(self._dims) > 1 and 2 * m <= self.params.expand_width:
            from .shards import ExpansionHelper
            self._helper = ExpansionHelper(self.ctx, (r + m, 2 * m), (len(self._dims[1::2]),) + self._shape[1:])

    def close(self) -> None:
        """Stop the expansion helper process, if any (the gallery keeps working without it)."""
        helper, self._helper = self._helper, None
        if helper is not None:
            helper.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def _where(self) -> dict[str, tuple[int, int]]:
        return self._index

    @property
    def dims(self) -> list[int]:
        """The embedding dimensions this gallery holds (all of them unless it is a dimension shard)."""
        return list(self._dims)

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """``(d, 2, L, N)``: the array of one block (``d`` held dimensions)."""
        return self._shape

    @property
    def bytes_per_template(self) -> float:
        """Ciphertext bytes held in memory per stored template (search layout, full capacity)."""
        d, parts, limbs, n = self._shape
        return d * parts * limbs * 8

    def memory_bytes(self) -> int:
        """Bytes of ciphertext data this gallery holds right now (block arrays + kept uploads),
        i.e. what grows with the number of templates; divide by ``len(self)`` for bytes per template."""
        with self._lock:
            total = sum(blk.data.nbytes for blk in self._blocks if blk.data is not None)
            return total + sum(len(b) for b in self._blobs.values())

    def block_arrays(self) -> list[np.ndarray]:
        """The arrays of the non-empty blocks (the gallery's own memory: read, do not modify)."""
        with self._lock:
            return [blk.data for blk in self._blocks if blk.data is not None]

    def block_ciphertexts(self, b: int) -> list:
        """Block ``b`` as SEAL ciphertexts (a copy; tests, the SEAL reference path)."""
        with self._lock:
            data = self._blocks[b].data
            if data is None:
                return []
            return [raw.from_array(a, self.ctx.core.ctx, self._pid, self.params.scale) for a in data]

    # -- content ---------------------------------------------------------------------------
    def _new_data(self) -> np.ndarray:
        data = K.aligned_empty(self._shape)
        data.fill(0)
        return data

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
        """Add (``sign`` +1) or subtract (-1) the expanded upload ``ct`` at coefficient ``slot``
        of block ``b``: SEAL expands and multiplies by ``X^slot``, the sum is taken on the arrays."""
        ev, core = self.ctx.core.evaluator, self.ctx.core
        parts = expand(self.ctx, ct, *self.part)
        mono = core.monomial(slot)
        blk = self._blocks[b]
        if blk.data is None:
            blk.data = self._new_data()
        tmp = np.empty(self._shape[1:], dtype=np.uint64)
        op = add_mod if sign > 0 else sub_mod
        for k, i in enumerate(self._dims):
            c = parts[i]
            ev.multiply_plain_inplace(c, mono)
            op(blk.data[k], raw.to_array(c, tmp), self._qcol)

    def add_block(self, subject_ids: Sequence[str], block_blob) -> None:
        """Bulk load a block: ``subject_ids[j]`` is at coefficient ``j``. ``block_blob``: a ``block``
        blob of :func:`~engine.he.blobops.encrypt_block_blob` (enrolment station; a dimension
        shard accepts the whole blob or one cut by :func:`~engine.he.blobops.split_block_blob`),
        or the block's ciphertexts already as a ``(dim, 2, L, N)`` uint64 array (fresh
        encryptions of this context in the block layout, e.g. :func:`engine.he.raw.to_arrays` of
        :meth:`PublicContext.encrypt_block`; every coefficient is checked to be reduced). Its
        subjects can be removed one by one like any other."""
        ids = [check_subject_id(s) for s in subject_ids]
        if len(ids) > self.params.poly_degree or len(set(ids)) != len(ids):
            raise HEFormatError("block: more subjects than a block holds, or a subject twice")
        if isinstance(block_blob, np.ndarray):
            data = self._block_from_array(block_blob)
        else:
            data = self._block_from_blob(block_blob, len(ids))
        with self._lock:
            for sid in ids:
                if sid in self._index:
                    self._remove(sid)
            blk = _Block(self.params.poly_degree)
            blk.data = data
            blk.ids[:len(ids)] = ids
            blk.free = list(range(self.params.poly_degree - 1, len(ids) - 1, -1))
            self._blocks.append(blk)
            b = len(self._blocks) - 1
            for j, sid in enumerate(ids):
                self._index[sid] = (b, j)

    def _block_from_blob(self, block_blob, count: int) -> np.ndarray:
        h, parts = unpack_blob(blob_of(block_blob), "block")
        self.ctx.check_header(h, "block")
        held = [int(i) for i in h.get("dims", range(len(parts)))]
        if len(parts) != len(held) or int(h.get("count", -1)) != count:
            raise HEFormatError("block blob does not match the subject ids / dimension")
        index = {d: k for k, d in enumerate(held)}
        if any(d not in index for d in self._dims):
            raise HEFormatError("block blob lacks dimensions this gallery holds")
        data = K.aligned_empty(self._shape)
        for k, d in enumerate(self._dims):
            ct = self._load_ct(parts[index[d]])
            if (ct.size() != 2 or not ct.is_ntt_form() or list(ct.parms_id()) != self._pid
                    or ct.scale != self.params.scale):
                raise HEFormatError("block blob: not fresh encryptions of this context")
            raw.to_array(ct, data[k])
        return data

    def _block_from_array(self, arr: np.ndarray) -> np.ndarray:
        full = (self.params.dim,) + self._shape[1:]
        if arr.dtype != np.uint64 or arr.shape not in (self._shape, full):
            raise HEFormatError(f"block array must be uint64 of shape {full} (or {self._shape}), "
                                f"got {arr.dtype} {arr.shape}")
        data = K.aligned_empty(self._shape)
        data[...] = arr[self._dims] if arr.shape == full and arr.shape != self._shape else arr
        if K.ckks_max_excess(data, self._q):
            raise HEFormatError("block array: coefficients not reduced modulo the context's primes")
        return data

    def remove(self, subject_id: str) -> bool:
        """Remove a subject: its contribution is deleted from its block's ciphertexts before this
        returns (exact subtraction of a kept upload, else :func:`purge_slot_arrays`), not merely
        hidden."""
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
            blk.data = None  # last subject of the block: drop its ciphertexts altogether
        elif blob is not None:
            self._place(b, slot, self._load_template(blob), -1)
        else:
            purge_slot_arrays(self.ctx, blk.data, slot)
            self.purged += 1
        del self._index[subject_id]
        blk.ids[slot] = None
        blk.free.append(slot)
        return True

    # -- matching --------------------------------------------------------------------------
    def search(self, probe) -> bytes:
        """1:N: encrypted scores of every stored template + the probe's encrypted norm -> ``scores``
        blob (parts: one score ciphertext per block, then the norm; header ``norm: true``)."""
        blob = blob_of(probe)
        probe_ct = self._load_probe(blob)
        if not len(self):
            return pack_blob("scores", dict(self.ctx.header(), blocks=[]), [])
        probe_arr, scale = self.expand_probe_array(probe_ct, blob)  # no gallery state: outside the lock
        with self._lock:
            blocks = [blk for blk in self._blocks if blk.data is not None]
            if not blocks:
                return pack_blob("scores", dict(self.ctx.header(), blocks=[]), [])
            table = [[[j for j, s in enumerate(blk.ids) if s is not None],
                      [s for s in blk.ids if s is not None]] for blk in blocks]
            # the probe's own pieces as one more "block" give its norm <probe, probe>
            parts = self.search_arrays(probe_arr, [blk.data for blk in blocks] + [probe_arr], scale)
        return pack_blob("scores", dict(self.ctx.header(), blocks=table, norm=True), parts)

    def expand_probe(self, probe_ct) -> list:
        """The uploaded probe traced and expanded into one encrypted constant per held dimension."""
        pieces = expand(self.ctx, probe_ct, *self.part)
        return [pieces[i] for i in self._dims]

    def expand_probe_array(self, probe_ct, blob: bytes | None = None) -> tuple[np.ndarray, float]:
        """The expanded probe as one aligned ``(d, 2, L, N)`` array and its scale. With the
        expansion helper (and the upload ``blob``), the helper expands the odd rows while this
        thread expands the even ones; otherwise (or when the helper is busy or gone) all here."""
        helper = self._helper
        if helper is not None and not helper.alive():
            log.warning("HE expansion helper (pid %s) is gone; expanding in this process", helper.pid)
            self.close()
            helper = None
        if helper is None or blob is None or not helper.try_acquire():
            pieces = self.expand_probe(probe_ct)
            return self.probe_array(pieces), float(pieces[0].scale)
        arr = K.aligned_empty(self._shape)
        started = False
        try:
            helper.start(blob)
            started = True
            r, m = self.part
            pieces = expand(self.ctx, probe_ct, r, 2 * m)    # dims r, r + 2m, ...: the even rows
            for k, i in enumerate(sorted(pieces)):
                raw.to_array(pieces[i], arr[2 * k])
            scale = float(pieces[r].scale)
            del pieces
            started = False
            if helper.finish(arr[1::2]) != scale:
                raise HEFormatError("expansion helper: pieces of another scale")
            return arr, scale
        except HEError as exc:
            if started:
                try:
                    helper.finish(None)
                except HEError:
                    pass
            if self._helper is helper and not helper.alive():
                log.warning("HE expansion helper is gone (%s); expanding in this process", exc)
                self.close()
            pieces = self.expand_probe(probe_ct)
            return self.probe_array(pieces), float(pieces[0].scale)
        except BaseException:
            if started:
                helper.finish(None)
            raise

    def probe_array(self, pieces: Sequence) -> np.ndarray:
        """:meth:`expand_probe` pieces as one aligned ``(d, 2, L, N)`` array for the kernel."""
        return raw.to_arrays(pieces, K.aligned_empty(self._shape))

    def search_arrays(self, probe: np.ndarray, blocks: Sequence[np.ndarray], probe_scale: float | None = None,
                      *, per_call: int = BLOCKS_PER_CALL) -> list[bytes]:
        """The hot loop: per block ``sum_i probe[i] * block[i]`` (native kernel, on a worker
        thread), rescaled and relinearised by SEAL on this thread while the kernel works on the next
        blocks. Returns one SEAL serialisation (uncompressed) per block: the score ciphertext at
        scale ``probe_scale * params.scale / q_last``, bit-equal to :meth:`search_cts`."""
        if not blocks:
            return []
        core = self.ctx.core
        ev, rk, ctx, pid = core.evaluator, self.ctx.relin_keys, core.ctx, self._pid
        scale = (self.params.scale if probe_scale is None else float(probe_scale)) * self.params.scale
        per_call = max(1, int(per_call))
        groups = [list(blocks[i:i + per_call]) for i in range(0, len(blocks), per_call)]
        shape = (per_call, 3) + self._shape[2:]
        bufs = [np.empty(shape, dtype=np.uint64) for _ in range(min(2, len(groups)))]
        pool = _kernel_pool()

        def run(g: int):
            return pool.submit(K.ckks_block_mac, groups[g], probe, self._q,
                               bufs[g % 2][:len(groups[g])], self.n_threads)

        out: list[bytes] = []
        carrier = None
        pending = run(0)
        try:
            for g in range(len(groups)):
                products = pending.result()
                pending = run(g + 1) if g + 1 < len(groups) else None
                for prod in products:
                    # the kernel's output is reduced by construction (bit-equal to SEAL's)
                    carrier = raw.from_array(prod, ctx, pid, scale, into=carrier, reduced=True)
                    ev.rescale_to_next_inplace(carrier)
                    ev.relinearize_inplace(carrier, rk)
                    out.append(raw.ciphertext_bytes(carrier))
        finally:
            if pending is not None:   # an error above: let the kernel finish with its buffers
                pending.result()
        return out

    def search_cts(self, pieces: Sequence, blocks: Sequence[Sequence]) -> list:
        """The SEAL-only reference of :meth:`search_arrays` (and the benchmark's in-run baseline):
        per block ``sum_i pieces[i] * block[i]`` through ``Evaluator.multiply`` + ``add_inplace``,
        rescaled and relinearised; ``blocks``: per block the SEAL ciphertexts of this gallery's
        dimensions (e.g. :meth:`block_ciphertexts`). Returns SEAL ciphertexts."""
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
    def _snapshot_state(self) -> tuple[dict, list]:
        """Format 2: per block its slot table and, when it has data, one part with the raw array
        (little-endian uint64, C order, shape ``array_shape``)."""
        blocks, parts = [], []
        for blk in self._blocks:
            blocks.append({"ids": list(blk.ids), "cts": blk.data is not None})
            if blk.data is not None:
                parts.append(memoryview(blk.data).cast("B"))
        return {"part": list(self.part), "dims": list(self._dims), "blocks": blocks,
                "array_shape": list(self._shape), "array_dtype": "<u8"}, parts

    def _parse_snapshot(self, h: dict, parts):
        if [int(x) for x in h["part"]] != list(self.part) or [int(d) for d in h["dims"]] != self._dims:
            raise HEFormatError(f"gallery snapshot of dimension part {h.get('part')}, this gallery "
                                f"holds part {list(self.part)}")
        fmt = int(h["snapshot_format"])
        if fmt >= 2 and ([int(x) for x in h["array_shape"]] != list(self._shape) or h["array_dtype"] != "<u8"):
            raise HEFormatError("gallery snapshot: block arrays of another shape")
        n, nd = self.params.poly_degree, len(self._dims)
        per_block = 1 if fmt >= 2 else nd
        blocks, where, k = [], {}, 0
        for b, spec in enumerate(h["blocks"]):
            ids = spec["ids"]
            if not isinstance(ids, list) or len(ids) != n:
                raise HEFormatError("gallery snapshot: a block's slot table has the wrong size")
            blk = _Block(n)
            blk.ids = [None if s is None else check_subject_id(s) for s in ids]
            blk.free = [j for j in range(n - 1, -1, -1) if blk.ids[j] is None]
            if spec["cts"]:
                if k + per_block > len(parts):
                    raise HEFormatError("gallery snapshot: fewer ciphertexts than its blocks need")
                blk.data = self._read_block(parts, k) if fmt >= 2 else self._block_of_cts(parts[k:k + nd])
                k += per_block
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

    def _read_block(self, parts, k: int) -> np.ndarray:
        """Part ``k`` of a format-2 snapshot into a new aligned array, checked: its size, and every
        coefficient reduced modulo its prime (:func:`engine.kernels.ckks_max_excess`) -- a file
        from disk is not trusted to be what SEAL would have produced."""
        data = K.aligned_empty(self._shape)
        if parts.size(k) != data.nbytes:
            raise HEFormatError("gallery snapshot: a block array has the wrong size")
        parts.read_into(k, memoryview(data).cast("B"))
        if K.ckks_max_excess(data, self._q):
            raise HEFormatError("gallery snapshot: a block array holds unreduced coefficients")
        return data

    def _block_of_cts(self, parts) -> np.ndarray:
        """A block of a format-1 snapshot (one SEAL serialisation per dimension)."""
        data = K.aligned_empty(self._shape)
        for k in range(len(self._dims)):
            ct = self._load_ct(parts[k])
            if raw.shape_of(ct) != self._shape[1:] or list(ct.parms_id()) != self._pid or not ct.is_ntt_form():
                raise HEFormatError("gallery snapshot: a block ciphertext of another shape or level")
            raw.to_array(ct, data[k])
        return data

    def _install(self, state) -> None:
        self._blocks, self._index = state


__all__ = ["IdentifyGallery", "BLOCKS_PER_CALL"]
