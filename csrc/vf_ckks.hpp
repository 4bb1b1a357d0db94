// CKKS ciphertext x ciphertext inner product over RNS/NTT arrays: the hot loop of encrypted 1:N
// search, done natively instead of one SEAL multiply + add per dimension.
//
// For each block b, RNS limb l < L and coefficient n < N (all in NTT form, so the ring product is
// coefficient-wise):
//
//     out[b][0][l][n] = sum_i p[i][0] * B_b[i][0]                    mod q_l
//     out[b][1][l][n] = sum_i p[i][0] * B_b[i][1] + p[i][1] * B_b[i][0]  mod q_l
//     out[b][2][l][n] = sum_i p[i][1] * B_b[i][1]                    mod q_l
//
// (all at [l][n]), i.e. exactly what SEAL's Evaluator::multiply (size 2 x size 2 -> size 3, NTT
// form) followed by add_inplace over the dimensions i computes: SEAL keeps every coefficient fully
// reduced in [0, q), so the unique residue is the bit-exact answer. Only ring arithmetic, no
// cryptography.
//
// Lazy reduction, two ways (the same residues, bit for bit):
// * scalar: products (< q^2) are summed in unsigned 128-bit and folded back below q every
//   fold_dims() dimensions (127 for 60-bit primes);
// * AVX2 / AVX-512 (4 / 8 coefficients per instruction, for primes < 2^60; larger ones take the
//   scalar code): x86 has no 64x64->128-bit vector multiply and AVX-512 IFMA needs primes of
//   <= 52 bits, so coefficients are split into 30-bit digits for 32x32->64-bit multiplies
//   (vf_ckks_digits.hpp). Measured on one core of an AMD EPYC (Zen 4) at 128-d: scalar 1.0,
//   AVX2 ~1.25x, AVX-512 ~1.6x. (Compiling the scalar code with BMI2 for mulx gained nothing.)
// Either way each coefficient is reduced once at the end with a Barrett reduction by
// floor(2^128 / q) (exact: the quotient estimate is off by at most one, so one conditional
// subtraction finishes it; needs q < 2^63, the boundary enforces q < 2^61).
//
// Inputs must be reduced (every coefficient < its q_l), which SEAL guarantees for its own
// ciphertexts; ckks_max_excess() checks arrays of other origin. Unreduced input gives a wrong
// result, never undefined behaviour (all arithmetic is unsigned).
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "vf_common.hpp"

