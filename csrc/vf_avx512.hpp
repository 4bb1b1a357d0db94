// AVX-512 kernels (F, BW, DQ, VL, VPOPCNTDQ, VNNI): Ice Lake / Zen 4 and later.
// Compiled with a target pragma and used only when the CPU reports all of these features.
#pragma once
#include <immintrin.h>

#include "vf_common.hpp"

VF_TARGET_BEGIN("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx512vnni,avx2,fma,popcnt,bmi,bmi2")

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

#include "vf_skeleton.hpp"  // skeleton, skeleton_qb, filter_topk for this ISA

// ---------------------------------------------------------------------------------------------
// Ops for the shared skeleton (vf_skeleton.hpp): QB queries x 4 gallery rows per step, masked
// loads for the tail chunk, software prefetch. Reduce4Store turns the 4 row accumulators into 4
// scores with one reduce4 (the Op's), then the Op's store4/store1.
template <class Op>
struct Reduce4Store {
    static constexpr int R = 4;
    static constexpr bool kPrefetch = true;
    template <class Out, class Acc>
    void store_rows(Out* o, const Acc (&a)[4], int q) const {
        static_cast<const Op*>(this)->store4(o, Op::reduce4(a[0], a[1], a[2], a[3]), q);
    }
    template <class Out, class Acc>
    void store_row(Out* o, Acc a, int q) const {
        const Acc z = Op::zero();
        static_cast<const Op*>(this)->store1(o, Op::reduce4(a, z, z, z), q);
    }
};
struct Bytes64 {  // 64 one-byte elements per chunk, byte masks
    using M = __mmask64;
    static constexpr int E = 64;
    static M tail(i64 rem) { return rem >= 64 ? ~M(0) : ((M(1) << rem) - 1); }
    static __m512i zero() { return _mm512_setzero_si512(); }
};

struct OpHamming : Bytes64, Reduce4Store<OpHamming> {  // popcnt per qword
    using In = std::uint8_t; using QIn = In; using Out = std::int32_t; using Acc = __m512i;
    static __m512i load_c(const In* p, M m) { return _mm512_maskz_loadu_epi8(m, p); }
    static __m512i load_q(const In* p, M m) { return _mm512_maskz_loadu_epi8(m, p); }
    static Acc step(Acc a, __m512i q, __m512i c, M) { return _mm512_add_epi64(a, _mm512_popcnt_epi64(_mm512_xor_si512(q, c))); }
    static __m128i reduce4(Acc a, Acc b, Acc c, Acc d) { return reduce4_epi64_to_i32(a, b, c, d); }
    void store4(Out* o, __m128i s, int) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(o), s); }
    void store1(Out* o, __m128i s, int) const { *o = _mm_cvtsi128_si32(s); }
};
struct OpIom : Bytes64, Reduce4Store<OpIom> {  // per-byte match counters (<= 255 chunks), summed with sad at the end
    using In = std::uint8_t; using QIn = In; using Out = std::int32_t; using Acc = __m512i;
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
struct OpInt8 : Bytes64, Reduce4Store<OpInt8> {  // VNNI: (c ^ 0x80) is c + 128 as u8; dot = sum(u8(c+128) * q) - 128 * sum(q)
    using In = std::int8_t; using QIn = In; using Out = std::int32_t; using Acc = __m512i;
    const std::int32_t* qsum128;  // 128 * sum(q) per query of the block
    static __m512i load_c(const In* p, M m) { return _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, p), _mm512_set1_epi8(-128)); }
    static __m512i load_q(const In* p, M m) { return _mm512_maskz_loadu_epi8(m, p); }
    static Acc step(Acc a, __m512i q, __m512i c, M) { return _mm512_dpbusd_epi32(a, c, q); }
    static __m128i reduce4(Acc a, Acc b, Acc c, Acc d) { return reduce4_epi32(a, b, c, d); }
    void store4(Out* o, __m128i s, int q) const {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_sub_epi32(s, _mm_set1_epi32(qsum128[q])));
    }
    void store1(Out* o, __m128i s, int q) const { *o = _mm_cvtsi128_si32(s) - qsum128[q]; }
};
struct OpF32 : Reduce4Store<OpF32> {
    using In = float; using QIn = In; using Out = float; using Acc = __m512; using M = __mmask16;
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
    if (dim == 32)
        with_qb(qb, [&](auto QB) { hamming256<decltype(QB)::value>(Q, qs, C, cs, nr, out, ldo); });
    else
        skeleton_qb(OpHamming{}, Q, qs, qb, C, cs, nr, dim, out, ldo);
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

static constexpr auto score_iom = &score<OpIom>;
static constexpr auto score_f32 = &score<OpF32>;

// ---------------- top-k filter candidates: 16 scores per compare (filter_topk in vf_skeleton.hpp)
struct Cand {
    static constexpr int W = 16;
    static unsigned gt(const std::int32_t* p, std::int32_t t) { return _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(p), _mm512_set1_epi32(t)); }
    static unsigned lt(const std::int32_t* p, std::int32_t t) { return _mm512_cmplt_epi32_mask(_mm512_loadu_si512(p), _mm512_set1_epi32(t)); }
    static unsigned gt(const float* p, float t) { return _mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_set1_ps(t), _CMP_GT_OQ); }
};

}  // namespace avx512
}  // namespace vf

VF_TARGET_END
