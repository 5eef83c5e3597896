// Driver of the fused InfoNCE forward + backward: pass 1 (row/column log-sum-exps, the lse kernel),
// the loss from them and the diagonal, pass 2 (per-ISA tasks of infonce_kernel.hpp), dV merge.
//
// Parallelisation of pass 2 (why per-thread dV partials): a task owns a row tile of a batch, so its
// dU rows are written by nobody else, but its dV contribution touches every column of the batch.
// The alternatives were (a) per-thread partial dV buffers merged at the end, or (b) a second
// parallel sweep over column tiles for dV. (b) recomputes every score tile and its exponentials a
// second time: 4 GEMM-sized products in pass 2 instead of 3 (plus pass 1's one), i.e. ~5/4 of (a)'s
// arithmetic, which alone would eat most of the 1.5x-of-the-GEMM-limit budget. (a) costs
// num_threads * B * d extra elements for each batch larger than one row tile (B > 96; smaller
// batches are handled by one task that writes dV directly) and one O(num_threads * n * d) merge,
// which is memory-bound and negligible next to the O(B^2 d) products. Big batches also get their V
// columns packed once into the score product's transposed panel layout (B * dp elements, shared by
// all row tiles of the batch; packing per row tile cost ~0.5 GEMM-equivalents). At n = 65536,
// d = 256 on two threads that is 128 MiB of float32 partials + 64 MiB of packed V, inside the
// < 256 MiB budget of the issue.
//
// That is the "few big batches" mode (e.g. "all" negatives). With many batches (the directional ops'
// rule: maxB^2 * 4 * threads <= sum B^2, or one thread) the driver runs the per-batch mode instead
// (infonce_per_batch below): whole batches per thread, score tiles cached, no partials, bitwise
// reproducible, memory O(threads * (B * d + cache)).
#include "infonce.hpp"

#include <algorithm>
#include <cmath>
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
using TaskFn = void (*)(const InfonceProblem<T>&, std::int64_t, std::int64_t, T*, T*, bool, double*, const T*);
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
            const LseProblem<T> lp{p.U, p.V, p.n, d, p.scale, p.perm + off, sub_off, 1, p.row, p.col};
            lse(lp, isa, 1);
            const i64 nct = (B + kIfCols - 1) / kIfCols, nrt = (B + kIfRows - 1) / kIfRows;
            for (i64 ct = 0; ct < nct; ++ct) kern.pack(p, b, ct, fv + size_t(ct) * vtile);
            std::fill(fdv, fdv + size_t(B) * size_t(d), T(0));
            for (i64 rt = 0; rt < nrt; ++rt) kern.task(p, b, rt, fw, fdv, with_scale, my, fv);
            for (i64 j = 0; j < B; ++j) {
                T* dst = p.dV + p.perm[off + j] * d;
                const T* src = fdv + size_t(j) * size_t(d);
                for (i64 c = 0; c < d; ++c) dst[c] = src[c];
            }
        }
#pragma omp barrier
        // Loss: sum over pairs of row + col - 2 t <u_k, v_k> (dot products in double), static share.
        double loss = 0.0;
        for (i64 q = tid; q < npairs; q += sz) {
            const i64 k = p.perm[q];
            const T* u = p.U + k * d;
            const T* v = p.V + k * d;
            double dot = 0.0;
            for (i64 c = 0; c < d; ++c) dot += double(u[c]) * double(v[c]);
            loss += double(p.row[k]) + double(p.col[k]) - 2.0 * double(p.scale) * dot;
        }
        my[1] = loss;
    }
    InfonceScalars out{0.0, 0.0};
    for (int t = 0; t < team; ++t) {  // thread order: deterministic
        out.dlog_scale += acc[size_t(t) * 8];
        out.loss += acc[size_t(t) * 8 + 1];
    }
    return out;
}

