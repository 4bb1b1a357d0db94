"""Matcher side of HE matching: an encrypted gallery that computes encrypted scores.

The matcher holds a :class:`~engine.he.context.PublicContext` only (a private context is refused)
and never sees a probe, a template or a score in the clear. Every result is a versioned ``score``
(1:1) or ``scores`` (1:N) blob that only the :class:`~engine.he.context.KeyHolder` can open.

Layouts (see :mod:`engine.he.context` for the coefficient encoding):

* ``verify`` mode (1:1): one ciphertext per subject; ``verify`` is one ct x ct product (N=2048,
  no relinearisation, no rotation). The other coefficients of the product are correlations of the
  probe with shifted templates; the matcher overwrites them with a fresh uniformly random mask so
  the key holder learns the score and nothing else.
* ``identify`` mode (1:N): templates packed dimension-wise, ``N = 8192`` per block: block ``b``
  is ``dim`` ciphertexts; ciphertext ``i`` holds component ``i`` of template ``j`` at coefficient
  ``j``. A search expands the uploaded probe into ``dim`` encrypted constants (``dim - 1`` Galois
  automorphisms, once per query) and scores each block with ``dim`` ct x ct products accumulated
  as size-3 ciphertexts, then one rescale and one relinearisation per block. Coefficient ``j`` of
  the result is the score of template ``j``; nothing else is in it.

Removal (consent withdrawal) keeps *no per-template data*: :func:`purge_slot` zeroes coefficient
``j`` of every ciphertext of the block homomorphically (ring packing of the ``dim`` coefficients
into one ciphertext with ``dim - 1 + log2(N/dim)`` automorphisms, then expansion back with
``dim - 1``, the ``2^s`` trace factor cancelled *beforehand* by multiplying with the exact integer
``2^-s mod Q``), and subtracts the result. After ``remove`` returns, the slot of the removed template
holds only key-switching noise (~1e-5 of a unit template), for individually added and block-loaded
subjects alike; the scores of the other templates change by the same ~1e-5. Cost: ~0.5 s per removed
subject on one core (~0.25 s on each of two dimension shards), no extra memory.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np
import tenseal.sealapi as seal

from ..errors import InvalidParameter, NotEnrolled
from ..template import Template
from ..validation import check_subject_id
from .context import PublicContext, blob_header, pack_blob, require_public, seal_save, unpack_blob
from .errors import HEFormatError, HEUnsupported


def _blob_of(x) -> bytes:
    if isinstance(x, Template):
        if x.spec.name != "he":
            raise HEFormatError(f"expected an he template, got scheme {x.spec.name!r}")
        return x.data.tobytes()
    if isinstance(x, np.ndarray):
        return x.tobytes()
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    raise HEFormatError(f"expected HE blob bytes or a Template, got {type(x).__name__}")



def expand(ctx: PublicContext, ct, residue: int = 0, modulus: int = 1) -> dict:
    """Oblivious expansion: ``ct`` encrypting ``sum_i v_i X^i`` -> ``{i: ct_i}`` with ``ct_i``
    encrypting the constant ``width * v_i`` for ``i < dim`` (only ``i % modulus == residue``).

    Level ``j`` applies the automorphism ``X -> X^(N/2^j + 1)`` (one Galois key each): ``c + s(c)``
    keeps the coefficients whose bit ``j`` is 0, ``(c - s(c)) * X^(-2^j)`` those whose bit is 1.
    """
    core, p = ctx.core, ctx.params
    ev, gk = core.evaluator, ctx.galois_keys
    items = {0: ct}
    for j in range(p.expand_levels):
        step = 1 << j
        elt = p.galois_elements[j]
        mono = core.monomial(-step)
        new = {}
        for r, c in items.items():
            want0 = want1 = True
            if step < modulus:
                bit = (residue >> j) & 1
                want0, want1 = bit == 0, bit == 1
            if want1 and r + step >= p.dim:
                want1 = False  # whole subtree beyond dim
            if not (want0 or want1):
                continue
            t = seal.Ciphertext()
            ev.apply_galois(c, elt, gk, t)
            if want0:
                c0 = seal.Ciphertext()
                ev.add(c, t, c0)
                new[r] = c0
            if want1:
                c1 = seal.Ciphertext()
                ev.sub(c, t, c1)
                ev.multiply_plain_inplace(c1, mono)
                new[r + step] = c1
        items = new
    return {i: c for i, c in items.items() if i < p.dim}


def _galois(ctx: PublicContext, ct, elt: int):
    out = seal.Ciphertext()
    ctx.core.evaluator.apply_galois(ct, int(elt), ctx.galois_keys, out)
    return out


def _pack(ctx: PublicContext, items: list, level: int):
    """Ring packing (Chen-Dai-Kim-Song 2021, PackLWEs): ``2^level`` ciphertexts (``None`` = zero)
    -> one ciphertext holding ``2^level * (constant coefficient of item k)`` at coefficient
    ``k * N / 2^level`` (other coefficients: junk that the remaining trace levels clear)."""
    if level == 0:
        return items[0]
    ev, n = ctx.core.evaluator, ctx.params.poly_degree
    even = _pack(ctx, items[0::2], level - 1)
    odd = _pack(ctx, items[1::2], level - 1)
    elt = (1 << level) + 1
    if odd is None:
        if even is None:
            return None
        out = _galois(ctx, even, elt)
        ev.add_inplace(out, even)
        return out
    shifted = seal.Ciphertext()
    ev.multiply_plain(odd, ctx.core.monomial(n >> level), shifted)
    if even is None:
        ev.sub_inplace(shifted, _galois(ctx, shifted, elt))
        return shifted
    plus, minus = seal.Ciphertext(), seal.Ciphertext()
    ev.add(even, shifted, plus)
    ev.sub(even, shifted, minus)
    ev.add_inplace(plus, _galois(ctx, minus, elt))
    return plus


def extract_coefficient(ctx: PublicContext, cts: Sequence, j: int) -> list:
    """``[ct_k]`` -> ``[c_k]`` where ``c_k`` encrypts the *constant* equal to coefficient ``j`` of
    ``ct_k`` (same scale, same level, up to key-switching noise), for ``k < len(cts) <= N``.

    Packs the ``len(cts)`` coefficients into one ciphertext (``len - 1`` automorphisms plus
    ``log2(N / width)`` trace levels) and expands it again (``len - 1`` automorphisms); the factor
    ``N * width`` of trace and expansion is cancelled in advance by the exact integer
    ``(N * width)^-1 mod Q``, so no level is consumed. Needs the Galois keys of all ``log2 N``
    levels (:attr:`HEParams.galois_elements`)."""
    core, p, ev = ctx.core, ctx.params, ctx.core.evaluator
    count = len(cts)
    level = max(0, (count - 1).bit_length())
    width, n, ring = 1 << level, p.poly_degree, p.ring_levels
    inv, shift = core.inv_pow2(ring + level), core.monomial(-int(j))
    items = []
    for ct in cts:
        a = seal.Ciphertext()
        ev.multiply_plain(ct, shift, a)
        ev.multiply_plain_inplace(a, inv)
        items.append(a)
    items += [None] * (width - count)
    packed = _pack(ctx, items, level)
    for k in range(level + 1, ring + 1):  # trace down to the subring of X^(N/width)
        ev.add_inplace(packed, _galois(ctx, packed, (1 << k) + 1))
    stride = n >> level
    parts = {0: packed}
    for lv in range(ring - level, ring):  # expansion from stride N/width down to 1
        step = 1 << lv
        elt, mono = n // step + 1, core.monomial(-step)
        new = {}
        for r, c in parts.items():
            t = _galois(ctx, c, elt)
            c0 = seal.Ciphertext()
            ev.add(c, t, c0)
            new[r] = c0
            if (r + step) // stride < count:
                c1 = seal.Ciphertext()
                ev.sub(c, t, c1)
                ev.multiply_plain_inplace(c1, mono)
                new[r + step] = c1
        parts = new
    return [parts[k * stride] for k in range(count)]


def purge_slot(ctx: PublicContext, cts: Sequence, slot: int) -> None:
    """Zero coefficient ``slot`` of every ciphertext in ``cts`` in place (homomorphically, with
    public keys only): afterwards that coefficient decrypts to key-switching noise, the others are
    unchanged up to the same noise. This is how a template is deleted from a block."""
    ev, mono = ctx.core.evaluator, ctx.core.monomial(int(slot))
    try:
        consts = extract_coefficient(ctx, cts, slot)
    except (RuntimeError, ValueError) as exc:
        raise HEUnsupported(f"cannot purge a slot with this public context (missing Galois keys of a "
                            f"context made before removal support?): {exc}") from None
    for ct, c in zip(cts, consts):
        ev.multiply_plain_inplace(c, mono)
        ev.sub_inplace(ct, c)


#: version of the :meth:`EncryptedGallery.snapshot` layout (in the blob header)
SNAPSHOT_FORMAT = 1


class _Block:
    __slots__ = ("dims", "ids", "free")

    def __init__(self, n: int) -> None:
        self.dims: list | None = None
        self.ids: list[str | None] = [None] * n
        self.free = list(range(n - 1, -1, -1))


class EncryptedGallery:
    """Encrypted gallery of one tenant epoch (thread-safe; one process).

    ``context`` is a :class:`PublicContext` or its bytes; a private context raises
    :class:`~engine.he.errors.HEPrivateContext`. For both cores use
    :class:`engine.he.shards.ShardedEncryptedGallery` (same API).

    ``keep_templates`` (default False): keep each individually added upload (~256 KB) in memory so
    that removal is a plain subtraction; not needed -- removal purges the slot homomorphically
    (:func:`purge_slot`) with nothing stored per template. ``part=(r, m)`` (identify mode): hold only
    the dimensions ``i`` with ``i % m == r`` (a dimension shard; its scores are *partial* sums that
    :func:`add_partial_scores` combines).
    """

    def __init__(self, context, *, keep_templates: bool = False, part: tuple[int, int] = (0, 1)) -> None:
        self.ctx = require_public(context)
        self.ctx.require_eval_keys()
        self.params = self.ctx.params
        self.keep_templates = bool(keep_templates)
        r, m = int(part[0]), int(part[1])
        if m < 1 or m & (m - 1) or not 0 <= r < m or m > self.params.expand_width:
            raise InvalidParameter(f"part must be (residue, 2^k) with 2^k <= {self.params.expand_width}")
        self.part = (r, m)
        self._dims = [i for i in range(self.params.dim) if i % m == r]
        self._lock = threading.RLock()
        self._tpl: dict[str, object] = {}        # verify: subject -> Ciphertext
        self._blobs: dict[str, bytes] = {}       # identify, keep_templates only: subject -> upload
        self._blocks: list[_Block] = []
        self._where: dict[str, tuple[int, int]] = {}
        self.purged = 0                          # slots purged so far (audit / tests)

    # -- content ---------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.params.mode

    @property
    def dims(self) -> list[int]:
        """The embedding dimensions this gallery holds (all of them unless it is a dimension shard)."""
        return list(self._dims)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tpl) if self.mode == "verify" else len(self._where)

    def __contains__(self, subject_id: object) -> bool:
        with self._lock:
            return subject_id in (self._tpl if self.mode == "verify" else self._where)

    def subjects(self) -> list[str]:
        with self._lock:
            return list(self._tpl if self.mode == "verify" else self._where)

    @property
    def bytes_per_template(self) -> float:
        """Ciphertext bytes held in memory per stored template (search layout, full capacity)."""
        p = self.params
        ct_bytes = 2 * p.poly_degree * (len(p.moduli) - (0 if p.mode == "verify" else 1)) * 8
        if p.mode == "verify":
            return float(ct_bytes)
        return ct_bytes * len(self._dims) / p.poly_degree

    def memory_bytes(self) -> int:
        """Bytes of ciphertext data this gallery holds right now (blocks + kept uploads), i.e. what
        grows with the number of templates; divide by ``len(self)`` for bytes per template."""
        with self._lock:
            total = 0
            for cts in ([self._tpl.values()] if self.mode == "verify" else
                        [blk.dims for blk in self._blocks if blk.dims is not None]):
                for ct in cts:
                    total += ct.size() * ct.poly_modulus_degree() * ct.coeff_modulus_size() * 8
            return total + sum(len(b) for b in self._blobs.values())

    def _load_template(self, blob: bytes):
        h, cts = self.ctx.load_ciphertexts(blob, "template")
        if len(cts) != 1:
            raise HEFormatError("a template blob holds exactly one ciphertext")
        return cts[0]

    def add(self, subject_id: str, template) -> None:
        """Add (or replace) the encrypted template (a ``template`` blob or he :class:`Template`)."""
        check_subject_id(subject_id)
        blob = _blob_of(template)
        ct = self._load_template(blob)
        with self._lock:
            if self.mode == "verify":
                self._tpl[subject_id] = ct
                return
            if subject_id in self._where:
                self._remove(subject_id)
            b, slot = self._alloc()
            self._place(b, slot, ct, +1)
            self._blocks[b].ids[slot] = subject_id
            self._where[subject_id] = (b, slot)
            if self.keep_templates:
                self._blobs[subject_id] = blob

    def add_many(self, subject_ids: Sequence[str], templates: Iterable) -> None:
        for sid, t in zip(subject_ids, templates, strict=True):
            self.add(sid, t)

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
        """Bulk load a block encrypted by :meth:`PublicContext.encrypt_block` (enrolment station):
        ``subject_ids[j]`` is at coefficient ``j``. Its subjects can be removed one by one like any
        other (:meth:`remove` purges the slot). A dimension shard accepts the whole block blob or
        one cut by :func:`split_block_blob`."""
        if self.mode != "identify":
            raise HEUnsupported("add_block is for identify mode")
        ids = [check_subject_id(s) for s in subject_ids]
        h, parts = unpack_blob(_blob_of(block_blob), "block")
        self.ctx.check_header(h, "block")
        held = [int(i) for i in h.get("dims", range(len(parts)))]
        if (len(parts) != len(held) or int(h.get("count", -1)) != len(ids)
                or len(ids) > self.params.poly_degree or len(set(ids)) != len(ids)):
            raise HEFormatError("block blob does not match the subject ids / dimension")
        index = {d: k for k, d in enumerate(held)}
        if any(d not in index for d in self._dims):
            raise HEFormatError("block blob lacks dimensions this gallery holds")
        from .context import seal_load
        cts = [seal_load(seal.Ciphertext, self.ctx.core.ctx, parts[index[d]]) for d in self._dims]
        with self._lock:
            for sid in ids:
                if sid in self._where:
                    self._remove(sid)
            blk = _Block(self.params.poly_degree)
            blk.dims = cts
            blk.ids[:len(ids)] = ids
            blk.free = list(range(self.params.poly_degree - 1, len(ids) - 1, -1))
            self._blocks.append(blk)
            b = len(self._blocks) - 1
            for j, sid in enumerate(ids):
                self._where[sid] = (b, j)

    def remove(self, subject_id: str) -> bool:
        """Remove a subject: its contribution is deleted from its block's ciphertexts before this
        returns (exact subtraction of a kept upload, else :func:`purge_slot`), not merely hidden."""
        with self._lock:
            if self.mode == "verify":
                return self._tpl.pop(subject_id, None) is not None
            return self._remove(subject_id)

    def _remove(self, subject_id: str) -> bool:
        loc = self._where.get(subject_id)
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
        del self._where[subject_id]
        blk.ids[slot] = None
        blk.free.append(slot)
        return True

    # -- snapshot / restore ------------------------------------------------------------------
    def snapshot(self) -> bytes:
        """The gallery's state as one versioned ``gallery_snapshot`` blob (no secret material).

        Identify mode: the packed block ciphertexts (~4 KB per template at full blocks, e.g.
        ~33 MB per block of 8192 at dim 128) + the (slot -> subject id) table of every block;
        verify mode: the per-subject ciphertexts. The header carries the context fingerprint and
        epoch, the format version (:data:`SNAPSHOT_FORMAT`), the dimension part and the purge
        counter. :meth:`restore` / :meth:`load_snapshot` rebuild the gallery without the ~0.27 s
        oblivious expansion per identify template. Uploads kept by ``keep_templates`` are not
        included (after a restore, removal purges the slot homomorphically)."""
        with self._lock:
            head = dict(self.ctx._header(), snapshot_format=SNAPSHOT_FORMAT, gallery_mode=self.mode,
                        purged=int(self.purged))
            if self.mode == "verify":
                ids = list(self._tpl)
                return pack_blob("gallery_snapshot", dict(head, subjects=ids),
                                 [seal_save(self._tpl[s]) for s in ids])
            blocks, parts = [], []
            for blk in self._blocks:
                blocks.append({"ids": list(blk.ids), "cts": blk.dims is not None})
                if blk.dims is not None:
                    parts += [seal_save(ct) for ct in blk.dims]
            return pack_blob("gallery_snapshot", dict(head, part=list(self.part), dims=list(self._dims),
                                                      blocks=blocks), parts)

    @classmethod
    def restore(cls, context, snapshot, **kwargs) -> EncryptedGallery:
        """A new gallery for ``context`` holding the state of :meth:`snapshot` bytes.

        A snapshot of another context or epoch raises :class:`~engine.he.errors.HEContextMismatch`
        / :class:`~engine.he.errors.HEEpochRevoked` (like any ciphertext); a corrupt one, another
        format version or another dimension part :class:`~engine.he.errors.HEFormatError`."""
        g = cls(context, **kwargs)
        g.load_snapshot(snapshot)
        return g

    def load_snapshot(self, snapshot) -> None:
        """Load :meth:`snapshot` bytes into this (empty) gallery; see :meth:`restore`."""
        if len(self):
            raise InvalidParameter("load_snapshot needs an empty gallery")
        h, parts = unpack_blob(_blob_of(snapshot), "gallery_snapshot")
        self.ctx.check_header(h, "gallery snapshot")
        if h.get("snapshot_format") != SNAPSHOT_FORMAT:
            raise HEFormatError(f"unknown gallery snapshot format {h.get('snapshot_format')!r} "
                                f"(this build reads {SNAPSHOT_FORMAT})")
        if h.get("gallery_mode") != self.mode:
            raise HEFormatError("gallery snapshot of another mode")
        from .context import seal_load
        core = self.ctx.core
        try:
            purged = int(h.get("purged", 0))
            if self.mode == "verify":
                ids = [check_subject_id(s) for s in h["subjects"]]
                if len(ids) != len(parts) or len(set(ids)) != len(ids):
                    raise HEFormatError("gallery snapshot: subjects do not match its ciphertexts")
                tpl = {s: seal_load(seal.Ciphertext, core.ctx, p) for s, p in zip(ids, parts)}
                with self._lock:
                    if len(self):
                        raise InvalidParameter("load_snapshot needs an empty gallery")
                    self._tpl, self.purged = tpl, purged
                return
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
                    blk.dims = [seal_load(seal.Ciphertext, core.ctx, p) for p in parts[k:k + nd]]
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
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, (HEFormatError, InvalidParameter)):
                raise
            raise HEFormatError(f"corrupt gallery snapshot: {exc}") from None
        with self._lock:
            if len(self):
                raise InvalidParameter("load_snapshot needs an empty gallery")
            self._blocks, self._where, self.purged = blocks, where, purged

    # -- matching --------------------------------------------------------------------------
    def verify(self, subject_id: str, probe) -> bytes:
        """1:1 (verify mode): encrypted score of ``probe`` against ``subject_id`` -> ``score`` blob."""
        if self.mode != "verify":
            raise HEUnsupported("1:1 verify needs a verify-mode context (the device is the key holder)")
        h, cts = self.ctx.load_ciphertexts(_blob_of(probe), "probe")
        with self._lock:
            tpl = self._tpl.get(subject_id)
            if tpl is None:
                raise NotEnrolled(f"subject {subject_id!r} is not enrolled")
            ct = self.verify_ct(cts[0], tpl)
        return pack_blob("score", dict(self.ctx._header(), subject=subject_id, pos=self.params.dim - 1),
                         [seal_save(ct)])

    def verify_ct(self, probe_ct, template_ct):
        """The hot path of :meth:`verify` on loaded ciphertexts: product + mask (size-3 result)."""
        core = self.ctx.core
        out = seal.Ciphertext()
        core.evaluator.multiply(probe_ct, template_ct, out)
        core.evaluator.add_plain_inplace(out, self._mask(out.scale))
        return out

    def _mask(self, scale: float):
        """Uniform random plaintext on every coefficient except the score's (d-1), fresh per call."""
        p = self.params
        q = 1 << (p.moduli[0] - 1)
        half = float(q) * 0.49  # SEAL encodes |coeff| < 2^52 only
        rng = np.random.default_rng()
        c = rng.uniform(-half, half, p.poly_degree).round()
        c[p.dim - 1] = 0.0
        return self.ctx.core.codec.encode(c / scale, scale)

    def search(self, probe) -> bytes:
        """1:N (identify mode): encrypted scores of every stored template -> ``scores`` blob."""
        if self.mode != "identify":
            raise HEUnsupported("1:N search needs an identify-mode context")
        h, cts = self.ctx.load_ciphertexts(_blob_of(probe), "probe")
        with self._lock:
            blocks = [blk for blk in self._blocks if blk.dims is not None]
            results = self.search_cts(cts[0], blocks)
            table = [[[j for j, s in enumerate(blk.ids) if s is not None],
                      [s for s in blk.ids if s is not None]] for blk in blocks]
        parts = [seal_save(ct) for ct in results]
        return pack_blob("scores", dict(self.ctx._header(), blocks=table), parts)

    def search_cts(self, probe_ct, blocks=None) -> list:
        """Hot loop of :meth:`search`: one score ciphertext per block (rescaled, relinearised)."""
        ev = self.ctx.core.evaluator
        blocks = [b for b in self._blocks if b.dims is not None] if blocks is None else blocks
        if not blocks:
            return []
        pieces = expand(self.ctx, probe_ct, *self.part)
        probe = [pieces[i] for i in self._dims]
        out = []
        tmp = seal.Ciphertext()
        for blk in blocks:
            acc = seal.Ciphertext()
            ev.multiply(probe[0], blk.dims[0], acc)
            for k in range(1, len(probe)):
                ev.multiply(probe[k], blk.dims[k], tmp)
                ev.add_inplace(acc, tmp)
            ev.rescale_to_next_inplace(acc)
            ev.relinearize_inplace(acc, self.ctx.relin_keys)
            out.append(acc)
        return out


