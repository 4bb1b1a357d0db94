"""Input checks shared by schemes, galleries and kernels (one place, one set of messages)."""
from __future__ import annotations

import numpy as np

from .errors import InvalidEmbedding, InvalidParameter

MAX_DIM = 4096


def as_embeddings(x, dim: int, *, normalise: bool = True) -> np.ndarray:
    """Validate embeddings and return a C-contiguous float32 ``(n, dim)`` array.

    Accepts one embedding ``(dim,)`` or a batch ``(n, dim)``. Rejects the wrong
    dimension, non-numeric input, NaN/inf and zero-norm rows with :class:`InvalidEmbedding`.
    Rows are L2-normalised unless ``normalise=False``.
    """
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidEmbedding(f"embedding is not numeric: {exc}") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InvalidEmbedding(f"embedding must be 1-D (dim,) or 2-D (n, dim), got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise InvalidEmbedding(f"embedding dimension {arr.shape[1]} != expected {dim}")
    if arr.shape[0] == 0:
        raise InvalidEmbedding("no embeddings given")
    if not np.isfinite(arr).all():
        raise InvalidEmbedding("embedding contains NaN or infinity")
    norms = np.linalg.norm(arr, axis=1)
    if (norms <= 1e-12).any():
        raise InvalidEmbedding("embedding has zero norm")
    if normalise:
        arr = arr / norms[:, None]
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_subject_id(subject_id: object) -> str:
    """A gallery key: a non-empty string of at most 256 characters (the service applies the stricter
    pseudonymous-id rule of :func:`engine.service.policy.check_id` before anything reaches a gallery)."""
    if not isinstance(subject_id, str) or not subject_id or len(subject_id) > 256:
        raise InvalidParameter("subject id must be a non-empty string of at most 256 characters")
    return subject_id


def check_int(name: str, value, lo: int, hi: int, multiple_of: int = 1) -> int:
    """Validate an integer parameter in ``[lo, hi]`` (and a multiple of ``multiple_of``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        try:
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise InvalidParameter(f"{name} must be an integer, got {value!r}") from None
    value = int(value)
    if not lo <= value <= hi:
        raise InvalidParameter(f"{name} must be in [{lo}, {hi}], got {value}")
    if value % multiple_of:
        raise InvalidParameter(f"{name} must be a multiple of {multiple_of}, got {value}")
    return value


def check_dim(dim) -> int:
    return check_int("dim", dim, 2, MAX_DIM)


def check_k(k, n: int) -> int:
    """Validate top-k and clip it to the gallery size ``n``."""
    k = check_int("k", k, 1, 1 << 30)
    return min(k, n)
