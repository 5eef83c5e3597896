// pybind11 module ecif_fast._C. Receives numpy arrays (zero-copy views of CPU tensors); does not
// link libtorch. Only float32 and float64 are accepted: the Python wrapper upcasts fp16/bf16.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "directional.hpp"
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
using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;

// U and V: (n, d) arrays of one dtype, float32 or float64. Returns true for float32.
bool check_embeddings(const std::string& o, const py::array& U, const py::array& V) {
    if (U.ndim() != 2 || V.ndim() != 2)
        throw py::value_error(o + ": U and V must be 2-D (n, d) arrays, got U of shape " + shape_str(U) +
                              " and V of shape " + shape_str(V));
    if (U.shape(0) != V.shape(0) || U.shape(1) != V.shape(1))
        throw py::value_error(o + ": U and V must have the same shape (n, d), got U " + shape_str(U) + " and V " +
                              shape_str(V));
    const bool f32 = U.dtype().equal(py::dtype::of<float>());
    if (!f32 && !U.dtype().equal(py::dtype::of<double>()))
        throw py::value_error(o + ": U must be float32 or float64, got " + dtype_name(U) +
                              " (convert float16/bfloat16 to float32 first)");
    if (!V.dtype().equal(U.dtype()))
        throw py::value_error(o + ": U and V must have the same dtype, got " + dtype_name(U) + " and " +
                              dtype_name(V));
    return f32;
}

// The batch plan as int64 arrays, after validate_plan.
struct Plan {
    Index perm, offsets;
};

// perm / offsets: 1-D integer arrays forming a valid plan over the n pairs; scale: finite. The kernels'
// memory safety rests on these checks.
Plan check_plan(const std::string& o, py::ssize_t n, double scale, const py::array& perm_in,
                const py::array& offsets_in) {
    if (perm_in.ndim() != 1 || offsets_in.ndim() != 1)
        throw py::value_error(o + ": perm and offsets must be 1-D, got shapes " + shape_str(perm_in) + " and " +
                              shape_str(offsets_in));
    for (const auto& [name, a] : {std::pair<const char*, const py::array*>{"perm", &perm_in}, {"offsets", &offsets_in}})
        if (a->dtype().kind() != 'i' && a->dtype().kind() != 'u')
            throw py::value_error(o + ": " + name + " must be an integer array, got " + dtype_name(*a));
    if (!std::isfinite(scale)) throw py::value_error(o + ": scale must be finite, got " + std::to_string(scale));
    Plan plan{Index::ensure(perm_in), Index::ensure(offsets_in)};
    if (!plan.perm || !plan.offsets) throw py::error_already_set();
    ecif::validate_plan(o.c_str(), n, plan.perm.data(), plan.perm.size(), plan.offsets.data(), plan.offsets.size());
    return plan;
}

// A C-contiguous view of `a` in dtype T (a copy only for a strided input; the dtype already matches).
template <class T>
Arr<T> contiguous(const py::array& a) {
    Arr<T> out = Arr<T>::ensure(a);
    if (!out) throw py::error_already_set();
    return out;
}

// The common problem fields over U, V (kept alive by the caller) and the plan.
template <class T>
ecif::Problem<T> problem(const Arr<T>& U, const Arr<T>& V, double scale, const Plan& plan) {
    return {U.data(),          V.data(),           U.shape(0), U.shape(1), static_cast<T>(scale),
            plan.perm.data(), plan.offsets.data(), static_cast<std::int64_t>(plan.offsets.size()) - 1};
}

template <class T>
py::tuple lse_typed(const py::array& U_in, const py::array& V_in, double scale, const Plan& plan,
                    const std::string& isa, int num_threads) {
    const Arr<T> U = contiguous<T>(U_in), V = contiguous<T>(V_in);
    Arr<T> row(U.shape(0)), col(U.shape(0));
    const ecif::LseProblem<T> p{problem(U, V, scale, plan), row.mutable_data(), col.mutable_data()};
    const std::string resolved = ecif::resolve_isa(isa);
    {
        py::gil_scoped_release nogil;
        ecif::lse(p, resolved, num_threads);
    }
    return py::make_tuple(row, col);
}

