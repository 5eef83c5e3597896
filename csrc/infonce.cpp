// Driver of the fused InfoNCE forward + backward: pass 1 (row/column log-sum-exps, the lse kernel),
// the loss from them and the diagonal, pass 2 (per-ISA tasks of infonce_kernel.hpp), dV merge.
//
// Parallelisation of pass 2 (why per-thread dV partials): a task owns a row tile of a batch, so its
// dU rows are written by nobody else, but its dV contribution touches every column of the batch.
// The alternatives were (a) per-thread partial dV buffers merged in thread order, or (b) a second
// parallel sweep over column tiles for dV. (b) recomputes every score tile and its exponentials a
// second time: 4 GEMM-sized products in pass 2 instead of 3 (plus pass 1's one), i.e. ~5/4 of (a)'s
// arithmetic. (a) as first written cost num_threads * B * d partial elements (128 MiB at n = 65536,
// d = 256, two threads; 322 MiB peak growth in all). So pass 2 runs in column chunks ("phases",
// chunk_tiles below: ~8 MiB of partials in all, >= 768 columns): in each phase every row tile of a
// batch is computed against the phase's columns only, its dU row sums carried over between phases
// through p.dU (exact: stored and reloaded floats), and the phase's dV partials merged after it.
// No arithmetic is added (only U row tiles are repacked once per phase: ~TR*d per task and phase).
// The tasks of a phase are split statically among the threads, so each thread's partial sums are
// fixed for a given thread count: every output is bitwise reproducible. Batches <= one row tile are
// one task that writes dV directly. Big batches also get their V columns packed once into the score
// product's transposed panel layout (B * dp elements, shared by all row tiles of the batch; packing
// per row tile cost ~0.5 GEMM-equivalents): 64 MiB at n = 65536, d = 256 (202 MiB peak measured).
//
// That is the "few big batches" mode (e.g. "all" negatives). With many batches (the directional ops'
// rule: maxB^2 * 4 * threads <= sum B^2, or one thread) the driver runs the per-batch mode instead
// (infonce_per_batch below): whole batches per thread, score tiles cached, no partials, bitwise
// reproducible, memory O(threads * (B * d + cache)).
#include "infonce.hpp"
#include "parallel.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ecif {

