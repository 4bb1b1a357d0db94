"""pytest-benchmark suite for CKKS matching (ours vs TenSEAL ``dot`` in the same group).

    .venv/bin/python -m pytest bench/test_bench_he.py --benchmark-only

``python -m bench`` runs the full comparison (including 1:N on 2 shard processes) and prints ratios.
"""
from __future__ import annotations

import numpy as np
import pytest

ts = pytest.importorskip("tenseal")


def _unit(rng, d):
    v = rng.standard_normal(d)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module", params=[128, 512])
def pair(request, bench_rng):
    import tenseal.sealapi as seal

    from engine.he import EncryptedGallery, KeyHolder, unpack_blob
    from engine.he.sealio import seal_load

    dim = request.param
    x, y = _unit(bench_rng, dim), _unit(bench_rng, dim)
    kh = KeyHolder("verify", dim, "bench")
    pub = kh.public_context()
    load = lambda b: seal_load(seal.Ciphertext, pub.core.ctx, unpack_blob(b)[1][0])  # noqa: E731
    tctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    tctx.global_scale = 2 ** 40
    tctx.generate_galois_keys()
    return {"dim": dim, "kh": kh, "gallery": EncryptedGallery(pub), "p": load(pub.encrypt(x, "probe")),
            "t": load(pub.encrypt(y, "template")), "tp": ts.ckks_vector(tctx, x.tolist()),
            "tt": ts.ckks_vector(tctx, y.tolist()), "truth": float(x @ y)}


def test_he_verify_ours(benchmark, pair):
    benchmark.group = f"he_verify_{pair['dim']}"
    g, kh = pair["gallery"], pair["kh"]
    score = benchmark(lambda: kh._decrypt_constant(g.verify_ct(pair["p"], pair["t"], g.norm_position())))
    assert abs(score - pair["truth"]) < 1e-3


def test_he_verify_tenseal_dot(benchmark, pair):
    benchmark.group = f"he_verify_{pair['dim']}"
    score = benchmark(lambda: pair["tp"].dot(pair["tt"]).decrypt()[0])
    assert abs(score - pair["truth"]) < 1e-3


@pytest.fixture(scope="module")
def identify(bench_rng):
    """Two 128-d blocks (16,384 encrypted templates) and one expanded probe."""
    from engine.he import EncryptedGallery, KeyHolder, raw

    kh = KeyHolder("identify", 128, "bench")
    pub = kh.public_context()
    g = EncryptedGallery(pub)
    y = bench_rng.standard_normal((8192, 128))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    arr = raw.to_arrays(pub.encrypt_block(y))
    for b in range(2):
        g.add_block([f"b{b}_{j}" for j in range(8192)], arr)
    probe = pub.encrypt(y[5], "probe")
    pieces = g.expand_probe(g._load_probe(probe))
    return {"g": g, "pieces": pieces, "array": g.probe_array(pieces), "blocks": g.block_arrays(),
            "cts": [g.block_ciphertexts(b) for b in range(2)]}


def test_he_identify_blocks_native(benchmark, identify):
    """Kernel + SEAL rescale/relinearise, pipelined (what a search does after the expansion)."""
    benchmark.group = "he_identify_128_2_blocks"
    d = identify
    parts = benchmark(lambda: d["g"].search_arrays(d["array"], d["blocks"], d["pieces"][0].scale))
    assert len(parts) == 2


def test_he_identify_blocks_sealapi(benchmark, identify):
    """The SEAL-only loop (multiply + add_inplace per dimension) on the same blocks."""
    benchmark.group = "he_identify_128_2_blocks"
    d = identify
    out = benchmark(lambda: d["g"].search_cts(d["pieces"], d["cts"]))
    assert len(out) == 2
