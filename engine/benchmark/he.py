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
* ``he_identify_<dim>`` (128 and 512, 100,000 templates; ``--quick``: 16,384 / 8,192): one
  encrypted probe against ``n`` encrypted templates in one process
  (:class:`~engine.he.identify.IdentifyGallery`: blocks as native arrays, SEAL expands the probe,
  the native kernel multiplies and accumulates on every core, SEAL rescales and relinearises each
  block meanwhile; ``expand_processes=1``: a helper process expands half of the probe's
  dimensions). ``ours_s`` is the median time per probe of ``gallery.search`` (loading the
  upload, expansion, kernel, SEAL, serialising the ``scores`` blob incl. the probe norm);
  ``one_process_s`` the same without the helper. The
  baseline is the SEAL-only loop the gallery ran before (``tenseal.sealapi`` ``multiply`` +
  ``add_inplace`` per dimension, rescale, relinearise, ``seal_save``; one process) on the same
  expanded probe: expansion time + its measured per-block time x (blocks + 1), timed on all
  blocks or, where memory would double, on ``baseline_blocks_timed`` of them and scaled
  (``baseline_2proc_ideal_s``: that halved, the best the old two spawn-process shards could do).
  ``bit_equal_to_sealapi``: our result parts are bit-for-bit SEAL's. Columns: ``templates_per_s``,
  ``expand_s``, ``bytes_per_template`` (4,096 at 128-d), ``probe_bytes`` (upload),
  ``bytes_touched`` (block arrays + the expanded probe once per kernel call) and ``bw_frac`` =
  (bytes touched / time) / the kernel suite's read-bandwidth probe over the same arrays,
  ``max_abs_err`` vs the plaintext inner products, ``top1_correct``, ``rss_bytes_per_template``,
  ``peak_rss_bytes``, ``setup_s`` (encrypting the gallery block by block in 2 spawn processes +
  loading it); 128-d also ``remove_s`` / ``remove_max_score_change`` / ``removed_absent`` /
  ``kept_bytes_per_added_template`` (withdrawal purges on the arrays; nothing kept per subject)
  and the snapshot file round trip (``snapshot_save_s``, ``snapshot_load_s``).
* ``he_identify_128_1M``: the same at 1,000,000 templates (baseline timed on 2 blocks and
  scaled), only with ``python -m engine.benchmark.he --1m`` (its own process: ~5 GB; peak RSS is
  the row's). ``--quick`` there: 250,000 templates.

Over 400 lines: each row needs its own setup, baseline and fields; the rows share the timing and
record helpers of :mod:`engine.benchmark`.
"""
from __future__ import annotations

import os
import time

import numpy as np

from .._optional import require
from . import median_time


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


# ------------------------------------------------------------------------------------------
# 1:N (identify)
def _block_embeddings(seed: int, b: int, count: int, dim: int) -> np.ndarray:
    """The plaintext templates of block ``b`` (regenerated on demand: a 1M gallery's embeddings
    are never all held at once)."""
    return _unit(np.random.default_rng([seed, b]), count, dim)


_worker_ctx = None


def _worker_init(ctx_bytes: bytes) -> None:  # setup process
    global _worker_ctx
    from ..he import PublicContext
    _worker_ctx = PublicContext.from_bytes(ctx_bytes)


def _encrypt_block_arrays(seed: int, b: int, count: int, dim: int) -> np.ndarray:
    """Block ``b`` encrypted by the device context (``PublicContext.encrypt_block``: one fresh
    public-key encryption per dimension) as the gallery's ``(dim, 2, L, N)`` array."""
    from ..he import raw
    return raw.to_arrays(_worker_ctx.encrypt_block(_block_embeddings(seed, b, count, dim)))


def _build_gallery(pub, n: int, dim: int, seed: int, workers: int):
    """An identify gallery of ``n`` templates, encrypted block by block (``workers`` spawn
    processes encrypt in parallel; SEAL holds the GIL). Returns (gallery, encrypt+load seconds)."""
    global _worker_ctx
    from ..he import EncryptedGallery

    block = pub.params.poly_degree
    counts = [min(block, n - i) for i in range(0, n, block)]
    g = EncryptedGallery(pub, expand_processes=1)
    dev = pub.device_context()
    t0 = time.perf_counter()
    if workers > 1 and len(counts) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(dev.to_bytes(),)) as ex:
            futs = [ex.submit(_encrypt_block_arrays, seed, b, c, dim) for b, c in enumerate(counts)]
            for b, (c, f) in enumerate(zip(counts, futs)):
                g.add_block([f"b{b}_{j}" for j in range(c)], f.result())
                futs[b] = None
    else:
        _worker_ctx = dev
        for b, c in enumerate(counts):
            g.add_block([f"b{b}_{j}" for j in range(c)], _encrypt_block_arrays(seed, b, c, dim))
    return g, time.perf_counter() - t0


