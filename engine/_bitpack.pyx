# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython helpers used on the device side of the schemes: sign bits -> packed codes, and the
per-group argmax of IoM hashing. Callers go through :mod:`engine.kernels`, which validates
shapes and dtypes; these functions assume C-contiguous float32/float64 input of the right ndim.
"""
import numpy as np
cimport numpy as cnp
from libc.math cimport isnan

cnp.import_array()

ctypedef fused real:
    float
    double


def sign_pack(const real[:, ::1] y):
    """``(n, bits)`` float -> ``(n, ceil(bits/8))`` uint8; bit set where ``y > 0``, MSB first
    (identical to ``np.packbits(y > 0, axis=1)``)."""
    cdef Py_ssize_t n = y.shape[0], bits = y.shape[1]
    cdef Py_ssize_t nbytes = (bits + 7) // 8
    out_arr = np.zeros((n, nbytes), dtype=np.uint8)
    cdef unsigned char[:, ::1] out = out_arr
    cdef Py_ssize_t i, b, j, full = bits // 8
    cdef unsigned char v
    with nogil:
        for i in range(n):
            for b in range(full):
                v = 0
                for j in range(8):
                    v = (v << 1) | (y[i, b * 8 + j] > 0)
                out[i, b] = v
            if full < nbytes:
                v = 0
                for j in range(8):
                    v = v << 1
                    if full * 8 + j < bits and y[i, full * 8 + j] > 0:
                        v = v | 1
                out[i, full] = v
    return out_arr


def group_argmax(const real[:, :, ::1] y):
    """``(n, m, q)`` float -> ``(n, m)`` uint8 index of the first maximum in each group of q
    (identical to ``np.argmax(y, axis=2).astype(np.uint8)``, including NaN: the first NaN wins).
    q must be <= 256 (checked by the caller)."""
    cdef Py_ssize_t n = y.shape[0], m = y.shape[1], q = y.shape[2]
    out_arr = np.zeros((n, m), dtype=np.uint8)
    cdef unsigned char[:, ::1] out = out_arr
    cdef Py_ssize_t i, g, t, best
    cdef real bv, v
    if q == 0:
        return out_arr
    with nogil:
        for i in range(n):
            for g in range(m):
                best = 0
                bv = y[i, g, 0]
                if not isnan(bv):
                    for t in range(1, q):
                        v = y[i, g, t]
                        if v > bv:
                            bv = v
                            best = t
                        elif isnan(v):
                            best = t
                            break
                out[i, g] = <unsigned char>best
    return out_arr
