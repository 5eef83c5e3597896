// The problem every op receives, its line statistics and their merge (no Python / pybind11 types here).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace ecif {

// Embeddings, scale and batch plan. Pointers are borrowed; U and V are C-contiguous (n, d). Batch b holds
// pairs perm[offsets[b] .. offsets[b+1]) (perm a permutation of 0..n-1, offsets a CSR split of it:
// validate_plan), and its scores are S = scale * U_b V_b^T. Each op's problem (LseProblem, InfonceProblem,
// DirProblem) extends this one with its outputs and scratch.
template <class T>
struct Problem {
    const T* U;
    const T* V;
    std::int64_t n;
    std::int64_t d;
    T scale;
    const std::int64_t* perm;
    const std::int64_t* offsets;
    std::int64_t num_batches;
};

// Line statistics of S, per pair k (its row, its column): top = the maximum, l = lse - top (in
// [0, log B]) and arg = the batch-local position of the maximum. The kernels that re-evaluate softmax
// weights use exp((S - top) - l), with S - top taken as exactly 0 at arg: the weight at a line's
// maximum is then exp(-l) whatever rounding the recomputed score gets (another micro-kernel or ISA,
// fma contraction), and no weight carries the rounding of a large lse (eps |S|), docs/math.md §8.
// Each array is (n,).
template <class T>
struct LineStats {
    T* rtop;
    T* rl;
    std::int64_t* rarg;
    T* ctop;
    T* cl;
    std::int64_t* carg;
};

// Check that perm is a permutation of 0..n-1 and offsets a valid CSR split of it covering every pair.
// Throws std::invalid_argument (ValueError in Python) naming `op`.
void validate_plan(const char* op, std::int64_t n, const std::int64_t* perm, std::int64_t perm_len,
                   const std::int64_t* offsets, std::int64_t offsets_len);

namespace {  // internal linkage: the per-ISA translation units each compile their own copy

// Fold a tile's line statistics into a running line state (top, arg, rest as (rM, rS): reference and
// sum of exp(x - rM) over the rest). (a, ja): the tile's max and its position; (b2, ts): the rest of
// the tile as (reference, sum). The smaller of the two maxima joins the rest. Ties keep the earlier
// entry (either choice is exact, docs/math.md §8).
template <class T>
inline __attribute__((always_inline)) void line_merge(T& top, std::int64_t& arg, T& rM, T& rS, T a,
                                                      std::int64_t ja, T b2, T ts) {
    constexpr T ninf = -std::numeric_limits<T>::infinity();
    T loser;
    if (a > top) {
        loser = top;
        top = a;
        arg = ja;
    } else {
        loser = a;
    }
    T M = rM;
    if (ts != T(0) && b2 > M) M = b2;
    if (loser > M) M = loser;
    if (M == ninf) {
        rM = M;
        rS = T(0);
        return;
    }
    T s = T(0);
    if (rS != T(0)) s += rS * std::exp(rM - M);
    if (ts != T(0)) s += ts * std::exp(b2 - M);
    if (loser > ninf) s += std::exp(loser - M);
    rM = M;
    rS = s;
}

}  // namespace
}  // namespace ecif
