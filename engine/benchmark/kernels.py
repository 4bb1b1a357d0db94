"""Kernel suite: Veilface's native kernels vs faiss and numpy, same data, same process.

Rows (``queries`` in {1, 64}, top-k with k = 10):

* ``mem_read``            -- read bandwidth of this machine (xor of every word, all cores); the
                             1-query rows also time this probe on their own gallery bytes,
                             interleaved with ours, and report ``bw_frac`` = probe time / ours;
* ``hamming_<bits>_q<Q>`` -- :func:`engine.kernels.hamming_topk` vs ``faiss.IndexBinaryFlat``
                             (numpy ``bitwise_count`` also reported for one query);
                             faiss is timed with all cores and with one thread, and the faster
                             of the two is the baseline (both are in the record);
* ``iom_<m>x<q>_q<Q>``    -- :func:`engine.kernels.iom_topk` vs numpy ``(codes == q).sum(1)``;
* ``int8_ip_<dim>_q<Q>``  -- :func:`engine.kernels.ip_topk_int8` vs numpy float32 gemv/gemm on
                             the same gallery as float32 (+ argpartition);
* ``f32_ip_<dim>_q<Q>``   -- :func:`engine.kernels.ip_topk_f32` vs ``faiss.IndexFlatIP`` (numpy
                             also reported);
* ``he_block_mac_<dim>``  -- :func:`engine.kernels.ckks_block_mac` on one 8192-template block of
                             the identify ring (N = 8192, two 60-bit primes) at 128 and 512
                             dimensions, one thread, vs the ``tenseal.sealapi`` loop the gallery
                             runs today (``multiply`` + ``add_inplace`` per dimension) on the same
                             ciphertexts; ``scalar_s`` is ours forced to the scalar path, ``all_threads_s``
                             ours on every core; results checked bit-equal to SEAL's first;
* ``he_block_mac_128_x<B>`` -- B blocks (16; 8 with ``--quick``) on 2 threads, ``templates_per_s``;
                             the baseline is the 1-block sealapi time x B (it holds the GIL: one
                             core per process).

Before timing, each row checks that ours and the baseline agree (top-1 scores equal; all k
distances for Hamming), so the timings measure correct work.
"""
from __future__ import annotations

import os

import numpy as np

from .._optional import require
from . import compare_times, median_time, record

K = 10


def _threads() -> int:
    return os.cpu_count() or 1


