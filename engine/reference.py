"""Pure-numpy reference implementations of every native kernel.

These define the semantics the C++/Cython kernels in :mod:`engine.kernels` must reproduce
exactly (tests compare the two). Conventions:

* codes are C-contiguous 2-D arrays, one row per template;
* top-k returns ``(scores, indices)`` each ``(nq, k)``, best first, ties broken by the
  smaller gallery index; ``k`` is clipped to the gallery size;
* Hamming: ``uint8`` packed bits, distance (smaller is better), ``int32``;
* IoM: ``uint8`` argmax indices, collision count (larger is better), ``int32``;
* int8 inner product (larger is better) accumulated in ``int32``; float32 inner product.
"""
from __future__ import annotations

import numpy as np

_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)


def sign_pack(y: np.ndarray) -> np.ndarray:
    """``(n, bits)`` float32 -> ``(n, bits/8)`` uint8; bit set where ``y > 0``, MSB first."""
    return np.packbits(np.asarray(y) > 0, axis=1)


def group_argmax(y: np.ndarray) -> np.ndarray:
    """``(n, m, q)`` float32 -> ``(n, m)`` uint8 index of the first maximum in each group."""
    return np.argmax(y, axis=2).astype(np.uint8)


def hamming_distances(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """All Hamming distances ``(nq, n)`` int32 between packed uint8 codes."""
    x = np.bitwise_xor(queries[:, None, :], codes[None, :, :])
    return _POP8[x].sum(axis=2, dtype=np.int32)


def iom_counts(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """All IoM collision counts ``(nq, n)`` int32."""
    return (queries[:, None, :] == codes[None, :, :]).sum(axis=2, dtype=np.int32)


def ip_int8(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """All int8 inner products ``(nq, n)`` int32."""
    return queries.astype(np.int32) @ codes.astype(np.int32).T


def ip_f32(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """All float32 inner products ``(nq, n)`` float32."""
    return (queries.astype(np.float32) @ codes.astype(np.float32).T).astype(np.float32)


def topk(scores: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row, best first, ties by smaller index."""
    nq, n = scores.shape
    k = min(k, n)
    idx = np.arange(n)
    order = np.empty((nq, k), dtype=np.int64)
    for i in range(nq):
        key = -scores[i].astype(np.float64) if largest else scores[i].astype(np.float64)
        order[i] = np.lexsort((idx, key))[:k]
    return np.take_along_axis(scores, order, axis=1), order


def hamming_topk(queries, codes, k):
    return topk(hamming_distances(queries, codes), k, largest=False)


def iom_topk(queries, codes, k):
    return topk(iom_counts(queries, codes), k, largest=True)


def ip_topk_int8(queries, codes, k):
    return topk(ip_int8(queries, codes), k, largest=True)


def ip_topk_f32(queries, codes, k):
    return topk(ip_f32(queries, codes), k, largest=True)
