// Portable scalar kernels. Included twice by vf_kernels.hpp: once as plain x86-64 / any-arch
// code (namespace vf::generic) and once compiled with the popcnt instruction enabled
// (namespace vf::scalar), chosen at run time. No include guard on purpose.
//
// Scorer contract (all levels): for qb <= kQB queries Q (row stride qs elements) and nr gallery
// rows C (row stride cs elements), write out[q * ldo + j] = score(Q[q], C[j]).
// dim is the row length in elements (bytes for the uint8/int8 kernels).

namespace vf {
namespace VF_SCALAR_NS {

#include "vf_skeleton.hpp"  // filter_topk for this ISA

static inline u64 ld64(const std::uint8_t* p) { u64 v; std::memcpy(&v, p, 8); return v; }

template <int QB, int W>
static void hamming_qb(const std::uint8_t* Q, i64 qs, const std::uint8_t* C, i64 cs, i64 nr,
                       i64 nwords, std::int32_t* out, i64 ldo) {
    const i64 nw = W ? W : nwords;
    for (i64 j = 0; j < nr; ++j) {
        const std::uint8_t* c = C + j * cs;
        std::int32_t acc[QB];
        for (int q = 0; q < QB; ++q) acc[q] = 0;
        for (i64 w = 0; w < nw; ++w) {
            const u64 cw = ld64(c + 8 * w);
            for (int q = 0; q < QB; ++q)
                acc[q] += __builtin_popcountll(cw ^ ld64(Q + q * qs + 8 * w));
        }
        for (int q = 0; q < QB; ++q) out[q * ldo + j] = acc[q];
    }
}

template <int W>
static void hamming_w(const std::uint8_t* Q, i64 qs, int qb, const std::uint8_t* C, i64 cs,
                      i64 nr, i64 nwords, std::int32_t* out, i64 ldo) {
    with_qb(qb, [&](auto QB) { hamming_qb<decltype(QB)::value, W>(Q, qs, C, cs, nr, nwords, out, ldo); });
}

static void score_hamming(const std::uint8_t* Q, i64 qs, int qb, const std::uint8_t* C, i64 cs,
                          i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    const i64 nw = dim / 8;
    if (nw == 4) hamming_w<4>(Q, qs, qb, C, cs, nr, nw, out, ldo);
    else if (nw == 8) hamming_w<8>(Q, qs, qb, C, cs, nr, nw, out, ldo);
    else hamming_w<0>(Q, qs, qb, C, cs, nr, nw, out, ldo);
}

// out[q * ldo + j] = pair(Q[q], C[j]) for the kernels without a register-blocked scalar loop
template <class In, class Out, class Pair>
static inline void each_pair(const In* Q, i64 qs, int qb, const In* C, i64 cs, i64 nr, Out* out,
                             i64 ldo, Pair pair) {
    for (i64 j = 0; j < nr; ++j)
        for (int q = 0; q < qb; ++q) out[q * ldo + j] = pair(Q + q * qs, C + j * cs);
}

static void score_iom(const std::uint8_t* Q, i64 qs, int qb, const std::uint8_t* C, i64 cs,
                      i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    each_pair(Q, qs, qb, C, cs, nr, out, ldo, [dim](const std::uint8_t* x, const std::uint8_t* c) {
        std::int32_t acc = 0;
        for (i64 d = 0; d < dim; ++d) acc += (x[d] == c[d]);
        return acc;
    });
}

static void score_int8(const std::int8_t* Q, i64 qs, int qb, const std::int8_t* C, i64 cs,
                       i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    each_pair(Q, qs, qb, C, cs, nr, out, ldo, [dim](const std::int8_t* x, const std::int8_t* c) {
        std::int32_t acc = 0;
        for (i64 d = 0; d < dim; ++d) acc += std::int32_t(x[d]) * std::int32_t(c[d]);
        return acc;
    });
}

static void score_f32(const float* Q, i64 qs, int qb, const float* C, i64 cs, i64 nr, i64 dim,
                      float* out, i64 ldo) {
    each_pair(Q, qs, qb, C, cs, nr, out, ldo, [dim](const float* x, const float* c) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        i64 d = 0;
        for (; d + 8 <= dim; d += 8)
            for (int t = 0; t < 8; ++t) acc[t] += x[d + t] * c[d + t];
        float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (; d < dim; ++d) s += x[d] * c[d];
        return s;
    });
}

// top-k filter candidates: one score per compare, i.e. the plain loop of filter_topk
struct Cand {
    static constexpr int W = 1;
};

}  // namespace VF_SCALAR_NS
}  // namespace vf