def _np_topk_rows(scores: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """numpy top-k along axis 0 of an (n, nq) score matrix (argpartition + sort of k)."""
    s = -scores if largest else scores
    part = np.argpartition(s, k - 1, axis=0)[:k]
    order = np.take_along_axis(s, part, axis=0).argsort(axis=0, kind="stable")
    return np.take_along_axis(part, order, axis=0)


def _stream(codes: np.ndarray):
    """Read-bandwidth probe over exactly the gallery's bytes (timed alongside the 1-query rows:
    ``bw_frac`` = probe time / our time, i.e. the fraction of the achievable read bandwidth)."""
    from engine import _kernels as N
    flat = codes.reshape(-1).view(np.uint8)
    return lambda: N._stream_xor(flat, 0)


def _bw_extra(t: dict, nbytes: int) -> dict:
    if "stream" not in t:
        return {}
    return {"stream_gb_per_s": nbytes / t["stream"] / 1e9, "bw_frac": t["stream"] / t["ours"]}


def _settle(quick: bool) -> float:
    """Pause before each timed call (lets OpenBLAS/OpenMP spinning threads go idle)."""
    return 0.02 if quick else 0.05


def _faiss_call(faiss, index, q, threads):
    """faiss search with a given OpenMP thread count (libgomp spin-waits: on a busy machine its
    all-core runs can be far slower than one thread, so both are timed and the best is used)."""
    def call():
        faiss.omp_set_num_threads(threads)
        return index.search(q, K)
    return call


def _best_faiss(t: dict, label: str) -> tuple[float, str]:
    if t["faiss_1t"] < t["faiss"]:
        return t["faiss_1t"], f"{label} (1 thread: faster than {_threads()})"
    return t["faiss"], f"{label} ({_threads()} threads)"


def _mem_read(quick: bool) -> dict:
    from engine import _kernels as N
    nbytes = (256 if quick else 1024) << 20
    a = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    t = median_time(lambda: N._stream_xor(a, 0), repeats=5, warmup=1)
    bw = nbytes / t / 1e9
    return record("mem_read", nbytes, "bytes", 0, t, "", None, gb_per_s=bw,
                  note="read bandwidth probe (all cores)")


def _hamming(quick: bool) -> list[dict]:
    faiss = require("faiss", feature="the kernel benchmark (faiss baseline)")

    from engine import kernels
    rows = []
    n = 200_000 if quick else 1_000_000
    rng = np.random.default_rng(1)
    faiss.omp_set_num_threads(_threads())
    for bits in (256, 512):
        codes = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
        index = faiss.IndexBinaryFlat(bits)
        index.add(codes)
        c64 = codes.view(np.uint64)
        for nq in (1, 64):
            q = rng.integers(0, 256, (nq, bits // 8), dtype=np.uint8)
            s, _ = kernels.hamming_topk(q, codes, K)
            D, _ = index.search(q, K)
            assert np.array_equal(s[:, 0], D[:, 0]), "top-1 Hamming distances differ from faiss"
            assert np.array_equal(s, D), "top-k Hamming distances differ from faiss"
            fns = {"ours": lambda: kernels.hamming_topk(q, codes, K),
                   "faiss": _faiss_call(faiss, index, q, _threads()),
                   "faiss_1t": _faiss_call(faiss, index, q, 1)}
            extra = {}
            if nq == 1:
                fns["stream"] = _stream(codes)
            if nq == 1 and hasattr(np, "bitwise_count"):
                q64 = q.view(np.uint64)

                def np_ham():
                    d = np.bitwise_count(c64 ^ q64[0]).sum(axis=1, dtype=np.int32)
                    return _np_topk_rows(d[:, None], K, largest=False)

                d_np = np.bitwise_count(c64 ^ q64[0]).sum(axis=1, dtype=np.int32)
                assert np.array_equal(np.sort(d_np)[:K], s[0]), "Hamming top-k differs from numpy"
                fns["numpy"] = np_ham
            t = compare_times(fns, repeats=7 if quick else 9, warmup=1, budget_s=20, settle_s=_settle(quick))
            if "numpy" in t:
                extra["numpy_s"] = t["numpy"]
            gbs = n * bits / 8 / t["ours"] / 1e9
            base, label = _best_faiss(t, "faiss IndexBinaryFlat")
            rows.append(record(f"hamming_{bits}_q{nq}", n, bits, nq, t["ours"], label,
                               base, faiss_s=t["faiss"], faiss_1t_s=t["faiss_1t"], gb_per_s=gbs,
                               comparisons_per_s=n * nq / t["ours"], **_bw_extra(t, codes.nbytes), **extra))
        del index
    return rows


def _iom(quick: bool) -> list[dict]:
    from engine import kernels
    rows = []
    m, qv = 512, 16
    n = 50_000 if quick else 1_000_000
    rng = np.random.default_rng(2)
    codes = rng.integers(0, qv, (n, m), dtype=np.uint8)
    for nq in (1, 64):
        q = rng.integers(0, qv, (nq, m), dtype=np.uint8)
        q[0] = codes[n // 3]  # a genuine match
        nb = min(nq, 4)  # numpy is timed on nb queries and scaled to nq

        def np_iom(qq=q[:nb]):
            out = []
            for row in qq:
                cnt = (codes == row).sum(axis=1, dtype=np.int32)
                out.append(_np_topk_rows(cnt[:, None], K, largest=True)[:, 0])
            return out

        s, i = kernels.iom_topk(q, codes, K)
        ref = (codes == q[0]).sum(axis=1, dtype=np.int32)
        assert s[0, 0] == ref.max() == m and i[0, 0] == n // 3, "IoM top-1 differs from numpy"
        fns = {"ours": lambda: kernels.iom_topk(q, codes, K), "numpy": np_iom}
        if nq == 1:
            fns["stream"] = _stream(codes)
        t = compare_times(fns,
                          repeats=5 if quick else 7, warmup=1, budget_s=30, settle_s=_settle(quick))
        base = t["numpy"] * nq / nb
        gbs = n * m / t["ours"] / 1e9
        rows.append(record(f"iom_{m}x{qv}_q{nq}", n, f"{m}x{qv}", nq, t["ours"], "numpy ==/sum", base,
                           gb_per_s=gbs, templates_per_s=n * nq / t["ours"], **_bw_extra(t, codes.nbytes),
                           note=None if nb == nq else f"numpy timed on {nb} queries, scaled x{nq // nb}"))
    return rows


def _int8_f32(quick: bool) -> list[dict]:
    faiss = require("faiss", feature="the kernel benchmark (faiss baseline)")

    from engine import kernels
    rows = []
    dim = 512
    n = 50_000 if quick else 500_000
    rng = np.random.default_rng(3)
    c8 = rng.integers(-128, 128, (n, dim), dtype=np.int8)
    cf = c8.astype(np.float32)  # the same gallery as float32 (integer values: exact products)
    for nq in (1, 64):
        q8 = rng.integers(-128, 128, (nq, dim), dtype=np.int8)
        qf = q8.astype(np.float32)

        def np_gemv():
            return _np_topk_rows(cf @ qf.T, K, largest=True)

        s, i = kernels.ip_topk_int8(q8, c8, K)
        best = np_gemv()[0]
        ref_best = (cf @ qf.T)[best, np.arange(nq)]
        assert np.array_equal(s[:, 0].astype(np.float32), ref_best), "int8 top-1 differs from numpy"
        fns = {"ours": lambda: kernels.ip_topk_int8(q8, c8, K), "numpy": np_gemv}
        if nq == 1:
            fns["stream"] = _stream(c8)
        t = compare_times(fns,
                          repeats=7 if quick else 9, warmup=1, budget_s=30, settle_s=_settle(quick))
        gbs = n * dim / t["ours"] / 1e9
        rows.append(record(f"int8_ip_{dim}_q{nq}", n, dim, nq, t["ours"],
                           "numpy f32 gemv" if nq == 1 else "numpy f32 gemm", t["numpy"],
                           gb_per_s=gbs, templates_per_s=n * nq / t["ours"], **_bw_extra(t, c8.nbytes)))
    # float32 on float data (unit-norm-like)
    cfl = rng.standard_normal((n, dim), dtype=np.float32)
    cfl /= np.linalg.norm(cfl, axis=1, keepdims=True)
    faiss.omp_set_num_threads(_threads())
    index = faiss.IndexFlatIP(dim)
    index.add(cfl)
    for nq in (1, 64):
        q = rng.standard_normal((nq, dim), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        s, i = kernels.ip_topk_f32(q, cfl, K)
        D, I = index.search(q, K)
        err = float(np.abs(s - D).max())
        assert np.allclose(s[:, 0], D[:, 0], rtol=1e-4, atol=1e-5), "f32 top-1 differs from faiss"

        def np_f32():
            return _np_topk_rows(cfl @ q.T, K, largest=True)

        t = compare_times({"ours": lambda: kernels.ip_topk_f32(q, cfl, K),
                           "faiss": _faiss_call(faiss, index, q, _threads()),
                           "faiss_1t": _faiss_call(faiss, index, q, 1), "numpy": np_f32,
                           **({"stream": _stream(cfl)} if nq == 1 else {})},
                          repeats=7 if quick else 9, warmup=1, budget_s=30, settle_s=_settle(quick))
        gbs = n * dim * 4 / t["ours"] / 1e9
        base, label = _best_faiss(t, "faiss IndexFlatIP")
        rows.append(record(f"f32_ip_{dim}_q{nq}", n, dim, nq, t["ours"], label, base,
                           faiss_s=t["faiss"], faiss_1t_s=t["faiss_1t"], numpy_s=t["numpy"], gb_per_s=gbs, max_abs_err=err,
                           templates_per_s=n * nq / t["ours"], **_bw_extra(t, cfl.nbytes)))
    return rows


def _he_block_mac(quick: bool) -> list[dict]:
    import tenseal.sealapi as seal

    from engine import kernels

    from ..he import raw
    from ..he.context import HEParams, core_for

    core = core_for(HEParams.for_mode("identify", 128))  # 512-d uses the same ring
    ctx, pid = core.ctx, core.ctx.first_parms_id()       # the level of the gallery's blocks
    q = raw.moduli(ctx, pid)
    n = core.params.poly_degree
    rng = np.random.default_rng(4)

    def residues(dim):  # uniform reduced residues: what random ciphertexts look like
        a = kernels.aligned_empty((dim, 2, len(q), n))
        a[...] = rng.integers(0, 1 << 62, a.shape, dtype=np.uint64) % q[:, None]
        return a

    def forced(level, fn):
        def call():
            prev = kernels.set_simd(level)
            try:
                return fn()
            finally:
                kernels.set_simd(prev if prev != kernels.simd_level() else "auto")
        return call

    rows, seal_s = [], {}
    for dim in (128, 512):
        probe, block = residues(dim), residues(dim)
        pc = [raw.from_array(x, ctx, pid, 2.0 ** 45) for x in probe]
        bc = [raw.from_array(x, ctx, pid, 2.0 ** 45) for x in block]
        ev, out = core.evaluator, np.empty((1, 3, len(q), n), np.uint64)

        def seal_loop(pc=pc, bc=bc, ev=ev):
            acc, tmp = seal.Ciphertext(), seal.Ciphertext()
            ev.multiply(pc[0], bc[0], acc)
            for a, b in zip(pc[1:], bc[1:]):
                ev.multiply(a, b, tmp)
                ev.add_inplace(acc, tmp)
            return acc

        def ours(nt, probe=probe, block=block, out=out):
            return lambda: kernels.ckks_block_mac([block], probe, q, out=out, n_threads=nt)

        got = ours(1)()[0]
        assert np.array_equal(got, raw.to_array(seal_loop())), "native block product differs from SEAL's"
        t = compare_times({"ours": ours(1), "scalar": forced("scalar", ours(1)), "all": ours(0),
                           "sealapi": seal_loop},
                          repeats=3 if quick else 7, warmup=1, budget_s=20, settle_s=_settle(quick))
        seal_s[dim] = t["sealapi"]
        rows.append(record(f"he_block_mac_{dim}", n, dim, 1, t["ours"],
                           "sealapi multiply + add_inplace per dim", t["sealapi"],
                           scalar_s=t["scalar"], all_threads_s=t["all"], templates_per_s=n / t["ours"],
                           gb_per_s=(probe.nbytes + block.nbytes) / t["ours"] / 1e9,
                           note="one 8192-template block, 1 thread; bit-equal to SEAL"))
        del pc, bc
    nb = 8 if quick else 16
    probe = residues(128)
    blocks = [residues(128) for _ in range(nb)]
    out = np.empty((nb, 3, len(q), n), np.uint64)
    t = compare_times({"ours": lambda: kernels.ckks_block_mac(blocks, probe, q, out=out, n_threads=2)},
                      repeats=3 if quick else 7, warmup=1, budget_s=20, settle_s=_settle(quick))
    rows.append(record(f"he_block_mac_128_x{nb}", nb * n, 128, 1, t["ours"],
                       f"sealapi loop, 1-block time x {nb}", seal_s[128] * nb,
                       templates_per_s=nb * n / t["ours"],
                       gb_per_s=sum(b.nbytes for b in blocks) / t["ours"] / 1e9,
                       note=f"{nb} blocks, 2 threads"))
    return rows


def run(quick: bool = False) -> list[dict]:
    """All kernel rows. ``quick``: small galleries (n is in each record)."""
    from engine import kernels
    rows = [_mem_read(quick)]
    rows += _hamming(quick)
    rows += _iom(quick)
    rows += _int8_f32(quick)
    rows += _he_block_mac(quick)
    for r in rows:
        r["simd"] = kernels.simd_level()
        if r.get("bw_frac") is not None:
            note = (f"{100 * r['bw_frac']:.0f}% of read bandwidth "
                    f"(probe on the same bytes: {r['stream_gb_per_s']:.1f} GB/s)")
            r["note"] = f"{r['note']}; {note}" if r.get("note") else note
    return rows