namespace vf {
namespace ckks {

using u128 = unsigned __int128;

constexpr u64 kMaxModulus = u64(1) << 61;  // enforced at the boundary

// q and floor(2^128 / q) for the Barrett reduction of 128-bit values.
struct Modulus {
    u64 q = 0, r0 = 0, r1 = 0;  // ratio = r1 * 2^64 + r0
    Modulus() = default;
    explicit Modulus(u64 q_) : q(q_) {
        const u128 ratio = ~u128(0) / q_;  // = floor(2^128 / q) for odd q > 1
        r0 = static_cast<u64>(ratio);
        r1 = static_cast<u64>(ratio >> 64);
    }
    // x mod q for any 128-bit x.
    inline u64 reduce(u128 x) const {
        const u64 x0 = static_cast<u64>(x), x1 = static_cast<u64>(x >> 64);
        // qhat = floor(x * ratio / 2^128) mod 2^64, from the four 64x64 partial products
        const u64 carry = static_cast<u64>((u128(x0) * r0) >> 64);
        const u128 m01 = u128(x0) * r1 + carry;  // < 2^128: no overflow
        const u128 m10 = u128(x1) * r0 + static_cast<u64>(m01);
        const u64 qhat = x1 * r1 + static_cast<u64>(m01 >> 64) + static_cast<u64>(m10 >> 64);
        const u64 r = x0 - qhat * q;  // the true remainder is < 2q < 2^64
        return r >= q ? r - q : r;
    }
    // Dimensions whose products can be added to a reduced value (< q) without overflowing
    // 128 bits: the middle part adds two products per dimension.
    i64 fold_dims() const {
        const u128 p = u128(q - 1) * (q - 1);
        const u128 room = ~u128(0) - (q - 1);
        const u128 k = room / (2 * p);
        return static_cast<i64>(std::min<u128>(k, 1 << 20));
    }
};

// Geometry of one call. Probe (dims, 2, L, N); each block (dims, 2, L, N); out (3, L, N) per block.
struct Shape {
    i64 dims = 0, limbs = 0, n = 0;
    i64 poly() const { return limbs * n; }      // elements of one polynomial (all limbs)
    i64 dim_stride() const { return 2 * poly(); }
};

// Multiply-accumulate of coefficients [n0, n1) of limb l over all dimensions: writes the three
// reduced output polynomials. POLY > 0 fixes L * N at compile time (the identify parameters):
// then the 4 x 4 operand streams of a dimension block are constant offsets from two pointers and
// everything fits in registers; POLY = 0 is the general case. Kept inline so that each ISA
// wrapper below compiles it for its target (no vector arguments: calls across targets are safe).
template <i64 POLY>
inline __attribute__((always_inline)) void mac_tile(const Shape& s, const u64* P, const u64* B,
                                                    u64* out, const Modulus& m, i64 fold, i64 l,
                                                    i64 n0, i64 n1) {
    constexpr i64 kTile = 1024;    // coefficients whose accumulators stay in L1 (3 x 16 x 256 B)
    constexpr int kDimBlock = 4;  // dimensions per pass over the accumulators
    u128 a0[kTile], a1[kTile], a2[kTile];
    const i64 poly = POLY ? POLY : s.poly();
    const i64 ds = 2 * poly, off = l * s.n;
    for (i64 t0 = n0; t0 < n1; t0 += kTile) {
        const i64 len = std::min(kTile, n1 - t0);
        for (i64 k = 0; k < len; ++k) a0[k] = a1[k] = a2[k] = 0;
        i64 since_fold = 0;
        for (i64 i = 0; i < s.dims;) {
            const int ib = static_cast<int>(std::min<i64>(kDimBlock, s.dims - i));
            if (since_fold + ib > fold) {  // fold the sums back below q before they can overflow
                for (i64 k = 0; k < len; ++k) {
                    a0[k] = m.reduce(a0[k]);
                    a1[k] = m.reduce(a1[k]);
                    a2[k] = m.reduce(a2[k]);
                }
                since_fold = 0;
            }
            const u64* p = P + i * ds + off + t0;
            const u64* b = B + i * ds + off + t0;
            if (ib == kDimBlock) {
                for (i64 k = 0; k < len; ++k) {
                    u128 s0 = a0[k], s1 = a1[k], s2 = a2[k];
                    for (int d = 0; d < kDimBlock; ++d) {
                        const u64 p0 = p[d * ds + k], p1 = p[d * ds + poly + k];
                        const u64 b0 = b[d * ds + k], b1 = b[d * ds + poly + k];
                        s0 += u128(p0) * b0;
                        s1 += u128(p0) * b1;
                        s1 += u128(p1) * b0;
                        s2 += u128(p1) * b1;
                    }
                    a0[k] = s0; a1[k] = s1; a2[k] = s2;
                }
            } else {
                for (int d = 0; d < ib; ++d)  // the last dims % kDimBlock dimensions
                    for (i64 k = 0; k < len; ++k) {
                        const u64 p0 = p[d * ds + k], p1 = p[d * ds + poly + k];
                        const u64 b0 = b[d * ds + k], b1 = b[d * ds + poly + k];
                        a0[k] += u128(p0) * b0;
                        a1[k] += u128(p0) * b1;
                        a1[k] += u128(p1) * b0;
                        a2[k] += u128(p1) * b1;
                    }
            }
            i += ib;
            since_fold += ib;
        }
        u64* o = out + off + t0;
        for (i64 k = 0; k < len; ++k) {
            o[k] = m.reduce(a0[k]);
            o[poly + k] = m.reduce(a1[k]);
            o[2 * poly + k] = m.reduce(a2[k]);
        }
    }
}

constexpr i64 kIdentifyPoly = 2 * 8192;  // L * N of the identify parameters (2 data primes, N = 8192)

inline __attribute__((always_inline)) void mac_any(const Shape& s, const u64* P, const u64* B,
                                                   u64* out, const Modulus& m, i64 fold, i64 l,
                                                   i64 n0, i64 n1) {
    if (s.poly() == kIdentifyPoly) mac_tile<kIdentifyPoly>(s, P, B, out, m, fold, l, n0, n1);
    else mac_tile<0>(s, P, B, out, m, fold, l, n0, n1);
}

// ---------------------------------------------------------------------------------------------
// Tile functions per SIMD level: mac_baseline (scalar), avx2::digit_tile, avx512::digit_tile (the
// digit kernel compiled for each ISA with its vector type V).
using MacFn = void (*)(const Shape&, const u64*, const u64*, u64*, const Modulus&, i64, i64, i64, i64);

static void mac_baseline(const Shape& s, const u64* P, const u64* B, u64* out, const Modulus& m,
                         i64 fold, i64 l, i64 n0, i64 n1) {
    mac_any(s, P, B, out, m, fold, l, n0, n1);
}

}  // namespace ckks
}  // namespace vf

