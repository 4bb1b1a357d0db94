// AVX-512 kernels (F, BW, DQ, VL, VPOPCNTDQ, VNNI): Ice Lake / Zen 4 and later.
// Compiled with a target pragma and used only when the CPU reports all of these features.
#pragma once
#include <immintrin.h>

#include "vf_common.hpp"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx512vnni,avx2,fma,popcnt,bmi,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx512vnni,avx2,fma,popcnt,bmi,bmi2")
#endif

namespace vf {
namespace avx512 {

// Horizontal sums of four vectors at once -> [sum a, sum b, sum c, sum d].
static inline __m128i reduce4_epi64_to_i32(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i t0 = _mm512_add_epi64(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    __m512i t1 = _mm512_add_epi64(_mm512_unpacklo_epi64(c, d), _mm512_unpackhi_epi64(c, d));
    // t0 lane k: [a_2k + a_2k+1, b_2k + b_2k+1]
    __m512i u = _mm512_add_epi64(_mm512_shuffle_i64x2(t0, t1, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_i64x2(t0, t1, _MM_SHUFFLE(3, 1, 3, 1)));
    // u lanes: [ab01+ab23 (a,b) | ab45+ab67 | cd.. | cd..]
    __m512i v = _mm512_add_epi64(_mm512_shuffle_i64x2(u, u, _MM_SHUFFLE(3, 3, 2, 0)),
                                 _mm512_shuffle_i64x2(u, u, _MM_SHUFFLE(3, 3, 3, 1)));
    // v qwords 0..3 = [a, b, c, d]
    return _mm256_castsi256_si128(_mm512_cvtepi64_epi32(v));
}
static inline __m128i reduce4_epi32(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    __m256i v = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}
static inline __m128 reduce4_ps(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512d t0d = _mm512_castps_pd(t0), t1d = _mm512_castps_pd(t1);
    __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(t0d, t1d)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(t0d, t1d)));
    __m256 v = _mm256_add_ps(_mm512_castps512_ps256(u),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

// ---------------------------------------------------------------------------------------------
// Generic register-blocked skeleton: QB queries x 4 gallery rows per step, E elements per chunk,
// masked loads for the tail chunk. An Op supplies load / step / reduce / finish.
struct OpHamming {  // In = uint8 bytes, chunk = 64 bytes, acc = popcnt per qword
    using In = std::uint8_t; using Out = std::int32_t; using Acc = __m512i; using M = __mmask64;
    static constexpr int E = 64;
    static M tail(i64 rem) { return rem >= 64 ? ~M(0) : ((M(1) << rem) - 1); }
    static Acc zero() { return _mm512_setzero_si512(); }
    static __m512i load_c(const In* p, M m) { return _mm512_maskz_loadu_epi8(m, p); }
    static __m512i load_q(const In* p, M m) { return _mm512_maskz_loadu_epi8(m, p); }
    static Acc step(Acc a, __m512i q, __m512i c, M) { return _mm512_add_epi64(a, _mm512_popcnt_epi64(_mm512_xor_si512(q, c))); }
    static __m128i reduce4(Acc a, Acc b, Acc c, Acc d) { return reduce4_epi64_to_i32(a, b, c, d); }
    void store4(Out* o, __m128i s, int) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(o), s); }
    void store1(Out* o, __m128i s, int) const { *o = _mm_cvtsi128_si32(s); }
};
struct OpIom {  // per-byte match counters (<= 255 chunks), summed with sad at the end
    using In = std::uint8_t; using Out = std::int32_t; using Acc = __m512i; using M = __mmask64;
    static constexpr int E = 64;
    static M tail(i64 rem) { return rem >= 64 ? ~M(0) : ((M(1) << rem) - 1); }
    static Acc zero() { return _mm512_setzero_si512(); }
    static __m512i load_c(const In* p, M m) { return _mm512_maskz_loadu_epi8(m, p); }
    static __m512i load_q(const In* p, M m) { return _mm512_maskz_loadu_epi8(m, p); }
    static Acc step(Acc a, __m512i q, __m512i c, M m) {
        return _mm512_mask_sub_epi8(a, _mm512_mask_cmpeq_epi8_mask(m, q, c), a, _mm512_set1_epi8(-1));
    }
    static __m128i reduce4(Acc a, Acc b, Acc c, Acc d) {
        const __m512i z = _mm512_setzero_si512();
        return reduce4_epi64_to_i32(_mm512_sad_epu8(a, z), _mm512_sad_epu8(b, z), _mm512_sad_epu8(c, z), _mm512_sad_epu8(d, z));
    }
    void store4(Out* o, __m128i s, int) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(o), s); }
    void store1(Out* o, __m128i s, int) const { *o = _mm_cvtsi128_si32(s); }
};
struct OpInt8 {  // VNNI: (c ^ 0x80) is c + 128 as u8; dot = sum(u8(c+128) * q) - 128 * sum(q)
    using In = std::int8_t; using Out = std::int32_t; using Acc = __m512i; using M = __mmask64;
    static constexpr int E = 64;
    const std::int32_t* qsum128;  // 128 * sum(q) per query of the block
    static M tail(i64 rem) { return rem >= 64 ? ~M(0) : ((M(1) << rem) - 1); }
    static Acc zero() { return _mm512_setzero_si512(); }
    static __m512i load_c(const In* p, M m) { return _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, p), _mm512_set1_epi8(-128)); }
    static __m512i load_q(const In* p, M m) { return _mm512_maskz_loadu_epi8(m, p); }
    static Acc step(Acc a, __m512i q, __m512i c, M) { return _mm512_dpbusd_epi32(a, c, q); }
    static __m128i reduce4(Acc a, Acc b, Acc c, Acc d) { return reduce4_epi32(a, b, c, d); }
    void store4(Out* o, __m128i s, int q) const {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_sub_epi32(s, _mm_set1_epi32(qsum128[q])));
    }
    void store1(Out* o, __m128i s, int q) const { *o = _mm_cvtsi128_si32(s) - qsum128[q]; }
};
struct OpF32 {
    using In = float; using Out = float; using Acc = __m512; using M = __mmask16;
    static constexpr int E = 16;
    static M tail(i64 rem) { return rem >= 16 ? M(0xFFFF) : M((1u << rem) - 1); }
    static Acc zero() { return _mm512_setzero_ps(); }
    static __m512 load_c(const In* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
    static __m512 load_q(const In* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
    static Acc step(Acc a, __m512 q, __m512 c, M) { return _mm512_fmadd_ps(q, c, a); }
    static __m128 reduce4(Acc a, Acc b, Acc c, Acc d) { return reduce4_ps(a, b, c, d); }
    void store4(Out* o, __m128 s, int) const { _mm_storeu_ps(o, s); }
    void store1(Out* o, __m128 s, int) const { *o = _mm_cvtss_f32(s); }
};

constexpr i64 kPrefetchBytes = 4096;  // software prefetch distance of the skeleton

template <class Op, int QB>
static void skeleton(const Op& op, const typename Op::In* Q, i64 qs, const typename Op::In* C, i64 cs,
                     i64 nr, i64 dim, typename Op::Out* out, i64 ldo) {
    using M = typename Op::M;
    using Acc = typename Op::Acc;
    constexpr int E = Op::E;
    const i64 nfull = dim / E;
    const i64 rem = dim - nfull * E;
    const M all = Op::tail(E), tm = Op::tail(rem);
    // prefetch distance: at least kPrefetchBytes ahead, at least 8 rows
    const i64 pf_rows = std::max<i64>(8, kPrefetchBytes / std::max<i64>(1, cs * static_cast<i64>(sizeof(typename Op::In))));
    i64 j = 0;
    for (; j + 4 <= nr; j += 4) {
        const typename Op::In* c0 = C + j * cs;
        Acc acc[QB][4];
        for (int q = 0; q < QB; ++q)
            for (int r = 0; r < 4; ++r) acc[q][r] = Op::zero();
        for (i64 ch = 0; ch < nfull; ++ch) {
            const i64 d = ch * E;
            {  // software prefetch of the rows pf_rows ahead (hardware prefetch alone reaches
               // ~60% of the bandwidth on these interleaved 4-row streams)
                const char* pf = reinterpret_cast<const char*>(c0 + pf_rows * cs + d);
                const i64 rb = cs * static_cast<i64>(sizeof(typename Op::In));
                _mm_prefetch(pf, _MM_HINT_T0);
                _mm_prefetch(pf + rb, _MM_HINT_T0);
                _mm_prefetch(pf + 2 * rb, _MM_HINT_T0);
                _mm_prefetch(pf + 3 * rb, _MM_HINT_T0);
            }
            auto v0 = Op::load_c(c0 + d, all);
            auto v1 = Op::load_c(c0 + cs + d, all);
            auto v2 = Op::load_c(c0 + 2 * cs + d, all);
            auto v3 = Op::load_c(c0 + 3 * cs + d, all);
            for (int q = 0; q < QB; ++q) {
                auto x = Op::load_q(Q + q * qs + d, all);
                acc[q][0] = Op::step(acc[q][0], x, v0, all);
                acc[q][1] = Op::step(acc[q][1], x, v1, all);
                acc[q][2] = Op::step(acc[q][2], x, v2, all);
                acc[q][3] = Op::step(acc[q][3], x, v3, all);
            }
        }
        if (rem) {
            const i64 d = nfull * E;
            auto v0 = Op::load_c(c0 + d, tm);
            auto v1 = Op::load_c(c0 + cs + d, tm);
            auto v2 = Op::load_c(c0 + 2 * cs + d, tm);
            auto v3 = Op::load_c(c0 + 3 * cs + d, tm);
            for (int q = 0; q < QB; ++q) {
                auto x = Op::load_q(Q + q * qs + d, tm);
                acc[q][0] = Op::step(acc[q][0], x, v0, tm);
                acc[q][1] = Op::step(acc[q][1], x, v1, tm);
                acc[q][2] = Op::step(acc[q][2], x, v2, tm);
                acc[q][3] = Op::step(acc[q][3], x, v3, tm);
            }
        }
        for (int q = 0; q < QB; ++q)
            op.store4(out + q * ldo + j, Op::reduce4(acc[q][0], acc[q][1], acc[q][2], acc[q][3]), q);
    }
    for (; j < nr; ++j) {
        const typename Op::In* c0 = C + j * cs;
        Acc acc[QB];
        for (int q = 0; q < QB; ++q) acc[q] = Op::zero();
        for (i64 ch = 0; ch <= nfull; ++ch) {
            const i64 d = ch * E;
            const M m = ch < nfull ? all : tm;
            if (ch == nfull && rem == 0) break;
            auto v0 = Op::load_c(c0 + d, m);
            for (int q = 0; q < QB; ++q) acc[q] = Op::step(acc[q], Op::load_q(Q + q * qs + d, m), v0, m);
        }
        for (int q = 0; q < QB; ++q) {
            const Acc z = Op::zero();
            op.store1(out + q * ldo + j, Op::reduce4(acc[q], z, z, z), q);
        }
    }
}

template <class Op>
static void skeleton_qb(const Op& op, const typename Op::In* Q, i64 qs, int qb, const typename Op::In* C,
                        i64 cs, i64 nr, i64 dim, typename Op::Out* out, i64 ldo) {
    switch (qb) {
        case 4: skeleton<Op, 4>(op, Q, qs, C, cs, nr, dim, out, ldo); break;
        case 3: skeleton<Op, 3>(op, Q, qs, C, cs, nr, dim, out, ldo); break;
        case 2: skeleton<Op, 2>(op, Q, qs, C, cs, nr, dim, out, ldo); break;
        default: skeleton<Op, 1>(op, Q, qs, C, cs, nr, dim, out, ldo); break;
    }
}

// ---------------- Hamming, 256-bit codes: two codes per zmm, 8 codes per step, QB queries.
template <int QB>
static void hamming256(const std::uint8_t* Q, i64 qs, const std::uint8_t* C, i64 cs, i64 nr,
                       std::int32_t* out, i64 ldo) {
    __m512i qv[QB];
    for (int q = 0; q < QB; ++q)
        qv[q] = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(Q + q * qs)));
    // reduction leaves codes in lane order [0,2,1,3,4,6,5,7]; this permutation restores it
    const __m512i perm = _mm512_set_epi64(7, 5, 6, 4, 3, 1, 2, 0);
    i64 j = 0;
    if (cs == 32) {
        for (; j + 8 <= nr; j += 8) {
            const std::uint8_t* c = C + j * 32;
            _mm_prefetch(reinterpret_cast<const char*>(c + kPrefetchBytes), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(c + kPrefetchBytes + 64), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(c + kPrefetchBytes + 128), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(c + kPrefetchBytes + 192), _MM_HINT_T0);
            __m512i a = _mm512_loadu_si512(c), b = _mm512_loadu_si512(c + 64);
            __m512i e = _mm512_loadu_si512(c + 128), f = _mm512_loadu_si512(c + 192);
            for (int q = 0; q < QB; ++q) {
                __m512i pa = _mm512_popcnt_epi64(_mm512_xor_si512(a, qv[q]));
                __m512i pb = _mm512_popcnt_epi64(_mm512_xor_si512(b, qv[q]));
                __m512i pe = _mm512_popcnt_epi64(_mm512_xor_si512(e, qv[q]));
                __m512i pf = _mm512_popcnt_epi64(_mm512_xor_si512(f, qv[q]));
                __m512i t0 = _mm512_add_epi64(_mm512_unpacklo_epi64(pa, pb), _mm512_unpackhi_epi64(pa, pb));
                __m512i t1 = _mm512_add_epi64(_mm512_unpacklo_epi64(pe, pf), _mm512_unpackhi_epi64(pe, pf));
                __m512i s = _mm512_add_epi64(_mm512_shuffle_i64x2(t0, t1, _MM_SHUFFLE(2, 0, 2, 0)),
                                             _mm512_shuffle_i64x2(t0, t1, _MM_SHUFFLE(3, 1, 3, 1)));
                s = _mm512_permutexvar_epi64(perm, s);
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + q * ldo + j), _mm512_cvtepi64_epi32(s));
            }
        }
    }
    if (j < nr) skeleton<OpHamming, QB>(OpHamming{}, Q, qs, C + j * cs, cs, nr - j, 32, out + j, ldo);
}

