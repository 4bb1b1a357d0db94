// Veilface native kernels: dispatch table + threaded drivers (dense score matrices, top-k).
#pragma once

#include "vf_common.hpp"

#define VF_SCALAR_NS generic
#include "vf_scalar.hpp"
#undef VF_SCALAR_NS

VF_TARGET_BEGIN("popcnt")
#define VF_SCALAR_NS scalar
#include "vf_scalar.hpp"
#undef VF_SCALAR_NS
VF_TARGET_END

#include "vf_avx2.hpp"
#include "vf_avx512.hpp"

namespace vf {

template <class In, class Out>
using ScoreFn = void (*)(const In*, i64, int, const In*, i64, i64, i64, Out*, i64);
template <class T, bool L>
using FilterFn = void (*)(const T*, i64, i64, TopK<T, L>&);

struct Table {
    ScoreFn<std::uint8_t, std::int32_t> hamming, iom;
    ScoreFn<std::int8_t, std::int32_t> int8;
    ScoreFn<float, float> f32;
    FilterFn<std::int32_t, false> filt_i32_small;
    FilterFn<std::int32_t, true> filt_i32_large;
    FilterFn<float, true> filt_f32_large;
};

#define VF_TABLE(ns) \
    Table { ns::score_hamming, ns::score_iom, ns::score_int8, ns::score_f32, \
            ns::filter_topk<ns::Cand, std::int32_t, false>, ns::filter_topk<ns::Cand, std::int32_t, true>, \
            ns::filter_topk<ns::Cand, float, true> }

inline Table table_for(Simd s) {
    switch (s) {
        case Simd::AVX512: return VF_TABLE(avx512);
        case Simd::AVX2: return VF_TABLE(avx2);
        default:
            if (cpu_has_popcnt()) return VF_TABLE(scalar);
            return VF_TABLE(generic);
    }
}

// Threads worth using for a job of `work` byte-operations (tiny jobs stay on one thread).
inline int threads_for(int requested, double work) {
    int T = resolve_threads(requested);
    const double per_thread = 1 << 20;
    int useful = static_cast<int>(std::max(1.0, work / per_thread));
    return std::max(1, std::min(T, useful));
}

// Rows per dynamically scheduled block, a multiple of the tile.
inline i64 block_rows(i64 n, int T, i64 tile) {
    // ~32 blocks per thread: a worker that is preempted (busy machine) or slow to wake holds
    // up at most one small block while the others take the rest
    i64 b = (n + 32 * T - 1) / (32 * T);
    b = std::max(b, tile);
    return (b + tile - 1) / tile * tile;
}

// Full score matrix out[nq, n]. Q: (nq, dim), C: (n, dim), both C-contiguous.
template <class In, class Out>
void dense_scores(ScoreFn<In, Out> fn, const In* Q, i64 nq, const In* C, i64 n, i64 dim,
                  Out* out, int n_threads) {
    if (nq <= 0 || n <= 0) return;
    const i64 tile = tile_rows(dim * static_cast<i64>(sizeof(In)));
    const int T = threads_for(n_threads, double(nq) * double(n) * double(dim * sizeof(In)));
    auto run = [&](i64 q0, i64 q1, i64 j0, i64 j1) {
        for (i64 j = j0; j < j1; j += tile) {
            const i64 len = std::min(tile, j1 - j);
            for (i64 q = q0; q < q1; q += kQB) {
                const int qb = static_cast<int>(std::min<i64>(kQB, q1 - q));
                fn(Q + q * dim, dim, qb, C + j * dim, dim, len, dim, out + q * n + j, n);
            }
        }
    };
    const bool split_gallery = (n >= i64(T) * 256) || nq < T;
    if (split_gallery) {
        // dynamic blocks: a thread that is descheduled (busy machine) does not hold up the rest
        const i64 blk = block_rows(n, T, tile);
        const i64 nblk = (n + blk - 1) / blk;
        std::atomic<i64> next{0};
        parallel_run(T, [&](int) {
            for (i64 b; (b = next.fetch_add(1)) < nblk;) run(0, nq, b * blk, std::min(n, (b + 1) * blk));
        });
    } else {
        std::atomic<i64> next{0};
        parallel_run(T, [&](int) {
            for (i64 q; (q = next.fetch_add(kQB)) < nq;) run(q, std::min(nq, q + kQB), 0, n);
        });
    }
}

// Top-k per query: out_s/out_i are (nq, k) with k <= n, best first, ties by smaller index.
template <class In, class T, bool L>
void topk_search(ScoreFn<In, T> fn, FilterFn<T, L> filt, const In* Q, i64 nq, const In* C, i64 n,
                 i64 dim, i64 k, T* out_s, i64* out_i, int n_threads) {
    if (nq <= 0 || n <= 0 || k <= 0) return;
    const i64 tile = tile_rows(dim * static_cast<i64>(sizeof(In)));
    const int T_ = threads_for(n_threads, double(nq) * double(n) * double(dim * sizeof(In)));
    // scan gallery rows [j0, j1) for queries [q0, q1), filling heaps[q - q0]
    auto scan = [&](i64 q0, i64 q1, i64 j0, i64 j1, std::vector<TopK<T, L>>& heaps, std::vector<T>& buf) {
        buf.resize(static_cast<size_t>(kQB * tile));
        for (i64 j = j0; j < j1; j += tile) {
            const i64 len = std::min(tile, j1 - j);
            for (i64 q = q0; q < q1; q += kQB) {
                const int qb = static_cast<int>(std::min<i64>(kQB, q1 - q));
                fn(Q + q * dim, dim, qb, C + j * dim, dim, len, dim, buf.data(), tile);
                for (int b = 0; b < qb; ++b) filt(buf.data() + b * tile, len, j, heaps[q - q0 + b]);
            }
        }
    };
    const bool split_gallery = (n >= i64(T_) * 4096) || nq < T_;
    if (split_gallery) {
        // Dynamic blocks taken in increasing order, so each thread's heaps see increasing
        // indices (the filters rely on it); per-thread heaps are merged at the end.
        std::vector<std::vector<TopK<T, L>>> heaps(static_cast<size_t>(T_));
        const i64 blk = block_rows(n, T_, tile);
        const i64 nblk = (n + blk - 1) / blk;
        std::atomic<i64> next{0};
        parallel_run(T_, [&](int t) {
            heaps[t].assign(static_cast<size_t>(nq), TopK<T, L>(k));
            std::vector<T> buf;
            for (i64 b; (b = next.fetch_add(1)) < nblk;)
                scan(0, nq, b * blk, std::min(n, (b + 1) * blk), heaps[t], buf);
        });
        std::vector<const TopK<T, L>*> parts(static_cast<size_t>(T_));
        for (i64 q = 0; q < nq; ++q) {
            for (int t = 0; t < T_; ++t) parts[t] = &heaps[t][q];
            merge_topk<T, L>(parts, k, out_s + q * k, out_i + q * k);
        }
    } else {
        std::atomic<i64> next{0};
        parallel_run(T_, [&](int) {
            for (i64 q0; (q0 = next.fetch_add(kQB)) < nq;) {
                const i64 q1 = std::min(nq, q0 + kQB);
                std::vector<TopK<T, L>> heaps(static_cast<size_t>(q1 - q0), TopK<T, L>(k));
                std::vector<T> buf;
                scan(q0, q1, 0, n, heaps, buf);
                std::vector<const TopK<T, L>*> parts(1);
                for (i64 q = q0; q < q1; ++q) {
                    parts[0] = &heaps[q - q0];
                    merge_topk<T, L>(parts, k, out_s + q * k, out_i + q * k);
                }
            }
        });
    }
}

// Read-bandwidth probe for the benchmark harness: xor of every 64-bit word, on T threads.
inline u64 stream_xor(const std::uint8_t* p, i64 nbytes, int n_threads) {
    const i64 nw = nbytes / 8;
    const int T = threads_for(n_threads, double(nbytes));
    std::vector<u64> part(static_cast<size_t>(T), 0);
    parallel_run(T, [&](int t) {
        const i64 w0 = nw * t / T, w1 = nw * (t + 1) / T;
        u64 a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        i64 w = w0;
        for (; w + 8 <= w1; w += 8)
            for (int u = 0; u < 8; ++u) { u64 v; std::memcpy(&v, p + 8 * (w + u), 8); a[u] ^= v; }
        for (; w < w1; ++w) { u64 v; std::memcpy(&v, p + 8 * w, 8); a[0] ^= v; }
        part[t] = a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7];
    });
    u64 r = 0;
    for (u64 v : part) r ^= v;
    for (i64 b = nw * 8; b < nbytes; ++b) r ^= p[b];
    return r;
}

}  // namespace vf
