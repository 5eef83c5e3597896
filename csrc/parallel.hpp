// The OpenMP team idiom shared by the driver translation units (infonce.cpp, directional.cpp).
#pragma once

#include <cstdint>

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

}  // namespace ecif

// Static round-robin share of [0, count) for thread tid of a team of sz (deterministic).
#define ECIF_FOR_SHARE(var, count, tid, sz) for (std::int64_t var = (tid); var < (count); var += (sz))
