"""Homomorphic-encryption (CKKS, TenSEAL/SEAL) matching: the matcher never sees a probe, a
template or a score in the clear.

* :class:`KeyHolder` -- secret key of one tenant epoch; decrypts and decides (device for 1:1,
  decider service for 1:N).
* :class:`PublicContext` / :data:`MatcherContext` -- public key (+ evaluation keys); devices encrypt
  with it, the matcher computes with it; ``is_private()`` is False.
* :class:`EncryptedGallery` / :class:`ShardedEncryptedGallery` -- matcher side.
* the ``he`` scheme (``make_scheme("he:dim=128,mode=identify")``).
"""
from __future__ import annotations

from .._optional import require

require("tenseal", extra="he", feature="encrypted matching (engine.he)")

from .context import HEParams, KeyHolder, MatcherContext, PublicContext, blob_header
from .errors import HEContextMismatch, HEEpochRevoked, HEError, HEFormatError, HEPrivateContext, HEUnsupported
from .gallery import EncryptedGallery, encrypt_block_blob, merge_scores

__all__ = ["HEParams", "KeyHolder", "PublicContext", "MatcherContext", "blob_header",
           "EncryptedGallery", "encrypt_block_blob", "merge_scores", "HEError", "HEContextMismatch",
           "HEEpochRevoked", "HEFormatError", "HEPrivateContext", "HEUnsupported",
           "ShardedEncryptedGallery", "HEScheme"]


def __getattr__(name):  # lazy: processes and the scheme registry on first use
    if name == "ShardedEncryptedGallery":
        from .shards import ShardedEncryptedGallery
        return ShardedEncryptedGallery
    if name == "HEScheme":
        from .scheme import HEScheme
        return HEScheme
    raise AttributeError(name)
