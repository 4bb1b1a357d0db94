"""The Scheme protocol: ``protect`` on the device, ``compare``/1:N scoring on the matcher.

A scheme is a plain object configured in ``__init__`` (like a scikit-learn estimator); its
:class:`~engine.template.SchemeSpec` (name, algorithm version, parameters) travels inside every
template so that a template from another scheme or parameter set is refused, never mis-scored.
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


class Scheme(ABC):
    """Base class of every protection scheme.

    Subclasses set ``name``, ``version`` and ``metric`` and implement :meth:`_transform`
    (key -> transform material) and :meth:`_apply` (material, embeddings -> codes).
    Similarities are always "higher is more similar".
    """

    name: ClassVar[str]
    version: ClassVar[int]
    metric: ClassVar[str]
    #: True for schemes whose comparisons run on encrypted data (see engine.he)
    encrypted: ClassVar[bool] = False

    def __init__(self, dim: int = 128) -> None:
        self.dim = check_dim(dim)

    # -- description -------------------------------------------------------------------
    @property
    def params(self) -> dict:
        """All parameters that change the template (JSON-serialisable)."""
        return {"dim": self.dim}

    @property
    def spec(self) -> SchemeSpec:
        return SchemeSpec(self.name, self.version, self.params)

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

    def __repr__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

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
        return _cached_material(self, key)

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


def _cached_material(scheme: Scheme, key: bytes):
    # Expanding a key (QR of a dim x dim matrix) costs milliseconds; a device protects many
    # captures of one subject in a row, so keep the last few expansions.
    cache = scheme.__dict__.setdefault("_material_cache", {})
    mat = cache.get(key)
    if mat is None:
        if len(cache) >= 16:
            cache.pop(next(iter(cache)))
        mat = cache[key] = scheme._transform(key)
    return mat


__all__ = ["Scheme", "METRICS"]
