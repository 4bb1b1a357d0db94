"""Blob-level operations that need no gallery: combine the ``scores`` of shards, cut and build
``block`` blobs. Only public material is handled; nothing is decrypted."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tenseal.sealapi as seal

from ..errors import InvalidParameter
from .context import PublicContext, require_public
from .errors import HEFormatError
from .sealio import seal_load, seal_save
from .wire import blob_of, pack_blob, unpack_blob


def _split_norm(h: dict, parts: list[bytes]) -> tuple[list[bytes], bytes | None]:
    if h.get("norm"):
        if len(parts) != len(h["blocks"]) + 1:
            raise HEFormatError("scores blob: block table does not match its ciphertexts")
        return parts[:-1], parts[-1]
    return parts, None


def merge_scores(blobs: Sequence[bytes]) -> bytes:
    """Concatenate ``scores`` blobs of one context whose blocks are disjoint (shards that own whole
    blocks); the probe norm is the same in each, the first one is kept."""
    if not blobs:
        raise InvalidParameter("nothing to merge")
    heads, parts, table, norm = [], [], [], None
    for b in blobs:
        h, ps = unpack_blob(b, "scores")
        heads.append(h)
        cts, n = _split_norm(h, ps)
        parts += cts
        table += h["blocks"]
        norm = norm if norm is not None else n
    if len({h["fp"] for h in heads}) != 1:
        raise HEFormatError("cannot merge scores of different contexts")
    h0 = {k: v for k, v in heads[0].items() if k not in ("kind", "parts", "blocks", "norm")}
    if norm is None:
        return pack_blob("scores", dict(h0, blocks=table), parts)
    return pack_blob("scores", dict(h0, blocks=table, norm=True), parts + [norm])


def add_partial_scores(ctx: PublicContext, blobs: Sequence[bytes]) -> bytes:
    """Sum ``scores`` blobs of *dimension* shards (same blocks, same slot tables, partial inner
    products and partial norms over disjoint dimensions) into the ``scores`` blob of the whole
    gallery."""
    if not blobs:
        raise InvalidParameter("nothing to add")
    ctx = require_public(ctx)
    core = ctx.core
    heads, partss = zip(*(unpack_blob(b, "scores") for b in blobs))
    for h in heads:
        ctx.check_header(h, "scores")
        if (h["blocks"] != heads[0]["blocks"] or len(h["parts"]) != len(heads[0]["parts"])
                or bool(h.get("norm")) != bool(heads[0].get("norm"))):
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
    h, parts = unpack_blob(blob_of(block_blob), "block")
    r, m = part
    held = [int(i) for i in h.get("dims", range(len(parts)))]
    if len(held) != len(parts):
        raise HEFormatError("block blob: dims table does not match its ciphertexts")
    keep = [k for k, d in enumerate(held) if d % m == r]
    head = {k: v for k, v in h.items() if k not in ("kind", "parts")}
    return pack_blob("block", dict(head, dims=[held[k] for k in keep]), [parts[k] for k in keep])


def encrypt_block_blob(ctx: PublicContext, embeddings) -> bytes:
    """Device/enrolment-station side of :meth:`IdentifyGallery.add_block`: up to ``N`` embeddings
    in the gallery's block layout, one ``block`` blob."""
    cts = ctx.encrypt_block(embeddings)
    return pack_blob("block", dict(ctx.header(), count=int(np.asarray(embeddings).shape[0])),
                     [seal_save(c) for c in cts])


__all__ = ["merge_scores", "add_partial_scores", "split_block_blob", "encrypt_block_blob"]