template <class T>
InfonceScalars infonce_driver(const InfonceProblem<T>& p, const std::string& isa_in, int num_threads,
                              bool with_scale) {
    using i64 = std::int64_t;
    const std::string isa = resolve_isa(isa_in);
    const IfKernels<T> kern = infonce_kernels_for<T>(isa);
    const i64 nb = p.num_batches, n = p.n, d = p.d;
    InfonceScalars out{0.0, 0.0};

    // Mode choice: the rule of the directional ops (directional.cpp, DirPlan): per-batch mode when
    // one thread runs everything or no batch dominates the work (maxB^2 * 4 * threads <= sum B^2).
    {
        std::vector<i64> batches;
        i64 maxB = 0;
        double sq = 0.0;
        for (i64 b = 0; b < nb; ++b) {
            const i64 B = p.offsets[b + 1] - p.offsets[b];
            if (B <= 0) continue;
            batches.push_back(b);
            maxB = std::max(maxB, B);
            sq += double(B) * double(B);
        }
        int nt1 = 1;
#if defined(_OPENMP)
        nt1 = num_threads > 0 ? num_threads : omp_get_max_threads();
        if (sq * double(d + 32) < 4.0e6) nt1 = 1;  // as below
        if (nt1 < 1) nt1 = 1;
#endif
        if (batches.empty()) return out;
        // One thread and a single batch too big for the cache (e.g. "all" negatives at large n): the
        // streaming path below (measured ~10 % faster there than the per-batch mode's fallback).
        const bool lone_big = batches.size() == 1 &&
                              double(infonce_cache_elems(maxB)) * sizeof(T) > std::min(kCacheBytes, kCacheTotal / nt1);
        if ((nt1 == 1 && !lone_big) || (nt1 > 1 && double(maxB) * double(maxB) * 4.0 * nt1 <= sq))
            return infonce_per_batch(p, kern, isa, nt1, with_scale, batches);
    }

    // Pass 1: row and column log-sum-exps of every batch (streamed, the lse kernel).
    const LseProblem<T> lp{p.U, p.V, n, d, p.scale, p.perm, p.offsets, nb, p.row, p.col};
    lse(lp, isa, num_threads);

    std::vector<i64> task_b, task_rt;
    std::vector<i64> bigbase(static_cast<size_t>(nb > 0 ? nb : 0), -1);
    std::vector<i64> bigpos;  // index in the big-batch row space -> position in perm
    std::vector<i64> vpbase(static_cast<size_t>(nb > 0 ? nb : 0), -1);  // first prepacked V tile
    std::vector<i64> pack_b, pack_ct;
    i64 nbig = 0, nvtiles = 0;
    double work = 0.0;
    for (i64 b = 0; b < nb; ++b) {
        const i64 B = p.offsets[b + 1] - p.offsets[b];
        if (B <= 0) continue;
        work += double(B) * double(B) * double(d + 32);
        const i64 nrt = (B + kIfRows - 1) / kIfRows;
        for (i64 rt = 0; rt < nrt; ++rt) {
            task_b.push_back(b);
            task_rt.push_back(rt);
        }
        if (B > kIfRows) {
            bigbase[static_cast<size_t>(b)] = nbig;
            for (i64 j = 0; j < B; ++j) bigpos.push_back(p.offsets[b] + j);
            nbig += B;
            vpbase[static_cast<size_t>(b)] = nvtiles;
            const i64 nct = (B + kIfCols - 1) / kIfCols;
            for (i64 ct = 0; ct < nct; ++ct) {
                pack_b.push_back(b);
                pack_ct.push_back(ct);
            }
            nvtiles += nct;
        }
    }
    const i64 ntasks = static_cast<i64>(task_b.size());
    const i64 npairs = nb > 0 ? p.offsets[nb] : 0;

    int nt = 1;
#if defined(_OPENMP)
    nt = num_threads > 0 ? num_threads : omp_get_max_threads();
    if (work < 4.0e6) nt = 1;  // a parallel region costs more than it saves (see lse.cpp)
    if (nt < 1) nt = 1;
#else
    (void)num_threads;
#endif
    const size_t wsz = static_cast<size_t>(infonce_workspace_elems(d));
    const size_t bigsz = static_cast<size_t>(nbig) * static_cast<size_t>(d);
    // Uninitialised (no serial zero-fill by the calling thread): every thread zeroes its own partial
    // slice (first touch) and every packed tile / workspace entry is written before it is read.
    std::unique_ptr<T[]> ws(new T[static_cast<size_t>(nt) * wsz]);
    std::unique_ptr<T[]> part(new T[static_cast<size_t>(nt) * bigsz]);
    const size_t vtile = static_cast<size_t>(kIfCols * infonce_padded_d(d));
    std::unique_ptr<T[]> vpack(new T[static_cast<size_t>(nvtiles) * vtile]);
    const i64 npack = static_cast<i64>(pack_b.size());
    std::vector<double> dls(static_cast<size_t>(nt) * 8, 0.0);  // one cache line per thread
    const i64 tsz = ntasks / (static_cast<i64>(nt) * 16);
    const i64 chunk = std::max<i64>(1, std::min<i64>(16, tsz));
    (void)chunk;
    double loss = 0.0;
    int team = 1;

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int tid = 0;
#if defined(_OPENMP)
        tid = omp_get_thread_num();
#pragma omp single nowait
        team = omp_get_num_threads();  // read only after a barrier (the one ending the task loop)
#endif
        T* mypart = part.get() + static_cast<size_t>(tid) * bigsz;
        std::fill(mypart, mypart + bigsz, T(0));  // own slice: first touch, no barrier needed
        T* w = ws.get() + static_cast<size_t>(tid) * wsz;
        double* mydls = dls.data() + static_cast<size_t>(tid) * 8;

        // Loss: sum over pairs of row + col - 2 t <u_k, v_k> (dot products in double).
#pragma omp for schedule(static) reduction(+ : loss) nowait
        for (i64 q = 0; q < npairs; ++q) {
            const i64 k = p.perm[q];
            const T* u = p.U + k * d;
            const T* v = p.V + k * d;
            double dot = 0.0;
            for (i64 c = 0; c < d; ++c) dot += double(u[c]) * double(v[c]);
            loss += double(p.row[k]) + double(p.col[k]) - 2.0 * double(p.scale) * dot;
        }

        if (npack > 0) {  // (implicit barrier: the packed tiles are complete before the tasks)
#pragma omp for schedule(dynamic, 1)
            for (i64 k = 0; k < npack; ++k) {
                const i64 b = pack_b[static_cast<size_t>(k)], ct = pack_ct[static_cast<size_t>(k)];
                kern.pack(p, b, ct, vpack.get() + static_cast<size_t>(vpbase[static_cast<size_t>(b)] + ct) * vtile);
            }
        }

#pragma omp for schedule(dynamic, chunk)
        for (i64 q = 0; q < ntasks; ++q) {
            const i64 b = task_b[static_cast<size_t>(q)];
            const i64 base = bigbase[static_cast<size_t>(b)];
            T* dst = base >= 0 ? mypart + static_cast<size_t>(base) * static_cast<size_t>(d) : nullptr;
            const i64 vb = vpbase[static_cast<size_t>(b)];
            const T* vp = vb >= 0 ? vpack.get() + static_cast<size_t>(vb) * vtile : nullptr;
            kern.task(p, b, task_rt[static_cast<size_t>(q)], w, dst, with_scale, mydls, vp);
        }
        // (implicit barrier: every partial is complete)

        if (nbig > 0) {
#pragma omp for schedule(static)
            for (i64 q = 0; q < nbig; ++q) {
                T* dst = p.dV + p.perm[bigpos[static_cast<size_t>(q)]] * d;
                const T* src0 = part.get() + static_cast<size_t>(q) * static_cast<size_t>(d);
                for (i64 c = 0; c < d; ++c) dst[c] = src0[c];
                for (int t = 1; t < team; ++t) {
                    const T* src = part.get() + static_cast<size_t>(t) * bigsz + static_cast<size_t>(q) * static_cast<size_t>(d);
                    for (i64 c = 0; c < d; ++c) dst[c] += src[c];
                }
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
