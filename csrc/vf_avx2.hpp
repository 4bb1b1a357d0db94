// AVX2 (+FMA, popcnt) kernels, compiled with a target pragma and used only when the CPU has them.
#pragma once
#include <immintrin.h>

#include "vf_common.hpp"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,popcnt,bmi,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt,bmi,bmi2")
#endif

namespace vf {
namespace avx2 {

static inline __m256i popcnt_bytes(__m256i x) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_and_si256(x, m4);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}
static inline __m256i ld(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline std::int64_t hsum_epi64(__m256i a) {
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}
static inline std::int32_t hsum_epi32(__m256i a) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}
static inline float hsum_ps(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// ---------------- Hamming (code length a multiple of 256 bits; else the popcnt scalar path)
template <int QB>
static void hamming_qb(const std::uint8_t* Q, i64 qs, const std::uint8_t* C, i64 cs, i64 nr,
                       i64 nchunks, std::int32_t* out, i64 ldo) {
    const __m256i zero = _mm256_setzero_si256();
    i64 j = 0;
    for (; j + 2 <= nr; j += 2) {
        const std::uint8_t* c0 = C + j * cs;
        const std::uint8_t* c1 = c0 + cs;
        __m256i a0[QB], a1[QB];
        for (int q = 0; q < QB; ++q) { a0[q] = zero; a1[q] = zero; }
        for (i64 ch = 0; ch < nchunks; ++ch) {
            __m256i v0 = ld(c0 + 32 * ch), v1 = ld(c1 + 32 * ch);
            for (int q = 0; q < QB; ++q) {
                __m256i x = ld(Q + q * qs + 32 * ch);
                a0[q] = _mm256_add_epi64(a0[q], _mm256_sad_epu8(popcnt_bytes(_mm256_xor_si256(x, v0)), zero));
                a1[q] = _mm256_add_epi64(a1[q], _mm256_sad_epu8(popcnt_bytes(_mm256_xor_si256(x, v1)), zero));
            }
        }
        for (int q = 0; q < QB; ++q) {
            __m256i t = _mm256_add_epi64(_mm256_unpacklo_epi64(a0[q], a1[q]), _mm256_unpackhi_epi64(a0[q], a1[q]));
            __m128i s = _mm_add_epi64(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
            out[q * ldo + j] = static_cast<std::int32_t>(_mm_cvtsi128_si64(s));
            out[q * ldo + j + 1] = static_cast<std::int32_t>(_mm_extract_epi64(s, 1));
        }
    }
    for (; j < nr; ++j) {
        const std::uint8_t* c0 = C + j * cs;
        for (int q = 0; q < QB; ++q) {
            __m256i a = zero;
            for (i64 ch = 0; ch < nchunks; ++ch)
                a = _mm256_add_epi64(a, _mm256_sad_epu8(popcnt_bytes(_mm256_xor_si256(ld(Q + q * qs + 32 * ch), ld(c0 + 32 * ch))), zero));
            out[q * ldo + j] = static_cast<std::int32_t>(hsum_epi64(a));
        }
    }
}

static void score_hamming(const std::uint8_t* Q, i64 qs, int qb, const std::uint8_t* C, i64 cs,
                          i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    if (dim % 32 != 0) { vf::scalar::score_hamming(Q, qs, qb, C, cs, nr, dim, out, ldo); return; }
    const i64 nch = dim / 32;
    switch (qb) {
        case 4: hamming_qb<4>(Q, qs, C, cs, nr, nch, out, ldo); break;
        case 3: hamming_qb<3>(Q, qs, C, cs, nr, nch, out, ldo); break;
        case 2: hamming_qb<2>(Q, qs, C, cs, nr, nch, out, ldo); break;
        default: hamming_qb<1>(Q, qs, C, cs, nr, nch, out, ldo); break;
    }
}

// ---------------- IoM collision count: cmpeq + movemask + popcnt
template <int QB>
static void iom_qb(const std::uint8_t* Q, i64 qs, const std::uint8_t* C, i64 cs, i64 nr, i64 dim,
                   std::int32_t* out, i64 ldo) {
    const i64 nfull = dim / 32 * 32;
    i64 j = 0;
    for (; j + 2 <= nr; j += 2) {
        const std::uint8_t* c0 = C + j * cs;
        const std::uint8_t* c1 = c0 + cs;
        std::int32_t n0[QB], n1[QB];
        for (int q = 0; q < QB; ++q) { n0[q] = 0; n1[q] = 0; }
        for (i64 d = 0; d < nfull; d += 32) {
            __m256i v0 = ld(c0 + d), v1 = ld(c1 + d);
            for (int q = 0; q < QB; ++q) {
                __m256i x = ld(Q + q * qs + d);
                n0[q] += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(x, v0))));
                n1[q] += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(x, v1))));
            }
        }
        for (i64 d = nfull; d < dim; ++d)
            for (int q = 0; q < QB; ++q) { n0[q] += (Q[q * qs + d] == c0[d]); n1[q] += (Q[q * qs + d] == c1[d]); }
        for (int q = 0; q < QB; ++q) { out[q * ldo + j] = n0[q]; out[q * ldo + j + 1] = n1[q]; }
    }
    for (; j < nr; ++j) {
        const std::uint8_t* c0 = C + j * cs;
        for (int q = 0; q < QB; ++q) {
            std::int32_t n = 0;
            for (i64 d = 0; d < nfull; d += 32)
                n += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(ld(Q + q * qs + d), ld(c0 + d)))));
            for (i64 d = nfull; d < dim; ++d) n += (Q[q * qs + d] == c0[d]);
            out[q * ldo + j] = n;
        }
    }
}

