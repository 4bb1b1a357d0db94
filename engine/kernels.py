"""Native matching kernels: the public, validated entry points.

Every function here has the same signature and semantics as its twin in
:mod:`engine.reference` (which defines them) plus an optional ``n_threads`` (0 = all cores).
Inputs are checked once, here, and again defensively in C++:

* ``queries`` is one code ``(d,)`` (treated as ``nq = 1``) or a batch ``(nq, d)``; ``codes`` is
  ``(n, d)``; non-contiguous input is copied to C order, the wrong dtype/ndim/length raises
  :class:`engine.errors.InvalidParameter`;
* dtypes: Hamming and IoM ``uint8``; :func:`ip_int8` ``int8``; :func:`ip_f32` ``float32``;
* Hamming codes are packed bits whose length is a multiple of 8 bytes (64 bits);
* top-k functions return ``(scores, indices)``, each ``(nq, min(k, n))``, best first, ties
  broken by the smaller gallery index; scores are ``int32`` (``float32`` for ``ip_topk_f32``),
  indices ``int64``; an empty gallery gives ``(nq, 0)`` arrays.

:func:`ckks_block_mac` is the encrypted 1:N hot loop (CKKS ciphertext x ciphertext inner products
over NTT/RNS ``uint64`` arrays, bit-equal to SEAL; see :mod:`engine.he.raw` for the conversion)
and checks its own inputs; :func:`engine.reference.ckks_block_mac` defines it.

The heavy loops run in C++ (``engine._kernels``: header-only code in ``csrc/``, SIMD level
chosen at run time: AVX-512, AVX2 or portable scalar) with the GIL released, on several threads.
:func:`simd_level` tells which path is in use; :func:`set_simd` (or the ``VEILFACE_SIMD``
environment variable at import) forces one, e.g. for tests.
"""
from __future__ import annotations

import os

import numpy as np

from .errors import InvalidParameter
from .validation import check_int

try:
    from . import _bitpack as _bp
    from . import _kernels as _native
except ImportError as _exc:  # pragma: no cover - only when the extensions were not built
    # No silent numpy fallback: a broken build must fail loudly, not run 50x slower.
    raise ImportError(f"Veilface's native kernels are not built ({_exc}). Reinstall with "
                      "`pip install .` (needs a C++17 compiler) or, in a checkout, "
                      "`python setup.py build_ext --inplace`.") from _exc

__all__ = [
    "sign_pack", "group_argmax",
    "hamming_distances", "iom_counts", "ip_int8", "ip_f32",
    "hamming_topk", "iom_topk", "ip_topk_int8", "ip_topk_f32",
    "simd_level", "simd_levels", "set_simd",
    "ckks_block_mac", "ckks_max_excess", "aligned_empty",
    "MAX_IOM_M", "MAX_INT8_DIM", "CKKS_MAX_MODULUS",
]

#: longest IoM code (per-byte match counters of the AVX-512 path must not wrap); set in C++
MAX_IOM_M: int = int(_native.MAX_IOM_M)
#: largest int8 dimension (int32 accumulation stays exact for the whole int8 range); set in C++
MAX_INT8_DIM: int = int(_native.MAX_INT8_DIM)
#: CKKS moduli accepted by :func:`ckks_block_mac` are odd and below this (2^61); set in C++
CKKS_MAX_MODULUS: int = int(_native.CKKS_MAX_MODULUS)

_KIND = {
    # kind: (dtype, description)
    "hamming": (np.dtype(np.uint8), "uint8 packed bits"),
    "iom": (np.dtype(np.uint8), "uint8 IoM indices"),
    "int8": (np.dtype(np.int8), "int8"),
    "f32": (np.dtype(np.float32), "float32"),
}