def merge_scores(blobs: Sequence[bytes]) -> bytes:
    """Concatenate ``scores`` blobs of one context (e.g. from several shards) into one."""
    if not blobs:
        raise InvalidParameter("nothing to merge")
    heads, parts, table = [], [], []
    for b in blobs:
        h, ps = unpack_blob(b, "scores")
        heads.append(h)
        parts += ps
        table += h["blocks"]
    fps = {h["fp"] for h in heads}
    if len(fps) != 1:
        raise HEFormatError("cannot merge scores of different contexts")
    h0 = {k: v for k, v in heads[0].items() if k not in ("kind", "parts", "blocks")}
    return pack_blob("scores", dict(h0, blocks=table), parts)


def add_partial_scores(ctx: PublicContext, blobs: Sequence[bytes]) -> bytes:
    """Sum ``scores`` blobs of *dimension* shards (same blocks, same slot tables, partial inner
    products over disjoint dimensions) into the ``scores`` blob of the whole gallery."""
    if not blobs:
        raise InvalidParameter("nothing to add")
    from .context import seal_load
    ctx = require_public(ctx)
    core = ctx.core
    heads, partss = zip(*(unpack_blob(b, "scores") for b in blobs))
    for h in heads:
        ctx.check_header(h, "scores")
        if h["blocks"] != heads[0]["blocks"] or len(h["parts"]) != len(heads[0]["parts"]):
            raise HEFormatError("partial scores of dimension shards do not line up")
    out = []
    for k in range(len(partss[0])):
        acc = seal_load(seal.Ciphertext, core.ctx, partss[0][k])
        for parts in partss[1:]:
            core.evaluator.add_inplace(acc, seal_load(seal.Ciphertext, core.ctx, parts[k]))
        out.append(seal_save(acc))
    h0 = {k: v for k, v in heads[0].items() if k not in ("kind", "parts")}
    return pack_blob("scores", h0, out)


