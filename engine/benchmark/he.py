"""HE suite: CKKS 1:1 verify and 1:N identify vs the naive TenSEAL ``CKKSVector.dot`` baseline.

Rows:

* ``he_verify_<dim>`` (128, 512): encrypted probe vs encrypted template. ``ours_s`` is the matcher's
  work (one ct x ct product, relinearisation, the fresh public-key encryption of the full-range
  mask and flood: the sanitised result of :mod:`engine.he.sanitize`) plus the key holder's decrypt
  and decode of the score, per match, on loaded ciphertexts; the baseline is TenSEAL's
  ``enc_probe.dot(enc_template)`` plus its ``decrypt()`` with the usual TenSEAL set-up (N=8192,
  [60,40,40,60], scale 2^40, Galois keys), on the same pairs in the same process.
  ``max_abs_err`` is against the plaintext inner product; ``bare_s`` is the unsanitised product +
  decrypt (what algorithm 1 returned, for the cost of sanitising: ``sanitise_share``).
* ``he_identify_<dim>`` (128): one encrypted probe against ``n`` encrypted templates on 2 shard
  processes (``templates_per_s = n / ours_s``; ``ours_s`` includes the oblivious expansion of the
  uploaded probe and serialising the encrypted result). The baseline is TenSEAL ``dot`` per
  template, *extrapolated* from the measured 1:1 time (running it would take minutes).
  ``--quick`` uses a smaller gallery (see ``n``); ``ours_s`` includes the probe's encrypted norm
  (one block-like product) that the decider checks. Dimension-split shards (each expands half of the
  probe, the parent adds the partial scores). Extra columns: ``mem_bytes_per_template`` (ciphertext
  bytes the shards hold / n), ``rss_bytes_per_template`` (growth of the shards' resident memory while
  loading / n), ``kept_bytes_per_added_template`` (memory growth per template added one by one into
  free slots: 0 -- nothing is kept for removal), ``remove_s`` (one withdrawal: the slot is purged
  homomorphically in every shard before ``remove`` returns), ``remove_max_score_change`` (largest
  change of any other subject's score across the removals) and ``removed_absent``.
"""
from __future__ import annotations

import time

import numpy as np

from .._optional import require


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _tenseal_context():
    ts = require("tenseal", feature="the HE benchmark (TenSEAL baseline)")

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2 ** 40
    ctx.generate_galois_keys()
    return ctx


