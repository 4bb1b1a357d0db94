"""Protectors: a small base (spec, params, protect) plus capabilities added as mixins.

A protector is a plain object configured in ``__init__`` (like a scikit-learn estimator); its
:class:`~engine.template.SchemeSpec` (name, algorithm version, parameters) travels inside every
template so that a template from another scheme or parameter set is refused, never mis-scored.
What a protector can do beyond ``protect`` is said by the mixins it inherits, not by methods that
raise:

* :class:`CodeMatching` -- cancellable schemes: templates are code arrays the matcher compares in
  the clear (``codes_of``, ``check_codes``, ``similarities``, ``topk_raw``, ``compare``...);
* :class:`EncryptedMatching` -- templates are ciphertexts (``protect_probe``, ``make_gallery``);
  comparing them is the encrypted gallery's job and deciding the key holder's.

:class:`Scheme` (= ``CodeMatching`` + :class:`Protector``) is the base of the cancellable schemes.
``protector.encrypted`` is derived: True exactly for :class:`EncryptedMatching` protectors.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from .. import kernels
from ..errors import InvalidParameter, TemplateFormatError
from ..keys import check_key
from ..template import SchemeSpec, Template
from ..validation import as_embeddings, check_dim

#: which native kernel family scores a scheme's codes
METRICS = ("hamming", "iom", "ip_int8", "ip_f32")


class Protector(ABC):
    """What every protection scheme is: a named, versioned, parameterised ``protect``.

    Subclasses set ``name`` and ``version``, report their template-changing :attr:`params` and
    implement :meth:`protect` (through a capability mixin).
    """

    name: ClassVar[str]
    version: ClassVar[int]

    def __init__(self, dim: int = 128) -> None:
        self.dim = check_dim(dim)

    @property
    def params(self) -> dict:
        """All parameters that change the template (JSON-serialisable)."""
        return {"dim": self.dim}

    @property
    def spec(self) -> SchemeSpec:
        return SchemeSpec(self.name, self.version, self.params)

    @property
    def encrypted(self) -> bool:
        """True when templates are ciphertexts compared by an encrypted gallery (derived from the
        capability, not declared)."""
        return isinstance(self, EncryptedMatching)

    @property
    @abstractmethod
    def bytes_per_template(self) -> int:
        """Bytes a stored template occupies in the matcher's search layout."""

    @abstractmethod
    def protect(self, key, embedding, key_version: int = 1) -> Template:
        """Protect one embedding ``(dim,)`` under ``key``; returns a :class:`Template`."""

    def __repr__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class CodeMatching(ABC):
    """Capability: templates are code arrays compared in the clear with the native kernels.

    Subclasses set ``metric`` (one of :data:`METRICS`), describe the code (:attr:`code_shape`,
    :attr:`code_dtype`) and implement :meth:`_transform` (key -> transform material),
    :meth:`_apply` (material, embeddings -> codes) and :meth:`to_similarity`. Similarities are
    always "higher is more similar".
    """

    metric: ClassVar[str]
    dim: int
    spec: SchemeSpec
    name: ClassVar[str]
    params: dict

    @property
    @abstractmethod
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one template's array."""

    @property
    @abstractmethod
    def code_dtype(self) -> np.dtype:
        """dtype of a template's array."""

    @property
    def bytes_per_template(self) -> int:
        return int(np.prod(self.code_shape)) * np.dtype(self.code_dtype).itemsize

    # -- device side ---------------------------------------------------------------------
    def protect(self, key: bytes, embedding, key_version: int = 1) -> Template:
        """Protect one embedding ``(dim,)`` with ``key``; returns a :class:`Template`."""
        codes = self.protect_codes(key, embedding)
        if codes.shape[0] != 1:
            raise InvalidParameter("protect() takes one embedding; use protect_codes() for a batch")
        return Template(self.spec, codes[0], int(key_version))

    def protect_codes(self, key: bytes, embeddings) -> np.ndarray:
        """Protect embeddings ``(n, dim)`` (or ``(dim,)``) under one key -> codes ``(n, *code_shape)``."""
        x = as_embeddings(embeddings, self.dim)
        return self._apply(self._material(check_key(key)), x)

    def _material(self, key: bytes):
        # Expanding a key (QR of a dim x dim matrix) costs milliseconds; a device protects many
        # captures of one subject in a row, so keep the last few expansions.
        cache = self.__dict__.setdefault("_material_cache", {})
        mat = cache.get(key)
        if mat is None:
            if len(cache) >= 16:
                cache.pop(next(iter(cache)))
            mat = cache[key] = self._transform(key)
        return mat

    def stream_label(self, part: str = "") -> str:
        """The keyed-stream label of this scheme's transform: binds the full spec (name, algorithm
        version, canonical parameters), so one key never yields related material for two parameter
        sets (a BioHash-256 code is not half of the BioHash-512 code; rotation f32 and int8 differ)."""
        return f"v2/{self.spec.key()}/{part}"

    @abstractmethod
    def _transform(self, key: bytes):
        """Expand ``key`` into the scheme's transform material (matrices, permutations)."""

    @abstractmethod
    def _apply(self, material, x: np.ndarray) -> np.ndarray:
        """Apply the transform to normalised float32 embeddings ``(n, dim)``."""

    # -- matcher side --------------------------------------------------------------------
    def check_codes(self, codes: np.ndarray) -> np.ndarray:
        """Validate a stack of raw codes ``(n, *code_shape)`` of this scheme; C-contiguous."""
        codes = np.asarray(codes)
        if codes.ndim == len(self.code_shape):
            codes = codes[None]
        if codes.dtype != self.code_dtype or codes.shape[1:] != self.code_shape:
            raise TemplateFormatError(
                f"{self.name} codes must be {np.dtype(self.code_dtype).name}{list(self.code_shape)}, "
                f"got {codes.dtype.name}{list(codes.shape[1:])}")
        if self.metric == "iom" and codes.size and int(codes.max()) >= self.params["q"]:
            raise TemplateFormatError(f"IoM index out of range [0, {self.params['q']})")
        return np.ascontiguousarray(codes)

    def codes_of(self, templates: Template | Sequence[Template]) -> np.ndarray:
        """Stack templates into codes after checking each was made with this scheme."""
        if isinstance(templates, Template):
            templates = [templates]
        if not templates:
            return np.empty((0, *self.code_shape), dtype=self.code_dtype)
        for t in templates:
            if not isinstance(t, Template):
                raise TemplateFormatError(f"expected a Template, got {type(t).__name__}")
            t.require(self.spec)
        return self.check_codes(np.stack([t.data for t in templates]))

    def compare(self, a: Template, b: Template) -> float:
        """Similarity of two templates of this scheme (higher = more similar)."""
        return float(self.similarities(self.codes_of(a), self.codes_of(b))[0, 0])

    def raw_scores(self, queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Kernel-native scores ``(nq, n)`` (distance for Hamming, counts/products otherwise)."""
        fn = {"hamming": kernels.hamming_distances, "iom": kernels.iom_counts,
              "ip_int8": kernels.ip_int8, "ip_f32": kernels.ip_f32}[self.metric]
        return fn(self.check_codes(queries), self.check_codes(codes))

    def similarities(self, queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Similarities ``(nq, n)`` float64 between code stacks."""
        return self.to_similarity(self.raw_scores(queries, codes))

    def topk_raw(self, queries: np.ndarray, codes: np.ndarray, k: int):
        """Best ``k`` gallery rows per query, with the native kernels: ``(raw, idx)``."""
        fn = {"hamming": kernels.hamming_topk, "iom": kernels.iom_topk,
              "ip_int8": kernels.ip_topk_int8, "ip_f32": kernels.ip_topk_f32}[self.metric]
        return fn(self.check_codes(queries), self.check_codes(codes), k)

    @abstractmethod
    def to_similarity(self, raw: np.ndarray) -> np.ndarray:
        """Map kernel-native scores to similarities (monotone, higher = more similar)."""


class EncryptedMatching(ABC):
    """Capability: templates are ciphertexts; the matcher scores them in an encrypted gallery and
    only the key holder decrypts (``engine.he``)."""

    @abstractmethod
    def protect_probe(self, key, embedding, key_version: int | None = None) -> Template:
        """Encrypt one embedding as a *probe* (its layout may differ from a template's)."""

    @abstractmethod
    def make_gallery(self, context, shards: int = 1):
        """The matcher-side encrypted gallery for a *public* context."""


class Scheme(CodeMatching, Protector):
    """Base class of the cancellable schemes (a :class:`Protector` with :class:`CodeMatching`)."""


__all__ = ["Protector", "CodeMatching", "EncryptedMatching", "Scheme", "METRICS"]
