// Drivers of the directional ops (ecif_reductions, Gauss-Newton product): task lists, OpenMP,
// per-thread column partials and their merge, and the per-pair assembly (docs/math.md §4).
//
// Passes (B = batch size, Q queries; cost in units of B^2 d multiply-adds per batch):
//   ecif_reductions   1. line statistics of S (top, arg, rest, lse per row and column)      1
//                     2. m, mc and the W / R weighted sums of δS                            1 + 2Q
//                     3. Σ_i Wr_ik m_i and Σ_j Wc_kj mc_j (S again, no δS)                  1
//                     then per pair: positive, negative, and the line-maximum terms (dot products)
//   gauss_newton      1. row / column top, l = lse - top and argmax (the lse kernel)         1
//                     2. m, mc                                                              1 + 2Q
//                     3. G per query, gU += t G V, gV += t G^T U, gs += Σ G∘S               1 + 4Q
// One infonce forward + backward is 4, so ecif_reductions with one query costs ~5/4 of it. With
// many batches each fitting the per-thread batch cache (run_batches), the score tiles are computed
// once per batch (their line statistics included): ecif_reductions 1 + 2Q, the Gauss-Newton
// product 1 + 4Q.
//
// Parallelisation (see DirPlan): tasks (batch, row tile) own their rows' results. Column results
// either stay with the thread that runs the whole batch (many batches: per-batch mode) or, for a
// few big batches, go to per-thread partials (threads x K x Q x B, or threads x Q x B x d for gV)
// summed in thread order. Work is shared statically (round robin), so for a given thread count
// every partial sees the same tasks in the same order: results are bitwise reproducible.
#include "directional.hpp"
#include "parallel.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ecif {

#define ECIF_RESTRICT_D __restrict__

namespace {

using i64 = std::int64_t;

template <class T>
struct DirKernels {
    void (*stats)(const DirProblem<T>&, i64, i64, T*, T*, i64*, T*, T*, const T*, T*);
    void (*pass)(const DirProblem<T>&, int, i64, i64, T*, T*, i64, double*, const T*, T*, int);
    void (*pack)(const DirProblem<T>&, i64, i64, bool, T*);
};

template <class T>
DirKernels<T> dir_kernels_for(const std::string& isa) {
#define ECIF_DIR_KERNELS(NS)                                                                           \
    DirKernels<T> {                                                                                     \
        static_cast<void (*)(const DirProblem<T>&, i64, i64, T*, T*, i64*, T*, T*, const T*, T*)>(       \
            &NS::dir_stats_task),                                                                       \
            static_cast<void (*)(const DirProblem<T>&, int, i64, i64, T*, T*, i64, double*, const T*, T*,  \
                                 int)>(&NS::dir_pass_task),                                             \
            static_cast<void (*)(const DirProblem<T>&, i64, i64, bool, T*)>(&NS::dir_pack_cols)         \
    }
#if defined(ECIF_HAVE_AVX512)
    if (isa == "avx512") return ECIF_DIR_KERNELS(avx512);
#endif
#if defined(ECIF_HAVE_AVX2)
    if (isa == "avx2") return ECIF_DIR_KERNELS(avx2);
#endif
    return ECIF_DIR_KERNELS(generic);
#undef ECIF_DIR_KERNELS
}

// Task list and the two ways of sharing column results:
//  * per-batch mode (many batches, none dominating the work, or one thread): a thread takes whole
//    batches (static round robin), packs the batch's column tiles into its own buffer, runs all its
//    row tiles and writes the column results directly: no partials, memory O(threads·B·(Q+2)·d);
//  * partial mode (a few big batches, e.g. "all" negatives): tasks are (batch, row tile); column
//    results of batches over one row tile go to per-thread partials merged in thread order, and the
//    column tiles of those batches are packed once up front, shared by all passes.
template <class T>
struct DirPlan {
    std::vector<i64> task_b, task_rt;
    std::vector<i64> bigbase;  // per batch: offset in the big-batch column space, -1 for one-task batches
    std::vector<i64> bigpos;   // big-batch column index -> position in perm
    std::vector<i64> vpbase;   // per batch: first packed tile, -1 when none
    std::vector<i64> pack_b, pack_ct;
    std::vector<i64> batches;  // non-empty batches (per-batch mode)
    i64 nbig = 0, ntiles = 0, maxB = 0;
    int nt = 1;
    bool per_batch = false;
    std::unique_ptr<T[]> vpack;
    size_t tsz = 0;

