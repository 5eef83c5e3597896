// The OpenMP team idiom shared by the driver translation units (infonce.cpp, directional.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ecif {

// Run `body(tid, team)` on nt threads (inline when nt == 1); returns the team size. The body may contain
// orphaned `#pragma omp barrier` / worksharing constructs: they bind to this region.
template <class F>
int run_team(int nt, F body) {
    int team = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = 0, sz = 1;
#if defined(_OPENMP)
        tid = omp_get_thread_num();
        sz = omp_get_num_threads();
#pragma omp single nowait
        team = sz;  // read after the region
#endif
        body(tid, sz);
    }
    return team;
}

// Threads for a job of `work` units (sum over batches of B^2 (d + 32)): num_threads (> 0) or OpenMP's
// default, at most `cap`; 1 below 4e6, where a parallel region's fork and barriers cost more than they save
// (and much more when the cores are oversubscribed).
inline int team_size(int num_threads, double work,
                     std::int64_t cap = std::numeric_limits<int>::max()) {
#if defined(_OPENMP)
    if (work < 4.0e6) return 1;
    const std::int64_t nt = num_threads > 0 ? num_threads : omp_get_max_threads();
    return int(std::max<std::int64_t>(1, std::min(nt, cap)));
#else
    (void)num_threads;
    (void)work;
    (void)cap;
    return 1;
#endif
}

// The non-empty batches of a CSR plan, the largest size and the sum of squared sizes.
struct BatchShape {
    std::vector<std::int64_t> batches;
    std::int64_t maxB = 0;
    double sq = 0.0;

    BatchShape(const std::int64_t* offsets, std::int64_t nb) {
        for (std::int64_t b = 0; b < nb; ++b) {
            const std::int64_t B = offsets[b + 1] - offsets[b];
            if (B <= 0) continue;
            batches.push_back(b);
            maxB = std::max(maxB, B);
            sq += double(B) * double(B);
        }
    }

    // Whole batches per thread (per-batch mode) pay off when no batch dominates the work.
    bool balanced(int nt) const { return double(maxB) * double(maxB) * 4.0 * nt <= sq; }
};

}  // namespace ecif

// Static round-robin share of [0, count) for thread tid of a team of sz (deterministic).
#define ECIF_FOR_SHARE(var, count, tid, sz) for (std::int64_t var = (tid); var < (count); var += (sz))
