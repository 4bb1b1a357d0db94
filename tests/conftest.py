"""Shared fixtures: deterministic keys and embeddings, location of the shared face data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.keys import KeyDeriver

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def deriver() -> KeyDeriver:
    return KeyDeriver(bytes(range(32)), tenant="test-tenant")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def clustered(rng: np.random.Generator, subjects: int, samples: int, dim: int, noise: float = 0.5):
    """Unit embeddings: ``subjects`` cluster centres, ``samples`` noisy captures each."""
    centres = rng.standard_normal((subjects, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[:, None, :] + noise / np.sqrt(dim) * rng.standard_normal((subjects, samples, dim))
    x /= np.linalg.norm(x, axis=2, keepdims=True)
    return x.astype(np.float32)


@pytest.fixture
def shared_faces() -> Path:
    path = SHARED_DATA / "faces"
    if not path.is_dir():
        pytest.skip("../shared/data/faces is not present")
    return path
