// Public interface of the C++ lse kernel (no Python / pybind11 types here).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "problem.hpp"

namespace ecif {

// Row / column log-sum-exp of every batch: row and col are (n,) outputs (or null) and, when stats is set,
// the line statistics are written there too.
template <class T>
struct LseProblem : Problem<T> {
    T* row;
    T* col;
    const LineStats<T>* stats = nullptr;
};

// Instruction-set variants compiled into this build, best first (e.g. {"avx2", "generic"}),
// and those usable on the running CPU.
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();
// Resolve "auto" (or "") to the best supported ISA; throws std::invalid_argument for an unknown or
// unsupported name.
std::string resolve_isa(const std::string& isa);

// Compute row/col log-sum-exp. Caller has validated shapes and the plan. num_threads <= 0 means the
// OpenMP default. Safe to call without the GIL.
void lse(const LseProblem<float>& p, const std::string& isa, int num_threads);
void lse(const LseProblem<double>& p, const std::string& isa, int num_threads);

bool has_openmp();
int max_threads();

// ---- Per-ISA task kernels (lse_kernel.hpp compiled once per instruction set) --------------------
//
// A task is (batch b, row tile rt): rows [rt*kTileRows, (rt+1)*kTileRows) of batch b against all of
// the batch's columns. It writes the final row[] of its rows. For a batch with <= kTileRows pairs it
// also writes the final col[] (it saw every row); otherwise it folds its rows into the running column
// state colM/colS/colA (the maximum, the sum of exp(S - maximum) and, with line statistics, the
// batch-local row of the maximum; length = batch size, one copy per thread), which the driver merges.
// `ws` is scratch of lse_workspace_elems(d) elements.
// `vpacked` is null (the task packs V itself) or the batch's V columns prepacked by lse_pack_cols,
// column tile ct at vpacked + ct * kTileCols * d.
constexpr std::int64_t kTileRows = 96;  // rows per task (multiple of every micro-tile height)
constexpr std::int64_t kTileCols = 64;  // columns per score tile (multiple of every micro-tile width)
inline std::int64_t lse_workspace_elems(std::int64_t d) {
    // + room for two [kTileRows] int64 arrays (row and small-batch column args), 8-byte aligned
    return (kTileRows + kTileCols) * d + kTileRows * kTileCols + 10 * kTileRows + 9 * kTileCols + 8;
}

#define ECIF_DECLARE_LSE_TASK_T(T)                                                                      \
    void lse_task(const LseProblem<T>& p, std::int64_t b, std::int64_t rt, T* ws, T* colM, T* colS,   \
                  std::int64_t* colA, const T* vpacked);                                              \
    void lse_pack_cols(const LseProblem<T>& p, std::int64_t b, std::int64_t ct, T* dst);
#define ECIF_DECLARE_LSE_TASK(NS) \
    namespace NS {                \
    ECIF_DECLARE_LSE_TASK_T(float)  \
    ECIF_DECLARE_LSE_TASK_T(double) \
    }

ECIF_DECLARE_LSE_TASK(generic)
#if defined(ECIF_HAVE_AVX2)
ECIF_DECLARE_LSE_TASK(avx2)
#endif
#if defined(ECIF_HAVE_AVX512)
ECIF_DECLARE_LSE_TASK(avx512)
#endif

}  // namespace ecif