static void score_hamming(const std::uint8_t* Q, i64 qs, int qb, const std::uint8_t* C, i64 cs,
                          i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    if (dim == 32) {
        switch (qb) {
            case 4: hamming256<4>(Q, qs, C, cs, nr, out, ldo); return;
            case 3: hamming256<3>(Q, qs, C, cs, nr, out, ldo); return;
            case 2: hamming256<2>(Q, qs, C, cs, nr, out, ldo); return;
            default: hamming256<1>(Q, qs, C, cs, nr, out, ldo); return;
        }
    }
    skeleton_qb(OpHamming{}, Q, qs, qb, C, cs, nr, dim, out, ldo);
}

static void score_iom(const std::uint8_t* Q, i64 qs, int qb, const std::uint8_t* C, i64 cs,
                      i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    skeleton_qb(OpIom{}, Q, qs, qb, C, cs, nr, dim, out, ldo);
}

static void score_int8(const std::int8_t* Q, i64 qs, int qb, const std::int8_t* C, i64 cs,
                       i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    std::int32_t qsum[kQB];
    for (int q = 0; q < qb; ++q) {
        std::int32_t s = 0;
        for (i64 d = 0; d < dim; ++d) s += Q[q * qs + d];
        qsum[q] = s * 128;
    }
    OpInt8 op;
    op.qsum128 = qsum;
    skeleton_qb(op, Q, qs, qb, C, cs, nr, dim, out, ldo);
}

