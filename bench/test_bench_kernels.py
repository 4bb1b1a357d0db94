"""pytest-benchmark suite for the native kernels (with faiss/numpy baselines in the same group)
and for the schemes' ``protect``.

    .venv/bin/python -m pytest bench/test_bench_kernels.py --benchmark-only

Sizes are moderate (a run takes about a minute); ``python -m bench`` runs the full-size
comparison and prints the ratios.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine import kernels

K = 10
N_HAM = 1_000_000
N_VEC = 100_000


@pytest.fixture(scope="module")
def ham(bench_rng):
    return {bits: bench_rng.integers(0, 256, (N_HAM, bits // 8), dtype=np.uint8) for bits in (256, 512)}


@pytest.fixture(scope="module")
def vec(bench_rng):
    c8 = bench_rng.integers(-128, 128, (N_VEC, 512), dtype=np.int8)
    cf = bench_rng.standard_normal((N_VEC, 512), dtype=np.float32)
    iom = bench_rng.integers(0, 16, (N_VEC, 512), dtype=np.uint8)
    return {"int8": c8, "int8_as_f32": c8.astype(np.float32), "f32": cf, "iom": iom}


def _queries(rng, codes, nq):
    idx = rng.integers(0, codes.shape[0], nq)
    return np.ascontiguousarray(codes[idx])


# ---------------------------------------------------------------------------------- Hamming
@pytest.mark.parametrize("nq", [1, 64])
@pytest.mark.parametrize("bits", [256, 512])
def test_hamming_topk(benchmark, ham, bench_rng, bits, nq):
    benchmark.group = f"hamming_{bits}_q{nq}"
    codes = ham[bits]
    q = _queries(bench_rng, codes, nq)
    s, i = benchmark(kernels.hamming_topk, q, codes, K)
    assert (s[:, 0] == 0).all()


@pytest.mark.parametrize("nq", [1, 64])
@pytest.mark.parametrize("bits", [256, 512])
def test_hamming_faiss_baseline(benchmark, ham, bench_rng, bits, nq):
    faiss = pytest.importorskip("faiss")
    benchmark.group = f"hamming_{bits}_q{nq}"
    codes = ham[bits]
    index = faiss.IndexBinaryFlat(bits)
    index.add(codes)
    q = _queries(bench_rng, codes, nq)
    D, _ = benchmark(index.search, q, K)
    assert (D[:, 0] == 0).all()


# ---------------------------------------------------------------------------------- IoM
@pytest.mark.parametrize("nq", [1, 64])
def test_iom_topk(benchmark, vec, bench_rng, nq):
    benchmark.group = f"iom_512x16_q{nq}"
    q = _queries(bench_rng, vec["iom"], nq)
    s, _ = benchmark(kernels.iom_topk, q, vec["iom"], K)
    assert (s[:, 0] == 512).all()


def test_iom_numpy_baseline(benchmark, vec, bench_rng):
    benchmark.group = "iom_512x16_q1"
    q = _queries(bench_rng, vec["iom"], 1)[0]
    cnt = benchmark(lambda: (vec["iom"] == q).sum(axis=1, dtype=np.int32))
    assert cnt.max() == 512


# ---------------------------------------------------------------------------------- int8 / f32
@pytest.mark.parametrize("nq", [1, 64])
def test_int8_topk(benchmark, vec, bench_rng, nq):
    benchmark.group = f"int8_ip_512_q{nq}"
    q = _queries(bench_rng, vec["int8"], nq)
    benchmark(kernels.ip_topk_int8, q, vec["int8"], K)


@pytest.mark.parametrize("nq", [1, 64])
def test_int8_numpy_f32_baseline(benchmark, vec, bench_rng, nq):
    benchmark.group = f"int8_ip_512_q{nq}"
    q = _queries(bench_rng, vec["int8_as_f32"], nq)
    benchmark(lambda: vec["int8_as_f32"] @ q.T)


@pytest.mark.parametrize("nq", [1, 64])
def test_f32_topk(benchmark, vec, bench_rng, nq):
    benchmark.group = f"f32_ip_512_q{nq}"
    q = _queries(bench_rng, vec["f32"], nq)
    benchmark(kernels.ip_topk_f32, q, vec["f32"], K)


@pytest.mark.parametrize("nq", [1, 64])
def test_f32_faiss_baseline(benchmark, vec, bench_rng, nq):
    faiss = pytest.importorskip("faiss")
    benchmark.group = f"f32_ip_512_q{nq}"
    index = faiss.IndexFlatIP(512)
    index.add(vec["f32"])
    q = _queries(bench_rng, vec["f32"], nq)
    benchmark(index.search, q, K)


def test_hamming_distances_1to1(benchmark, bench_rng):
    """1:1 verify cost (one probe vs one template) -- dominated by call overhead."""
    benchmark.group = "verify_1to1"
    a = bench_rng.integers(0, 256, (1, 32), dtype=np.uint8)
    b = bench_rng.integers(0, 256, (1, 32), dtype=np.uint8)
    benchmark(kernels.hamming_distances, a, b)


# ---------------------------------------------------------------------------------- CKKS block product
@pytest.fixture(scope="module")
def ckks(bench_rng):
    """One 8192-template block at 128-d and an expanded probe, as reduced residues of the identify
    ring, plus the same data as SEAL ciphertexts for the sealapi baseline."""
    pytest.importorskip("tenseal")
    from engine.he import raw
    from engine.he.context import HEParams, core_for
    core = core_for(HEParams.for_mode("identify", 128))
    pid = core.ctx.first_parms_id()
    q = raw.moduli(core.ctx, pid)
    shape = (128, 2, len(q), core.params.poly_degree)
    probe, block = (bench_rng.integers(0, 1 << 62, shape, dtype=np.uint64) % q[:, None] for _ in range(2))
    cts = [[raw.from_array(x, core.ctx, pid, 2.0 ** 45) for x in a] for a in (probe, block)]
    return {"q": q, "probe": probe, "block": block, "cts": cts, "core": core}


@pytest.mark.parametrize("n_threads", [1, 2])
def test_ckks_block_mac(benchmark, ckks, n_threads):
    benchmark.group = "he_block_mac_128"
    out = benchmark(kernels.ckks_block_mac, [ckks["block"]], ckks["probe"], ckks["q"], None, n_threads)
    assert out.shape == (1, 3) + ckks["probe"].shape[2:]


def test_ckks_block_mac_sealapi_baseline(benchmark, ckks):
    import tenseal.sealapi as seal
    benchmark.group = "he_block_mac_128"
    ev = ckks["core"].evaluator
    pc, bc = ckks["cts"]

    def loop():
        acc, tmp = seal.Ciphertext(), seal.Ciphertext()
        ev.multiply(pc[0], bc[0], acc)
        for a, b in zip(pc[1:], bc[1:]):
            ev.multiply(a, b, tmp)
            ev.add_inplace(acc, tmp)
        return acc

    assert benchmark(loop).size() == 3


# ---------------------------------------------------------------------------------- Cython helpers
def test_sign_pack(benchmark, bench_rng):
    benchmark.group = "device_helpers"
    y = bench_rng.standard_normal((1024, 512), dtype=np.float32)
    benchmark(kernels.sign_pack, y)


def test_group_argmax(benchmark, bench_rng):
    benchmark.group = "device_helpers"
    y = bench_rng.standard_normal((256, 256, 16), dtype=np.float32)
    benchmark(kernels.group_argmax, y)


# ---------------------------------------------------------------------------------- schemes
SCHEMES = ["biohash:bits=256,dim=512", "biohash:bits=512,dim=512", "iom:dim=512,m=256,q=16",
           "iom:dim=512,m=256,q=16,variant=urp", "rotation:dim=512", "rotation:dim=512,quant=int8"]


@pytest.mark.parametrize("desc", SCHEMES)
def test_scheme_protect(benchmark, bench_rng, desc):
    schemes = pytest.importorskip("engine.schemes")
    make = getattr(schemes, "make_scheme", None)
    if make is None:
        pytest.skip("engine.schemes.make_scheme not available")
    try:
        scheme = make(desc)
    except Exception as exc:  # noqa: BLE001 - a scheme/parameter not (yet) available
        pytest.skip(f"{desc}: {exc}")
    benchmark.group = "scheme_protect"
    key = bytes(range(32))
    emb = bench_rng.standard_normal(512).astype(np.float32)
    emb /= np.linalg.norm(emb)
    scheme.protect(key, emb)  # warm the key-expansion cache: measures the per-capture cost
    benchmark(scheme.protect, key, emb)


@pytest.mark.parametrize("desc", SCHEMES[:1] + SCHEMES[2:3] + SCHEMES[4:5])
def test_scheme_protect_batch(benchmark, bench_rng, desc):
    schemes = pytest.importorskip("engine.schemes")
    try:
        scheme = schemes.make_scheme(desc)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{desc}: {exc}")
    if not hasattr(scheme, "protect_codes"):
        pytest.skip("protect_codes not available")
    benchmark.group = "scheme_protect_batch_1000"
    key = bytes(range(32))
    emb = bench_rng.standard_normal((1000, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    scheme.protect_codes(key, emb[:2])
    benchmark(scheme.protect_codes, key, emb)