py::tuple lse(const py::array& U, const py::array& V, double scale, const py::array& perm, const py::array& offsets,
              const std::string& isa, int num_threads) {
    const bool f32 = check_embeddings("lse", U, V);
    const Plan plan = check_plan("lse", U.shape(0), scale, perm, offsets);
    if (f32) return lse_typed<float>(U, V, scale, plan, isa, num_threads);
    return lse_typed<double>(U, V, scale, plan, isa, num_threads);
}

template <class T>
py::tuple infonce_typed(const py::array& U_in, const py::array& V_in, double scale, const Plan& plan,
                        bool with_scale, const std::string& isa, int num_threads) {
    const Arr<T> U = contiguous<T>(U_in), V = contiguous<T>(V_in);
    const std::int64_t n = U.shape(0), d = U.shape(1);
    Arr<T> dU({n, d}), dV({n, d});
    std::vector<T> st(static_cast<size_t>(4 * n));
    std::vector<std::int64_t> args(static_cast<size_t>(2 * n));
    const ecif::LineStats<T> stats{st.data(), st.data() + n, args.data(), st.data() + 2 * n, st.data() + 3 * n,
                                   args.data() + n};
    const ecif::InfonceProblem<T> p{problem(U, V, scale, plan), stats, dU.mutable_data(), dV.mutable_data()};
    const std::string resolved = ecif::resolve_isa(isa);
    ecif::InfonceScalars r{};
    {
        py::gil_scoped_release nogil;
        r = ecif::infonce(p, resolved, num_threads, with_scale);
    }
    return py::make_tuple(r.loss, dU, dV, with_scale ? py::object(py::float_(r.dlog_scale)) : py::object(py::none()));
}

py::tuple infonce(const py::array& U, const py::array& V, double scale, const py::array& perm,
                  const py::array& offsets, bool with_scale, const std::string& isa, int num_threads) {
    const bool f32 = check_embeddings("infonce", U, V);
    const Plan plan = check_plan("infonce", U.shape(0), scale, perm, offsets);
    if (f32) return infonce_typed<float>(U, V, scale, plan, with_scale, isa, num_threads);
    return infonce_typed<double>(U, V, scale, plan, with_scale, isa, num_threads);
}

// Validation of the directional ops' arguments; returns whether they are float32 and the plan.
std::pair<bool, Plan> check_directional(const char* op, const py::array& U, const py::array& V, double scale,
                                        const py::array& perm, const py::array& offsets, const py::array& dU,
                                        const py::array& dV, const py::object& ds) {
    const std::string o(op);
    const bool f32 = check_embeddings(o, U, V);
    if (!dU.dtype().equal(U.dtype()) || !dV.dtype().equal(U.dtype()))
        throw py::value_error(o + ": U, V, dU and dV must have the same dtype, got " + dtype_name(U) + ", " +
                              dtype_name(V) + ", " + dtype_name(dU) + " and " + dtype_name(dV));
    if (dU.ndim() != 3 || dV.ndim() != 3 || dU.shape(1) != U.shape(0) || dU.shape(2) != U.shape(1) ||
        dV.shape(0) != dU.shape(0) || dV.shape(1) != U.shape(0) || dV.shape(2) != U.shape(1))
        throw py::value_error(o + ": dU and dV must have shape (Q, n, d) = (Q, " + std::to_string(U.shape(0)) +
                              ", " + std::to_string(U.shape(1)) + "), got dU " + shape_str(dU) + " and dV " +
                              shape_str(dV));
    const py::ssize_t Q = dU.shape(0);
    if (!ds.is_none()) {
        py::array a = py::array::ensure(ds);
        if (!a || a.ndim() != 1 || a.shape(0) != Q || !a.dtype().equal(U.dtype()))
            throw py::value_error(o + ": dlog_scale must be None or a 1-D array of Q = " + std::to_string(Q) +
                                  " entries of the dtype of U");
    }
    return {f32, check_plan(o, U.shape(0), scale, perm, offsets)};
}

