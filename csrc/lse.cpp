// Plan validation and run-time selection of the instruction-set variant.
#include "lse.hpp"
#include "parallel.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ecif {

void validate_plan(const char* op, std::int64_t n, const std::int64_t* perm, std::int64_t perm_len,
                   const std::int64_t* offsets, std::int64_t offsets_len) {
    const std::string o = std::string(op) + ": ";
    if (perm_len != n)
        throw std::invalid_argument(o + "the batch plan covers " + std::to_string(perm_len) + " pairs but U has " +
                                    std::to_string(n) + " rows (perm must have one entry per pair)");
    if (offsets_len < 1)
        throw std::invalid_argument(o + "offsets must have at least one entry (offsets[0] == 0)");
    if (offsets[0] != 0)
        throw std::invalid_argument(o + "offsets[0] must be 0, got " + std::to_string(offsets[0]));
    for (std::int64_t b = 0; b + 1 < offsets_len; ++b) {
        if (offsets[b + 1] < offsets[b])
            throw std::invalid_argument(o + "offsets must be non-decreasing, but offsets[" + std::to_string(b + 1) +
                                        "] = " + std::to_string(offsets[b + 1]) + " < offsets[" +
                                        std::to_string(b) + "] = " + std::to_string(offsets[b]));
    }
    if (offsets[offsets_len - 1] != n)
        throw std::invalid_argument(o + "offsets[-1] must equal the number of pairs " + std::to_string(n) +
                                    ", got " + std::to_string(offsets[offsets_len - 1]));
    std::vector<char> seen(static_cast<size_t>(n), 0);
    for (std::int64_t k = 0; k < n; ++k) {
        const std::int64_t i = perm[k];
        if (i < 0 || i >= n)
            throw std::invalid_argument(o + "perm[" + std::to_string(k) + "] = " + std::to_string(i) +
                                        " is out of range [0, " + std::to_string(n) + ")");
        if (seen[static_cast<size_t>(i)])
            throw std::invalid_argument(o + "perm is not a permutation: pair " + std::to_string(i) +
                                        " appears twice");
        seen[static_cast<size_t>(i)] = 1;
    }
}

static bool cpu_has(const char* isa) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    const std::string s(isa);
    if (s == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (s == "avx512")
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("fma");
#endif
    return std::string(isa) == "generic";
}

std::vector<std::string> compiled_isas() {
    std::vector<std::string> v;
#if defined(ECIF_HAVE_AVX512)
    v.push_back("avx512");
#endif
#if defined(ECIF_HAVE_AVX2)
    v.push_back("avx2");
#endif
    v.push_back("generic");
    return v;
}

std::vector<std::string> supported_isas() {
    std::vector<std::string> v;
    for (const auto& s : compiled_isas())
        if (cpu_has(s.c_str())) v.push_back(s);
    return v;
}

std::string resolve_isa(const std::string& isa) {
    const auto sup = supported_isas();
    if (isa.empty() || isa == "auto") return sup.front();
    for (const auto& s : sup)
        if (s == isa) return s;
    std::string names;
    for (const auto& s : sup) names += (names.empty() ? "" : ", ") + s;
    throw std::invalid_argument("lse: instruction set '" + isa +
                                "' is not compiled in or not supported by this CPU; usable: " + names);
}

