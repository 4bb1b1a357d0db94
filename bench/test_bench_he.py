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
