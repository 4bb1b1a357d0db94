"""BioHashing (Teoh et al. 2004): keyed random orthonormal projection, then sign bits."""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..keys import KeyedStream
from ..validation import check_int
from .base import Scheme


class BioHash(Scheme):
    """``bits`` sign bits of the embedding projected on a key-seeded orthonormal basis.

    For ``bits <= dim`` the projection is the first ``bits`` columns of one Haar-random
    orthonormal matrix; longer codes stack independent orthonormal blocks. Score:
    ``1 - hamming / bits``. Template: ``bits/8`` bytes (uint8).
    """

    name = "biohash"
    version = 2   # 2: transform stream bound to the full spec (CodeMatching.stream_label)
    metric = "hamming"

    def __init__(self, dim: int = 128, bits: int = 256) -> None:
        super().__init__(dim)
        self.bits = check_int("bits", bits, 64, 8192, multiple_of=64)

    @property
    def params(self) -> dict:
        return {"dim": self.dim, "bits": self.bits}

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (self.bits // 8,)

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def _transform(self, key: bytes) -> np.ndarray:
        blocks, left = [], self.bits
        for b in range((self.bits + self.dim - 1) // self.dim):
            q = KeyedStream(key, self.stream_label(f"block{b}")).orthonormal(self.dim)
            blocks.append(q[:, :min(left, self.dim)])
            left -= self.dim
        return np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32)

    def _apply(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        return kernels.sign_pack(np.ascontiguousarray(x @ w, dtype=np.float32))

    def to_similarity(self, raw: np.ndarray) -> np.ndarray:
        return 1.0 - np.asarray(raw, dtype=np.float64) / self.bits