namespace {

template <class T>
struct Kernels {
    void (*task)(const LseProblem<T>&, std::int64_t, std::int64_t, T*, T*, T*, std::int64_t*, const T*);
    void (*pack)(const LseProblem<T>&, std::int64_t, std::int64_t, T*);
};

template <class T>
Kernels<T> kernels_for(const std::string& isa) {
#define ECIF_KERNELS(NS)                                                                              \
    Kernels<T> {                                                                                      \
        static_cast<void (*)(const LseProblem<T>&, std::int64_t, std::int64_t, T*, T*, T*, std::int64_t*,   \
                             const T*)>(                                                              \
            &NS::lse_task),                                                                           \
            static_cast<void (*)(const LseProblem<T>&, std::int64_t, std::int64_t, T*)>(&NS::lse_pack_cols) \
    }
#if defined(ECIF_HAVE_AVX512)
    if (isa == "avx512") return ECIF_KERNELS(avx512);
#endif
#if defined(ECIF_HAVE_AVX2)
    if (isa == "avx2") return ECIF_KERNELS(avx2);
#endif
    return ECIF_KERNELS(generic);
#undef ECIF_KERNELS
}

// OpenMP driver: tasks = (batch, row tile), statically scheduled (round robin in chunks), so that
// for a given thread count every per-thread column partial sees the same tasks in the same order
// and the result is bitwise reproducible (the Gauss-Newton product builds on it). For batches
// larger than one row tile, V is packed once (shared by the batch's tasks) and the columns
// accumulate in per-thread (maximum, sum, position of the maximum) arrays, merged in a final
// parallel pass.
template <class T>
void lse_driver(const LseProblem<T>& p, const std::string& isa, int num_threads) {
    using i64 = std::int64_t;
    const Kernels<T> kern = kernels_for<T>(resolve_isa(isa));
    const i64 nb = p.num_batches;

    std::vector<i64> task_b, task_rt;
    std::vector<i64> bigbase(static_cast<size_t>(nb > 0 ? nb : 0), 0);
    std::vector<i64> bigpos;  // index in the big-batch column space -> position in perm
    std::vector<i64> vpbase(static_cast<size_t>(nb > 0 ? nb : 0), -1);  // first packed V tile
    std::vector<i64> pack_b, pack_ct;
    i64 nbig = 0, nvtiles = 0;
    for (i64 b = 0; b < nb; ++b) {
        const i64 B = p.offsets[b + 1] - p.offsets[b];
        if (B <= 0) continue;
        const i64 nrt = (B + kTileRows - 1) / kTileRows;
        for (i64 rt = 0; rt < nrt; ++rt) {
            task_b.push_back(b);
            task_rt.push_back(rt);
        }
        if (B > kTileRows) {
            bigbase[static_cast<size_t>(b)] = nbig;
            for (i64 j = 0; j < B; ++j) bigpos.push_back(p.offsets[b] + j);
            nbig += B;
            vpbase[static_cast<size_t>(b)] = nvtiles;
            const i64 nct = (B + kTileCols - 1) / kTileCols;
            for (i64 ct = 0; ct < nct; ++ct) {
                pack_b.push_back(b);
                pack_ct.push_back(ct);
            }
            nvtiles += nct;
        }
    }
    const i64 ntasks = static_cast<i64>(task_b.size());
    if (ntasks == 0) return;

    // Work estimate (score entries times the per-entry cost); tiny problems run on one thread, where
    // a parallel region's fork/barriers would cost more than they save (and much more when the
    // cores are oversubscribed).
    const int nt = team_size(num_threads, BatchShape(p.offsets, nb).sq * static_cast<double>(p.d + 32), ntasks);
    const size_t wsz = static_cast<size_t>(lse_workspace_elems(p.d));
    std::vector<T> ws(static_cast<size_t>(nt) * wsz);
    std::vector<T> partM(static_cast<size_t>(nt) * static_cast<size_t>(nbig));
    std::vector<T> partS(static_cast<size_t>(nt) * static_cast<size_t>(nbig));
    std::vector<i64> partA(p.stats ? static_cast<size_t>(nt) * static_cast<size_t>(nbig) : 0);
    const size_t vtile = static_cast<size_t>(kTileCols * p.d);
    std::vector<T> vpack(static_cast<size_t>(nvtiles) * vtile);
    const i64 npack = static_cast<i64>(pack_b.size());
    // Small tasks are grouped so that scheduling overhead stays negligible.
    const i64 chunk = std::max<i64>(1, std::min<i64>(64, ntasks / (static_cast<i64>(nt) * 16)));
    (void)chunk;  // unused without OpenMP
    int team = 1;
    const T ninf = -std::numeric_limits<T>::infinity();

    auto run = [&](i64 t, T* w, T* pM, T* pS, i64* pA) {
        const i64 b = task_b[static_cast<size_t>(t)];
        const i64 o = bigbase[static_cast<size_t>(b)];
        const i64 vb = vpbase[static_cast<size_t>(b)];
        const T* vp = vb >= 0 ? vpack.data() + static_cast<size_t>(vb) * vtile : nullptr;
        kern.task(p, b, task_rt[static_cast<size_t>(t)], w, pM + o, pS + o, pA ? pA + o : nullptr, vp);
    };

    // Barriers only where a later phase reads what other threads wrote: packed V before the tasks,
    // all partial column states before the merge.
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = 0;
#if defined(_OPENMP)
        tid = omp_get_thread_num();
#pragma omp single nowait
        team = omp_get_num_threads();  // read only after a barrier
#endif
        T* pM = partM.data() + static_cast<size_t>(tid) * static_cast<size_t>(nbig);
        T* pS = partS.data() + static_cast<size_t>(tid) * static_cast<size_t>(nbig);
        i64* pA = p.stats ? partA.data() + static_cast<size_t>(tid) * static_cast<size_t>(nbig) : nullptr;
        for (i64 q = 0; q < nbig; ++q) {  // own slice only: no barrier needed
            pM[q] = ninf;
            pS[q] = T(0);
            if (pA) pA[q] = 0;
        }
        T* w = ws.data() + static_cast<size_t>(tid) * wsz;
        if (npack > 0) {
#pragma omp for schedule(dynamic, 1)
            for (i64 k = 0; k < npack; ++k) {
                const i64 b = pack_b[static_cast<size_t>(k)], ct = pack_ct[static_cast<size_t>(k)];
                kern.pack(p, b, ct, vpack.data() + static_cast<size_t>(vpbase[static_cast<size_t>(b)] + ct) * vtile);
            }
        }
        if (nbig > 0) {
#pragma omp for schedule(static, chunk)
            for (i64 t = 0; t < ntasks; ++t) run(t, w, pM, pS, pA);
#pragma omp for schedule(static) nowait
            for (i64 q = 0; q < nbig; ++q) {
                T M = ninf;
                i64 arg = 0;
                for (int t = 0; t < team; ++t) {
                    const size_t k = static_cast<size_t>(t) * static_cast<size_t>(nbig) + static_cast<size_t>(q);
                    if (partM[k] > M) {  // the first thread's position wins ties
                        M = partM[k];
                        if (p.stats) arg = partA[k];
                    }
                }
                const T base = (M - M == T(0)) ? M : T(0);
                T s = T(0);
                for (int t = 0; t < team; ++t) {
                    const size_t k = static_cast<size_t>(t) * static_cast<size_t>(nbig) + static_cast<size_t>(q);
                    if (partS[k] != T(0)) s += partS[k] * std::exp(partM[k] - base);
                }
                if (M == std::numeric_limits<T>::infinity()) s = T(1);
                const i64 pair = p.perm[bigpos[static_cast<size_t>(q)]];
                const T l = std::log(s);
                if (p.col) p.col[pair] = M + l;
                if (p.stats) {
                    p.stats->ctop[pair] = M;
                    p.stats->cl[pair] = l;
                    p.stats->carg[pair] = arg;
                }
            }
        } else {
#pragma omp for schedule(static, chunk) nowait
            for (i64 t = 0; t < ntasks; ++t) run(t, w, pM, pS, pA);
        }
    }
}

}  // namespace

void lse(const LseProblem<float>& p, const std::string& isa, int num_threads) { lse_driver(p, isa, num_threads); }
void lse(const LseProblem<double>& p, const std::string& isa, int num_threads) { lse_driver(p, isa, num_threads); }

bool has_openmp() {
#if defined(_OPENMP)
    return true;
#else
    return false;
#endif
}

int max_threads() {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

}  // namespace ecif