def split_block_blob(block_blob: bytes, part: tuple[int, int]) -> bytes:
    """The ``block`` blob restricted to dimensions ``i % m == r`` (what dimension shard ``(r, m)``
    needs); no SEAL work, the parts are cut from the bytes."""
    h, parts = unpack_blob(_blob_of(block_blob), "block")
    r, m = part
    held = [int(i) for i in h.get("dims", range(len(parts)))]
    if len(held) != len(parts):
        raise HEFormatError("block blob: dims table does not match its ciphertexts")
    keep = [k for k, d in enumerate(held) if d % m == r]
    head = {k: v for k, v in h.items() if k not in ("kind", "parts")}
    return pack_blob("block", dict(head, dims=[held[k] for k in keep]), [parts[k] for k in keep])


def encrypt_block_blob(ctx: PublicContext, embeddings) -> bytes:
    """Device/enrolment-station side of :meth:`EncryptedGallery.add_block`."""
    cts = ctx.encrypt_block(embeddings)
    return pack_blob("block", dict(ctx._header(), count=int(np.asarray(embeddings).shape[0])),
                     [seal_save(c) for c in cts])


__all__ = ["EncryptedGallery", "SNAPSHOT_FORMAT", "expand", "extract_coefficient", "purge_slot", "merge_scores",
           "add_partial_scores", "split_block_blob", "encrypt_block_blob", "blob_header"]
