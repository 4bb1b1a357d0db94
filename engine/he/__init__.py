"""Homomorphic-encryption (CKKS, TenSEAL/SEAL) matching: the matcher never sees a probe, a
template or a score in the clear.

* :class:`KeyHolder` -- secret key of one tenant epoch; decrypts and decides (device for 1:1,
  decider for 1:N); releases decisions (:mod:`.decisions`), not score vectors.
* :class:`PublicContext` / :data:`MatcherContext` -- public key (+ evaluation keys); devices encrypt
  with it, the matcher computes with it; ``is_private()`` is False.
* :class:`EncryptedGallery` (factory: :class:`VerifyGallery` / :class:`IdentifyGallery` by mode)
  and :class:`ShardedEncryptedGallery` -- matcher side.
* the ``he`` scheme (``make_scheme("he:dim=128,mode=identify")``).

Module map: ``params`` (parameter sets) · ``wire`` (VFHE blobs) · ``sealio`` (SEAL save/load) ·
``encoding`` (coefficient codec, per-parameter core) · ``context`` (PublicContext, KeyHolder) ·
``decisions`` (what the decider releases) · ``sanitize`` (1:1 result sanitisation) ·
``algorithms`` (trace/expand, pack, extract, purge) · ``gallery`` / ``verify`` / ``identify``
(encrypted galleries) · ``blobops`` (shard results, block blobs) · ``shards`` (processes) ·
``scheme`` (the ``he`` protector).
"""
from __future__ import annotations

from .._optional import require

require("tenseal", extra="he", feature="encrypted matching (engine.he)")

from .blobops import add_partial_scores, encrypt_block_blob, merge_scores, split_block_blob
from .context import KeyHolder, MatcherContext, PublicContext, require_public
from .decisions import DecisionPolicy, IdentifyDecision, VerifyDecision
from .errors import (
    HEContextMismatch,
    HEEpochRevoked,
    HEError,
    HEFormatError,
    HEPrivateContext,
    HEProbeRefused,
    HEUnsupported,
)
from .gallery import EncryptedGallery, make_encrypted_gallery
from .identify import IdentifyGallery
from .params import HEParams
from .verify import VerifyGallery
from .wire import blob_header, pack_blob, unpack_blob

__all__ = ["HEParams", "KeyHolder", "PublicContext", "MatcherContext", "require_public", "blob_header",
           "pack_blob", "unpack_blob", "EncryptedGallery", "VerifyGallery", "IdentifyGallery",
           "make_encrypted_gallery", "encrypt_block_blob", "merge_scores", "add_partial_scores",
           "split_block_blob", "DecisionPolicy", "IdentifyDecision", "VerifyDecision", "HEError",
           "HEContextMismatch", "HEEpochRevoked", "HEFormatError", "HEPrivateContext", "HEProbeRefused",
           "HEUnsupported", "ShardedEncryptedGallery", "HEScheme"]


def __getattr__(name):  # lazy: processes and the scheme registry on first use
    if name == "ShardedEncryptedGallery":
        from .shards import ShardedEncryptedGallery
        return ShardedEncryptedGallery
    if name == "HEScheme":
        from .scheme import HEScheme
        return HEScheme
    raise AttributeError(name)