def _verify_rows(quick: bool, rng) -> tuple[list[dict], dict]:
    ts = require("tenseal", feature="the HE benchmark (TenSEAL baseline)")
    seal = require("tenseal.sealapi")

    from ..he import EncryptedGallery, KeyHolder
    from ..he.sealio import seal_load
    from . import compare_times, record

    tctx = _tenseal_context()
    rows, per_dim_dot = [], {}
    for dim in (128, 512):
        pairs = 16 if quick else 64
        x = _unit(rng, pairs, dim)
        y = x + 0.4 / np.sqrt(dim) * rng.standard_normal((pairs, dim))
        y[pairs // 2:] = _unit(rng, pairs - pairs // 2, dim)  # half genuine-like, half impostor-like
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        truth = np.einsum("ij,ij->i", x, y)

        kh = KeyHolder("verify", dim, "bench")
        pub = kh.public_context()
        gallery = EncryptedGallery(pub)
        core = pub.core
        probes = [seal_load(seal.Ciphertext, core.ctx, _part(pub.encrypt(v, "probe"))) for v in x]
        templates = [seal_load(seal.Ciphertext, core.ctx, _part(pub.encrypt(v, "template"))) for v in y]
        ours_scores = np.empty(pairs)

        def ours():
            for i in range(pairs):
                # keysvc: with the probe norm (what the service computes for the decider)
                ours_scores[i] = kh._decrypt_constant(gallery.verify_ct(probes[i], templates[i],
                                                                        gallery.norm_position()))

        def bare():
            for i in range(pairs):
                kh._decrypt_constant(gallery.product(probes[i], templates[i]))

        tp = [ts.ckks_vector(tctx, v.tolist()) for v in x]
        tt = [ts.ckks_vector(tctx, v.tolist()) for v in y]
        nb = 4 if quick else 12
        base_scores = np.empty(nb)

        def baseline():
            for i in range(nb):
                base_scores[i] = tp[i].dot(tt[i]).decrypt()[0]

        t = compare_times({"ours": ours, "base": baseline, "bare": bare}, repeats=3 if quick else 5, warmup=1,
                          budget_s=8 if quick else 30)
        ours_s, base_s, bare_s = t["ours"] / pairs, t["base"] / nb, t["bare"] / pairs
        per_dim_dot[dim] = base_s

        # full wire path once (load probe blob, compute, serialise, key holder parses + decrypts)
        blob_t = pub.encrypt(y[0], "template")
        gallery.add("s0", blob_t)
        pb = pub.encrypt(x[0], "probe")
        t0 = time.perf_counter()
        reps = 10
        for _ in range(reps):
            kh.decrypt_scores(gallery.verify("s0", pb))
        wire_s = (time.perf_counter() - t0) / reps

        rows.append(record(
            f"he_verify_{dim}", pairs, dim, pairs, ours_s, "tenseal_dot", base_s,
            max_abs_err=float(np.abs(ours_scores - truth).max()),
            baseline_max_abs_err=float(np.abs(base_scores - truth[:nb]).max()),
            with_serialisation_s=wire_s, template_bytes=len(blob_t), probe_bytes=len(pb),
            bare_s=bare_s, sanitise_share=1.0 - bare_s / ours_s,
            params="N=4096, q=[43,43|23], probe 2^20, template 2^64 (128-bit); relinearised, "
                   "flood 2^73 (SD <= 2^-40)",
            note="ours = matcher product + relinearisation + sanitising encryption of mask/flood + "
                 "key-holder decrypt/decode per match; baseline = TenSEAL CKKSVector.dot + decrypt (N=8192)"))
    return rows, per_dim_dot


def _part(blob: bytes) -> bytes:
    from ..he import unpack_blob
    return unpack_blob(blob)[1][0]


def _identify_rows(quick: bool, rng, per_dim_dot: dict) -> list[dict]:
    from ..he import KeyHolder, encrypt_block_blob
    from ..he.shards import ShardedEncryptedGallery
    from . import record

    dim = 128
    n = 16384 if quick else 100_000
    kh = KeyHolder("identify", dim, "bench")
    pub = kh.public_context()
    y = _unit(rng, n, dim)
    block = pub.params.poly_degree
    t0 = time.perf_counter()
    blobs = [encrypt_block_blob(pub, y[i:i + block]) for i in range(0, n, block)]
    enc_s = time.perf_counter() - t0
    gallery = ShardedEncryptedGallery(pub, shards=2)
    try:
        rss_before = sum(_rss(pid) for pid in gallery.pids)
        t0 = time.perf_counter()
        for i, b in zip(range(0, n, block), blobs):
            gallery.add_block([f"s{j}" for j in range(i, min(i + block, n))], b)
        load_s = time.perf_counter() - t0
        del blobs
        rss_after = sum(_rss(pid) for pid in gallery.pids)
        queries = 2 if quick else 4
        qi = rng.integers(0, n, queries)
        probes = []
        for j in qi:
            v = y[j] + 0.3 / np.sqrt(dim) * rng.standard_normal(dim)
            probes.append(v / np.linalg.norm(v))
        blobs_p = [pub.encrypt(v, "probe") for v in probes]
        gallery.search(blobs_p[0])  # warm-up (Galois/monomial caches in the shards)
        times, dec_times, errs, top_ok, res = [], [], [], 0, b""
        for j, v, pb in zip(qi, probes, blobs_p):
            t0 = time.perf_counter()
            res = gallery.search(pb)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ids, scores = kh.decrypt_scores(res)
            best = kh.decide_identify(res, threshold=0.5, k=1).subject_ids
            dec_times.append(time.perf_counter() - t0)
            order = np.fromiter((int(s[1:]) for s in ids), dtype=np.int64, count=len(ids))
            errs.append(float(np.abs(scores - y[order] @ v).max()))
            top_ok += int(bool(best) and best[0] == f"s{j}")
        ours_s = float(np.median(times))
        base_s = per_dim_dot.get(dim)
        mem = gallery.memory_bytes()

        # withdrawal: individually added templates keep nothing; block-loaded and added ones purge
        extra = _unit(rng, 8, dim)
        for k, v in enumerate(extra):
            gallery.add(f"x{k}", pub.encrypt(v))
        from ..he import EncryptedGallery
        single = EncryptedGallery(pub)  # memory beyond its one block = what is kept per template
        for k, v in enumerate(extra):
            single.add(f"x{k}", pub.encrypt(v))
        kept = (single.memory_bytes() - single.bytes_per_template * pub.params.poly_degree) / len(extra)
        del single
        probe = probes[0]
        ref = np.concatenate([y @ probe, extra @ probe])
        pb = blobs_p[0]
        ids0, s0 = kh.decrypt_scores(gallery.search(pb))
        victims = ["s0", f"s{n // 2}", "x3"]
        rm_times = []
        for vid in victims:
            t0 = time.perf_counter()
            assert gallery.remove(vid)
            rm_times.append(time.perf_counter() - t0)
        ids1, s1 = kh.decrypt_scores(gallery.search(pb))
        before = dict(zip(ids0, s0))
        change = float(max(abs(before[i] - v) for i, v in zip(ids1, s1)))
        idx = np.array([int(i[1:]) if i[0] == "s" else n + int(i[1:]) for i in ids1])
        errs.append(float(np.abs(s1 - ref[idx]).max()))
        return [record(
            f"he_identify_{dim}", n, dim, queries, ours_s, "tenseal_dot x n (extrapolated)",
            None if base_s is None else base_s * n,
            templates_per_s=n / ours_s, shards=gallery.shards, split=gallery.split,
            bytes_per_template=gallery.bytes_per_template, probe_bytes=len(blobs_p[0]),
            mem_bytes_per_template=mem / n, rss_bytes_per_template=(rss_after - rss_before) / n,
            kept_bytes_per_added_template=kept, remove_s=float(np.median(rm_times)),
            remove_max_score_change=change,
            removed_absent=not (set(victims) & set(ids1)) and len(ids1) == len(ids0) - len(victims),
            result_bytes=len(res), key_holder_decide_s=float(np.median(dec_times)),
            max_abs_err=max(errs), top1_correct=f"{top_ok}/{queries}",
            setup_encrypt_s=enc_s, setup_load_s=load_s,
            params="N=8192, q=[60,60|60], scale 2^45 (128-bit); dimension-wise coefficient packing, "
                   "8192 templates per block; stride-layout uploads (trace + expansion), probe norm",
            note=("quick: 16384-template gallery" if quick else "100k-template gallery")
                 + "; time per probe incl. oblivious expansion of the uploaded probe; "
                 + f"{gallery.split} split; remove {float(np.median(rm_times)):.2f} s (purged), "
                 + f"kept {kept:.0f} B per added template")]
    finally:
        gallery.close()


def _rss(pid: int) -> int:
    """Resident memory of a process in bytes (0 where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(quick: bool = False) -> list[dict]:
    """The HE suite (see module docstring)."""
    rng = np.random.default_rng(7)
    rows, per_dim_dot = _verify_rows(quick, rng)
    rows += _identify_rows(quick, rng, per_dim_dot)
    return rows


__all__ = ["run"]
