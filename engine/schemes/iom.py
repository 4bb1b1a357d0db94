"""Index-of-Max hashing (Jin et al., IEEE TIFS 2018), GRP and URP variants."""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..errors import InvalidParameter
from ..keys import KeyedStream
from ..validation import check_int
from .base import Scheme


class IoMHash(Scheme):
    """``m`` argmax indices, each in ``[0, q)``; score = fraction of equal indices.

    * ``variant="grp"`` (Gaussian random projection): hash ``i`` is the argmax of ``q``
      key-seeded Gaussian projections of the embedding.
    * ``variant="urp"`` (uniformly random permutation): hash ``i`` is the argmax over the
      first ``q`` entries of the element-wise product of ``p`` keyed permutations of the
      embedding.

    Template: ``m`` bytes (uint8, so ``q <= 256``).
    """

    name = "iom"
    version = 2   # 2: transform stream bound to the full spec (CodeMatching.stream_label)
    metric = "iom"

    def __init__(self, dim: int = 128, m: int = 256, q: int = 16, variant: str = "grp",
                 p: int = 2) -> None:
        super().__init__(dim)
        self.m = check_int("m", m, 1, 8192)
        self.q = check_int("q", q, 2, 256)
        if variant not in ("grp", "urp"):
            raise InvalidParameter(f"IoM variant must be 'grp' or 'urp', got {variant!r}")
        self.variant = variant
        self.p = check_int("p", p, 1, 16)
        if variant == "urp" and self.q > self.dim:
            raise InvalidParameter(f"URP window q={self.q} exceeds dim={self.dim}")

    @property
    def params(self) -> dict:
        params = {"dim": self.dim, "m": self.m, "q": self.q, "variant": self.variant}
        if self.variant == "urp":
            params["p"] = self.p
        return params

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (self.m,)

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def _transform(self, key: bytes) -> np.ndarray:
        stream = KeyedStream(key, self.stream_label())
        if self.variant == "grp":
            # (dim, m*q): one GEMM projects all hashes at once
            return np.ascontiguousarray(stream.normal((self.dim, self.m * self.q)), dtype=np.float32)
        # (m, p, q) indices: the first q entries of p permutations per hash
        perms = np.stack([np.stack([stream.permutation(self.dim)[:self.q] for _ in range(self.p)])
                          for _ in range(self.m)])
        return perms.astype(np.int32)

    def _apply(self, material: np.ndarray, x: np.ndarray) -> np.ndarray:
        if self.variant == "grp":
            y = (x @ material).reshape(len(x), self.m, self.q)
        else:
            y = np.prod(x[:, material], axis=2)  # (n, m, p, q) -> (n, m, q)
        return kernels.group_argmax(np.ascontiguousarray(y, dtype=np.float32))

    def to_similarity(self, raw: np.ndarray) -> np.ndarray:
        return np.asarray(raw, dtype=np.float64) / self.m
