// Public interface of the C++ directional ops (docs/math.md §4): ecif_reductions and the embedding-space
// Gauss-Newton product. No Python / pybind11 types here.
//
// Both work in "δS form": per batch b, S = t U_b V_b^T and, per query q,
//   δS = t (δU_q V_b^T + U_b δV_q^T) + δs_q S
// are formed tile by tile (never a whole batch block) from packed panels, and every softmax-weighted
// reduction of the twins (torch_ref/reductions.py, torch_ref/gauss_newton.py) is a row or column sum
// over those tiles.
#pragma once

#include <cstdint>
#include <string>

#include "lse.hpp"

namespace ecif {

// One directional problem. dU, dV: (Q, n, d), C-contiguous; ds: (Q,) or null (δs = 0).
// The remaining pointers are (n,) or (Q, n) scratch / outputs owned by the driver's caller; which of
// them a pass reads or writes is listed at dir_pass_task.
template <class T>
struct DirProblem : Problem<T> {
    std::int64_t Q;
    const T* dU;
    const T* dV;
    const T* ds;
    bool exact;
    // line statistics of S, per pair (row i of its batch / column j of its batch), docs/math.md §4:
    // st: top = max, l = lse - top, arg = batch-local position of the max (problem.hpp); the rest (the line
    // without its max; ecif_reductions only) as rest = rm + rl, rm its own max (-inf, rl = 0 if empty).
    LineStats<T> st;
    T* rrm;
    T* rrl;
    T* crm;
    T* crl;
    // (Q, n) per-query sums (pair index k = perm[...]):
    T* m;    // Σ_j P_kj δS_kj                (row means)
    T* mc;   // Σ_i Qc_ik δS_ik               (column means)
    T* c1;   // Σ_j Wc_kj δS_kj               (exact/taylor column weights, row k)
    T* a1;   // Σ_i Wr_ik δS_ik               (row weights, column k)
    T* rr;   // Σ_j R_kj δS_kj                (row softmax without the row max)
    T* rc;   // Σ_i Rc_ik δS_ik               (column softmax without the column max)
    T* mcX;  // Σ_j Wc_kj mc_j
    T* mW;   // Σ_i Wr_ik m_i
    // Gauss-Newton outputs (Q, n, d)
    T* gU;
    T* gV;
};

// ecif_reductions: fills positive/negative (Q, n) (uses every scratch field of p).
void ecif_reductions(const DirProblem<float>& p, float* positive, float* negative, const std::string& isa,
                     int num_threads);
void ecif_reductions(const DirProblem<double>& p, double* positive, double* negative, const std::string& isa,
                     int num_threads);
// gauss_newton_product: fills p.gU, p.gV and gs (Q,) (0 when p.ds is null).
void gauss_newton_product(const DirProblem<float>& p, double* gs, const std::string& isa, int num_threads);
void gauss_newton_product(const DirProblem<double>& p, double* gs, const std::string& isa, int num_threads);

// ---- Per-ISA task kernels (directional_kernel.hpp compiled once per instruction set) --------------
//
// Tiles are kDirRows x kDirCols; a task is (batch b, row tile rt) and sweeps all column tiles of the
// batch. Column tile ct of a batch larger than one row tile is prepacked once by dir_pack_cols into
// `vpk + ct * dir_tile_elems(d, Q)`: [V panels | V rows | δV_0 panels | ... | δV_{Q-1} panels] (see
// tile_common.hpp for the layouts). A batch of <= kDirRows pairs is handled by one task, which packs
// its (single) column tile itself (vpk null) and writes column results directly.
//
// dir_stats_task: row line stats of its rows (final) and column stats folded into (cTop, cArg, cRM,
//   cRS) = (max, arg, reference and sum of the rest's log-sum-exp), batch-local arrays of one thread
//   (null for a one-task batch: written to p.st / p.crm / p.crl directly).
// Both take an optional batch cache (DirCache below).
// dir_pass_task, by mode, reading the line stats:
//   kDirRed2: rows -> p.m, p.c1, p.rr; columns (3 x Q x B at colacc, stride cstride between the
//             (k, q) slices) -> mc, a1, rc;
//   kDirRed3: rows -> p.mcX (reads p.mc); columns -> mW (reads p.m), 1 x Q slices;
//   kDirGn2:  rows -> p.m; columns -> mc, 1 x Q slices;
//   kDirGn3:  rows -> p.gU; columns -> gV as Q slices of (B, d) at colacc (stride cstride);
//             adds Σ G∘S per query to gs[0..Q).
constexpr std::int64_t kDirRows = 96;
constexpr std::int64_t kDirCols = 96;
constexpr std::int64_t kDirPad = 32;
enum DirMode : int { kDirRed2 = 0, kDirRed3 = 1, kDirGn2 = 2, kDirGn3 = 3 };
// Batch cache (per-batch mode, see directional.cpp): `cache` (or null) holds the batch's scaled score
// tiles, tile (rt, ct) at (rt * nct + ct) * kDirRows * kDirCols, followed by Q blocks of δS tiles laid
// out the same way. dir_stats_task and a pass without kDirReadS write S there; kDirReadS reads it
// instead of recomputing; kDirFillD writes δS there, kDirReadD reads it (kDirGn3 then overwrites it).
enum DirCache : int { kDirReadS = 1, kDirFillD = 2, kDirReadD = 4 };
inline std::int64_t dir_padded_d(std::int64_t d) { return (d + kDirPad - 1) / kDirPad * kDirPad; }
inline std::int64_t dir_tile_elems(std::int64_t d, std::int64_t Q) { return (Q + 2) * kDirCols * dir_padded_d(d); }
inline std::int64_t dir_workspace_elems(std::int64_t d, std::int64_t Q) {
    const std::int64_t dp = dir_padded_d(d);
    return dp * (kDirRows * (2 * Q + 2) + kDirCols * (Q + 3)) + 8 * kDirRows * kDirCols +
           Q * 4 * (kDirRows + kDirCols) + 16 * (kDirRows + kDirCols) + 256;
}

#define ECIF_DECLARE_DIR_TASK_T(T)                                                                          \
    void dir_stats_task(const DirProblem<T>& p, std::int64_t b, std::int64_t rt, T* ws, T* cTop,             \
                        std::int64_t* cArg, T* cRM, T* cRS, const T* vpk, T* cache);                         \
    void dir_pass_task(const DirProblem<T>& p, int mode, std::int64_t b, std::int64_t rt, T* ws, T* colacc, \
                       std::int64_t cstride, double* gs, const T* vpk, T* cache, int cflags);               \
    void dir_pack_cols(const DirProblem<T>& p, std::int64_t b, std::int64_t ct, bool rows, T* dst);
#define ECIF_DECLARE_DIR_TASK(NS)   \
    namespace NS {                  \
    ECIF_DECLARE_DIR_TASK_T(float)  \
    ECIF_DECLARE_DIR_TASK_T(double) \
    }

ECIF_DECLARE_DIR_TASK(generic)
#if defined(ECIF_HAVE_AVX2)
ECIF_DECLARE_DIR_TASK(avx2)
#endif
#if defined(ECIF_HAVE_AVX512)
ECIF_DECLARE_DIR_TASK(avx512)
#endif

}  // namespace ecif
