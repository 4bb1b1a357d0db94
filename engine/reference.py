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


# ------------------------------------------------------------------------------------------
# CKKS: ciphertext x ciphertext inner product over RNS/NTT arrays (engine.kernels.ckks_block_mac)
def ckks_block_mac(blocks, probe: np.ndarray, moduli) -> np.ndarray:
    """``(len(blocks), 3, L, N)`` uint64: for each block ``B`` (``(dims, 2, L, N)``, like ``probe``)
    the three polynomials ``sum_i (p0*b0, p0*b1 + p1*b0, p1*b1)`` reduced mod ``q_l`` per limb, in
    exact Python-int arithmetic (slow: for small ``N``). Inputs must be reduced (``< q_l``)."""
    p = np.asarray(probe, dtype=np.uint64).astype(object)
    q = np.array([int(m) for m in moduli], dtype=object)[:, None]  # (L, 1) broadcasts over N
    out = []
    for blk in blocks:
        b = np.asarray(blk, dtype=np.uint64).astype(object)
        c0 = (p[:, 0] * b[:, 0]).sum(axis=0) % q
        c1 = (p[:, 0] * b[:, 1] + p[:, 1] * b[:, 0]).sum(axis=0) % q
        c2 = (p[:, 1] * b[:, 1]).sum(axis=0) % q
        out.append(np.stack([c0, c1, c2]).astype(np.uint64))
    shape = (0, 3) + p.shape[2:]
    return np.stack(out) if out else np.zeros(shape, dtype=np.uint64)
