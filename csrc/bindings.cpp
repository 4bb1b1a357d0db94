// pybind11 bindings for the Veilface kernels (engine._kernels). The Python layer
// (engine/kernels.py) validates and normalises inputs; the checks here are a second line of
// defence so that bad input can never crash the interpreter. The GIL is released for the loops.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "vf_ckks.hpp"
#include "vf_kernels.hpp"

namespace py = pybind11;
using vf::i64;

namespace {

template <class In>
const In* check_2d(const py::array& a, const char* what, const char* dtype_name) {
    if (!a.dtype().is(py::dtype::of<In>()))
        throw py::value_error(std::string(what) + " must have dtype " + dtype_name + ", got " +
                              std::string(py::str(a.dtype())));
    if (a.ndim() != 2)
        throw py::value_error(std::string(what) + " must be 2-D, got ndim=" + std::to_string(a.ndim()));
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(what) + " must be C-contiguous");
    return static_cast<const In*>(a.data());
}

template <class In>
struct Checked {
    const In* Q;
    const In* C;
    i64 nq, n, dim;
};

template <class In>
Checked<In> check_pair(const py::array& queries, const py::array& codes, const char* dtype_name,
                       const char* kind) {
    Checked<In> c;
    c.Q = check_2d<In>(queries, "queries", dtype_name);
    c.C = check_2d<In>(codes, "codes", dtype_name);
    c.nq = queries.shape(0);
    c.n = codes.shape(0);
    c.dim = codes.shape(1);
    if (queries.shape(1) != c.dim)
        throw py::value_error("code length mismatch: queries have " + std::to_string(queries.shape(1)) +
                              ", codes have " + std::to_string(c.dim));
    std::string k(kind);
    if (c.dim < 1) throw py::value_error("code length must be >= 1");
    if (k == "hamming" && c.dim % 8 != 0)
        throw py::value_error("Hamming code length must be a multiple of 8 bytes (64 bits), got " +
                              std::to_string(c.dim) + " bytes");
    if (k == "iom" && c.dim > vf::kMaxIomM)
        throw py::value_error("IoM code length must be <= " + std::to_string(vf::kMaxIomM));
    if (k == "int8" && c.dim > vf::kMaxInt8Dim)
        throw py::value_error("int8 dimension must be <= " + std::to_string(vf::kMaxInt8Dim));
    return c;
}

template <class In, class Out>
py::array_t<Out> dense(const py::array& queries, const py::array& codes, int n_threads,
                       vf::ScoreFn<In, Out> vf::Table::*member, const char* dtype_name, const char* kind) {
    auto c = check_pair<In>(queries, codes, dtype_name, kind);
    py::array_t<Out> out({c.nq, c.n});
    Out* o = out.mutable_data();
    auto fn = vf::table_for(vf::current_simd()).*member;
    {
        py::gil_scoped_release nogil;
        vf::dense_scores<In, Out>(fn, c.Q, c.nq, c.C, c.n, c.dim, o, n_threads);
    }
    return out;
}

template <class In, class T, bool L>
py::tuple topk(const py::array& queries, const py::array& codes, i64 k, int n_threads,
               vf::ScoreFn<In, T> vf::Table::*member, vf::FilterFn<T, L> vf::Table::*fmember,
               const char* dtype_name, const char* kind) {
    auto c = check_pair<In>(queries, codes, dtype_name, kind);
    if (k < 1) throw py::value_error("k must be >= 1, got " + std::to_string(k));
    const i64 kk = std::min(k, c.n);
    py::array_t<T> scores({c.nq, kk});
    py::array_t<i64> idx({c.nq, kk});
    T* s = scores.mutable_data();
    i64* ix = idx.mutable_data();
    const vf::Table tab = vf::table_for(vf::current_simd());
    {
        py::gil_scoped_release nogil;
        vf::topk_search<In, T, L>(tab.*member, tab.*fmember, c.Q, c.nq, c.C, c.n, c.dim, kk, s, ix, n_threads);
    }
    return py::make_tuple(scores, idx);
}

// ---- CKKS block multiply-accumulate (vf_ckks.hpp)
const vf::u64* check_u64(const py::array& a, const char* what, py::ssize_t ndim) {
    if (!a.dtype().is(py::dtype::of<vf::u64>()))
        throw py::value_error(std::string(what) + " must have dtype uint64, got " + std::string(py::str(a.dtype())));
    if (a.ndim() != ndim)
        throw py::value_error(std::string(what) + " must be " + std::to_string(ndim) + "-D, got ndim=" +
                              std::to_string(a.ndim()));
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(what) + " must be C-contiguous");
    return static_cast<const vf::u64*>(a.data());
}

std::vector<vf::u64> check_moduli(const py::array& moduli, i64 limbs) {
    const vf::u64* q = check_u64(moduli, "moduli", 1);
    if (moduli.shape(0) != limbs)
        throw py::value_error("need one modulus per RNS limb: " + std::to_string(limbs) + ", got " +
                              std::to_string(moduli.shape(0)));
    for (i64 l = 0; l < limbs; ++l)
        if (q[l] < 3 || q[l] % 2 == 0 || q[l] >= vf::ckks::kMaxModulus)
            throw py::value_error("moduli must be odd, > 1 and < 2^61, got " + std::to_string(q[l]));
    return std::vector<vf::u64>(q, q + limbs);
}

