"""Native kernels (engine.kernels / engine._kernels / engine._bitpack) against the numpy reference.

Every kernel is checked on every SIMD path this CPU has (``scalar`` always), on fixed cases and
with hypothesis on random shapes, including heavy ties (codes drawn from a few values) so the
"best first, ties by smaller index" contract is exercised. Integer kernels must match the
reference bit for bit; float32 scores within rounding.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import kernels as K
from engine import reference as R
from engine.errors import InvalidParameter

LEVELS = K.simd_levels()
HYP = settings(max_examples=60, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(params=LEVELS)
def level(request):
    prev = K.set_simd(request.param)
    yield request.param
    K.set_simd("auto")
    del prev


def _codes(rng, shape, kind, few=False):
    if kind in ("hamming", "iom"):
        hi = 256 if kind == "hamming" else 16
        if few:  # heavy ties
            vals = rng.integers(0, hi, 3).astype(np.uint8)
            return vals[rng.integers(0, 3, shape)]
        return rng.integers(0, hi, shape, dtype=np.uint8)
    if kind == "int8":
        if few:
            vals = np.array([-128, 0, 127], dtype=np.int8)
            return vals[rng.integers(0, 3, shape)]
        return rng.integers(-128, 128, shape, dtype=np.int8)
    if few:  # small integers: float sums are exact, so ties are exact too
        return rng.integers(-2, 3, shape).astype(np.float32)
    return rng.standard_normal(shape, dtype=np.float32)


DENSE = {
    "hamming": (K.hamming_distances, R.hamming_distances),
    "iom": (K.iom_counts, R.iom_counts),
    "int8": (K.ip_int8, R.ip_int8),
    "f32": (K.ip_f32, R.ip_f32),
}
TOPK = {
    "hamming": (K.hamming_topk, R.hamming_topk),
    "iom": (K.iom_topk, R.iom_topk),
    "int8": (K.ip_topk_int8, R.ip_topk_int8),
    "f32": (K.ip_topk_f32, R.ip_topk_f32),
}


def _check_dense(kind, q, c, n_threads=0):
    ours, ref = DENSE[kind][0](q, c, n_threads=n_threads), DENSE[kind][1](q, c)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    if kind == "f32":
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4 * max(1, q.shape[1]) ** 0.5)
    else:
        np.testing.assert_array_equal(ours, ref)


def _check_topk(kind, q, c, k, n_threads=0, exact=True):
    s, i = TOPK[kind][0](q, c, k, n_threads=n_threads)
    rs, ri = TOPK[kind][1](q, c, k)
    assert s.shape == rs.shape and i.shape == ri.shape
    assert s.dtype == rs.dtype and i.dtype == np.int64
    if kind != "f32" or exact:
        np.testing.assert_array_equal(s, rs)
        np.testing.assert_array_equal(i, ri)
        return
    # float32 with rounding: the scores must match; the indices must be a valid top-k of
    # the reference scores up to a small tolerance (near-ties may swap).
    tol = 1e-4 * max(1, q.shape[1]) ** 0.5
    np.testing.assert_allclose(s, rs, rtol=1e-5, atol=tol)
    full = R.ip_f32(q, c)
    for row in range(q.shape[0]):
        assert len(set(i[row].tolist())) == i.shape[1]
        np.testing.assert_allclose(full[row, i[row]], s[row], rtol=1e-5, atol=tol)
        assert np.all(np.diff(s[row]) <= tol)
        if i.shape[1] < c.shape[0]:
            rest = np.delete(full[row], i[row])
            assert rest.max() <= s[row, -1] + tol


# ------------------------------------------------------------------------------------------
# fixed cases
@pytest.mark.parametrize("kind", list(DENSE))
@pytest.mark.parametrize("nq,n,d", [(1, 1, 8), (3, 17, 32), (5, 100, 64), (70, 300, 40),
                                    (4, 1031, 128), (2, 9, 8 * 13)])
def test_fixed_cases(level, kind, nq, n, d):
    rng = np.random.default_rng(nq * 1000 + n + d)
    for few in (False, True):
        q, c = _codes(rng, (nq, d), kind, few), _codes(rng, (n, d), kind, few)
        if few:
            c[: n // 2] = c[0]  # many exact duplicates
        _check_dense(kind, q, c)
        for k in (1, 2, 10, n, n + 5):
            _check_topk(kind, q, c, k, exact=(kind != "f32" or few))


@pytest.mark.parametrize("kind", list(DENSE))
def test_one_dimensional_query(level, kind):
    rng = np.random.default_rng(7)
    c = _codes(rng, (50, 64), kind)
    q = c[3].copy()
    s, i = TOPK[kind][0](q, c, 3)
    assert s.shape == (1, 3) and i.shape == (1, 3)
    assert DENSE[kind][0](q, c).shape == (1, 50)
    if kind == "hamming":
        assert s[0, 0] == 0 and i[0, 0] == 3


def test_int8_extremes(level):
    q = np.full((3, 333), -128, np.int8)
    q[1] = 127
    q[2, ::2] = 127
    c = np.full((41, 333), -128, np.int8)
    c[1] = 127
    c[2, 1::2] = 0
    c[5:] = np.random.default_rng(0).integers(-128, 128, (36, 333), dtype=np.int8)
    _check_dense("int8", q, c)
    _check_topk("int8", q, c, 41)
    assert K.ip_int8(q[:1], c[:1])[0, 0] == 333 * 128 * 128


def test_iom_long_codes(level):
    rng = np.random.default_rng(3)
    q = rng.integers(0, 2, (3, 4096), dtype=np.uint8)
    c = np.concatenate([q, rng.integers(0, 2, (20, 4096), dtype=np.uint8)])
    _check_dense("iom", q, c)
    _check_topk("iom", q, c, 5)
    c2 = np.repeat(q[:1], 9, axis=0)
    assert (K.iom_counts(q[:1], c2) == 4096).all()
    big = np.zeros((2, K.MAX_IOM_M), np.uint8)
    assert (K.iom_counts(big, big) == K.MAX_IOM_M).all()


@pytest.mark.parametrize("kind", list(DENSE))
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_threads_and_large_gallery(level, kind, n_threads):
    # large enough for the split-gallery path (per-thread heaps merged afterwards)
    rng = np.random.default_rng(11)
    n = 20_000 if level != "scalar" else 12_000
    d = 32 if kind != "f32" else 16
    q = _codes(rng, (3, d), kind, few=True)
    c = _codes(rng, (n, d), kind, few=True)
    _check_topk(kind, q, c, 57, n_threads=n_threads)
    _check_topk(kind, q[:1], c, 1, n_threads=n_threads)
    _check_dense(kind, q[:2], c[:5000], n_threads=n_threads)


def test_batched_queries_split(level):
    # many queries, small gallery: the split-queries path
    rng = np.random.default_rng(5)
    q = _codes(rng, (64, 32), "hamming", few=True)
    c = _codes(rng, (2000, 32), "hamming", few=True)
    _check_topk("hamming", q, c, 10, n_threads=2)
    _check_dense("hamming", q, c, n_threads=2)


# ------------------------------------------------------------------------------------------
# hypothesis: random shapes, k from 1 to n + 5, ties
@st.composite
def cases(draw, kind):
    nq = draw(st.integers(1, 70))
    n = draw(st.integers(0, 300))
    if kind == "hamming":
        d = 8 * draw(st.integers(1, 12))
    else:
        d = draw(st.integers(1, 200))
    k = draw(st.integers(1, n + 5))
    few = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return nq, n, d, k, few, seed


def _hyp(kind, level, case):
    nq, n, d, k, few, seed = case
    rng = np.random.default_rng(seed)
    q, c = _codes(rng, (nq, d), kind, few), _codes(rng, (n, d), kind, few)
    _check_dense(kind, q, c)
    _check_topk(kind, q, c, k, exact=(kind != "f32" or few))


@HYP
@given(case=cases("hamming"))
def test_hypothesis_hamming(level, case):
    _hyp("hamming", level, case)


@HYP
@given(case=cases("iom"))
def test_hypothesis_iom(level, case):
    _hyp("iom", level, case)


@HYP
@given(case=cases("int8"))
def test_hypothesis_int8(level, case):
    _hyp("int8", level, case)


@HYP
@given(case=cases("f32"))
def test_hypothesis_f32(level, case):
    _hyp("f32", level, case)


# ------------------------------------------------------------------------------------------
# Cython helpers
@HYP
@given(n=st.integers(0, 20), bits=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       f64=st.booleans())
def test_sign_pack(n, bits, seed, f64):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((n, bits)).astype(np.float64 if f64 else np.float32)
    y[rng.random((n, bits)) < 0.2] = 0.0
    np.testing.assert_array_equal(K.sign_pack(y), R.sign_pack(y))
    np.testing.assert_array_equal(K.sign_pack(y[:, ::-1]), R.sign_pack(y[:, ::-1]))  # non-contiguous


@HYP
@given(n=st.integers(0, 10), m=st.integers(1, 40), q=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_group_argmax(n, m, q, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, (n, m, q)).astype(np.float32)  # many ties: first maximum wins
    np.testing.assert_array_equal(K.group_argmax(y), R.group_argmax(y))
    y2 = rng.standard_normal((n, m, q))
    np.testing.assert_array_equal(K.group_argmax(y2), R.group_argmax(y2))


def test_group_argmax_nan_and_sign_pack_1d():
    y = np.array([[[1, np.nan, 3], [np.nan, 5, 6], [1, 2, 3]]], dtype=np.float32)
    np.testing.assert_array_equal(K.group_argmax(y), R.group_argmax(y))
    v = np.array([1.0, -1.0, 0.0, 2.0] * 4, dtype=np.float32)
    np.testing.assert_array_equal(K.sign_pack(v), R.sign_pack(v[None])[0])


# ------------------------------------------------------------------------------------------
# bad input: InvalidParameter (a ValueError), never a crash
def _u8(*shape):
    return np.zeros(shape, np.uint8)


@pytest.mark.parametrize("call", [
    lambda: K.hamming_topk(_u8(2, 32).astype(np.int8), _u8(5, 32), 1),          # dtype
    lambda: K.hamming_topk(_u8(2, 32), _u8(5, 32).astype(np.float32), 1),
    lambda: K.hamming_topk(_u8(2, 2, 32), _u8(5, 32), 1),                       # ndim
    lambda: K.hamming_topk(_u8(2, 32), _u8(32), 1),
    lambda: K.hamming_topk(_u8(2, 32), _u8(5, 24 + 8), 0),                      # k < 1
    lambda: K.hamming_topk(_u8(2, 32), _u8(5, 32), -3),
    lambda: K.hamming_topk(_u8(2, 32), _u8(5, 32), "x"),
    lambda: K.hamming_topk(_u8(2, 32), _u8(5, 16), 1),                          # length
    lambda: K.hamming_distances(_u8(2, 12), _u8(5, 12)),                        # not 64-bit multiple
    lambda: K.hamming_distances(_u8(2, 0), _u8(5, 0)),
    lambda: K.iom_counts(_u8(1, 8), _u8(3, 9)),
    lambda: K.iom_counts(_u8(1, K.MAX_IOM_M + 1), _u8(3, K.MAX_IOM_M + 1)),
    lambda: K.ip_int8(_u8(1, 8), _u8(3, 8)),
    lambda: K.ip_topk_int8(np.zeros((1, 8), np.int16), np.zeros((3, 8), np.int8), 1),
    lambda: K.ip_f32(np.zeros((1, 8)), np.zeros((3, 8), np.float32)),           # float64
    lambda: K.ip_topk_f32(np.zeros((1, 8), np.float32), np.zeros((3, 7), np.float32), 2),
    lambda: K.hamming_topk(_u8(1, 32), _u8(5, 32), 1, n_threads=-1),
    lambda: K.hamming_topk([[1, 2]], _u8(5, 32), 1),
    lambda: K.sign_pack(np.zeros((2, 8), np.int32)),
    lambda: K.sign_pack(np.zeros((2, 2, 8), np.float32)),
    lambda: K.group_argmax(np.zeros((2, 8), np.float32)),
    lambda: K.group_argmax(np.zeros((2, 3, 300), np.float32)),
    lambda: K.set_simd("sse9"),
])
def test_bad_input_raises(call):
    with pytest.raises(InvalidParameter):
        call()


def test_native_defensive_checks():
    from engine import _kernels as N
    bad = [
        lambda: N.hamming_topk(_u8(2, 32).astype(np.int8), _u8(5, 32), 1),
        lambda: N.hamming_topk(_u8(2, 32), _u8(5, 32), 0),
        lambda: N.hamming_topk(_u8(32), _u8(5, 32), 1),
        lambda: N.hamming_distances(_u8(2, 12), _u8(5, 12)),
        lambda: N.hamming_distances(_u8(2, 64)[:, ::2], _u8(5, 32)),
        lambda: N.iom_counts(_u8(2, 8), _u8(5, 9)),
        lambda: N.ip_int8(np.zeros((1, 8), np.int8), np.zeros((3, 8), np.uint8)),
        lambda: N.ip_f32(np.zeros((1, 8), np.float32), np.zeros((3, 8), np.float64)),
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("kind", list(DENSE))
def test_empty_gallery_and_no_queries(kind):
    rng = np.random.default_rng(0)
    q, c = _codes(rng, (3, 16), kind), _codes(rng, (0, 16), kind)
    s, i = TOPK[kind][0](q, c, 5)
    assert s.shape == (3, 0) and i.shape == (3, 0)
    assert DENSE[kind][0](q, c).shape == (3, 0)
    c = _codes(rng, (4, 16), kind)
    s, i = TOPK[kind][0](q[:0], c, 5)
    assert s.shape == (0, 4)
    assert DENSE[kind][0](q[:0], c).shape == (0, 4)


def test_non_contiguous_input_is_accepted(level):
    rng = np.random.default_rng(2)
    c = rng.integers(0, 256, (40, 64), dtype=np.uint8)
    q = rng.integers(0, 256, (64, 6), dtype=np.uint8)
    c_f = np.asfortranarray(c)
    q_t = np.ascontiguousarray(q).T[:, :].copy()[:, :64]  # (6, 64)
    np.testing.assert_array_equal(K.hamming_distances(q_t[::2], c_f[::-1]),
                                  R.hamming_distances(q_t[::2].copy(), c[::-1].copy()))


def test_simd_env_var_forces_level():
    env = dict(os.environ, VEILFACE_SIMD="scalar")
    out = subprocess.run([sys.executable, "-c", "from engine import kernels; print(kernels.simd_level())"],
                         env=env, capture_output=True, text=True, timeout=60, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "scalar"


def test_limits_come_from_the_native_module():
    from engine import _kernels as N
    assert (K.MAX_IOM_M, K.MAX_INT8_DIM) == (N.MAX_IOM_M, N.MAX_INT8_DIM) == (16320, 65536)
    assert N.QUERY_BLOCK == 4
    with pytest.raises(ValueError):  # the C++ boundary enforces the same numbers
        N.iom_counts(_u8(1, N.MAX_IOM_M + 1), _u8(2, N.MAX_IOM_M + 1))


def test_simd_control():
    assert K.simd_level() in K.simd_levels()
    assert "scalar" in K.simd_levels()
    prev = K.set_simd("scalar")
    try:
        assert K.simd_level() == "scalar"
    finally:
        K.set_simd("auto")
    assert prev in K.simd_levels()


# ------------------------------------------------------------------------------------------
# concurrency: several Python threads at once (GIL released), and use after fork()
def test_concurrent_calls():
    rng = np.random.default_rng(9)
    c = rng.integers(0, 256, (30_000, 32), dtype=np.uint8)
    qs = [rng.integers(0, 256, (3, 32), dtype=np.uint8) for _ in range(6)]
    want = [R.hamming_topk(q, c, 7) for q in qs]
    got = [None] * len(qs)

    def work(t):
        for _ in range(5):
            got[t] = K.hamming_topk(qs[t], c, 7, n_threads=2)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(qs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for (s, i), (rs, ri) in zip(got, want):
        np.testing.assert_array_equal(s, rs)
        np.testing.assert_array_equal(i, ri)


def _child(conn):
    rng = np.random.default_rng(1)
    c = rng.integers(0, 256, (50_000, 32), dtype=np.uint8)
    s, i = K.hamming_topk(c[:2], c, 3, n_threads=2)
    conn.send((s.tolist(), i.tolist()))
    conn.close()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork")
def test_thread_pool_survives_fork():
    rng = np.random.default_rng(1)
    c = rng.integers(0, 256, (50_000, 32), dtype=np.uint8)
    want = K.hamming_topk(c[:2], c, 3, n_threads=2)  # starts the pool in the parent
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(child,))
    p.start()
    assert parent.poll(30), "child hung"
    s, i = parent.recv()
    p.join(10)
    assert p.exitcode == 0
    np.testing.assert_array_equal(np.array(s), want[0])
    np.testing.assert_array_equal(np.array(i), want[1])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity")
def test_pool_with_caller_pinned_and_migrating():
    # the pool keeps its workers off the caller's current CPU (re-aimed when the caller moves);
    # results must not depend on where the caller runs, also when it is pinned to one CPU (no
    # CPU left for the workers) and when it asks for more threads than there are CPUs
    rng = np.random.default_rng(12)
    c = rng.integers(0, 256, (40_000, 32), dtype=np.uint8)
    q = rng.integers(0, 256, (3, 32), dtype=np.uint8)
    ref = R.hamming_topk(q, c, 9)
    saved = os.sched_getaffinity(0)
    try:
        for mask in [{cpu} for cpu in sorted(saved)] + [saved] + [{cpu} for cpu in sorted(saved)[::-1]]:
            os.sched_setaffinity(0, mask)
            for nt in (2, 3):
                s, i = K.hamming_topk(q, c, 9, n_threads=nt)
                np.testing.assert_array_equal(s, ref[0])
                np.testing.assert_array_equal(i, ref[1])
            assert os.sched_getaffinity(0) == mask  # the caller's own mask is left alone
    finally:
        os.sched_setaffinity(0, saved)
    s, i = K.hamming_topk(q, c, 9, n_threads=2)
    np.testing.assert_array_equal(i, ref[1])
