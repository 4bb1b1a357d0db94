"""Before/after timing of two builds of the native kernels (engine._kernels) in ONE process.

Both extension files are loaded side by side and timed interleaved (A B A B ...) on the same
data, so load drift on a shared machine hits both alike; the paired ratios new/base are the
figure to quote. Rows: top-k (k = 10) for 1 and 64 queries on the galleries of
``python -m bench --only kernels --quick`` (Hamming 256/512 bits n = 200k; IoM 512x16, int8 512
and f32 512 n = 50k). Results of the two builds are checked equal first.

    # build the baseline extension from another revision, outside this checkout
    git worktree add --detach /tmp/vf-base main && (cd /tmp/vf-base && python setup.py build_ext --inplace)
    python bench/compare_builds.py /tmp/vf-base/engine/_kernels*.so engine/_kernels*.so \\
        [--repeats 41] [--threads 1] [--simd avx2]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import numpy as np


def _load(path: str, tag: str):
    spec = importlib.util.spec_from_file_location(f"{tag}._kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data(rng) -> dict:
    return {
        "hamming_256": ("hamming_topk", rng.integers(0, 256, (200_000, 32), dtype=np.uint8)),
        "hamming_512": ("hamming_topk", rng.integers(0, 256, (200_000, 64), dtype=np.uint8)),
        "iom_512x16": ("iom_topk", rng.integers(0, 16, (50_000, 512), dtype=np.uint8)),
        "int8_512": ("ip_topk_int8", rng.integers(-128, 128, (50_000, 512), dtype=np.int8)),
        "f32_512": ("ip_topk_f32", rng.standard_normal((50_000, 512), dtype=np.float32)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="baseline engine/_kernels*.so")
    ap.add_argument("new", help="new engine/_kernels*.so")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=0, help="n_threads of every call (0 = all cores)")
    ap.add_argument("--simd", default="auto", help="force a SIMD level in both builds")
    ap.add_argument("--only", default="", help="substring of the row names to run")
    a = ap.parse_args(argv)
    mods = {"base": _load(a.base, "vf_base"), "new": _load(a.new, "vf_new")}
    for m in mods.values():
        m.set_simd(a.simd)
    print("simd:", {k: m.simd_level() for k, m in mods.items()}, "threads:", a.threads or "all")
    rng = np.random.default_rng(0)
    print(f"{'row':<18}{'base ms':>9}{'(min-max)':>17}{'new ms':>9}{'(min-max)':>17}"
          f"{'new/base':>10}{'(q1-q3)':>15}")
    for name, (fn, codes) in _data(rng).items():
        if a.only not in name:
            continue
        for nq in (1, 64):
            q = np.ascontiguousarray(codes[rng.integers(0, len(codes), nq)])
            res = {k: getattr(m, fn)(q, codes, 10, a.threads) for k, m in mods.items()}
            assert all(np.array_equal(x, y) for x, y in zip(res["base"], res["new"])), name
            times = {k: [] for k in mods}
            for _ in range(a.repeats):
                for k, m in mods.items():
                    time.sleep(0.02)  # let the other build's workers go idle
                    t0 = time.perf_counter()
                    getattr(m, fn)(q, codes, 10, a.threads)
                    times[k].append(time.perf_counter() - t0)
            b, n = times["base"], times["new"]
            ratios = sorted(x / y for x, y in zip(n, b))
            q1, q3 = ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]
            print(f"{name + '_q' + str(nq):<18}{1e3 * statistics.median(b):>9.3f}"
                  f"{f'({1e3 * min(b):.2f}-{1e3 * max(b):.2f})':>17}{1e3 * statistics.median(n):>9.3f}"
                  f"{f'({1e3 * min(n):.2f}-{1e3 * max(n):.2f})':>17}{statistics.median(ratios):>10.3f}"
                  f"{f'({q1:.2f}-{q3:.2f})':>15}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
