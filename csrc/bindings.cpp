// pybind11 bindings for the Veilface kernels (engine._kernels). The Python layer
// (engine/kernels.py) validates and normalises inputs; the checks here are a second line of
// defence so that bad input can never crash the interpreter. The GIL is released for the loops.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

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
