"""Shared fixtures for the pytest-benchmark suites in bench/ (run: pytest bench/ --benchmark-only)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so `pytest bench/` works from any directory
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def bench_rng() -> np.random.Generator:
    return np.random.default_rng(2024)
