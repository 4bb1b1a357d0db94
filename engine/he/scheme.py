"""The ``he`` scheme: CKKS-encrypted templates as an :class:`EncryptedMatching` protector.

>>> s = make_scheme("he:dim=128,mode=identify")                  # doctest: +SKIP
>>> kh = s.keygen(tenant="acme")                 # key holder (decider / device) -- secret
>>> pub = kh.public_context()                    # to devices and the matcher
>>> t = s.protect(pub, embedding)                # device: Template whose data is a ciphertext blob
>>> g = s.make_gallery(pub); g.add("subj-1", t)  # matcher
>>> blob = g.search(s.protect_probe(pub, probe)) # matcher: encrypted scores + probe norm
>>> kh.decide_identify(blob, threshold=0.5)      # key holder: ids at or above the threshold

``protect``'s ``key`` argument is the *public* context (or its bytes): an HE template needs no
secret on the device. There is no clear comparison: the matcher scores in an encrypted gallery and
only the key holder decrypts.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..schemes import register_scheme
from ..schemes.base import EncryptedMatching, Protector
from ..template import Template
from .context import KeyHolder, PublicContext, require_public
from .errors import HEFormatError, HEUnsupported
from .params import MODES, HEParams
from .wire import blob_header


def _public(key) -> PublicContext:
    if isinstance(key, KeyHolder):
        return key.public_context(eval_keys=False)
    if isinstance(key, PublicContext):
        return key
    if isinstance(key, (bytes, bytearray, memoryview)):
        return PublicContext.from_bytes(key)
    raise HEUnsupported(f"he.protect needs a PublicContext (or its bytes), got {type(key).__name__}")


@register_scheme
class HEScheme(EncryptedMatching, Protector):
    """CKKS (TenSEAL/SEAL) encrypted templates; ``mode="verify"`` (1:1) or ``"identify"`` (1:N).
    Version 2: sanitised verify results, stride-layout identify uploads (:mod:`engine.he.params`)."""

    name: ClassVar[str] = "he"
    version: ClassVar[int] = 2

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
    def bytes_per_template(self) -> int:
        """In-memory ciphertext bytes per template in the matcher's search layout."""
        p = self.he_params
        ct = 2 * p.poly_degree * len(p.data_moduli) * 8
        return ct if p.mode == "verify" else int(ct * p.dim / p.poly_degree)

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

    # -- matcher -------------------------------------------------------------------------------
    def make_gallery(self, context, shards: int = 1):
        """Matcher-side encrypted gallery for a *public* context (``shards > 1``: processes)."""
        ctx = self._check_ctx(require_public(context))
        if shards > 1:
            from .shards import ShardedEncryptedGallery
            return ShardedEncryptedGallery(ctx, shards=shards)
        from .gallery import make_encrypted_gallery
        return make_encrypted_gallery(ctx)

    @staticmethod
    def describe(template: Template) -> dict:
        """Header of an he template (kind, mode, tenant, epoch, context fingerprint) without decrypting."""
        if template.spec.name != "he":
            raise HEFormatError("not an he template")
        return blob_header(template.data.tobytes())


__all__ = ["HEScheme"]