static void score_f32(const float* Q, i64 qs, int qb, const float* C, i64 cs, i64 nr, i64 dim,
                      float* out, i64 ldo) {
    skeleton_qb(OpF32{}, Q, qs, qb, C, cs, nr, dim, out, ldo);
}

// ---------------- top-k filters: 16 scores per compare
template <class T, bool L>
static inline unsigned cand_mask(const T* p, T thr);
template <>
inline unsigned cand_mask<std::int32_t, false>(const std::int32_t* p, std::int32_t thr) {
    return _mm512_cmplt_epi32_mask(_mm512_loadu_si512(p), _mm512_set1_epi32(thr));
}
template <>
inline unsigned cand_mask<std::int32_t, true>(const std::int32_t* p, std::int32_t thr) {
    return _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(p), _mm512_set1_epi32(thr));
}
template <>
inline unsigned cand_mask<float, true>(const float* p, float thr) {
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_set1_ps(thr), _CMP_GT_OQ);
}

template <class T, bool L>
static void filter_t(const T* buf, i64 n, i64 base, TopK<T, L>& h) {
    i64 j = 0;
    for (; j < n && !h.full(); ++j) h.push(buf[j], base + j);
    for (; j + 16 <= n; j += 16) {
        unsigned m = cand_mask<T, L>(buf + j, h.thr);
        while (m) {
            int t = __builtin_ctz(m);
            m &= m - 1;
            if (TopK<T, L>::beats(buf[j + t], h.thr)) h.push(buf[j + t], base + j + t);
        }
    }
    for (; j < n; ++j)
        if (TopK<T, L>::beats(buf[j], h.thr)) h.push(buf[j], base + j);
}
static void filter_i32_small(const std::int32_t* b, i64 n, i64 base, TopK<std::int32_t, false>& h) { filter_t(b, n, base, h); }
static void filter_i32_large(const std::int32_t* b, i64 n, i64 base, TopK<std::int32_t, true>& h) { filter_t(b, n, base, h); }
static void filter_f32_large(const float* b, i64 n, i64 base, TopK<float, true>& h) { filter_t(b, n, base, h); }

}  // namespace avx512
}  // namespace vf

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif
