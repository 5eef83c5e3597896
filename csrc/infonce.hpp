// Public interface of the C++ fused InfoNCE forward + backward (no Python / pybind11 types here).
#pragma once

#include <cstdint>
#include <string>

#include "lse.hpp"

namespace ecif {

// One fused InfoNCE problem; dU, dV are C-contiguous (n, d) outputs.
//   loss      = sum_b sum_{k in b} [LSE_j S_kj - S_kk] + [LSE_i S_ik - S_kk],  S = scale * U_b V_b^T
//   G         = P + Qc - 2 I      (P, Qc: row and column softmax of S, per batch)
//   dU        = scale * G V,  dV = scale * G^T U,  dlog_scale = sum G o S
// stats: (n,) scratch for the per-pair line statistics of S (pass 1, computed by the driver; problem.hpp).
template <class T>
struct InfonceProblem : Problem<T> {
    LineStats<T> stats;
    T* dU;
    T* dV;
};

struct InfonceScalars {
    double loss;
    double dlog_scale;
};

// Caller has validated shapes and the plan. num_threads <= 0 means the OpenMP default. Safe to call
// without the GIL. Writes dU, dV (every row of a pair in some batch; a valid plan covers all pairs).
// with_scale = false skips the sum G o S (dlog_scale is then 0).
InfonceScalars infonce(const InfonceProblem<float>& p, const std::string& isa, int num_threads, bool with_scale);
InfonceScalars infonce(const InfonceProblem<double>& p, const std::string& isa, int num_threads, bool with_scale);

// ---- Per-ISA task kernels (infonce_kernel.hpp compiled once per instruction set) ------------------
//
// Pass 2 task = (batch b, row tile rt, column tiles [ct0, ct1)): rows [rt*kIfRows, (rt+1)*kIfRows) of
// batch b against the batch's columns [ct0*kIfCols, min(ct1*kIfCols, B)), given the final row/col
// line statistics. It writes dU of its rows summed over column tiles 0 .. ct1-1: with ct0 > 0 it first
// reloads the sum of tiles 0 .. ct0-1 from p.dU (written by the task of the previous column chunk;
// float values stored and reloaded exactly, so chunking does not change dU by a bit). The dV
// contribution of column tile ct goes to dVdst + ((ct-ct0)*kIfCols + j)*d (a per-thread partial
// buffer of the chunk) when dVdst is not null, else (a batch with <= kIfRows pairs: one task sees
// every row; ct0 = 0, ct1 = all tiles) straight to p.dV[perm[...]]. Adds sum G o S of its rows to *dls (when with_scale).
// `ws` is scratch of infonce_workspace_elems(d) elements. `vpacked` is null (the task packs V itself)
// or the batch's V columns prepacked by infonce_pack_cols, column tile ct at vpacked + ct*kIfCols*dp
// (dp = infonce_padded_d(d)); prepacking once per batch spares every row tile the strided transpose.
constexpr std::int64_t kIfRows = 96;  // multiple of every micro-tile height (6, 12) and width (8..32)
constexpr std::int64_t kIfCols = 96;
constexpr std::int64_t kIfPad = 32;   // d is padded to a multiple of this in the packed panels
inline std::int64_t infonce_padded_d(std::int64_t d) { return (d + kIfPad - 1) / kIfPad * kIfPad; }
inline std::int64_t infonce_workspace_elems(std::int64_t d) {
    const std::int64_t dp = infonce_padded_d(d);
    return 3 * (kIfRows + kIfCols) * dp + kIfRows * kIfCols + 4 * kIfRows + 7 * kIfCols + 64;
}

// Per-batch mode (many batches, see infonce.cpp): infonce_batch runs the whole batch b on the
// calling thread. Pass 1 computes every scaled score tile once into `cache` (tile (rt, ct) at
// (rt * nct + ct) * kIfRows * kIfCols, infonce_cache_elems(B) elements) and folds the row and column
// line statistics from it (top and l written to p.stats, no argmax: pass 2 reads the same tiles);
// pass 2 forms t*G in each cached tile and accumulates dU (written per row tile) and dV (in the
// workspace, written at the end): nothing is shared with other threads. `ws`:
// infonce_batch_ws_elems(d, B) elements (any B' >= B works).
inline std::int64_t infonce_cache_elems(std::int64_t B) {
    const std::int64_t nrt = (B + kIfRows - 1) / kIfRows, nct = (B + kIfCols - 1) / kIfCols;
    return nrt * nct * kIfRows * kIfCols;
}
inline std::int64_t infonce_batch_ws_elems(std::int64_t d, std::int64_t B) {
    const std::int64_t dp = infonce_padded_d(d);
    const std::int64_t Bp = (B + kIfCols - 1) / kIfCols * kIfCols;
    return 3 * (Bp + kIfRows) * dp + 2 * Bp + 6 * kIfRows + 8 * kIfCols + 64;
}

#define ECIF_DECLARE_INFONCE_TASK_T(T)                                                                 \
    void infonce_task(const InfonceProblem<T>& p, std::int64_t b, std::int64_t rt, T* ws, T* dVdst, \
                      bool with_scale, double* dls, const T* vpacked, std::int64_t ct0, std::int64_t ct1); \
    void infonce_pack_cols(const InfonceProblem<T>& p, std::int64_t b, std::int64_t ct, T* dst);     \
    void infonce_batch(const InfonceProblem<T>& p, std::int64_t b, T* ws, T* cache, bool with_scale, double* dls);
#define ECIF_DECLARE_INFONCE_TASK(NS) \
    namespace NS {                    \
    ECIF_DECLARE_INFONCE_TASK_T(float)  \
    ECIF_DECLARE_INFONCE_TASK_T(double) \
    }

ECIF_DECLARE_INFONCE_TASK(generic)
#if defined(ECIF_HAVE_AVX2)
ECIF_DECLARE_INFONCE_TASK(avx2)
#endif
#if defined(ECIF_HAVE_AVX512)
ECIF_DECLARE_INFONCE_TASK(avx512)
#endif

}  // namespace ecif