def _rss_self() -> tuple[int, int]:
    """(current, peak) resident memory of this process in bytes."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return _rss(os.getpid()), peak


def _stream_bw(arrays) -> float:
    """Read bandwidth (bytes/s) of the kernel suite's probe (xor of every word, all cores) over
    exactly the gallery's block arrays."""
    from engine import _kernels as N
    flats = [a.reshape(-1).view(np.uint8) for a in arrays]

    def stream():
        for f in flats:
            N._stream_xor(f, 0)

    t = median_time(stream, repeats=3, warmup=1)
    return sum(f.nbytes for f in flats) / t


def _sealapi_search(g, pieces, block_cts: list) -> list[bytes]:
    """The SEAL-only search of the previous gallery (one process): ``multiply`` + ``add_inplace``
    per dimension, rescale, relinearise, ``seal_save`` -- on the given blocks + the probe norm."""
    from ..he.sealio import seal_save
    return [seal_save(ct) for ct in g.search_cts(pieces, block_cts + [pieces])]


def _identify_row(dim: int, n: int, queries: int, seed: int, *, name: str, baseline_blocks: int,
                  removal: bool, snapshot: bool, workers: int) -> dict:
    """One ``he_identify_*`` row; see the module docstring."""
    from ..he import KeyHolder, raw, unpack_blob
    from . import record

    kh = KeyHolder("identify", dim, "bench")
    pub = kh.public_context()
    mem0 = _rss_self()[0]
    g, setup_s = _build_gallery(pub, n, dim, seed, workers)
    mem1 = _rss_self()[0]
    nblocks = len(g.block_arrays())
    rng = np.random.default_rng([seed, 99])
    targets = rng.integers(0, n, queries)
    probes = []
    for t in targets:
        b, j = divmod(int(t), pub.params.poly_degree)
        v = _block_embeddings(seed, b, min(pub.params.poly_degree, n - b * pub.params.poly_degree), dim)[j]
        v = v + 0.3 / np.sqrt(dim) * rng.standard_normal(dim)
        probes.append(v / np.linalg.norm(v))
    blobs = [pub.encrypt(v, "probe") for v in probes]

    # baseline: the SEAL-only loop on `bb` blocks (SEAL ciphertexts rebuilt from the arrays),
    # scaled to all blocks; the expansion is timed separately and counted once in both
    bb = max(1, min(nblocks, baseline_blocks))
    base_cts = [g.block_ciphertexts(b) for b in range(bb)]
    pieces = g.expand_probe(g._load_probe(blobs[0]))
    g.search(blobs[0])                                          # warm-up (pool, caches)
    ours = unpack_blob(g.search(blobs[0]))[1]
    base_parts = _sealapi_search(g, pieces, base_cts)
    # same bits as SEAL's own loop (each block's result and the norm)
    bit_equal = all(ours[k] == raw.ciphertext_bytes(_load(g, base_parts[k])) for k in range(bb)) \
        and ours[-1] == raw.ciphertext_bytes(_load(g, base_parts[-1]))
    times, one_times, base_times, exp_times, errs, top_ok, res = [], [], [], [], [], 0, b""
    helper = g._helper
    for t, v, pb in zip(targets, probes, blobs):
        t0 = time.perf_counter()
        res = g.search(pb)
        times.append(time.perf_counter() - t0)
        g._helper = None                                            # the same, one process
        t0 = time.perf_counter()
        g.search(pb)
        one_times.append(time.perf_counter() - t0)
        g._helper = helper
        t0 = time.perf_counter()
        pieces = g.expand_probe(g._load_probe(pb))
        exp_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _sealapi_search(g, pieces, base_cts)
        base_times.append(time.perf_counter() - t0)
        del pieces
        ids, scores = kh.decrypt_scores(res)
        truth = np.concatenate([_block_embeddings(seed, b, c, dim) @ v for b, c in enumerate(_counts(n, pub))])
        if len(ids) != n or ids[0] != "b0_0" or ids[-1] != f"b{nblocks - 1}_{_counts(n, pub)[-1] - 1}":
            raise AssertionError("bench: unexpected result table")
        errs.append(float(np.abs(scores - truth).max()))
        best = kh.decide_identify(res, threshold=0.5, k=1).subject_ids
        b, j = divmod(int(t), pub.params.poly_degree)
        top_ok += int(bool(best) and best[0] == f"b{b}_{j}")
    del base_cts
    ours_s, exp_s = float(np.median(times)), float(np.median(exp_times))
    per_block = float(np.median(base_times)) / (bb + 1)          # bb blocks + the norm
    base_s = exp_s + per_block * (nblocks + 1)
    arrays = g.block_arrays()
    probe_bytes = g.bytes_per_template * pub.params.poly_degree          # the expanded probe array
    from ..he.identify import BLOCKS_PER_CALL
    calls = -(-(nblocks + 1) // BLOCKS_PER_CALL)
    touched = sum(a.nbytes for a in arrays) + probe_bytes * (calls + 1)
    bw = _stream_bw(arrays)
    cur, peak = _rss_self()
    extra = dict(
        templates_per_s=n / ours_s, expand_s=exp_s, one_process_s=float(np.median(one_times)),
        one_process_templates_per_s=n / float(np.median(one_times)), expansion_helper=helper is not None,
        baseline_2proc_ideal_s=base_s / 2,
        bytes_per_template=g.bytes_per_template, mem_bytes_per_template=g.memory_bytes() / n,
        rss_bytes_per_template=(mem1 - mem0) / n, rss_bytes=cur, peak_rss_bytes=peak,
        probe_bytes=len(blobs[0]), result_bytes=len(res), max_abs_err=max(errs),
        top1_correct=f"{top_ok}/{queries}", bit_equal_to_sealapi=bool(bit_equal),
        bytes_touched=int(touched), gb_per_s=touched / ours_s / 1e9, stream_gb_per_s=bw / 1e9,
        bw_frac=touched / ours_s / bw, setup_s=setup_s, setup_workers=workers,
        baseline_blocks_timed=bb, blocks=nblocks, load_avg=os.getloadavg()[0],
        kernel_simd=_simd(), params="N=8192, q=[60,60|60], scale 2^45 (128-bit); dimension-wise packing, "
                                    "8192 templates per block; blocks as native uint64 arrays")
    if snapshot:
        extra.update(_snapshot_timing(g, pub))
    if removal:
        extra.update(_removal(g, kh, pub, probes[0], n, dim, seed))
    g.close()
    note = (f"{n:,} templates, {nblocks} blocks; time per probe incl. expansion (one process: "
            f"{exp_s * 1e3:.0f} ms; half of it in the helper process) and serialising the result; "
            f"one process: {extra['one_process_s'] * 1e3:.0f} ms; {100 * extra['bw_frac']:.0f}% of read bandwidth "
            f"({extra['gb_per_s']:.1f} of {extra['stream_gb_per_s']:.1f} GB/s); baseline = sealapi loop in "
            f"one process{'' if bb == nblocks else f', timed on {bb} of {nblocks} blocks and scaled'}; "
            f"setup {setup_s:.0f} s; load avg {extra['load_avg']:.1f}")
    return record(name, n, dim, queries, ours_s, "sealapi multiply+add loop (1 process)", base_s,
                  note=note, **extra)


def _counts(n: int, pub) -> list[int]:
    block = pub.params.poly_degree
    return [min(block, n - i) for i in range(0, n, block)]


def _load(g, part: bytes):
    import tenseal.sealapi as seal

    from ..he.sealio import seal_load
    return seal_load(seal.Ciphertext, g.ctx.core.ctx, part)


def _simd() -> str:
    from engine import kernels
    return kernels.simd_level()


def _snapshot_timing(g, pub) -> dict:
    """Save the gallery to a snapshot file and load it into a new gallery (read straight into the
    block arrays, every coefficient checked); the file is deleted afterwards."""
    import tempfile

    from ..he import EncryptedGallery
    with tempfile.TemporaryDirectory(prefix="veilface-bench-") as d:
        path = os.path.join(d, "gallery.vfhe")
        t0 = time.perf_counter()
        size = g.save_snapshot(path)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = EncryptedGallery.restore(pub, path)
        load_s = time.perf_counter() - t0
        ok = len(r) == len(g)
        del r
    return {"snapshot_bytes": size, "snapshot_save_s": save_s, "snapshot_load_s": load_s, "snapshot_ok": ok}


def _removal(g, kh, pub, probe, n, dim, seed) -> dict:
    """Withdrawal: templates added one by one keep nothing; removals purge the slot on the
    arrays before ``remove`` returns; the other scores stay put."""
    from ..he import EncryptedGallery
    rng = np.random.default_rng([seed, 7])
    extra = _unit(rng, 4, dim)
    single = EncryptedGallery(pub)  # memory beyond its one block = what is kept per template
    for k, v in enumerate(extra):
        single.add(f"x{k}", pub.encrypt(v))
    kept = (single.memory_bytes() - single.bytes_per_template * pub.params.poly_degree) / len(extra)
    del single
    g.add("x0", pub.encrypt(extra[0]))
    pb = pub.encrypt(probe, "probe")
    ids0, s0 = kh.decrypt_scores(g.search(pb))
    victims = ["b0_0", f"b{len(_counts(n, pub)) // 2}_5", "x0"]
    rm = []
    for vid in victims:
        t0 = time.perf_counter()
        if not g.remove(vid):
            raise AssertionError(f"bench: {vid} was not in the gallery")
        rm.append(time.perf_counter() - t0)
    ids1, s1 = kh.decrypt_scores(g.search(pb))
    before = dict(zip(ids0, s0))
    change = float(max(abs(before[i] - v) for i, v in zip(ids1, s1)))
    return {"kept_bytes_per_added_template": kept, "remove_s": float(np.median(rm)),
            "remove_max_score_change": change,
            "removed_absent": not (set(victims) & set(ids1)) and len(ids1) == len(ids0) - len(victims)}


def _identify_rows(quick: bool) -> list[dict]:
    n = 16384 if quick else 100_000
    rows = [_identify_row(128, n, 2 if quick else 3, 11, name="he_identify_128", baseline_blocks=16,
                          removal=True, snapshot=True, workers=2)]
    rows.append(_identify_row(512, 8192 if quick else 100_000, 2, 12, name="he_identify_512",
                              baseline_blocks=2 if quick else 4, removal=False, snapshot=False, workers=2))
    return rows


def run_1m(quick: bool = False) -> list[dict]:
    """``he_identify_128_1M``: 1,000,000 templates (``quick``: 250,000), 2 probes. Run on its own
    (peak RSS is the process's): ``python -m engine.benchmark.he --1m``."""
    n = 250_000 if quick else 1_000_000
    return [_identify_row(128, n, 2, 13, name="he_identify_128_1M" if not quick else "he_identify_128_250k",
                          baseline_blocks=2, removal=False, snapshot=True, workers=2)]


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
    """The HE suite (see module docstring): 1:1 rows, then 1:N at 128 and 512 dimensions."""
    rng = np.random.default_rng(7)
    rows, _ = _verify_rows(quick, rng)
    rows += _identify_rows(quick)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.benchmark.he [--quick] [--1m] [--identify] [--json PATH]``: the HE suite,
    only its 1:N rows (``--identify``), or the 1M row alone (``--1m``; needs ~5 GB of memory)."""
    import argparse
    import json

    from . import _json_default, format_table, machine_line
    ap = argparse.ArgumentParser(prog="python -m engine.benchmark.he")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--1m", dest="one_m", action="store_true", help="only he_identify_128_1M")
    ap.add_argument("--identify", action="store_true", help="only the he_identify_* rows")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    rows = run_1m(a.quick) if a.one_m else _identify_rows(a.quick) if a.identify else run(a.quick)
    for r in rows:
        r.setdefault("suite", "he")
    print(f"Machine: {machine_line()}\n")
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=2, default=_json_default)
    return 0


__all__ = ["run", "run_1m", "main"]


if __name__ == "__main__":
    import sys
    sys.exit(main())