bool overlaps(const py::array& a, const py::array& b) {
    const auto* a0 = static_cast<const char*>(a.data());
    const auto* b0 = static_cast<const char*>(b.data());
    return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

py::array ckks_block_mac(const py::sequence& blocks, const py::array& probe, const py::array& moduli,
                         const py::object& out_obj, int n_threads) {
    const vf::u64* P = check_u64(probe, "probe", 4);
    vf::ckks::Shape s;
    s.dims = probe.shape(0);
    s.limbs = probe.shape(2);
    s.n = probe.shape(3);
    if (probe.shape(1) != 2)
        throw py::value_error("probe must be (dims, 2, L, N): size-2 ciphertexts, got " +
                              std::to_string(probe.shape(1)) + " polynomials");
    if (s.dims < 1 || s.limbs < 1 || s.n < 1) throw py::value_error("probe has an empty dimension");
    const std::vector<vf::u64> q = check_moduli(moduli, s.limbs);
    const i64 nb = static_cast<i64>(py::len(blocks));
    std::vector<py::array> keep;
    keep.reserve(static_cast<size_t>(nb));
    std::vector<const vf::u64*> bp(static_cast<size_t>(nb));
    for (i64 b = 0; b < nb; ++b) {
        py::object item = blocks[static_cast<size_t>(b)];
        if (!py::isinstance<py::array>(item)) throw py::value_error("blocks must be numpy arrays");
        keep.push_back(item.cast<py::array>());
        bp[b] = check_u64(keep.back(), "block", 4);
        for (int k = 0; k < 4; ++k)
            if (keep.back().shape(k) != probe.shape(k))
                throw py::value_error("block " + std::to_string(b) + " must have the probe's shape (dims, 2, L, N)");
    }
    py::array_t<vf::u64> out;
    if (out_obj.is_none()) {
        out = py::array_t<vf::u64>({nb, i64(3), s.limbs, s.n});
    } else {
        if (!py::isinstance<py::array>(out_obj)) throw py::value_error("out must be a numpy array");
        py::array o = out_obj.cast<py::array>();
        check_u64(o, "out", 4);
        if (!o.writeable()) throw py::value_error("out must be writeable");
        if (o.shape(0) != nb || o.shape(1) != 3 || o.shape(2) != s.limbs || o.shape(3) != s.n)
            throw py::value_error("out must be (len(blocks), 3, L, N)");
        if (overlaps(o, probe)) throw py::value_error("out must not overlap the probe");
        for (const auto& blk : keep)
            if (overlaps(o, blk)) throw py::value_error("out must not overlap a block");
        out = py::reinterpret_borrow<py::array_t<vf::u64>>(o);
    }
    std::vector<vf::u64*> op(static_cast<size_t>(nb));
    vf::u64* o0 = out.mutable_data();
    for (i64 b = 0; b < nb; ++b) op[b] = o0 + b * 3 * s.limbs * s.n;
    const auto fn = vf::ckks::mac_for(vf::current_simd());
    {
        py::gil_scoped_release nogil;
        vf::ckks::block_mac(fn, s, P, bp.data(), nb, op.data(), q.data(), n_threads);
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
    m.doc() = "Veilface native matching kernels (header-only C++ in csrc/, runtime SIMD dispatch).";
    m.attr("MAX_INT8_DIM") = vf::kMaxInt8Dim;  // int8 kernels: int32 accumulation stays exact
    m.attr("MAX_IOM_M") = vf::kMaxIomM;        // IoM kernels: per-byte counters must not wrap
    m.attr("QUERY_BLOCK") = vf::kQB;           // queries scored together per gallery pass

    m.def("simd_level", [] { return std::string(vf::simd_name(vf::current_simd())); },
          "SIMD level the kernels currently use: 'avx512', 'avx2' or 'scalar'.");
    m.def("simd_levels", [] {
        std::vector<std::string> v;
        for (auto s : {vf::Simd::Scalar, vf::Simd::AVX2, vf::Simd::AVX512})
            if (vf::cpu_supports(s)) v.emplace_back(vf::simd_name(s));
        return v;
    }, "SIMD levels this CPU supports (always includes 'scalar').");
    m.def("set_simd", [](const std::string& level) {
        std::string prev = vf::simd_name(vf::current_simd());
        if (level == "auto" || level.empty()) { vf::forced_simd().store(-1); return prev; }
        vf::Simd s;
        if (!vf::parse_simd(level, &s))
            throw py::value_error("unknown SIMD level '" + level + "' (use scalar, avx2, avx512 or auto)");
        if (!vf::cpu_supports(s))
            throw py::value_error("this CPU does not support SIMD level '" + level + "'");
        vf::forced_simd().store(static_cast<int>(s));
        return prev;
    }, py::arg("level"), "Force a SIMD level ('scalar', 'avx2', 'avx512') or 'auto'; returns the previous level.");

    m.def("hamming_distances", [](const py::array& q, const py::array& c, int nt) {
        return dense<std::uint8_t, std::int32_t>(q, c, nt, &vf::Table::hamming, "uint8", "hamming");
    }, py::arg("queries"), py::arg("codes"), py::arg("n_threads") = 0);
    m.def("iom_counts", [](const py::array& q, const py::array& c, int nt) {
        return dense<std::uint8_t, std::int32_t>(q, c, nt, &vf::Table::iom, "uint8", "iom");
    }, py::arg("queries"), py::arg("codes"), py::arg("n_threads") = 0);
    m.def("ip_int8", [](const py::array& q, const py::array& c, int nt) {
        return dense<std::int8_t, std::int32_t>(q, c, nt, &vf::Table::int8, "int8", "int8");
    }, py::arg("queries"), py::arg("codes"), py::arg("n_threads") = 0);
    m.def("ip_f32", [](const py::array& q, const py::array& c, int nt) {
        return dense<float, float>(q, c, nt, &vf::Table::f32, "float32", "f32");
    }, py::arg("queries"), py::arg("codes"), py::arg("n_threads") = 0);

    m.def("hamming_topk", [](const py::array& q, const py::array& c, i64 k, int nt) {
        return topk<std::uint8_t, std::int32_t, false>(q, c, k, nt, &vf::Table::hamming,
                                                       &vf::Table::filt_i32_small, "uint8", "hamming");
    }, py::arg("queries"), py::arg("codes"), py::arg("k"), py::arg("n_threads") = 0);
    m.def("iom_topk", [](const py::array& q, const py::array& c, i64 k, int nt) {
        return topk<std::uint8_t, std::int32_t, true>(q, c, k, nt, &vf::Table::iom,
                                                      &vf::Table::filt_i32_large, "uint8", "iom");
    }, py::arg("queries"), py::arg("codes"), py::arg("k"), py::arg("n_threads") = 0);
    m.def("ip_topk_int8", [](const py::array& q, const py::array& c, i64 k, int nt) {
        return topk<std::int8_t, std::int32_t, true>(q, c, k, nt, &vf::Table::int8,
                                                     &vf::Table::filt_i32_large, "int8", "int8");
    }, py::arg("queries"), py::arg("codes"), py::arg("k"), py::arg("n_threads") = 0);
    m.def("ip_topk_f32", [](const py::array& q, const py::array& c, i64 k, int nt) {
        return topk<float, float, true>(q, c, k, nt, &vf::Table::f32, &vf::Table::filt_f32_large,
                                        "float32", "f32");
    }, py::arg("queries"), py::arg("codes"), py::arg("k"), py::arg("n_threads") = 0);

    m.def("ckks_block_mac", &ckks_block_mac, py::arg("blocks"), py::arg("probe"), py::arg("moduli"),
          py::arg("out") = py::none(), py::arg("n_threads") = 0,
          "CKKS ct x ct inner product per block over NTT/RNS arrays: blocks[b] and probe are\n"
          "(dims, 2, L, N) uint64, moduli (L,) uint64; returns (len(blocks), 3, L, N) uint64 equal to\n"
          "SEAL's multiply + add_inplace over the dims.");
    m.def("ckks_max_excess", [](const py::array& a, const py::array& moduli) {
        if (a.ndim() < 2) throw py::value_error("array must be (..., L, N)");
        check_u64(a, "array", a.ndim());
        const i64 limbs = a.shape(a.ndim() - 2), n = a.shape(a.ndim() - 1);
        const std::vector<vf::u64> q = check_moduli(moduli, limbs);
        const i64 count = limbs * n == 0 ? 0 : a.size() / (limbs * n);
        const auto* p = static_cast<const vf::u64*>(a.data());
        vf::u64 r;
        {
            py::gil_scoped_release nogil;
            r = vf::ckks::max_excess(p, count, limbs, n, q.data());
        }
        return r;
    }, py::arg("array"), py::arg("moduli"),
       "0 when every coefficient of a C-contiguous (..., L, N) uint64 array is < its modulus q_l,\n"
       "else the largest excess (coefficient - (q_l - 1)).");
    m.attr("CKKS_MAX_MODULUS") = vf::ckks::kMaxModulus;

    m.def("_stream_xor", [](const py::array& a, int nt) {
        if (!a.dtype().is(py::dtype::of<std::uint8_t>()) || !(a.flags() & py::array::c_style))
            throw py::value_error("array must be a C-contiguous uint8 array");
        const auto* p = static_cast<const std::uint8_t*>(a.data());
        const i64 nbytes = a.size();
        vf::u64 r;
        {
            py::gil_scoped_release nogil;
            r = vf::stream_xor(p, nbytes, nt);
        }
        return r;
    }, py::arg("array"), py::arg("n_threads") = 0,
       "Benchmark helper: xor of all 64-bit words of a C-contiguous uint8 array (measures read bandwidth).");
}