    DirPlan(const DirProblem<T>& p, int num_threads, int flops_per_entry) {
        const i64 nb = p.num_batches;
        bigbase.assign(static_cast<size_t>(nb > 0 ? nb : 0), -1);
        vpbase.assign(static_cast<size_t>(nb > 0 ? nb : 0), -1);
        BatchShape shape(p.offsets, nb);
        batches = std::move(shape.batches);
        maxB = shape.maxB;
        nt = team_size(num_threads, shape.sq * double(flops_per_entry) * double(p.d + 32));
        per_batch = nt == 1 || shape.balanced(nt);
        tsz = size_t(dir_tile_elems(p.d, p.Q));
        if (per_batch) return;
        for (const i64 b : batches) {
            const i64 B = p.offsets[b + 1] - p.offsets[b];
            const i64 nrt = (B + kDirRows - 1) / kDirRows;
            for (i64 rt = 0; rt < nrt; ++rt) {
                task_b.push_back(b);
                task_rt.push_back(rt);
            }
            if (B > kDirRows) {
                bigbase[size_t(b)] = nbig;
                for (i64 j = 0; j < B; ++j) bigpos.push_back(p.offsets[b] + j);
                nbig += B;
                vpbase[size_t(b)] = ntiles;
                const i64 nct = (B + kDirCols - 1) / kDirCols;
                for (i64 ct = 0; ct < nct; ++ct) {
                    pack_b.push_back(b);
                    pack_ct.push_back(ct);
                }
                ntiles += nct;
            }
        }
        vpack.reset(new T[size_t(ntiles) * tsz]);
    }
    i64 ntasks() const { return i64(task_b.size()); }
    i64 max_tiles() const { return (maxB + kDirCols - 1) / kDirCols; }
    const T* vp(i64 b) const {
        const i64 v = vpbase[size_t(b)];
        return v >= 0 ? vpack.get() + size_t(v) * tsz : nullptr;
    }
};

template <class T>
void pack_all(const DirProblem<T>& p, const DirKernels<T>& kern, DirPlan<T>& pl, bool rows) {
    const i64 npack = i64(pl.pack_b.size());
    if (npack == 0) return;
    run_team(pl.nt, [&](int tid, int sz) {
        ECIF_FOR_SHARE(k, npack, tid, sz) {
            const i64 b = pl.pack_b[size_t(k)], ct = pl.pack_ct[size_t(k)];
            kern.pack(p, b, ct, rows, pl.vpack.get() + size_t(pl.vpbase[size_t(b)] + ct) * pl.tsz);
        }
    });
}

// One pass over all tasks with per-thread column partials of `per_col` elements per (column, slice)
// and `slices` slices; merged into outs[k][q * n + pair] (slice k * Q + q, per_col == 1) or, when
// outs is null, into the gV rows (slice q, per_col == d).
// Column result `c` (batch-local column j of batch b at offset off) of slice s, per_col elements:
// destination outs[s / Q][q * n + pair] (outs given) or the gV row of query s (outs null).
template <class T>
inline T* col_dest(const DirProblem<T>& p, T* const* outs, int s, i64 pair) {
    if (outs) return outs[s / int(p.Q)] + (s % p.Q) * p.n + pair;
    return p.gV + (i64(s) * p.n + pair) * p.d;
}

// Partial mode: one pass over all tasks; `slices` column results of `per_col` elements per column, written to
// outs[k][q * n + pair] (slice k * Q + q, per_col == 1) or, when outs is null, to the gV rows
// (slice q, per_col == d). Adds the per-query Σ G∘S to gs_out when given.
template <class T>
void run_pass(const DirProblem<T>& p, const DirKernels<T>& kern, const DirPlan<T>& pl, int mode, int slices,
              i64 per_col, T* const* outs, double* gs_out) {
    const i64 ntasks = pl.ntasks(), nbig = pl.nbig, Q = p.Q;
    const size_t wsz = size_t(dir_workspace_elems(p.d, Q));
    const int nt = pl.nt;
    std::unique_ptr<T[]> ws(new T[size_t(nt) * wsz]);
    std::vector<double> gsp(size_t(nt) * size_t(Q + 8), 0.0);
    int team = 1;
    {
        const size_t psz = size_t(slices) * size_t(nbig) * size_t(per_col);  // per thread
        std::unique_ptr<T[]> part(new T[size_t(nt) * psz]);
        const i64 cstride = nbig * per_col;  // between slices
        team = run_team(nt, [&](int tid, int sz) {
            T* mypart = part.get() + size_t(tid) * psz;
            std::fill(mypart, mypart + psz, T(0));
            T* w = ws.get() + size_t(tid) * wsz;
            double* mygs = gsp.data() + size_t(tid) * size_t(Q + 8);
            ECIF_FOR_SHARE(k, ntasks, tid, sz) {
                const i64 b = pl.task_b[size_t(k)];
                const i64 base = pl.bigbase[size_t(b)];
                T* acc = base >= 0 ? mypart + size_t(base) * size_t(per_col) : nullptr;
                kern.pass(p, mode, b, pl.task_rt[size_t(k)], w, acc, cstride, mygs, pl.vp(b), nullptr, 0);
            }
        });
        if (nbig > 0) {
            run_team(nt, [&](int tid, int sz) {
                ECIF_FOR_SHARE(c, nbig, tid, sz) {
                    const i64 k = p.perm[pl.bigpos[size_t(c)]];
                    for (int s = 0; s < slices; ++s) {
                        T* dst = col_dest(p, outs, s, k);
                        const size_t o = (size_t(s) * size_t(nbig) + size_t(c)) * size_t(per_col);
                        for (i64 e = 0; e < per_col; ++e) {
                            T v = part[o + size_t(e)];
                            for (int t = 1; t < team; ++t) v += part[size_t(t) * psz + o + size_t(e)];
                            dst[e] = v;
                        }
                    }
                }
            });
        }
    }
    if (gs_out)
        for (int t = 0; t < team; ++t)
            for (i64 q = 0; q < Q; ++q) gs_out[q] += gsp[size_t(t) * size_t(Q + 8) + size_t(q)];
}

// Final line statistics of a column from its (top, arg, rest reference, rest sum) state (as the
// kernel's stats task writes its rows: l = log(1 + exp(rest - top)), no large lse ever rounded).
template <class T>
void finish_col(const DirProblem<T>& p, i64 k, T top, i64 arg, T rM, T rS) {
    const T lrs = rS > T(0) ? std::log(rS) : T(0);
    p.st.ctop[k] = top;
    p.st.cl[k] = rS > T(0) ? std::log1p(std::exp((rM - top) + lrs)) : T(0);
    p.st.carg[k] = arg;
    p.crm[k] = rS > T(0) ? rM : -std::numeric_limits<T>::infinity();
    p.crl[k] = lrs;
}

template <class T>
void stats_pass(const DirProblem<T>& p, const DirKernels<T>& kern, const DirPlan<T>& pl) {
    const i64 ntasks = pl.ntasks(), nbig = pl.nbig;
    const int nt = pl.nt;
    const size_t wsz = size_t(dir_workspace_elems(p.d, p.Q));
    std::unique_ptr<T[]> ws(new T[size_t(nt) * wsz]);
    const T ninf = -std::numeric_limits<T>::infinity();
    std::unique_ptr<T[]> pT(new T[size_t(nt) * size_t(nbig) * 3]);
    std::unique_ptr<i64[]> pA(new i64[size_t(nt) * size_t(nbig)]);
    const int team = run_team(nt, [&](int tid, int sz) {
        T* top = pT.get() + size_t(tid) * size_t(nbig) * 3;
        T* rM = top + nbig;
        T* rS = rM + nbig;
        i64* arg = pA.get() + size_t(tid) * size_t(nbig);
        for (i64 c = 0; c < nbig; ++c) {
            top[c] = rM[c] = ninf;
            rS[c] = T(0);
            arg[c] = 0;
        }
        T* w = ws.get() + size_t(tid) * wsz;
        ECIF_FOR_SHARE(k, ntasks, tid, sz) {
            const i64 b = pl.task_b[size_t(k)];
            const i64 base = pl.bigbase[size_t(b)];
            if (base >= 0)
                kern.stats(p, b, pl.task_rt[size_t(k)], w, top + base, arg + base, rM + base, rS + base, pl.vp(b),
                           nullptr);
            else
                kern.stats(p, b, pl.task_rt[size_t(k)], w, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
        }
    });
    if (nbig == 0) return;
    run_team(nt, [&](int tid, int sz) {
        ECIF_FOR_SHARE(c, nbig, tid, sz) {
            T top = ninf, rM = ninf, rS = T(0);
            i64 arg = 0;
            for (int t = 0; t < team; ++t) {
                const T* tp = pT.get() + size_t(t) * size_t(nbig) * 3;
                line_merge<T>(top, arg, rM, rS, tp[c], pA[size_t(t) * size_t(nbig) + size_t(c)], tp[nbig + c],
                              tp[2 * nbig + c]);
            }
            finish_col(p, p.perm[pl.bigpos[size_t(c)]], top, arg, rM, rS);
        }
    });
}

// Per-batch mode: the thread that owns a batch runs the steps (passes) one after another on it,
// so the column results of a step are complete before the next one reads them. A step is a pass
// mode, or -1 for the line statistics. When it fits (kCacheBytes per thread, at most kCacheTotal in
// all), the batch's score tiles
// (and, for the Gauss-Newton product, its δS tiles) are kept between the steps instead of being
// recomputed: ecif_reductions then costs 1 + 2Q score-sized products per batch instead of 3 + 2Q,
// the Gauss-Newton product 1 + 4Q instead of 3 + 6Q (its log-sum-exps come from the statistics step).
template <class T>
struct Step {
    int mode;
    int slices;
    i64 per_col;
    T* const* outs;
    int cflags;
};
constexpr double kCacheBytes = 64.0 * 1024 * 1024;
constexpr double kCacheTotal = 512.0 * 1024 * 1024;

template <class T>
void run_batches(const DirProblem<T>& p, const DirKernels<T>& kern, const DirPlan<T>& pl,
                 const std::vector<Step<T>>& steps, bool rows, bool cache_d, double* gs_out) {
    const i64 Q = p.Q, maxB = pl.maxB;
    const int nt = pl.nt;
    const T ninf = -std::numeric_limits<T>::infinity();
    const size_t wsz = size_t(dir_workspace_elems(p.d, Q));
    const size_t vsz = size_t(pl.max_tiles()) * pl.tsz;
    size_t csz = 3 * size_t(maxB);
    for (const auto& st : steps) csz = std::max(csz, size_t(st.slices) * size_t(maxB) * size_t(st.per_col));
    const i64 mt = (maxB + kDirRows - 1) / kDirRows, mct = pl.max_tiles();
    const size_t ksz = size_t(1 + (cache_d ? Q : 0)) * size_t(mt * mct) * size_t(kDirRows * kDirCols);
    const bool use_cache = double(ksz) * sizeof(T) <= std::min(kCacheBytes, kCacheTotal / nt);
    std::unique_ptr<T[]> ws(new T[size_t(nt) * wsz]);
    std::unique_ptr<T[]> vbuf(new T[size_t(nt) * vsz]);
    std::unique_ptr<T[]> cbuf(new T[size_t(nt) * csz]);
    std::unique_ptr<i64[]> abuf(new i64[size_t(nt) * size_t(maxB)]);
    std::unique_ptr<T[]> kbuf(new T[use_cache ? size_t(nt) * ksz : 0]);
    std::vector<double> gsp(size_t(nt) * size_t(Q + 8), 0.0);
    const i64 nbat = i64(pl.batches.size());
    const int team = run_team(nt, [&](int tid, int sz) {
        T* w = ws.get() + size_t(tid) * wsz;
        T* vb = vbuf.get() + size_t(tid) * vsz;
        T* cb = cbuf.get() + size_t(tid) * csz;
        i64* ab = abuf.get() + size_t(tid) * size_t(maxB);
        T* kb = use_cache ? kbuf.get() + size_t(tid) * ksz : nullptr;
        double* mygs = gsp.data() + size_t(tid) * size_t(Q + 8);
        ECIF_FOR_SHARE(k, nbat, tid, sz) {
            const i64 b = pl.batches[size_t(k)], off = p.offsets[b], B = p.offsets[b + 1] - off;
            const bool single = B <= kDirRows;  // one task: packs its tile, writes its columns
            const i64 nct = (B + kDirCols - 1) / kDirCols, nrt = (B + kDirRows - 1) / kDirRows;
            if (!single)
                for (i64 ct = 0; ct < nct; ++ct) kern.pack(p, b, ct, rows, vb + size_t(ct) * pl.tsz);
            for (const auto& st : steps) {
                if (st.mode < 0) {
                    if (single) {
                        kern.stats(p, b, 0, w, nullptr, nullptr, nullptr, nullptr, nullptr, kb);
                        continue;
                    }
                    T* top = cb;
                    T* rM = cb + B;
                    T* rS = cb + 2 * B;
                    for (i64 j = 0; j < B; ++j) {
                        top[j] = rM[j] = ninf;
                        rS[j] = T(0);
                        ab[j] = 0;
                    }
                    for (i64 rt = 0; rt < nrt; ++rt) kern.stats(p, b, rt, w, top, ab, rM, rS, vb, kb);
                    for (i64 j = 0; j < B; ++j) finish_col(p, p.perm[off + j], top[j], ab[j], rM[j], rS[j]);
                    continue;
                }
                if (single) {
                    kern.pass(p, st.mode, b, 0, w, nullptr, 0, mygs, nullptr, kb, st.cflags);
                    continue;
                }
                const size_t used = size_t(st.slices) * size_t(B) * size_t(st.per_col);
                std::fill(cb, cb + used, T(0));
                for (i64 rt = 0; rt < nrt; ++rt)
                    kern.pass(p, st.mode, b, rt, w, cb, B * st.per_col, mygs, vb, kb, st.cflags);
                for (int s = 0; s < st.slices; ++s)
                    for (i64 j = 0; j < B; ++j) {
                        T* dst = col_dest(p, st.outs, s, p.perm[off + j]);
                        const T* src = cb + (size_t(s) * size_t(B) + size_t(j)) * size_t(st.per_col);
                        for (i64 e = 0; e < st.per_col; ++e) dst[e] = src[e];
                    }
            }
        }
    });
    if (gs_out)
        for (int t = 0; t < team; ++t)
            for (i64 q = 0; q < Q; ++q) gs_out[q] += gsp[size_t(t) * size_t(Q + 8) + size_t(q)];
}

// a·b + c·e in double (the single-entry δS values); independent partial sums keep the FMA
// pipeline busy (a plain loop is one long dependency chain: no vectorisation of FP reductions).
template <class T>
double dot2(const T* ECIF_RESTRICT_D a, const T* ECIF_RESTRICT_D b, const T* ECIF_RESTRICT_D c,
            const T* ECIF_RESTRICT_D e, i64 d) {
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    i64 k = 0;
    for (; k + 8 <= d; k += 8)
        for (int l = 0; l < 8; ++l)
            s[l] += double(a[k + l]) * double(b[k + l]) + double(c[k + l]) * double(e[k + l]);
    for (; k < d; ++k) s[0] += double(a[k]) * double(b[k]) + double(c[k]) * double(e[k]);
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <class T>
void reductions_driver(const DirProblem<T>& p, T* positive, T* negative, const std::string& isa_in,
                       int num_threads) {
    const std::string isa = resolve_isa(isa_in);
    const DirKernels<T> kern = dir_kernels_for<T>(isa);
    DirPlan<T> pl(p, num_threads, 4 + 2 * int(p.Q));
    const i64 n = p.n, d = p.d, Q = p.Q, nb = p.num_batches;
    const T t = p.scale;
    if (pl.per_batch) {
        T* o2[3] = {p.mc, p.a1, p.rc};
        T* o3[1] = {p.mW};
        const std::vector<Step<T>> steps{{-1, 0, 0, nullptr, 0},
                                         {kDirRed2, 3 * int(Q), 1, o2, kDirReadS},
                                         {kDirRed3, int(Q), 1, o3, kDirReadS}};
        run_batches(p, kern, pl, steps, false, false, nullptr);
    } else {
        pack_all(p, kern, pl, false);
        stats_pass(p, kern, pl);
        T* o2[3] = {p.mc, p.a1, p.rc};
        run_pass(p, kern, pl, kDirRed2, 3 * int(Q), 1, o2, nullptr);
        T* o3[1] = {p.mW};
        run_pass(p, kern, pl, kDirRed3, int(Q), 1, o3, nullptr);
    }
    // Per pair: positive, the regular negative terms, and the two line-maximum terms (docs/math.md §4,
    // torch_ref/softmax.py): p_ia (δS_ia - Σ_{j≠a} r_ij δS_ij) credited to the row's max pair a and
    // the column analogue. They are computed per pair in parallel, then scattered in a fixed order.
    const i64 npairs = nb > 0 ? p.offsets[nb] : 0;
    std::vector<i64> bof(static_cast<size_t>(npairs), 0);  // batch offset of every position in perm
    for (i64 b = 0; b < nb; ++b)
        for (i64 q = p.offsets[b]; q < p.offsets[b + 1]; ++q) bof[size_t(q)] = p.offsets[b];
    const bool exact = p.exact;
    std::vector<T> spR(exact ? size_t(Q * npairs) : 0), spC(exact ? size_t(Q * npairs) : 0);
    std::vector<i64> tgR(exact ? size_t(npairs) : 0), tgC(exact ? size_t(npairs) : 0);
    int nt = pl.nt;
    if (double(npairs) * double(Q) * double(d + 8) < 1.0e5) nt = 1;
    run_team(nt, [&](int tid, int sz) {
        ECIF_FOR_SHARE(pos, npairs, tid, sz) {
            const i64 k = p.perm[pos], o = bof[size_t(pos)], il = pos - o;
            const T* u = p.U + k * d;
            const T* v = p.V + k * d;
            const double skk = double(t) * 0.5 * dot2(u, v, u, v, d);
            i64 ka = -1, kb = -1;
            if (exact) {
                if (p.st.rarg[k] != il) ka = p.perm[o + p.st.rarg[k]];
                if (p.st.carg[k] != il) kb = p.perm[o + p.st.carg[k]];
                tgR[size_t(pos)] = ka;
                tgC[size_t(pos)] = kb;
            }
            const double pr = exact ? std::exp(-double(p.st.rl[k])) : 0.0;  // the weight at the row max
            const double pc = exact ? std::exp(-double(p.st.cl[k])) : 0.0;
            for (i64 q = 0; q < Q; ++q) {
                const T* du = p.dU + (q * n + k) * d;
                const T* dv = p.dV + (q * n + k) * d;
                const double dsq = p.ds ? double(p.ds[q]) : 0.0;
                const double dkk = double(t) * dot2(du, v, u, dv, d) + dsq * skk;
                const i64 e = q * n + k;
                positive[e] = T(double(p.m[e]) + double(p.mc[e]) - 2.0 * dkk);
                negative[e] = (p.a1[e] - p.mW[e]) + (p.c1[e] - p.mcX[e]);
                if (ka >= 0) {  // row k's max at column pair ka
                    const double dsa = double(t) * dot2(du, p.V + ka * d, u, p.dV + (q * n + ka) * d, d) +
                                       dsq * double(p.st.rtop[k]);
                    spR[size_t(q * npairs + pos)] = T(pr * (dsa - double(p.rr[e])));
                }
                if (kb >= 0) {  // column k's max at row pair kb
                    const double dsb = double(t) * dot2(p.dU + (q * n + kb) * d, v, p.U + kb * d, dv, d) +
                                       dsq * double(p.st.ctop[k]);
                    spC[size_t(q * npairs + pos)] = T(pc * (dsb - double(p.rc[e])));
                }
            }
        }
    });
    if (exact) {
        for (i64 q = 0; q < Q; ++q)
            for (i64 pos = 0; pos < npairs; ++pos) {
                if (tgR[size_t(pos)] >= 0) negative[q * n + tgR[size_t(pos)]] += spR[size_t(q * npairs + pos)];
                if (tgC[size_t(pos)] >= 0) negative[q * n + tgC[size_t(pos)]] += spC[size_t(q * npairs + pos)];
            }
    }
}

template <class T>
void gn_driver(const DirProblem<T>& p, double* gs, const std::string& isa_in, int num_threads) {
    const std::string isa = resolve_isa(isa_in);
    const DirKernels<T> kern = dir_kernels_for<T>(isa);
    DirPlan<T> pl(p, num_threads, 3 + 6 * int(p.Q));
    for (i64 q = 0; q < p.Q; ++q) gs[q] = 0.0;
    T* o2[1] = {p.mc};
    if (pl.per_batch) {  // line statistics from the cached score tiles, no extra product
        const std::vector<Step<T>> steps{{-1, 0, 0, nullptr, 0},
                                         {kDirGn2, int(p.Q), 1, o2, kDirReadS | kDirFillD},
                                         {kDirGn3, int(p.Q), p.d, nullptr, kDirReadS | kDirReadD}};
        run_batches(p, kern, pl, steps, true, true, gs);
    } else {
        const LseProblem<T> lp{p, nullptr, nullptr, &p.st};
        lse(lp, isa, num_threads);
        pack_all(p, kern, pl, true);
        run_pass(p, kern, pl, kDirGn2, int(p.Q), 1, o2, nullptr);
        run_pass<T>(p, kern, pl, kDirGn3, int(p.Q), p.d, nullptr, gs);
    }
    if (!p.ds)
        for (i64 q = 0; q < p.Q; ++q) gs[q] = 0.0;
}

}  // namespace

void ecif_reductions(const DirProblem<float>& p, float* positive, float* negative, const std::string& isa,
                     int num_threads) {
    reductions_driver(p, positive, negative, isa, num_threads);
}
void ecif_reductions(const DirProblem<double>& p, double* positive, double* negative, const std::string& isa,
                     int num_threads) {
    reductions_driver(p, positive, negative, isa, num_threads);
}
void gauss_newton_product(const DirProblem<float>& p, double* gs, const std::string& isa, int num_threads) {
    gn_driver(p, gs, isa, num_threads);
}
void gauss_newton_product(const DirProblem<double>& p, double* gs, const std::string& isa, int num_threads) {
    gn_driver(p, gs, isa, num_threads);
}

}  // namespace ecif