# ------------------------------------------------------------------------------------------
# SIMD control
def simd_level() -> str:
    """The SIMD path the kernels use now: ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    return _native.simd_level()


def simd_levels() -> list[str]:
    """SIMD paths this CPU supports (``"scalar"`` always)."""
    return list(_native.simd_levels())


def set_simd(level: str) -> str:
    """Force a SIMD path (``"scalar"``, ``"avx2"``, ``"avx512"``) or ``"auto"``; returns the previous one.

    Raises :class:`InvalidParameter` for an unknown level or one this CPU lacks.
    """
    try:
        return _native.set_simd(str(level))
    except ValueError as exc:
        raise InvalidParameter(str(exc)) from None


# ------------------------------------------------------------------------------------------
# validation helpers
def _threads(n_threads) -> int:
    if n_threads is None:
        return 0
    return check_int("n_threads", n_threads, 0, 1024)


def _as_array(x, what: str, dtype: np.dtype, desc: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # noqa: BLE001 - anything unconvertible is bad input
            raise InvalidParameter(f"{what} is not an array: {exc}") from None
    if x.dtype != dtype:
        if x.dtype.kind == dtype.kind and x.dtype.itemsize == dtype.itemsize:
            x = x.astype(dtype)  # same type, other byte order
        else:
            raise InvalidParameter(f"{what} must have dtype {dtype.name} ({desc}), got {x.dtype}")
    return x


def _pair(queries, codes, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (queries, codes) pair; returns 2-D C-contiguous arrays."""
    dtype, desc = _KIND[kind]
    q = _as_array(queries, "queries", dtype, desc)
    c = _as_array(codes, "codes", dtype, desc)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise InvalidParameter(f"queries must be 1-D (d,) or 2-D (nq, d), got shape {q.shape}")
    if c.ndim != 2:
        raise InvalidParameter(f"codes must be 2-D (n, d), got shape {c.shape}")
    d = c.shape[1]
    if q.shape[1] != d:
        raise InvalidParameter(f"code length mismatch: queries have {q.shape[1]}, codes have {d}")
    if d < 1:
        raise InvalidParameter("code length must be >= 1")
    if kind == "hamming" and d % 8:
        raise InvalidParameter(
            f"Hamming code length must be a multiple of 8 bytes (64 bits), got {d} bytes ({8 * d} bits)")
    if kind == "iom" and d > MAX_IOM_M:
        raise InvalidParameter(f"IoM code length must be <= {MAX_IOM_M}, got {d}")
    if kind == "int8" and d > MAX_INT8_DIM:
        raise InvalidParameter(f"int8 dimension must be <= {MAX_INT8_DIM}, got {d}")
    return np.ascontiguousarray(q), np.ascontiguousarray(c)


def _call(fn, *args):
    try:
        return fn(*args)
    except ValueError as exc:  # defensive checks in C++ -> our error type
        raise InvalidParameter(str(exc)) from None


def _dense(kind: str, native_name: str, queries, codes, n_threads):
    q, c = _pair(queries, codes, kind)
    nt = _threads(n_threads)
    out_dtype = np.float32 if kind == "f32" else np.int32
    if c.shape[0] == 0 or q.shape[0] == 0:
        return np.zeros((q.shape[0], c.shape[0]), dtype=out_dtype)
    return _call(getattr(_native, native_name), q, c, nt)


def _topk(kind: str, native_name: str, queries, codes, k, n_threads):
    q, c = _pair(queries, codes, kind)
    k = check_int("k", k, 1, 1 << 62)
    nt = _threads(n_threads)
    n = c.shape[0]
    kk = min(k, n)
    out_dtype = np.float32 if kind == "f32" else np.int32
    if n == 0 or q.shape[0] == 0:
        return np.zeros((q.shape[0], kk), dtype=out_dtype), np.zeros((q.shape[0], kk), dtype=np.int64)
    return _call(getattr(_native, native_name), q, c, kk, nt)


# ------------------------------------------------------------------------------------------
# device-side helpers (Cython)
def sign_pack(y) -> np.ndarray:
    """``(n, bits)`` float32/float64 -> ``(n, ceil(bits/8))`` uint8: bit set where ``y > 0``,
    MSB first (same as ``np.packbits(y > 0, axis=1)``). A 1-D ``(bits,)`` input gives ``(bits/8,)``."""
    y = np.asarray(y)
    if y.dtype not in (np.float32, np.float64):
        raise InvalidParameter(f"sign_pack needs float32 or float64 input, got {y.dtype}")
    if y.ndim == 1:
        return sign_pack(y[None, :])[0]
    if y.ndim != 2:
        raise InvalidParameter(f"sign_pack needs a 2-D (n, bits) array, got shape {y.shape}")
    y = np.ascontiguousarray(y)
    return _bp.sign_pack(y)


def group_argmax(y) -> np.ndarray:
    """``(n, m, q)`` float32/float64 -> ``(n, m)`` uint8 index of the first maximum of each group
    (same as ``np.argmax(y, axis=2).astype(np.uint8)``); ``1 <= q <= 256``."""
    y = np.asarray(y)
    if y.dtype not in (np.float32, np.float64):
        raise InvalidParameter(f"group_argmax needs float32 or float64 input, got {y.dtype}")
    if y.ndim != 3:
        raise InvalidParameter(f"group_argmax needs a 3-D (n, m, q) array, got shape {y.shape}")
    if not 1 <= y.shape[2] <= 256:
        raise InvalidParameter(f"group size q must be in [1, 256], got {y.shape[2]}")
    y = np.ascontiguousarray(y)
    return _bp.group_argmax(y)


# ------------------------------------------------------------------------------------------
# full score matrices
def hamming_distances(queries, codes, n_threads: int = 0) -> np.ndarray:
    """Hamming distances ``(nq, n)`` int32 between packed uint8 codes ``(.., d)``, ``d % 8 == 0``."""
    return _dense("hamming", "hamming_distances", queries, codes, n_threads)


def iom_counts(queries, codes, n_threads: int = 0) -> np.ndarray:
    """IoM collision counts ``(nq, n)`` int32 between uint8 index codes ``(.., m)``."""
    return _dense("iom", "iom_counts", queries, codes, n_threads)