template <class T>
struct DirArrays {
    Arr<T> U, V, dU, dV, ds;
    std::vector<T> scratch;
    std::vector<std::int64_t> args;
    ecif::DirProblem<T> p{};
    DirArrays(const py::array& U_in, const py::array& V_in, const py::array& dU_in, const py::array& dV_in,
              const py::object& ds_in, double scale, const Plan& plan)
        : U(contiguous<T>(U_in)), V(contiguous<T>(V_in)), dU(contiguous<T>(dU_in)), dV(contiguous<T>(dV_in)) {
        if (!ds_in.is_none()) ds = contiguous<T>(ds_in);
        const std::int64_t n = U.shape(0), Q = dU.shape(0);
        scratch.assign(size_t(8 * n + 8 * Q * n), T(0));
        args.assign(size_t(2 * n), 0);
        T* s = scratch.data();
        static_cast<ecif::Problem<T>&>(p) = problem(U, V, scale, plan);
        p.Q = Q;
        p.dU = dU.data();
        p.dV = dV.data();
        p.ds = ds_in.is_none() ? nullptr : ds.data();
        p.st = ecif::LineStats<T>{s, s + n, args.data(), s + 2 * n, s + 3 * n, args.data() + n};
        p.rrm = s + 4 * n;
        p.rrl = s + 5 * n;
        p.crm = s + 6 * n;
        p.crl = s + 7 * n;
        T* qs = s + 8 * n;
        p.m = qs;
        p.mc = qs + Q * n;
        p.c1 = qs + 2 * Q * n;
        p.a1 = qs + 3 * Q * n;
        p.rr = qs + 4 * Q * n;
        p.rc = qs + 5 * Q * n;
        p.mcX = qs + 6 * Q * n;
        p.mW = qs + 7 * Q * n;
    }
};

template <class T>
py::tuple reductions_typed(const py::array& U, const py::array& V, double scale, const Plan& plan,
                           const py::array& dU, const py::array& dV, const py::object& ds, bool exact,
                           const std::string& isa, int num_threads) {
    DirArrays<T> A(U, V, dU, dV, ds, scale, plan);
    A.p.exact = exact;
    const std::int64_t n = A.p.n, Q = A.p.Q;
    Arr<T> pos({Q, n}), neg({Q, n});
    const std::string resolved = ecif::resolve_isa(isa);
    {
        py::gil_scoped_release nogil;
        ecif::ecif_reductions(A.p, pos.mutable_data(), neg.mutable_data(), resolved, num_threads);
    }
    return py::make_tuple(pos, neg);
}

template <class T>
py::tuple gn_typed(const py::array& U, const py::array& V, double scale, const Plan& plan, const py::array& dU,
                   const py::array& dV, const py::object& ds, const std::string& isa, int num_threads) {
    DirArrays<T> A(U, V, dU, dV, ds, scale, plan);
    const std::int64_t n = A.p.n, d = A.p.d, Q = A.p.Q;
    Arr<T> gU({Q, n, d}), gV({Q, n, d}), gs(Q);
    A.p.gU = gU.mutable_data();
    A.p.gV = gV.mutable_data();
    std::vector<double> g(size_t(Q), 0.0);
    const std::string resolved = ecif::resolve_isa(isa);
    {
        py::gil_scoped_release nogil;
        ecif::gauss_newton_product(A.p, g.data(), resolved, num_threads);
    }
    for (std::int64_t q = 0; q < Q; ++q) gs.mutable_data()[q] = static_cast<T>(g[size_t(q)]);
    return py::make_tuple(gU, gV, gs);
}

