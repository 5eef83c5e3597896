// pybind11 module ecif_fast._C. Receives numpy arrays (zero-copy views of CPU tensors); does not
// link libtorch. Only float32 and float64 are accepted: the Python wrapper upcasts fp16/bf16.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "infonce.hpp"
#include "lse.hpp"

namespace py = pybind11;

namespace {

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    if (a.ndim() == 1) s += ",";
    return s + ")";
}

using Index = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

template <class T>
py::tuple lse_typed(const py::array& U_in, const py::array& V_in, double scale, const Index& perm,
                    const Index& offsets, const std::string& isa, int num_threads) {
    using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;
    // dtype already matches; forcecast only makes a contiguous copy when the input is strided.
    Arr U = Arr::ensure(U_in);
    Arr V = Arr::ensure(V_in);
    if (!U || !V) throw py::error_already_set();
    const std::int64_t n = U.shape(0), d = U.shape(1);
    Arr row(n), col(n);
    ecif::LseProblem<T> p{U.data(), V.data(), n, d, static_cast<T>(scale), perm.data(), offsets.data(),
                          static_cast<std::int64_t>(offsets.size()) - 1, row.mutable_data(), col.mutable_data()};
    const std::string resolved = ecif::resolve_isa(isa);
    {
        py::gil_scoped_release nogil;
        ecif::lse(p, resolved, num_threads);
    }
    return py::make_tuple(row, col);
}

py::tuple lse(const py::array& U, const py::array& V, double scale, const py::array& perm_in,
              const py::array& offsets_in, const std::string& isa, int num_threads) {
    if (U.ndim() != 2 || V.ndim() != 2)
        throw py::value_error("lse: U and V must be 2-D (n, d) arrays, got U of shape " + shape_str(U) +
                              " and V of shape " + shape_str(V));
    if (U.shape(0) != V.shape(0) || U.shape(1) != V.shape(1))
        throw py::value_error("lse: U and V must have the same shape (n, d), got U " + shape_str(U) +
                              " and V " + shape_str(V));
    const bool f32 = U.dtype().equal(py::dtype::of<float>());
    const bool f64 = U.dtype().equal(py::dtype::of<double>());
    if (!f32 && !f64)
        throw py::value_error("lse: U must be float32 or float64, got " + dtype_name(U) +
                              " (convert float16/bfloat16 to float32 first)");
    if (!V.dtype().equal(U.dtype()))
        throw py::value_error("lse: U and V must have the same dtype, got " + dtype_name(U) + " and " +
                              dtype_name(V));
    if (perm_in.ndim() != 1 || offsets_in.ndim() != 1)
        throw py::value_error("lse: perm and offsets must be 1-D, got shapes " + shape_str(perm_in) + " and " +
                              shape_str(offsets_in));
    if (perm_in.dtype().kind() != 'i' && perm_in.dtype().kind() != 'u')
        throw py::value_error("lse: perm must be an integer array, got " + dtype_name(perm_in));
    if (offsets_in.dtype().kind() != 'i' && offsets_in.dtype().kind() != 'u')
        throw py::value_error("lse: offsets must be an integer array, got " + dtype_name(offsets_in));
    Index perm = Index::ensure(perm_in);
    Index offsets = Index::ensure(offsets_in);
    if (!perm || !offsets) throw py::error_already_set();
    ecif::validate_plan(U.shape(0), perm.data(), perm.size(), offsets.data(), offsets.size());
    if (f32) return lse_typed<float>(U, V, scale, perm, offsets, isa, num_threads);
    return lse_typed<double>(U, V, scale, perm, offsets, isa, num_threads);
}

template <class T>
py::tuple infonce_typed(const py::array& U_in, const py::array& V_in, double scale, const Index& perm,
                        const Index& offsets, bool with_scale, const std::string& isa, int num_threads) {
    using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;
    Arr U = Arr::ensure(U_in);
    Arr V = Arr::ensure(V_in);
    if (!U || !V) throw py::error_already_set();
    const std::int64_t n = U.shape(0), d = U.shape(1);
    Arr row(n), col(n), dU({n, d}), dV({n, d});
    ecif::InfonceProblem<T> p{U.data(), V.data(), n, d, static_cast<T>(scale), perm.data(), offsets.data(),
                              static_cast<std::int64_t>(offsets.size()) - 1, row.mutable_data(),
                              col.mutable_data(), dU.mutable_data(), dV.mutable_data()};
    const std::string resolved = ecif::resolve_isa(isa);
    ecif::InfonceScalars r{};
    {
        py::gil_scoped_release nogil;
        r = ecif::infonce(p, resolved, num_threads, with_scale);
    }
    return py::make_tuple(r.loss, dU, dV, with_scale ? py::object(py::float_(r.dlog_scale)) : py::object(py::none()));
}

