// Portable scalar kernels. Included twice by vf_kernels.hpp: once as plain x86-64 / any-arch
// code (namespace vf::generic) and once compiled with the popcnt instruction enabled
// (namespace vf::scalar), chosen at run time. No include guard on purpose.
//
// Scorer contract (all levels): for qb <= kQB queries Q (row stride qs elements) and nr gallery
// rows C (row stride cs elements), write out[q * ldo + j] = score(Q[q], C[j]).
// dim is the row length in elements (bytes for the uint8/int8 kernels).

namespace vf {
namespace VF_SCALAR_NS {

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
    switch (qb) {
        case 4: hamming_qb<4, W>(Q, qs, C, cs, nr, nwords, out, ldo); break;
        case 3: hamming_qb<3, W>(Q, qs, C, cs, nr, nwords, out, ldo); break;
        case 2: hamming_qb<2, W>(Q, qs, C, cs, nr, nwords, out, ldo); break;
        default: hamming_qb<1, W>(Q, qs, C, cs, nr, nwords, out, ldo); break;
    }
}

static void score_hamming(const std::uint8_t* Q, i64 qs, int qb, const std::uint8_t* C, i64 cs,
                          i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    const i64 nw = dim / 8;
    if (nw == 4) hamming_w<4>(Q, qs, qb, C, cs, nr, nw, out, ldo);
    else if (nw == 8) hamming_w<8>(Q, qs, qb, C, cs, nr, nw, out, ldo);
    else hamming_w<0>(Q, qs, qb, C, cs, nr, nw, out, ldo);
}

static void score_iom(const std::uint8_t* Q, i64 qs, int qb, const std::uint8_t* C, i64 cs,
                      i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    for (i64 j = 0; j < nr; ++j) {
        const std::uint8_t* c = C + j * cs;
        for (int q = 0; q < qb; ++q) {
            const std::uint8_t* x = Q + q * qs;
            std::int32_t acc = 0;
            for (i64 d = 0; d < dim; ++d) acc += (x[d] == c[d]);
            out[q * ldo + j] = acc;
        }
    }
}

static void score_int8(const std::int8_t* Q, i64 qs, int qb, const std::int8_t* C, i64 cs,
                       i64 nr, i64 dim, std::int32_t* out, i64 ldo) {
    for (i64 j = 0; j < nr; ++j) {
        const std::int8_t* c = C + j * cs;
        for (int q = 0; q < qb; ++q) {
            const std::int8_t* x = Q + q * qs;
            std::int32_t acc = 0;
            for (i64 d = 0; d < dim; ++d) acc += std::int32_t(x[d]) * std::int32_t(c[d]);
            out[q * ldo + j] = acc;
        }
    }
}

static void score_f32(const float* Q, i64 qs, int qb, const float* C, i64 cs, i64 nr, i64 dim,
                      float* out, i64 ldo) {
    for (i64 j = 0; j < nr; ++j) {
        const float* c = C + j * cs;
        for (int q = 0; q < qb; ++q) {
            const float* x = Q + q * qs;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            i64 d = 0;
            for (; d + 8 <= dim; d += 8)
                for (int t = 0; t < 8; ++t) acc[t] += x[d + t] * c[d + t];
            float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for (; d < dim; ++d) s += x[d] * c[d];
            out[q * ldo + j] = s;
        }
    }
}

template <class T, bool L>
static void filter_t(const T* buf, i64 n, i64 base, TopK<T, L>& h) {
    i64 j = 0;
    for (; j < n && !h.full(); ++j) h.push(buf[j], base + j);
    for (; j < n; ++j)
        if (TopK<T, L>::beats(buf[j], h.thr)) h.push(buf[j], base + j);
}
static void filter_i32_small(const std::int32_t* b, i64 n, i64 base, TopK<std::int32_t, false>& h) { filter_t(b, n, base, h); }
static void filter_i32_large(const std::int32_t* b, i64 n, i64 base, TopK<std::int32_t, true>& h) { filter_t(b, n, base, h); }
static void filter_f32_large(const float* b, i64 n, i64 base, TopK<float, true>& h) { filter_t(b, n, base, h); }

}  // namespace VF_SCALAR_NS
}  // namespace vf
