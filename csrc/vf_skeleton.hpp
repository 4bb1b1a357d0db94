// ISA-neutral building blocks of the SIMD kernels, written once and parameterised by an
// ISA-specific type (an Op or a Cand struct): the register-blocked scoring skeleton and the top-k
// filter. With with_qb (vf_common.hpp) this follows faiss' with_HammingComputer: one switch, the
// specialisation chosen by a template parameter.
//
// Included once per ISA, inside that ISA's namespace and target region (vf_scalar.hpp,
// vf_avx2.hpp, vf_avx512.hpp), so every instantiation is compiled for its ISA -- the way Highway
// re-includes code per target. No include guard on purpose. (A single copy outside the target
// regions would be baseline x86-64 code calling AVX functions with vector arguments, which GCC
// passes in a different ABI unless every call is inlined.)

// ---------------------------------------------------------------------------------------------
// Register-blocked scoring skeleton: QB queries x Op::R gallery rows per step, Op::E elements per
// chunk, a partial chunk (Op::tail(rem)) for the last dim % E elements, then one row at a time
// for the last nr % R rows. An Op supplies:
//
//   types   In (gallery element), QIn (query element), Out (score), Acc (accumulator), M (mask
//           of a chunk: which of its E elements are valid)
//   consts  E, R, kPrefetch (software prefetch of the rows ahead)
//   static  M tail(i64 rem)           mask of a chunk with rem <= E valid elements
//           Acc zero()
//           V load_c(const In*, M)    gallery chunk (invalid elements read as zero, never past rem)
//           V load_q(const QIn*, M)   query chunk
//           Acc step(Acc, V q, V c, M)
//   member  store_rows(Out* o, const Acc (&acc)[R], int q)   o[r] = score of row j + r
//           store_row(Out* o, Acc acc, int q)                o[0] = score of one row
//
// Writes out[q * ldo + j] = score(Q[q], C[j]) for q < QB, j < nr.
template <class Op, int QB, int R>
static inline void skeleton_chunk(const typename Op::QIn* Q, i64 qs, const typename Op::In* c0,
                                  i64 cs, i64 d, typename Op::M m, typename Op::Acc (&acc)[QB][R]) {
    decltype(Op::load_c(c0, m)) v[R];
    for (int r = 0; r < R; ++r) v[r] = Op::load_c(c0 + r * cs + d, m);
    for (int q = 0; q < QB; ++q) {
        const auto x = Op::load_q(Q + q * qs + d, m);
        for (int r = 0; r < R; ++r) acc[q][r] = Op::step(acc[q][r], x, v[r], m);
    }
}

template <class Op, int QB>
static inline void skeleton(const Op& op, const typename Op::QIn* Q, i64 qs,
                            const typename Op::In* C, i64 cs, i64 nr, i64 dim, typename Op::Out* out, i64 ldo) {
    using M = typename Op::M;
    using Acc = typename Op::Acc;
    using In = typename Op::In;
    constexpr int E = Op::E;
    constexpr int R = Op::R;
    const i64 nfull = dim / E;
    const i64 rem = dim - nfull * E;
    const M all = Op::tail(E), tm = Op::tail(rem);
    const i64 rb = cs * static_cast<i64>(sizeof(In));
    // prefetch distance: at least kPrefetchBytes ahead, at least 8 rows (hardware prefetch alone
    // reaches ~60% of the bandwidth on these interleaved row streams)
    const i64 pf_rows = std::max<i64>(8, kPrefetchBytes / std::max<i64>(1, rb));
    i64 j = 0;
    for (; j + R <= nr; j += R) {
        const In* c0 = C + j * cs;
        Acc acc[QB][R];
        for (int q = 0; q < QB; ++q)
            for (int r = 0; r < R; ++r) acc[q][r] = Op::zero();
        for (i64 ch = 0; ch < nfull; ++ch) {
            const i64 d = ch * E;
            if constexpr (Op::kPrefetch) {
                const char* pf = reinterpret_cast<const char*>(c0 + pf_rows * cs + d);
                for (int r = 0; r < R; ++r) __builtin_prefetch(pf + r * rb, 0, 3);
            }
            skeleton_chunk<Op, QB, R>(Q, qs, c0, cs, d, all, acc);
        }
        if (rem) skeleton_chunk<Op, QB, R>(Q, qs, c0, cs, nfull * E, tm, acc);
        for (int q = 0; q < QB; ++q) op.store_rows(out + q * ldo + j, acc[q], q);
    }
    for (; j < nr; ++j) {
        Acc acc[QB][1];
        for (int q = 0; q < QB; ++q) acc[q][0] = Op::zero();
        const In* c0 = C + j * cs;
        for (i64 ch = 0; ch < nfull; ++ch) skeleton_chunk<Op, QB, 1>(Q, qs, c0, cs, ch * E, all, acc);
        if (rem) skeleton_chunk<Op, QB, 1>(Q, qs, c0, cs, nfull * E, tm, acc);
        for (int q = 0; q < QB; ++q) op.store_row(out + q * ldo + j, acc[q][0], q);
    }
}

// The skeleton for a run-time query block size qb <= kQB.
template <class Op>
static inline void skeleton_qb(const Op& op, const typename Op::QIn* Q, i64 qs, int qb,
                               const typename Op::In* C, i64 cs, i64 nr, i64 dim,
                               typename Op::Out* out, i64 ldo) {
    with_qb(qb, [&](auto QB) { skeleton<Op, decltype(QB)::value>(op, Q, qs, C, cs, nr, dim, out, ldo); });
}

// A Table scorer (vf_kernels.hpp: ScoreFn) for an Op whose queries are plain rows (QIn == In).
template <class Op>
static void score(const typename Op::In* Q, i64 qs, int qb, const typename Op::In* C, i64 cs, i64 nr,
                  i64 dim, typename Op::Out* out, i64 ldo) {
    skeleton_qb(Op{}, Q, qs, qb, C, cs, nr, dim, out, ldo);
}

// ---------------------------------------------------------------------------------------------
// Top-k filter over one row of scores buf[0, n) (gallery indices base + j, increasing). A Cand
// supplies W (scores per compare; 1 = plain scalar loop) and, for W > 1, bit masks of the W scores
// at p that are strictly greater / less than t: gt(const int32_t* p, t), lt(const int32_t* p, t),
// gt(const float* p, t). Candidates are re-checked against the live threshold (it moves while a
// mask is consumed). Used directly as the Table's filter (vf_kernels.hpp: FilterFn).
template <class Cand, class T, bool L>
static void filter_topk(const T* buf, i64 n, i64 base, TopK<T, L>& h) {
    i64 j = 0;
    for (; j < n && !h.full(); ++j) h.push(buf[j], base + j);
    if constexpr (Cand::W > 1) {
        for (; j + Cand::W <= n; j += Cand::W) {
            unsigned m;
            if constexpr (L) m = Cand::gt(buf + j, h.thr);
            else m = Cand::lt(buf + j, h.thr);
            while (m) {
                const int t = __builtin_ctz(m);
                m &= m - 1;
                if (TopK<T, L>::beats(buf[j + t], h.thr)) h.push(buf[j + t], base + j + t);
            }
        }
    }
    for (; j < n; ++j)
        if (TopK<T, L>::beats(buf[j], h.thr)) h.push(buf[j], base + j);
}