static void score_iom(const std::uint8_t* Q, i64 qs, int qb, const std::uint8_t* C, i64 cs,
                      i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    switch (qb) {
        case 4: iom_qb<4>(Q, qs, C, cs, nr, dim, out, ldo); break;
        case 3: iom_qb<3>(Q, qs, C, cs, nr, dim, out, ldo); break;
        case 2: iom_qb<2>(Q, qs, C, cs, nr, dim, out, ldo); break;
        default: iom_qb<1>(Q, qs, C, cs, nr, dim, out, ldo); break;
    }
}

// ---------------- int8 inner product: sign-extend to int16, madd_epi16 (exact for all of int8)
template <int QB>
static void int8_qb(const std::int16_t* Q16, i64 q16s, const std::int8_t* Q, i64 qs,
                    const std::int8_t* C, i64 cs, i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    const i64 nfull = dim / 16 * 16;
    const __m256i zero = _mm256_setzero_si256();
    i64 j = 0;
    for (; j + 2 <= nr; j += 2) {
        const std::int8_t* c0 = C + j * cs;
        const std::int8_t* c1 = c0 + cs;
        __m256i a0[QB], a1[QB];
        for (int q = 0; q < QB; ++q) { a0[q] = zero; a1[q] = zero; }
        for (i64 d = 0; d < nfull; d += 16) {
            __m256i v0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c0 + d)));
            __m256i v1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c1 + d)));
            for (int q = 0; q < QB; ++q) {
                __m256i x = ld(Q16 + q * q16s + d);
                a0[q] = _mm256_add_epi32(a0[q], _mm256_madd_epi16(x, v0));
                a1[q] = _mm256_add_epi32(a1[q], _mm256_madd_epi16(x, v1));
            }
        }
        for (int q = 0; q < QB; ++q) {
            std::int32_t s0 = hsum_epi32(a0[q]), s1 = hsum_epi32(a1[q]);
            for (i64 d = nfull; d < dim; ++d) {
                s0 += std::int32_t(Q[q * qs + d]) * c0[d];
                s1 += std::int32_t(Q[q * qs + d]) * c1[d];
            }
            out[q * ldo + j] = s0; out[q * ldo + j + 1] = s1;
        }
    }
    for (; j < nr; ++j) {
        const std::int8_t* c0 = C + j * cs;
        for (int q = 0; q < QB; ++q) {
            __m256i a = zero;
            for (i64 d = 0; d < nfull; d += 16)
                a = _mm256_add_epi32(a, _mm256_madd_epi16(ld(Q16 + q * q16s + d),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c0 + d)))));
            std::int32_t s = hsum_epi32(a);
            for (i64 d = nfull; d < dim; ++d) s += std::int32_t(Q[q * qs + d]) * c0[d];
            out[q * ldo + j] = s;
        }
    }
}