def ip_int8(queries, codes, n_threads: int = 0) -> np.ndarray:
    """Exact int8 inner products ``(nq, n)`` int32 (int32 accumulation)."""
    return _dense("int8", "ip_int8", queries, codes, n_threads)


def ip_f32(queries, codes, n_threads: int = 0) -> np.ndarray:
    """float32 inner products ``(nq, n)`` float32 (summation order differs from numpy: equal
    within float32 rounding)."""
    return _dense("f32", "ip_f32", queries, codes, n_threads)


# ------------------------------------------------------------------------------------------
# top-k search
def hamming_topk(queries, codes, k: int, n_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` nearest codes by Hamming distance: ``(distances int32, indices int64)``, each
    ``(nq, min(k, n))``, smallest distance first, ties by smaller index."""
    return _topk("hamming", "hamming_topk", queries, codes, k, n_threads)


def iom_topk(queries, codes, k: int, n_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` codes with the most IoM collisions: ``(counts int32, indices int64)``, largest first."""
    return _topk("iom", "iom_topk", queries, codes, k, n_threads)


def ip_topk_int8(queries, codes, k: int, n_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` largest int8 inner products: ``(products int32, indices int64)``."""
    return _topk("int8", "ip_topk_int8", queries, codes, k, n_threads)


def ip_topk_f32(queries, codes, k: int, n_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` largest float32 inner products: ``(products float32, indices int64)``. Scores equal
    numpy's within float32 rounding, so the order of near-ties may differ from the reference."""
    return _topk("f32", "ip_topk_f32", queries, codes, k, n_threads)


# ------------------------------------------------------------------------------------------
# CKKS: ciphertext x ciphertext inner product over NTT/RNS arrays (see csrc/vf_ckks.hpp)
def _moduli(moduli) -> np.ndarray:
    try:
        vals = [int(m) for m in moduli]
    except (TypeError, ValueError) as exc:
        raise InvalidParameter(f"moduli must be integers: {exc}") from None
    if not vals or any(not (2 < m < CKKS_MAX_MODULUS and m % 2) for m in vals):
        raise InvalidParameter(f"moduli must be odd integers in (2, 2^61), got {vals}")
    return np.array(vals, dtype=np.uint64)


def _u64(a, what: str, ndim: int) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint64 or a.ndim != ndim or not a.flags.c_contiguous:
        desc = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise InvalidParameter(f"{what} must be a C-contiguous uint64 array with {ndim} dimensions, got {desc}")
    return a


def ckks_block_mac(blocks, probe, moduli, out: np.ndarray | None = None,
                   n_threads: int = 0) -> np.ndarray:
    """Encrypted inner products of one expanded probe with many gallery blocks, bit-for-bit equal
    to SEAL's ``Evaluator.multiply`` + ``add_inplace`` over the dimensions.

    ``probe`` and every block are ``(dims, 2, L, N)`` uint64 (dimension ``i`` is a size-2
    ciphertext in NTT form at the level whose ``L`` primes are ``moduli``, laid out as
    :func:`engine.he.raw.to_arrays` does; every coefficient reduced modulo its prime). ``blocks``
    is a sequence of such arrays (one allocation each) or one ``(nblocks, dims, 2, L, N)`` array.
    Returns ``(nblocks, 3, L, N)`` uint64 -- block ``b``'s size-3 product ciphertext (scale =
    product of the operand scales, same level), written into ``out`` when given. Unreduced
    coefficients give a wrong result, never a crash: check foreign arrays with
    :func:`ckks_max_excess`. Runs with the GIL released on ``n_threads`` threads (0 = all)."""
    p = _u64(probe, "probe", 4)
    if isinstance(blocks, np.ndarray) and blocks.ndim == 5:
        blocks = list(blocks)
    blocks = [_u64(b, "block", 4) for b in blocks]
    if not blocks:
        return np.zeros((0, 3) + p.shape[2:], dtype=np.uint64)
    q = _moduli(moduli)
    if out is not None:
        _u64(out, "out", 4)
    return _call(_native.ckks_block_mac, blocks, p, q, out, _threads(n_threads))


def ckks_max_excess(array, moduli) -> int:
    """0 when every coefficient of a C-contiguous ``(..., L, N)`` uint64 array is below its
    prime ``moduli[l]`` (what :func:`ckks_block_mac` needs), else the largest excess. For arrays
    that did not come from SEAL, e.g. a gallery snapshot read from disk."""
    a = np.asarray(array)
    if a.dtype != np.uint64 or a.ndim < 2:
        raise InvalidParameter(f"need a (..., L, N) uint64 array, got {a.dtype} {a.shape}")
    return int(_call(_native.ckks_max_excess, np.ascontiguousarray(a), _moduli(moduli)))


def aligned_empty(shape, dtype=np.uint64, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary (one
    allocation; e.g. a gallery block for :func:`ckks_block_mac`)."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dt.itemsize + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + count * dt.itemsize].view(dt).reshape(shape)


def default_threads() -> int:
    """Threads used when ``n_threads=0``."""
    return os.cpu_count() or 1
