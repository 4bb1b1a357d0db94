"""Synthetic faces: random unit "identities" in embedding space and noisy captures of them."""
from __future__ import annotations

import numpy as np


def faces(n: int, dim: int = 128, seed: int = 0) -> np.ndarray:
    """``n`` random unit embeddings ``(n, dim)`` (float64), reproducible by ``seed``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def capture(centre: np.ndarray, rng: np.random.Generator, noise: float = 0.45) -> np.ndarray:
    """A new noisy capture of the face ``centre`` (cosine ~0.9 at the default noise)."""
    return centre + noise * rng.standard_normal(centre.shape[-1]) / np.sqrt(centre.shape[-1])