py::tuple ecif_reductions(const py::array& U, const py::array& V, double scale, const py::array& perm,
                          const py::array& offsets, const py::array& dU, const py::array& dV,
                          const py::object& dlog_scale, bool exact, const std::string& isa, int num_threads) {
    const auto [f32, plan] = check_directional("ecif_reductions", U, V, scale, perm, offsets, dU, dV, dlog_scale);
    if (f32) return reductions_typed<float>(U, V, scale, plan, dU, dV, dlog_scale, exact, isa, num_threads);
    return reductions_typed<double>(U, V, scale, plan, dU, dV, dlog_scale, exact, isa, num_threads);
}

py::tuple gauss_newton_product(const py::array& U, const py::array& V, double scale, const py::array& perm,
                               const py::array& offsets, const py::array& dU, const py::array& dV,
                               const py::object& dlog_scale, const std::string& isa, int num_threads) {
    const auto [f32, plan] =
        check_directional("gauss_newton_product", U, V, scale, perm, offsets, dU, dV, dlog_scale);
    if (f32) return gn_typed<float>(U, V, scale, plan, dU, dV, dlog_scale, isa, num_threads);
    return gn_typed<double>(U, V, scale, plan, dU, dV, dlog_scale, isa, num_threads);
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
    m.def("ecif_reductions", &ecif_reductions, py::arg("U"), py::arg("V"), py::arg("scale"), py::arg("perm"),
          py::arg("offsets"), py::arg("dU"), py::arg("dV"), py::arg("dlog_scale"), py::arg("exact"), py::kw_only(),
          py::arg("isa") = "auto", py::arg("num_threads") = 0,
          R"doc(Positive and negative influence parts of every pair along Q query directions (docs/math.md §4).

Per batch, S = scale U_b V_b^T and dS = scale (dU_q V_b^T + U_b dV_q^T) + dlog_scale[q] S:
  positive_k = m_k + mc_k - 2 dS_kk  (m, mc: row / column softmax means of dS);
  negative_k = sum_i Wr_ik (dS_ik - m_i) + sum_j Wc_kj (dS_kj - mc_j), W = p/(1-p) (exact=True,
  line maxima in cancellation-free form) or p (exact=False), zero on the diagonal.
U, V: (n, d); dU, dV: (Q, n, d), all float32 or all float64; dlog_scale: None or (Q,) of that dtype;
perm / offsets: the batch plan (as for lse()). isa, num_threads: as for lse().
Returns (positive, negative): two (Q, n) arrays of the input dtype. Streams 96x96 tiles; three passes.
Raises ValueError on bad shapes/dtypes/plan.)doc");
    m.def("gauss_newton_product", &gauss_newton_product, py::arg("U"), py::arg("V"), py::arg("scale"),
          py::arg("perm"), py::arg("offsets"), py::arg("dU"), py::arg("dV"), py::arg("dlog_scale"), py::kw_only(),
          py::arg("isa") = "auto", py::arg("num_threads") = 0,
          R"doc(Embedding-space Gauss-Newton product (docs/math.md §4), S and dS as for ecif_reductions():
  G = P o (dS - m) + Qc o (dS - mc);  gU = scale G V_b;  gV = scale G^T U_b;  gs = sum G o S.
Arguments as for ecif_reductions() (no exact). Returns (gU, gV: (Q, n, d), gs: (Q,)), input dtype;
gs is zero when dlog_scale is None. Raises ValueError on bad shapes/dtypes/plan.)doc");
    m.def("compiled_isas", &ecif::compiled_isas, "Instruction-set variants compiled in, best first.");
    m.def("supported_isas", &ecif::supported_isas, "Compiled variants this CPU can run, best first.");
    m.def("has_openmp", &ecif::has_openmp, "True when the module was built with OpenMP.");
    m.def("max_threads", &ecif::max_threads, "omp_get_max_threads() (1 without OpenMP).");
}