static void score_int8(const std::int8_t* Q, i64 qs, int qb, const std::int8_t* C, i64 cs,
                       i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    thread_local std::vector<std::int16_t> q16;
    const i64 stride = (dim + 15) / 16 * 16;
    q16.resize(static_cast<size_t>(stride * qb));
    for (int q = 0; q < qb; ++q)
        for (i64 d = 0; d < dim; ++d) q16[q * stride + d] = Q[q * qs + d];
    switch (qb) {
        case 4: int8_qb<4>(q16.data(), stride, Q, qs, C, cs, nr, dim, out, ldo); break;
        case 3: int8_qb<3>(q16.data(), stride, Q, qs, C, cs, nr, dim, out, ldo); break;
        case 2: int8_qb<2>(q16.data(), stride, Q, qs, C, cs, nr, dim, out, ldo); break;
        default: int8_qb<1>(q16.data(), stride, Q, qs, C, cs, nr, dim, out, ldo); break;
    }
}

// ---------------- float32 inner product: FMA, 4 queries x 2 rows register block
template <int QB>
static void f32_qb(const float* Q, i64 qs, const float* C, i64 cs, i64 nr, i64 dim, float* out, i64 ldo) {
    const i64 nfull = dim / 8 * 8;
    i64 j = 0;
    for (; j + 2 <= nr; j += 2) {
        const float* c0 = C + j * cs;
        const float* c1 = c0 + cs;
        __m256 a0[QB], a1[QB];
        for (int q = 0; q < QB; ++q) { a0[q] = _mm256_setzero_ps(); a1[q] = _mm256_setzero_ps(); }
        for (i64 d = 0; d < nfull; d += 8) {
            __m256 v0 = _mm256_loadu_ps(c0 + d), v1 = _mm256_loadu_ps(c1 + d);
            for (int q = 0; q < QB; ++q) {
                __m256 x = _mm256_loadu_ps(Q + q * qs + d);
                a0[q] = _mm256_fmadd_ps(x, v0, a0[q]);
                a1[q] = _mm256_fmadd_ps(x, v1, a1[q]);
            }
        }
        for (int q = 0; q < QB; ++q) {
            float s0 = hsum_ps(a0[q]), s1 = hsum_ps(a1[q]);
            for (i64 d = nfull; d < dim; ++d) { s0 += Q[q * qs + d] * c0[d]; s1 += Q[q * qs + d] * c1[d]; }
            out[q * ldo + j] = s0; out[q * ldo + j + 1] = s1;
        }
    }
    for (; j < nr; ++j) {
        const float* c0 = C + j * cs;
        for (int q = 0; q < QB; ++q) {
            __m256 a = _mm256_setzero_ps();
            for (i64 d = 0; d < nfull; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(Q + q * qs + d), _mm256_loadu_ps(c0 + d), a);
            float s = hsum_ps(a);
            for (i64 d = nfull; d < dim; ++d) s += Q[q * qs + d] * c0[d];
            out[q * ldo + j] = s;
        }
    }
}

static void score_f32(const float* Q, i64 qs, int qb, const float* C, i64 cs, i64 nr, i64 dim,
                      float* out, i64 ldo) {
    switch (qb) {
        case 4: f32_qb<4>(Q, qs, C, cs, nr, dim, out, ldo); break;
        case 3: f32_qb<3>(Q, qs, C, cs, nr, dim, out, ldo); break;
        case 2: f32_qb<2>(Q, qs, C, cs, nr, dim, out, ldo); break;
        default: f32_qb<1>(Q, qs, C, cs, nr, dim, out, ldo); break;
    }
}

// ---------------- top-k filters: compare 8 scores at once against the heap threshold
template <class T, bool L>
static inline unsigned cand_mask(const T* p, T thr);
template <>
inline unsigned cand_mask<std::int32_t, false>(const std::int32_t* p, std::int32_t thr) {
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(thr), ld(p)))));
}
template <>
inline unsigned cand_mask<std::int32_t, true>(const std::int32_t* p, std::int32_t thr) {
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(ld(p), _mm256_set1_epi32(thr)))));
}
template <>
inline unsigned cand_mask<float, true>(const float* p, float thr) {
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), _mm256_set1_ps(thr), _CMP_GT_OQ)));
}

template <class T, bool L>
static void filter_t(const T* buf, i64 n, i64 base, TopK<T, L>& h) {
    i64 j = 0;
    for (; j < n && !h.full(); ++j) h.push(buf[j], base + j);
    for (; j + 8 <= n; j += 8) {
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

}  // namespace avx2
}  // namespace vf

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
