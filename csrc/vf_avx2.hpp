// AVX2 (+FMA, popcnt) kernels, compiled with a target pragma and used only when the CPU has them.
#pragma once
#include <immintrin.h>

#include "vf_common.hpp"

VF_TARGET_BEGIN("avx2,fma,popcnt,bmi,bmi2")

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

#include "vf_skeleton.hpp"  // skeleton, skeleton_qb, filter_topk for this ISA

// ---------------------------------------------------------------------------------------------
// Ops for the shared skeleton (vf_skeleton.hpp): QB queries x 2 gallery rows per step (16 ymm
// registers: 4 queries x 2 rows of accumulators + rows + query fit; 4 rows would spill). AVX2 has
// no byte-masked loads, so a chunk mask M is the count of valid elements (E for a full chunk: a
// compile-time constant after inlining, so full chunks pay nothing); the tail chunk is copied to a
// zeroed buffer.
template <class T, int N>
static inline __m256i load_partial(const T* p, i64 rem) {
    alignas(32) T buf[N] = {};
    std::memcpy(buf, p, static_cast<size_t>(rem) * sizeof(T));
    return ld(buf);
}
struct Rows2 {
    using M = i64;  // valid elements of the chunk
    static constexpr int R = 2;
    static constexpr bool kPrefetch = false;
};

struct OpHamming : Rows2 {  // sad of byte popcounts -> 4 qword sums
    using In = std::uint8_t; using QIn = In; using Out = std::int32_t; using Acc = __m256i;
    static constexpr int E = 32;
    static M tail(i64 rem) { return rem; }
    static Acc zero() { return _mm256_setzero_si256(); }
    static __m256i load_c(const In* p, M m) { return m == E ? ld(p) : load_partial<In, E>(p, m); }
    static __m256i load_q(const In* p, M m) { return load_c(p, m); }
    static Acc step(Acc a, __m256i q, __m256i c, M) {
        return _mm256_add_epi64(a, _mm256_sad_epu8(popcnt_bytes(_mm256_xor_si256(q, c)), _mm256_setzero_si256()));
    }
    void store_rows(Out* o, const Acc (&a)[2], int) const {
        __m256i t = _mm256_add_epi64(_mm256_unpacklo_epi64(a[0], a[1]), _mm256_unpackhi_epi64(a[0], a[1]));
        __m128i s = _mm_add_epi64(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        o[0] = static_cast<Out>(_mm_cvtsi128_si64(s));
        o[1] = static_cast<Out>(_mm_extract_epi64(s, 1));
    }
    void store_row(Out* o, Acc a, int) const { *o = static_cast<Out>(hsum_epi64(a)); }
};
struct OpIom : Rows2 {  // cmpeq + movemask + popcnt, scalar counters
    using In = std::uint8_t; using QIn = In; using Out = std::int32_t; using Acc = std::int32_t;
    static constexpr int E = 32;
    static M tail(i64 rem) { return rem; }
    static Acc zero() { return 0; }
    static __m256i load_c(const In* p, M m) { return m == E ? ld(p) : load_partial<In, E>(p, m); }
    static __m256i load_q(const In* p, M m) { return load_c(p, m); }
    static Acc step(Acc a, __m256i q, __m256i c, M m) {
        unsigned eq = static_cast<unsigned>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(q, c)));
        if (m != E) eq &= (1u << m) - 1;  // the zero padding of the tail matches itself
        return a + __builtin_popcount(eq);
    }
    void store_rows(Out* o, const Acc (&a)[2], int) const { o[0] = a[0]; o[1] = a[1]; }
    void store_row(Out* o, Acc a, int) const { *o = a; }
};
struct OpInt8 : Rows2 {  // queries pre-widened to int16 (zero padded), gallery sign-extended, madd_epi16
    using In = std::int8_t; using QIn = std::int16_t; using Out = std::int32_t; using Acc = __m256i;
    static constexpr int E = 16;
    static M tail(i64 rem) { return rem; }
    static Acc zero() { return _mm256_setzero_si256(); }
    static __m256i load_c(const In* p, M m) {
        const __m128i b = m == E ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                 : _mm256_castsi256_si128(load_partial<In, 32>(p, m));
        return _mm256_cvtepi8_epi16(b);
    }
    static __m256i load_q(const QIn* p, M) { return ld(p); }  // padded to a multiple of E
    static Acc step(Acc a, __m256i q, __m256i c, M) { return _mm256_add_epi32(a, _mm256_madd_epi16(q, c)); }
    void store_rows(Out* o, const Acc (&a)[2], int) const { o[0] = hsum_epi32(a[0]); o[1] = hsum_epi32(a[1]); }
    void store_row(Out* o, Acc a, int) const { *o = hsum_epi32(a); }
};
struct OpF32 : Rows2 {  // FMA
    using In = float; using QIn = In; using Out = float; using Acc = __m256;
    static constexpr int E = 8;
    static M tail(i64 rem) { return rem; }
    static Acc zero() { return _mm256_setzero_ps(); }
    static __m256 load_c(const In* p, M m) {
        if (m == E) return _mm256_loadu_ps(p);
        const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(m)), lanes));
    }
    static __m256 load_q(const In* p, M m) { return load_c(p, m); }
    static Acc step(Acc a, __m256 q, __m256 c, M) { return _mm256_fmadd_ps(q, c, a); }
    void store_rows(Out* o, const Acc (&a)[2], int) const { o[0] = hsum_ps(a[0]); o[1] = hsum_ps(a[1]); }
    void store_row(Out* o, Acc a, int) const { *o = hsum_ps(a); }
};

// Hamming: code length a multiple of 256 bits here; other lengths take the popcnt scalar path
static void score_hamming(const std::uint8_t* Q, i64 qs, int qb, const std::uint8_t* C, i64 cs,
                          i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    if (dim % 32 != 0) { vf::scalar::score_hamming(Q, qs, qb, C, cs, nr, dim, out, ldo); return; }
    skeleton_qb(OpHamming{}, Q, qs, qb, C, cs, nr, dim, out, ldo);
}

static void score_int8(const std::int8_t* Q, i64 qs, int qb, const std::int8_t* C, i64 cs,
                       i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    thread_local std::vector<std::int16_t> q16;
    const i64 stride = (dim + OpInt8::E - 1) / OpInt8::E * OpInt8::E;
    q16.assign(static_cast<size_t>(stride * qb), 0);
    for (int q = 0; q < qb; ++q)
        for (i64 d = 0; d < dim; ++d) q16[q * stride + d] = Q[q * qs + d];
    skeleton_qb(OpInt8{}, q16.data(), stride, qb, C, cs, nr, dim, out, ldo);
}

static constexpr auto score_iom = &score<OpIom>;
static constexpr auto score_f32 = &score<OpF32>;

// ---------------- top-k filter candidates: 8 scores per compare (filter_topk in vf_skeleton.hpp)
static inline unsigned mask_ps(__m256 m) { return static_cast<unsigned>(_mm256_movemask_ps(m)); }
struct Cand {
    static constexpr int W = 8;
    static unsigned gt(const std::int32_t* p, std::int32_t t) { return mask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(ld(p), _mm256_set1_epi32(t)))); }
    static unsigned lt(const std::int32_t* p, std::int32_t t) { return mask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(t), ld(p)))); }
    static unsigned gt(const float* p, float t) { return mask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), _mm256_set1_ps(t), _CMP_GT_OQ)); }
};

}  // namespace avx2
}  // namespace vf

VF_TARGET_END