#if defined(__x86_64__)
// The vector type of the digit kernel from one ISA's intrinsics (vf_ckks_digits.hpp says what it
// must offer).
#define VF_DIGIT_VECTOR(T_, W_, loadu_, load_, store_, set1_, andf_, shr_, mul_, add_)           \
    struct V {                                                                                   \
        using T = T_;                                                                            \
        static constexpr int W = W_;                                                             \
        static T loadu(const u64* p) { return loadu_(reinterpret_cast<const T*>(p)); }           \
        static T load(const u64* p) { return load_(reinterpret_cast<const T*>(p)); }             \
        static void store(u64* p, T v) { store_(reinterpret_cast<T*>(p), v); }                  \
        static T set1(i64 x) { return set1_(x); }                                                \
        static T and_(T a, T b) { return andf_(a, b); }                                          \
        static T shr30(T a) { return shr_(a, 30); }                                              \
        static T mul(T a, T b) { return mul_(a, b); }                                            \
        static T add(T a, T b) { return add_(a, b); }                                            \
    };

VF_TARGET_BEGIN("avx2")
namespace vf::ckks::avx2 {  // 4 coefficients per vector
VF_DIGIT_VECTOR(__m256i, 4, _mm256_loadu_si256, _mm256_load_si256, _mm256_store_si256, _mm256_set1_epi64x, _mm256_and_si256, _mm256_srli_epi64, _mm256_mul_epu32, _mm256_add_epi64)
#include "vf_ckks_digits.hpp"
}  // namespace vf::ckks::avx2
VF_TARGET_END

VF_TARGET_BEGIN("avx512f")
namespace vf::ckks::avx512 {  // 8 coefficients per vector
VF_DIGIT_VECTOR(__m512i, 8, _mm512_loadu_si512, _mm512_load_si512, _mm512_store_si512, _mm512_set1_epi64, _mm512_and_si512, _mm512_srli_epi64, _mm512_mul_epu32, _mm512_add_epi64)
#include "vf_ckks_digits.hpp"
}  // namespace vf::ckks::avx512
VF_TARGET_END
#undef VF_DIGIT_VECTOR
#endif  // __x86_64__

namespace vf {
namespace ckks {

inline MacFn mac_for(Simd level) {
#if defined(__x86_64__)
    if (level == Simd::AVX512) return avx512::digit_tile;
    if (level == Simd::AVX2) return avx2::digit_tile;
#endif
    (void)level;
    return mac_baseline;
}

// out[b] (3, L, N) = the accumulated product of probe P (dims, 2, L, N) with blocks[b] (dims, 2,
// L, N), for b < nblocks, on up to n_threads threads (0 = all cores). Work units are (limb,
// coefficient range, block), ordered so that consecutive units share a probe slice (2 MiB at
// 128-d) that stays in the last-level cache while the blocks stream past it.
inline void block_mac(MacFn fn, const Shape& s, const u64* P, const u64* const* blocks, i64 nblocks,
                      u64* const* outs, const u64* moduli, int n_threads) {
    if (nblocks <= 0 || s.dims <= 0 || s.limbs <= 0 || s.n <= 0) return;
    std::vector<Modulus> mod(static_cast<size_t>(s.limbs));
    std::vector<i64> fold(static_cast<size_t>(s.limbs));
    for (i64 l = 0; l < s.limbs; ++l) {
        mod[l] = Modulus(moduli[l]);
        fold[l] = mod[l].fold_dims();
    }
    // coefficients per unit: long contiguous runs per dimension (the hardware prefetchers need
    // them; measured best at 1-2 K), 16 units per block and limb at N = 8192 for the threads
    const i64 width = std::min<i64>(s.n, 1024);
    const i64 nslices = (s.n + width - 1) / width;
    const i64 units = s.limbs * nslices * nblocks;
    const int T = static_cast<int>(std::min<i64>(resolve_threads(n_threads), units));
    std::atomic<i64> next{0};
    parallel_run(T, [&](int) {
        for (i64 u; (u = next.fetch_add(1)) < units;) {
            const i64 b = u % nblocks, ls = u / nblocks;
            const i64 l = ls / nslices, n0 = (ls % nslices) * width;
            fn(s, P, blocks[b], outs[b], mod[l], fold[l], l, n0, std::min(s.n, n0 + width));
        }
    });
}

// Largest amount by which any coefficient of a (count, L, N) array exceeds q_l - 1 (0 when every
// coefficient is reduced, i.e. < q_l). For checking arrays that did not come from SEAL.
inline u64 max_excess(const u64* a, i64 count, i64 limbs, i64 n, const u64* moduli) {
    u64 worst = 0;
    for (i64 c = 0; c < count; ++c)
        for (i64 l = 0; l < limbs; ++l) {
            const u64* p = a + (c * limbs + l) * n;
            const u64 top = moduli[l] - 1;
            u64 mx = 0;
            for (i64 k = 0; k < n; ++k) mx = std::max(mx, p[k]);
            if (mx > top) worst = std::max(worst, mx - top);
        }
    return worst;
}

}  // namespace ckks
}  // namespace vf
