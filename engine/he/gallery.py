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
"""
from __future__ import annotations

import threading
from typing import Iterable, Sequence

import numpy as np
import tenseal.sealapi as seal

from ..errors import InvalidParameter, NotEnrolled
from ..template import Template
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


def _check_subject(subject_id: str) -> str:
    if not isinstance(subject_id, str) or not subject_id or len(subject_id) > 256:
        raise InvalidParameter("subject id must be a non-empty string of at most 256 characters")
    return subject_id


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
    """

    def __init__(self, context, *, keep_templates: bool = True) -> None:
        self.ctx = require_public(context)
        self.ctx.require_eval_keys()
        self.params = self.ctx.params
        self.keep_templates = keep_templates
        self._lock = threading.RLock()
        self._tpl: dict[str, object] = {}        # verify: subject -> Ciphertext
        self._blobs: dict[str, bytes] = {}       # identify: subject -> uploaded template blob
        self._blocks: list[_Block] = []
        self._where: dict[str, tuple[int, int]] = {}

    # -- content ---------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.params.mode

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
        """Ciphertext bytes held in memory per stored template (search layout)."""
        p = self.params
        ct_bytes = 2 * p.poly_degree * (len(p.moduli) - (0 if p.mode == "verify" else 1)) * 8
        if p.mode == "verify":
            return float(ct_bytes)
        return ct_bytes * p.dim / p.poly_degree

    def _load_template(self, blob: bytes):
        h, cts = self.ctx.load_ciphertexts(blob, "template")
        if len(cts) != 1:
            raise HEFormatError("a template blob holds exactly one ciphertext")
        return cts[0]

    def add(self, subject_id: str, template) -> None:
        """Add (or replace) the encrypted template (a ``template`` blob or he :class:`Template`)."""
        _check_subject(subject_id)
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
        parts = expand(self.ctx, ct)
        mono = core.monomial(slot)
        blk = self._blocks[b]
        if blk.dims is None:
            blk.dims = [None] * self.params.dim
        for i in range(self.params.dim):
            c = parts[i]
            ev.multiply_plain_inplace(c, mono)
            if sign < 0:
                ev.negate_inplace(c)
            if blk.dims[i] is None:
                blk.dims[i] = c
            else:
                ev.add_inplace(blk.dims[i], c)

    def add_block(self, subject_ids: Sequence[str], block_blob: bytes) -> None:
        """Bulk load a block encrypted by :meth:`PublicContext.encrypt_block` (enrolment station):
        ``subject_ids[j]`` is at coefficient ``j``. Subjects loaded this way cannot be removed
        one by one (no per-subject ciphertext); replace the whole block instead."""
        if self.mode != "identify":
            raise HEUnsupported("add_block is for identify mode")
        ids = [_check_subject(s) for s in subject_ids]
        h, cts = self.ctx.load_ciphertexts(block_blob, "block")
        if len(cts) != self.params.dim or int(h.get("count", -1)) != len(ids) or len(ids) > self.params.poly_degree:
            raise HEFormatError("block blob does not match the subject ids / dimension")
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
        """Remove a subject; its ciphertext contribution is subtracted exactly from its block."""
        with self._lock:
            if self.mode == "verify":
                return self._tpl.pop(subject_id, None) is not None
            return self._remove(subject_id)

    def _remove(self, subject_id: str) -> bool:
        loc = self._where.get(subject_id)
        if loc is None:
            return False
        blob = self._blobs.get(subject_id)
        if blob is None:
            raise HEUnsupported(f"subject {subject_id!r} was bulk-loaded or its template was not kept; "
                                "re-encrypt its block to remove it")
        b, slot = loc
        self._place(b, slot, self._load_template(blob), -1)
        del self._where[subject_id], self._blobs[subject_id]
        self._blocks[b].ids[slot] = None
        self._blocks[b].free.append(slot)
        return True

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
        pieces = expand(self.ctx, probe_ct)
        probe = [pieces[i] for i in range(self.params.dim)]
        out = []
        tmp = seal.Ciphertext()
        for blk in blocks:
            acc = seal.Ciphertext()
            ev.multiply(probe[0], blk.dims[0], acc)
            for i in range(1, self.params.dim):
                ev.multiply(probe[i], blk.dims[i], tmp)
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


def encrypt_block_blob(ctx: PublicContext, embeddings) -> bytes:
    """Device/enrolment-station side of :meth:`EncryptedGallery.add_block`."""
    cts = ctx.encrypt_block(embeddings)
    return pack_blob("block", dict(ctx._header(), count=int(np.asarray(embeddings).shape[0])),
                     [seal_save(c) for c in cts])


__all__ = ["EncryptedGallery", "expand", "merge_scores", "encrypt_block_blob", "blob_header"]
