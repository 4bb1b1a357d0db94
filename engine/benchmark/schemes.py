"""Speed and size of protection schemes on this machine: protect, compare, 1:N search, bytes.

The evaluation (``veilface eval``) reports these next to accuracy and privacy; the benchmark
harness runs them as the ``schemes`` suite (``python -m bench --only schemes``). Every figure
is a median wall time of repeated calls (:func:`engine.benchmark.median_time`).

* :func:`code_scheme_speed` -- a cancellable scheme: protect (single, one BLAS thread; and
  batched, default threads; cached key), key expansion (first protect under a fresh key),
  1:1 compare, 1:N in a native gallery (``engine.gallery``) of random unit embeddings.
* :func:`encrypted_scheme_speed` -- an encrypted (``he``) scheme: block enrolment, probe
  encryption, one encrypted 1:N search (identify) or 1:1 verify, decryption excluded.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import median_time, record


@dataclass
class CodeSchemeSpeed:
    """Medians for a cancellable scheme (keys as in the evaluation's ``report.json``)."""

    protect_us_batched: float
    protect_us_single: float
    key_expansion_ms: float
    compare_us: float
    search_1n_ms: float
    search_1n_ms_per_query_batch16: float
    search_1n_templates_per_s: float | None
    n_gallery: int
    gallery_backend: str = "native"


@dataclass
class EncryptedSchemeSpeed:
    """Medians for an encrypted scheme; ``search_1n_*`` is None in verify mode (``verify_ms``)."""

    enrol_ms_per_template_block: float | None
    protect_probe_ms: float
    search_1n_ms: float | None
    search_1n_templates_per_s: float | None
    verify_ms: float | None
    n_gallery: int
    gallery_backend: str = "engine.he encrypted gallery (one process)"


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def code_scheme_speed(scheme, embeddings: np.ndarray, key_of: Callable[[int], bytes], n_gallery: int = 10_000,
                      repeats: int = 30, seed: int = 0) -> CodeSchemeSpeed:
    """Medians for a cancellable ``scheme``. ``embeddings``: probes (``(n, dim)``, unit rows);
    ``key_of(i)``: the ``i``-th distinct key (``0`` is used for protect and the gallery, others
    once each for the cold-key figure)."""
    from .._optional import require
    from ..gallery import make_gallery
    threadpool_limits = require("threadpoolctl", feature="the scheme speed benchmark").threadpool_limits

    x = np.asarray(embeddings, dtype=np.float32)
    key = key_of(0)
    scheme.protect_codes(key, x[:1])  # expand + cache the key material
    batch = x[:min(len(x), 1000)]
    t_batch = median_time(lambda: scheme.protect_codes(key, batch), max(3, repeats // 10), warmup=0) / len(batch)
    # one capture at a time, as on a device: one BLAS thread (waking a thread pool for a
    # 1 x dim product costs more than the product, and milliseconds on a loaded machine)
    with threadpool_limits(limits=1, user_api="blas"):
        t_single = median_time(lambda: scheme.protect_codes(key, x[:1]), repeats, warmup=0)
        cold = iter([key_of(10_000_000 + i) for i in range(max(3, repeats // 10))])
        t_cold = median_time(lambda: scheme.protect_codes(next(cold), x[:1]), max(3, repeats // 10), warmup=0)
        a, b = scheme.protect_codes(key, x[:1]), scheme.protect_codes(key, x[1:2] if len(x) > 1 else x[:1])
        t_cmp = median_time(lambda: scheme.similarities(a, b), repeats * 3, warmup=0)
    # gallery of random unit embeddings: timing does not depend on identities or keys
    g = _unit(np.random.default_rng(seed), n_gallery, scheme.dim)
    codes = np.concatenate([scheme.protect_codes(key, g[s:s + 4096]) for s in range(0, n_gallery, 4096)])
    gallery = make_gallery(scheme, "native", capacity=n_gallery)
    gallery.add_codes([f"g{i}" for i in range(n_gallery)], codes)
    q1, q16 = scheme.protect_codes(key, x[:1]), scheme.protect_codes(key, x[:16])
    t_1n = median_time(lambda: gallery.search_codes(q1, k=10), max(3, repeats // 3))
    t_1n16 = median_time(lambda: gallery.search_codes(q16, k=10), max(3, repeats // 10)) / len(q16)
    return CodeSchemeSpeed(t_batch * 1e6, t_single * 1e6, t_cold * 1e3, t_cmp * 1e6, t_1n * 1e3, t_1n16 * 1e3,
                           n_gallery / t_1n if t_1n > 0 else None, int(n_gallery))


def encrypted_scheme_speed(scheme, n_gallery: int = 1000, repeats: int = 5, seed: int = 0) -> EncryptedSchemeSpeed:
    """Medians for an encrypted ``scheme`` on a gallery of ``n_gallery`` random unit embeddings
    under a fresh key pair."""
    import time

    import engine.he as he

    rng = np.random.default_rng(seed)
    kh = scheme.keygen(tenant="bench")
    pub = kh.public_context()
    g = _unit(rng, n_gallery, scheme.dim)
    probe_x = _unit(rng, 1, scheme.dim)[0]
    gallery = scheme.make_gallery(pub)
    t_probe = median_time(lambda: scheme.protect_probe(pub, probe_x), repeats)
    probe = scheme.protect_probe(pub, probe_x)
    if scheme.params.get("mode") == "verify":
        n_verify = min(n_gallery, 16)  # 1:1: the gallery size does not matter
        for i in range(n_verify):
            gallery.add(f"g{i}", scheme.protect(pub, g[i]))
        t_verify = median_time(lambda: gallery.verify("g0", probe), repeats * 4)
        return EncryptedSchemeSpeed(None, t_probe * 1e3, None, None, t_verify * 1e3, n_verify)
    block = int(scheme.he_params.poly_degree)
    t0 = time.perf_counter()
    for a in range(0, n_gallery, block):
        gallery.add_block([f"g{i}" for i in range(a, min(a + block, n_gallery))],
                          he.encrypt_block_blob(pub, g[a:a + block]))
    t_enrol = (time.perf_counter() - t0) / n_gallery
    t_search = median_time(lambda: gallery.search(probe), repeats)
    return EncryptedSchemeSpeed(t_enrol * 1e3, t_probe * 1e3, t_search * 1e3, n_gallery / t_search, None,
                                int(n_gallery))


def run(quick: bool) -> list[dict]:
    """Bench suite ``schemes``: protect and 1:N of the default schemes (no baseline: these are
    the figures the evaluation quotes; the kernels suite compares 1:N with faiss)."""
    from ..keys import KeyDeriver
    from ..schemes import make_scheme

    kd = KeyDeriver(bytes(range(32)), tenant="bench")
    x = _unit(np.random.default_rng(1), 1000, 128)
    n = 2000 if quick else 10_000
    rows = []
    for desc in ("biohash:bits=256", "biohash:bits=512", "iom:m=256,q=16", "rotation"):
        s = make_scheme(desc, dim=128)
        sp = code_scheme_speed(s, x, lambda i, s=s: kd.derive(f"s{i}", 1, s.name), n_gallery=n,
                               repeats=10 if quick else 30)
        rows.append(record(f"protect_{desc}", 1, 128, 1, sp.protect_us_single * 1e-6, "", None,
                           note=f"batched {sp.protect_us_batched:.2f} µs/template; cold key {sp.key_expansion_ms:.2f} ms"))
        rows.append(record(f"search_1n_{desc}", n, s.bytes_per_template * 8, 1, sp.search_1n_ms * 1e-3, "", None,
                           templates_per_s=sp.search_1n_templates_per_s))
    he_s = make_scheme("he:dim=128,mode=identify")
    hs = encrypted_scheme_speed(he_s, n_gallery=256 if quick else 1000, repeats=3 if quick else 5)
    rows.append(record("he_protect_probe_128", 1, 128, 1, hs.protect_probe_ms * 1e-3, "", None))
    rows.append(record("he_search_1n_128_one_process", hs.n_gallery, 128, 1, hs.search_1n_ms * 1e-3, "", None,
                       templates_per_s=hs.search_1n_templates_per_s))
    return rows