py::tuple infonce(const py::array& U, const py::array& V, double scale, const py::array& perm_in,
                  const py::array& offsets_in, bool with_scale, const std::string& isa, int num_threads) {
    if (U.ndim() != 2 || V.ndim() != 2)
        throw py::value_error("infonce: U and V must be 2-D (n, d) arrays, got U of shape " + shape_str(U) +
                              " and V of shape " + shape_str(V));
    if (U.shape(0) != V.shape(0) || U.shape(1) != V.shape(1))
        throw py::value_error("infonce: U and V must have the same shape (n, d), got U " + shape_str(U) +
                              " and V " + shape_str(V));
    const bool f32 = U.dtype().equal(py::dtype::of<float>());
    const bool f64 = U.dtype().equal(py::dtype::of<double>());
    if (!f32 && !f64)
        throw py::value_error("infonce: U must be float32 or float64, got " + dtype_name(U) +
                              " (convert float16/bfloat16 to float32 first)");
    if (!V.dtype().equal(U.dtype()))
        throw py::value_error("infonce: U and V must have the same dtype, got " + dtype_name(U) + " and " +
                              dtype_name(V));
    if (perm_in.ndim() != 1 || offsets_in.ndim() != 1)
        throw py::value_error("infonce: perm and offsets must be 1-D, got shapes " + shape_str(perm_in) +
                              " and " + shape_str(offsets_in));
    if (perm_in.dtype().kind() != 'i' && perm_in.dtype().kind() != 'u')
        throw py::value_error("infonce: perm must be an integer array, got " + dtype_name(perm_in));
    if (offsets_in.dtype().kind() != 'i' && offsets_in.dtype().kind() != 'u')
        throw py::value_error("infonce: offsets must be an integer array, got " + dtype_name(offsets_in));
    if (!std::isfinite(scale))
        throw py::value_error("infonce: scale must be finite, got " + std::to_string(scale));
    Index perm = Index::ensure(perm_in);
    Index offsets = Index::ensure(offsets_in);
    if (!perm || !offsets) throw py::error_already_set();
    ecif::validate_plan(U.shape(0), perm.data(), perm.size(), offsets.data(), offsets.size());
    if (f32) return infonce_typed<float>(U, V, scale, perm, offsets, with_scale, isa, num_threads);
    return infonce_typed<double>(U, V, scale, perm, offsets, with_scale, isa, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "ecif_fast C++/OpenMP CPU kernels (float32/float64 numpy arrays in, numpy arrays out).";
    m.def("lse", &lse, py::arg("U"), py::arg("V"), py::arg("scale"), py::arg("perm"), py::arg("offsets"),
          py::kw_only(), py::arg("isa") = "auto", py::arg("num_threads") = 0,
          R"doc(Per-batch row and column log-sum-exp of S = scale * U V^T.

For every batch b (pairs perm[offsets[b]:offsets[b+1]]):
  row[i] = log sum_{j in b} exp(scale <u_i, v_j>),  col[j] = log sum_{i in b} exp(scale <u_i, v_j>).

U, V: (n, d) float32 or float64 arrays of the same dtype; perm: (n,) int64 permutation of 0..n-1;
offsets: (num_batches + 1,) int64, offsets[0] == 0, non-decreasing, offsets[-1] == n.
isa: "auto" or one of supported_isas(). num_threads: <= 0 means the OpenMP default.
Returns (row, col), two (n,) arrays of the input dtype. Streams 96x64 tiles of S; never stores it.
Raises ValueError on bad shapes/dtypes/plan.)doc");
    m.def("infonce", &infonce, py::arg("U"), py::arg("V"), py::arg("scale"), py::arg("perm"), py::arg("offsets"),
          py::arg("with_scale"), py::kw_only(), py::arg("isa") = "auto", py::arg("num_threads") = 0,
          R"doc(Fused contrastive (InfoNCE) loss and its gradients, S = scale * U_b V_b^T per batch.

loss = sum_b sum_{k in b} [LSE_j S_kj - S_kk] + [LSE_i S_ik - S_kk];
G = exp(S - rowLSE) + exp(S - colLSE) - 2I;  dU = scale G V;  dV = scale G^T U;  dlog_scale = sum G o S.
Arguments as for lse(); with_scale: also compute dlog_scale (else None).
Returns (loss: float, dU, dV: (n, d) arrays of the input dtype, dlog_scale: float or None).
Two streaming passes over 96x96 tiles of S (log-sum-exps, then gradients); never stores S.
Raises ValueError on bad shapes/dtypes/plan.)doc");
    m.def("compiled_isas", &ecif::compiled_isas, "Instruction-set variants compiled in, best first.");
    m.def("supported_isas", &ecif::supported_isas, "Compiled variants this CPU can run, best first.");
    m.def("has_openmp", &ecif::has_openmp, "True when the module was built with OpenMP.");
    m.def("max_threads", &ecif::max_threads, "omp_get_max_threads() (1 without OpenMP).");
}
