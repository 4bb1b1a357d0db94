"""Keyed orthonormal rotation (float32 or int8): the accuracy ceiling, weakest privacy."""
from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidParameter
from ..keys import KeyedStream
from .base import Scheme


class Rotation(Scheme):
    """``R x`` for a key-seeded Haar orthonormal ``R``; score = inner product = cosine.

    Rotation preserves every inner product, so accuracy equals the unprotected embedding;
    anyone holding the key inverts it exactly (a baseline, not a privacy scheme on its own).
    With ``quant="int8"`` the rotated vector is scaled by ``scale`` (default clips at 4
    standard deviations of a component) and rounded to int8: 4x smaller, faster 1:N.
    """

    name = "rotation"
    version = 2   # 2: transform stream bound to the full spec (CodeMatching.stream_label)

    def __init__(self, dim: int = 128, quant: str = "float32", scale: float | None = None) -> None:
        super().__init__(dim)
        if quant not in ("float32", "int8"):
            raise InvalidParameter(f"rotation quant must be 'float32' or 'int8', got {quant!r}")
        self.quant = quant
        default = 127.0 * math.sqrt(self.dim) / 4.0
        self.scale = float(default if scale is None else scale)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise InvalidParameter(f"scale must be positive, got {scale!r}")

    @property
    def metric(self) -> str:  # type: ignore[override]
        return "ip_int8" if self.quant == "int8" else "ip_f32"

    @property
    def params(self) -> dict:
        params = {"dim": self.dim, "quant": self.quant}
        if self.quant == "int8":
            params["scale"] = round(self.scale, 6)
        return params

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.int8 if self.quant == "int8" else np.float32)

    def _transform(self, key: bytes) -> np.ndarray:
        return np.ascontiguousarray(KeyedStream(key, self.stream_label()).orthonormal(self.dim), dtype=np.float32)

    def _apply(self, r: np.ndarray, x: np.ndarray) -> np.ndarray:
        y = x @ r
        if self.quant == "float32":
            return np.ascontiguousarray(y, dtype=np.float32)
        return np.clip(np.rint(y * self.scale), -127, 127).astype(np.int8)

    def to_similarity(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.float64)
        return raw / (self.scale * self.scale) if self.quant == "int8" else raw

    def invert(self, key: bytes, codes: np.ndarray) -> np.ndarray:
        """Recover embeddings from codes with the key (shows why rotation alone is weak)."""
        r = self._material(key)
        y = np.asarray(codes, dtype=np.float32)
        if self.quant == "int8":
            y = y / self.scale
        return y @ r.T