namespace {

template <class T>
using TaskFn = void (*)(const InfonceProblem<T>&, std::int64_t, std::int64_t, T*, T*, bool, double*, const T*,
                        std::int64_t, std::int64_t);
template <class T>
using PackFn = void (*)(const InfonceProblem<T>&, std::int64_t, std::int64_t, T*);

template <class T>
using BatchFn = void (*)(const InfonceProblem<T>&, std::int64_t, T*, T*, bool, double*);

template <class T>
struct IfKernels {
    TaskFn<T> task;
    PackFn<T> pack;
    BatchFn<T> batch;
};

template <class T>
IfKernels<T> infonce_kernels_for(const std::string& isa) {
#define ECIF_IF_KERNELS(NS) \
    IfKernels<T> {                                                                                  \
        static_cast<TaskFn<T>>(&NS::infonce_task), static_cast<PackFn<T>>(&NS::infonce_pack_cols),  \
            static_cast<BatchFn<T>>(&NS::infonce_batch)                                              \
    }
#if defined(ECIF_HAVE_AVX512)
    if (isa == "avx512") return ECIF_IF_KERNELS(avx512);
#endif
#if defined(ECIF_HAVE_AVX2)
    if (isa == "avx2") return ECIF_IF_KERNELS(avx2);
#endif
    return ECIF_IF_KERNELS(generic);
#undef ECIF_IF_KERNELS
}

// Per-batch mode (many batches): thread tid runs batches tid, tid + team, ... (static round robin)
// whole, so nothing is shared between threads and, for a given thread count, every result is
// bitwise reproducible. A batch whose score tiles fit the cache (kCacheBytes per thread, at most
// kCacheTotal in all; float32 B <~ 4000) runs infonce_batch: 3 score-sized products (S once, dU,
// dV) instead of the 4 of the streaming path. A bigger one runs the streaming pieces on its thread:
// its log-sum-exps by the lse kernel (one thread), its V columns packed once, then the pass-2 row
// tiles with the thread's batch buffer as dV destination. Extra memory per thread: the batch
// workspace (~3·B·d: packed V twice and the dV accumulator) plus the cache of the largest fitting
// batch, and, only when some batch does not fit, packed V + dV of the largest such batch (~2·B·d).
constexpr double kCacheBytes = 64.0 * 1024 * 1024;
constexpr double kCacheTotal = 512.0 * 1024 * 1024;

// Loss term of pair k: row LSE + column LSE - 2 t <u_k, v_k> (LSE = top + l; all in double).
template <class T>
double pair_loss(const InfonceProblem<T>& p, std::int64_t k) {
    const T* u = p.U + k * p.d;
    const T* v = p.V + k * p.d;
    double dot = 0.0;
    for (std::int64_t c = 0; c < p.d; ++c) dot += double(u[c]) * double(v[c]);
    const LineStats<T>& st = p.stats;
    return ((double(st.rtop[k]) + double(st.ctop[k])) - 2.0 * double(p.scale) * dot) +
           (double(st.rl[k]) + double(st.cl[k]));
}

template <class T>
InfonceScalars infonce_per_batch(const InfonceProblem<T>& p, const IfKernels<T>& kern, const std::string& isa,
                                 int nt, bool with_scale, const std::vector<std::int64_t>& batches) {
    using i64 = std::int64_t;
    const i64 d = p.d;
    const double climit = std::min(kCacheBytes, kCacheTotal / nt);
    auto fits = [&](i64 B) { return double(infonce_cache_elems(B)) * sizeof(T) <= climit; };
    i64 maxFit = 0, maxBig = 0;
    for (const i64 b : batches) {
        const i64 B = p.offsets[b + 1] - p.offsets[b];
        if (fits(B))
            maxFit = std::max(maxFit, B);
        else
            maxBig = std::max(maxBig, B);
    }
    const size_t wsz = maxFit > 0 ? size_t(infonce_batch_ws_elems(d, maxFit)) : 0;
    const size_t ksz = maxFit > 0 ? size_t(infonce_cache_elems(maxFit)) : 0;
    const size_t vtile = size_t(kIfCols * infonce_padded_d(d));
    const size_t fvsz = maxBig > 0 ? size_t((maxBig + kIfCols - 1) / kIfCols) * vtile : 0;
    const size_t fdsz = size_t(maxBig) * size_t(d);
    const size_t fwsz = maxBig > 0 ? size_t(infonce_workspace_elems(d)) : 0;
    const size_t per = wsz + ksz + fvsz + fdsz + fwsz;
    std::unique_ptr<T[]> buf(new T[size_t(nt) * per]);
    std::vector<double> acc(size_t(nt) * 8, 0.0);  // [0]: dlog_scale, [1]: loss; one cache line per thread
    const i64 nbat = i64(batches.size());
    const i64 npairs = p.offsets[p.num_batches];
    const int team = run_team(nt, [&](int tid, int sz) {
        T* w = buf.get() + size_t(tid) * per;
        T* kb = w + wsz;
        T* fv = kb + ksz;
        T* fdv = fv + fvsz;
        T* fw = fdv + fdsz;
        double* my = acc.data() + size_t(tid) * 8;
        for (i64 k = tid; k < nbat; k += sz) {
            const i64 b = batches[size_t(k)], off = p.offsets[b], B = p.offsets[b + 1] - off;
            if (fits(B)) {
                kern.batch(p, b, w, kb, with_scale, my);
                continue;
            }
            const i64 sub_off[2] = {0, B};
            Problem<T> one = p;  // this batch alone
            one.perm += off;
            one.offsets = sub_off;
            one.num_batches = 1;
            const LseProblem<T> lp{one, nullptr, nullptr, &p.stats};
            lse(lp, isa, 1);
            const i64 nct = (B + kIfCols - 1) / kIfCols, nrt = (B + kIfRows - 1) / kIfRows;
            for (i64 ct = 0; ct < nct; ++ct) kern.pack(p, b, ct, fv + size_t(ct) * vtile);
            std::fill(fdv, fdv + size_t(B) * size_t(d), T(0));
            for (i64 rt = 0; rt < nrt; ++rt) kern.task(p, b, rt, fw, fdv, with_scale, my, fv, 0, nct);
            for (i64 j = 0; j < B; ++j) {
                T* dst = p.dV + p.perm[off + j] * d;
                const T* src = fdv + size_t(j) * size_t(d);
                for (i64 c = 0; c < d; ++c) dst[c] = src[c];
            }
        }
#pragma omp barrier
        // Loss: sum over pairs of row + col - 2 t <u_k, v_k> (dot products in double), static share.
        double loss = 0.0;
        ECIF_FOR_SHARE(q, npairs, tid, sz) loss += pair_loss(p, p.perm[q]);
        my[1] = loss;
    });
    InfonceScalars out{0.0, 0.0};
    for (int t = 0; t < team; ++t) {  // thread order: deterministic
        out.dlog_scale += acc[size_t(t) * 8];
        out.loss += acc[size_t(t) * 8 + 1];
    }
    return out;
}

// Column tiles per phase of the streaming mode: per-thread dV partials of about kChunkBytes in all
// (threads * chunk * d elements), but at least kChunkMinTiles tiles (768 columns) so that the phase
// barriers and the per-chunk repacking of each row tile's U stay negligible. Test hook: the
// environment variable ECIF_INFONCE_CHUNK_TILES (> 0) overrides it.
constexpr double kChunkBytes = 8.0 * 1024 * 1024;
constexpr std::int64_t kChunkMinTiles = 8;
std::int64_t chunk_tiles(std::int64_t d, size_t elem, int nt) {
    if (const char* e = std::getenv("ECIF_INFONCE_CHUNK_TILES")) {
        const long long v = std::atoll(e);
        if (v > 0) return std::int64_t(v);
    }
    const double per_tile = double(nt) * double(kIfCols) * double(std::max<std::int64_t>(d, 1)) * double(elem);
    return std::max<std::int64_t>(kChunkMinTiles, std::int64_t(kChunkBytes / per_tile));
}

template <class T>
InfonceScalars infonce_driver(const InfonceProblem<T>& p, const std::string& isa_in, int num_threads,
                              bool with_scale) {
    using i64 = std::int64_t;
    const std::string isa = resolve_isa(isa_in);
    const IfKernels<T> kern = infonce_kernels_for<T>(isa);
    const i64 nb = p.num_batches, d = p.d;
    InfonceScalars out{0.0, 0.0};

    // Mode choice: the rule of the directional ops (directional.cpp, DirPlan): per-batch mode when
    // one thread runs everything or no batch dominates the work (maxB^2 * 4 * threads <= sum B^2).
    const BatchShape shape(p.offsets, nb);
    const int nt = team_size(num_threads, shape.sq * double(d + 32));
    {
        const std::vector<i64>& batches = shape.batches;
        const i64 maxB = shape.maxB;
        if (batches.empty()) return out;
        // One thread and a single batch too big for the cache (e.g. "all" negatives at large n): the
        // streaming path below (measured ~10 % faster there than the per-batch mode's fallback).
        const bool lone_big = batches.size() == 1 &&
                              double(infonce_cache_elems(maxB)) * sizeof(T) > std::min(kCacheBytes, kCacheTotal / nt);
        if ((nt == 1 && !lone_big) || (nt > 1 && shape.balanced(nt)))
            return infonce_per_batch(p, kern, isa, nt, with_scale, batches);
    }

    // Pass 1: row and column line statistics of every batch (streamed, the lse kernel).
    const LseProblem<T> lp{p, nullptr, nullptr, &p.stats};
    lse(lp, isa, num_threads);


    // Column chunks ("phases"): the big batches' column tiles, in batch order, cut into phases of at
    // most capT tiles (a batch may straddle two or more phases; a phase holds at most one column
    // segment of each batch). Phase k runs every row tile of every batch with a segment in it against
    // that segment only; dV of the phase's columns goes to per-thread partials of capT * kIfCols rows,
    // merged in thread order after the phase. Batches of <= kIfRows pairs (one task each, dV written
    // directly) run in phase 0.
    const i64 capT = chunk_tiles(d, sizeof(T), nt);
    struct Seg { i64 b, ct0, ct1, base; };  // base: first partial row of the segment in its phase
    std::vector<Seg> segs;
    std::vector<i64> phase_seg{0};          // segments of phase k: [phase_seg[k], phase_seg[k+1])
    std::vector<i64> small;                 // batches of <= kIfRows pairs
    std::vector<i64> vpbase(static_cast<size_t>(nb > 0 ? nb : 0), -1);  // first prepacked V tile
    std::vector<i64> pack_b, pack_ct;
    i64 nvtiles = 0, fill = 0;
    for (i64 b = 0; b < nb; ++b) {
        const i64 B = p.offsets[b + 1] - p.offsets[b];
        if (B <= 0) continue;
        if (B <= kIfRows) {
            small.push_back(b);
            continue;
        }
        const i64 nct = (B + kIfCols - 1) / kIfCols;
        vpbase[static_cast<size_t>(b)] = nvtiles;
        for (i64 ct = 0; ct < nct; ++ct) {
            pack_b.push_back(b);
            pack_ct.push_back(ct);
        }
        nvtiles += nct;
        for (i64 ct = 0; ct < nct;) {
            if (fill == capT) {
                phase_seg.push_back(static_cast<i64>(segs.size()));
                fill = 0;
            }
            const i64 take = std::min(nct - ct, capT - fill);
            segs.push_back(Seg{b, ct, ct + take, fill * kIfCols});
            fill += take;
            ct += take;
        }
    }
    phase_seg.push_back(static_cast<i64>(segs.size()));
    const i64 nphase = static_cast<i64>(phase_seg.size()) - 1;  // >= 1 (phase 0 may hold only small batches)
    // Tasks of each phase: (segment, row tile), plus the small batches in phase 0.
    std::vector<i64> task_seg, task_rt, phase_task{0};
    for (i64 k = 0; k < nphase; ++k) {
        if (k == 0)
            for (const i64 b : small) {
                task_seg.push_back(-1 - b);
                task_rt.push_back(0);
            }
        for (i64 s = phase_seg[static_cast<size_t>(k)]; s < phase_seg[static_cast<size_t>(k) + 1]; ++s) {
            const Seg& g = segs[static_cast<size_t>(s)];
            const i64 B = p.offsets[g.b + 1] - p.offsets[g.b];
            const i64 nrt = (B + kIfRows - 1) / kIfRows;
            for (i64 rt = 0; rt < nrt; ++rt) {
                task_seg.push_back(s);
                task_rt.push_back(rt);
            }
        }
        phase_task.push_back(static_cast<i64>(task_seg.size()));
    }
    const i64 npairs = nb > 0 ? p.offsets[nb] : 0;

    const size_t wsz = static_cast<size_t>(infonce_workspace_elems(d));
    const size_t chsz = segs.empty() ? 0 : static_cast<size_t>(capT * kIfCols) * static_cast<size_t>(d);
    // Uninitialised (no serial zero-fill by the calling thread): every thread zeroes its own partial
    // slice before each phase and every packed tile / workspace entry is written before it is read.
    std::unique_ptr<T[]> ws(new T[static_cast<size_t>(nt) * wsz]);
    std::unique_ptr<T[]> part(new T[static_cast<size_t>(nt) * chsz]);
    const size_t vtile = static_cast<size_t>(kIfCols * infonce_padded_d(d));
    std::unique_ptr<T[]> vpack(new T[static_cast<size_t>(nvtiles) * vtile]);
    const i64 npack = static_cast<i64>(pack_b.size());
    std::vector<double> dls(static_cast<size_t>(nt) * 8, 0.0);  // one cache line per thread
    double loss = 0.0;
    int team = 1;

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = 0;
#if defined(_OPENMP)
        tid = omp_get_thread_num();
#pragma omp single nowait
        team = omp_get_num_threads();  // read only after a barrier (the one ending the pack loop)
#endif
        T* mypart = part.get() + static_cast<size_t>(tid) * chsz;
        T* w = ws.get() + static_cast<size_t>(tid) * wsz;
        double* mydls = dls.data() + static_cast<size_t>(tid) * 8;

        // Loss: sum over pairs of row + col - 2 t <u_k, v_k> (dot products in double).
#pragma omp for schedule(static) reduction(+ : loss) nowait
        for (i64 q = 0; q < npairs; ++q) loss += pair_loss(p, p.perm[q]);

        // (implicit barrier: the packed tiles are complete before the tasks)
#pragma omp for schedule(dynamic, 1)
        for (i64 k = 0; k < npack; ++k) {
            const i64 b = pack_b[static_cast<size_t>(k)], ct = pack_ct[static_cast<size_t>(k)];
            kern.pack(p, b, ct, vpack.get() + static_cast<size_t>(vpbase[static_cast<size_t>(b)] + ct) * vtile);
        }

        for (i64 ph = 0; ph < nphase; ++ph) {
            const i64 s0 = phase_seg[static_cast<size_t>(ph)], s1 = phase_seg[static_cast<size_t>(ph) + 1];
            i64 rows = 0;  // partial rows used by this phase
            if (s1 > s0) {
                const Seg& last = segs[static_cast<size_t>(s1 - 1)];
                const i64 Bl = p.offsets[last.b + 1] - p.offsets[last.b];
                rows = last.base + std::min(last.ct1 * kIfCols, Bl) - last.ct0 * kIfCols;
            }
            std::fill(mypart, mypart + static_cast<size_t>(rows) * static_cast<size_t>(d), T(0));
            // Static schedule: which thread adds which task into which partial is fixed by the thread
            // count, so dU, dV and d log_scale are bitwise reproducible for a given count.
#pragma omp for schedule(static)
            for (i64 q = phase_task[static_cast<size_t>(ph)]; q < phase_task[static_cast<size_t>(ph) + 1]; ++q) {
                const i64 sg = task_seg[static_cast<size_t>(q)];
                if (sg < 0) {
                    const i64 b = -1 - sg;
                    const i64 B = p.offsets[b + 1] - p.offsets[b];
                    kern.task(p, b, 0, w, nullptr, with_scale, mydls, nullptr, 0, (B + kIfCols - 1) / kIfCols);
                    continue;
                }
                const Seg& g = segs[static_cast<size_t>(sg)];
                T* dst = mypart + static_cast<size_t>(g.base) * static_cast<size_t>(d);
                const T* vp = vpack.get() + static_cast<size_t>(vpbase[static_cast<size_t>(g.b)]) * vtile;
                kern.task(p, g.b, task_rt[static_cast<size_t>(q)], w, dst, with_scale, mydls, vp, g.ct0, g.ct1);
            }
            // (implicit barrier: every partial of the phase is complete)
            if (rows > 0) {
                // Merge: partial row r of the phase -> its pair's dV row, threads in order.
#pragma omp for schedule(static)
                for (i64 r = 0; r < rows; ++r) {
                    // the segment holding partial row r (few segments per phase: linear scan)
                    i64 s = s0;
                    while (s + 1 < s1 && segs[static_cast<size_t>(s) + 1].base <= r) ++s;
                    const Seg& g = segs[static_cast<size_t>(s)];
                    const i64 j = g.ct0 * kIfCols + (r - g.base);  // column within batch g.b
                    if (j >= p.offsets[g.b + 1] - p.offsets[g.b]) continue;  // gap after a batch's last tile
                    T* dst = p.dV + p.perm[p.offsets[g.b] + j] * d;
                    const T* src0 = part.get() + static_cast<size_t>(r) * static_cast<size_t>(d);
                    for (i64 c = 0; c < d; ++c) dst[c] = src0[c];
                    for (int t = 1; t < team; ++t) {
                        const T* src = part.get() + static_cast<size_t>(t) * chsz + static_cast<size_t>(r) * static_cast<size_t>(d);
                        for (i64 c = 0; c < d; ++c) dst[c] += src[c];
                    }
                }
                // (implicit barrier: the partials are free for the next phase)
            }
        }
    }
    out.loss = loss;
    for (int t = 0; t < team; ++t) out.dlog_scale += dls[static_cast<size_t>(t) * 8];
    return out;
}

}  // namespace

InfonceScalars infonce(const InfonceProblem<float>& p, const std::string& isa, int num_threads, bool with_scale) {
    return infonce_driver(p, isa, num_threads, with_scale);
}
InfonceScalars infonce(const InfonceProblem<double>& p, const std::string& isa, int num_threads, bool with_scale) {
    return infonce_driver(p, isa, num_threads, with_scale);
}

}  // namespace ecif
