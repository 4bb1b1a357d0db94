"""The ``he`` scheme: CKKS-encrypted templates behind the common Scheme API.

>>> s = make_scheme("he:dim=128,mode=identify")                  # doctest: +SKIP
>>> kh = s.keygen(tenant="acme")                 # key holder (decider / device) -- secret
>>> pub = kh.public_context()                    # to devices and the matcher
>>> t = s.protect(pub, embedding)                # device: Template whose data is a ciphertext blob
>>> g = s.make_gallery(pub); g.add("subj-1", t)  # matcher
>>> blob = g.search(s.protect_probe(pub, probe)) # matcher: encrypted scores
>>> kh.decide(blob, k=5, threshold=0.5)          # key holder: matches

``protect``'s ``key`` argument is the *public* context (or its bytes): an HE template needs no
secret on the device. ``compare``/``similarities`` are refused: the matcher cannot compute a clear
score; use :class:`~engine.he.gallery.EncryptedGallery` and the key holder.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..schemes import register_scheme
from ..schemes.base import Scheme
from ..template import Template
from .context import MODES, HEParams, KeyHolder, PublicContext, blob_header
from .errors import HEFormatError, HEUnsupported


def _public(key) -> PublicContext:
    if isinstance(key, KeyHolder):
        return key.public_context(eval_keys=False)
    if isinstance(key, PublicContext):
        return key
    if isinstance(key, (bytes, bytearray, memoryview)):
        return PublicContext.from_bytes(key)
    raise HEUnsupported(f"he.protect needs a PublicContext (or its bytes), got {type(key).__name__}")


@register_scheme
class HEScheme(Scheme):
    """CKKS (TenSEAL/SEAL) encrypted templates; ``mode="verify"`` (1:1) or ``"identify"`` (1:N)."""

    name: ClassVar[str] = "he"
    version: ClassVar[int] = 1
    metric: ClassVar[str] = "he_ckks"
    encrypted: ClassVar[bool] = True

    def __init__(self, dim: int = 128, mode: str = "identify") -> None:
        super().__init__(dim)
        if mode not in MODES:
            raise HEUnsupported(f"he mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.he_params = HEParams.for_mode(mode, self.dim)

    @property
    def params(self) -> dict:
        return {"dim": self.dim, "mode": self.mode}

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (-1,)  # variable-length ciphertext blob

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def bytes_per_template(self) -> int:
        """In-memory ciphertext bytes per template in the matcher's search layout."""
        p = self.he_params
        if p.mode == "verify":
            return 2 * p.poly_degree * 8
        return int(2 * p.poly_degree * 2 * 8 * p.dim / p.poly_degree)

    # -- key holder --------------------------------------------------------------------------
    def keygen(self, tenant: str = "default", epoch: int = 1) -> KeyHolder:
        """A fresh key holder (secret key) for this scheme's mode and dimension."""
        return KeyHolder(self.mode, self.dim, tenant, epoch)

    # -- device --------------------------------------------------------------------------------
    def _check_ctx(self, ctx: PublicContext) -> PublicContext:
        if ctx.params != self.he_params:
            raise HEUnsupported(f"context is for {ctx.params.as_dict()}, scheme is {self.he_params.as_dict()}")
        return ctx

    def protect(self, key, embedding, key_version: int | None = None) -> Template:
        """Encrypt one embedding as a *template* under the public context ``key``."""
        return self._wrap(key, embedding, "template", key_version)

    def protect_probe(self, key, embedding, key_version: int | None = None) -> Template:
        """Encrypt one embedding as a *probe* (layout differs from a template in verify mode)."""
        return self._wrap(key, embedding, "probe", key_version)

    def _wrap(self, key, embedding, role, key_version) -> Template:
        ctx = self._check_ctx(_public(key))
        if key_version is not None and int(key_version) != ctx.epoch:
            raise HEUnsupported(f"key_version {key_version} != context epoch {ctx.epoch}")
        blob = ctx.encrypt(embedding, role)
        return Template(self.spec, np.frombuffer(blob, dtype=np.uint8).copy(), ctx.epoch)

    def protect_codes(self, key, embeddings) -> np.ndarray:
        raise HEUnsupported("he templates are variable-length ciphertext blobs; call protect() per embedding")

    def _transform(self, key):  # pragma: no cover - not used by he
        raise HEUnsupported("he has no transform material")

    def _apply(self, material, x):  # pragma: no cover - not used by he
        raise HEUnsupported("he has no transform material")

    # -- matcher -------------------------------------------------------------------------------
    def make_gallery(self, context, shards: int = 1):
        """Matcher-side encrypted gallery for a *public* context (``shards > 1``: processes)."""
        from .context import require_public
        ctx = self._check_ctx(require_public(context))
        if shards > 1:
            from .shards import ShardedEncryptedGallery
            return ShardedEncryptedGallery(ctx, shards=shards)
        from .gallery import EncryptedGallery
        return EncryptedGallery(ctx)

    def check_codes(self, codes):
        raise HEUnsupported("he templates are compared by engine.he.EncryptedGallery, not as code arrays")

    def codes_of(self, templates):
        raise HEUnsupported("he templates are compared by engine.he.EncryptedGallery, not as code arrays")

    def compare(self, a, b) -> float:
        raise HEUnsupported("the matcher cannot compute a clear HE score; use EncryptedGallery.verify "
                            "and KeyHolder.verify_decision")

    def to_similarity(self, raw):
        raise HEUnsupported("he scores are decrypted by the key holder only")

    @staticmethod
    def describe(template: Template) -> dict:
        """Header of an he template (kind, mode, tenant, epoch, context fingerprint) without decrypting."""
        if template.spec.name != "he":
            raise HEFormatError("not an he template")
        return blob_header(template.data.tobytes())


__all__ = ["HEScheme"]
