// One lse task (batch b, row tile rt) of S = t * U_b V_b^T: tiled, streaming, online log-sum-exp.
//
// Compiled once per instruction-set variant: the including .cpp defines ECIF_ISA_NS (namespace),
// ECIF_VEC_BYTES (SIMD width) and optionally ECIF_MR (micro-tile height), and is itself compiled
// with the matching -m flags. No STL containers or other shared inline code is instantiated here
// (see vec.hpp), so variants never share a symbol. OpenMP and the final merge live in lse.cpp.
//
// A task packs its <= kTileRows rows of U into MR-row panels, then sweeps the batch's columns in
// tiles of kTileCols (V packed into NR-column panels, by the task or once per batch by the driver).
// Per tile:
//   1. score tile with a register-blocked MR x NR micro-kernel (KC-blocked inner dimension);
//   2. scale, mask columns past the batch, and take the tile's row maxima a_i and column maxima b_j;
//   3. e_ij = exp(s_ij - a_i) gives the row sums. Column sums reuse them:
//        exp(s_ij - b_j) = e_ij * exp(a_i - tmax) * exp(tmax - b_j),   tmax = max_i a_i,
//      which is safe when tmax - min_j b_j <= kReuseRange (the only factor > 1 is bounded, and a
//      term that underflows is < exp(kReuseRange - 87) relative to its column's max). Otherwise
//      (huge logit spread, +-inf) the column sums take their own exp(s_ij - b_j): one exponential
//      per score in the common case, two in the rare one;
//   4. fold (a_i, rowsum_i) and (b_j, colsum_j) into the running (reference, sum) states.
// The references are the running maxima, so with line statistics (p.stats, problem.hpp) top = reference
// and l = log(sum) come for free; the position of each maximum is tracked alongside (a row's first
// position of its tile maximum when that beats the running one; a column's row index, vectorised).
#include <cmath>
#include <cstdint>

#include "lse.hpp"
#include "tile_common.hpp"
#include "vec.hpp"

#if !defined(ECIF_ISA_NS)
#error "define ECIF_ISA_NS before including lse_kernel.hpp"
#endif
#if !defined(ECIF_MR)
#define ECIF_MR 6
#endif

namespace ecif {
namespace ECIF_ISA_NS {
namespace {

using i64 = std::int64_t;

template <class T>
struct Cfg {
    static constexpr int W = Vec<T>::W;  // lanes per vector
    static constexpr int MR = ECIF_MR;   // micro-tile rows
    static constexpr int NV = 2;         // vectors per micro-tile row
    static constexpr int NR = NV * W;    // micro-tile cols
    static constexpr int TR = int(kTileRows);
    static constexpr int TC = int(kTileCols);
    static constexpr int KC = 256;  // inner-dimension block (keeps a V panel slice in L1)
    static_assert(TR % MR == 0, "kTileRows must be a multiple of MR");
    static_assert(TC % NR == 0, "kTileCols must be a multiple of NR");
    static_assert(TR % W == 0, "kTileRows must be a multiple of the vector width");
};

template <class T>
struct Lim;
template <>
struct Lim<float> {
    static constexpr float exp_lo = -87.0f;     // exp(lo) is still a normal float
    static constexpr float reuse_range = 40.0f;  // see 3. above: exp(40 - 87) ~ 4e-21
};
template <>
struct Lim<double> {
    static constexpr double exp_lo = -708.0;
    static constexpr double reuse_range = 500.0;  // exp(500 - 708) ~ 5e-91
};

template <class T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();
template <class T>
constexpr T kPosInf = std::numeric_limits<T>::infinity();

ECIF_INLINE i64 imin(i64 a, i64 b) { return tc_imin(a, b); }

// Subtraction base for exp(): the reference when finite, else 0 (all -inf so far, or +inf which
// the callers special-case), so that exp() never sees inf - inf.
template <class V>
ECIF_INLINE V vfinite_or_zero(V m) {
    return vselect(m - m == V{}, m, V{});
}

// Fold (ref2, sum2) into the running (ref, sum) states, lane-wise; ref may be -inf (empty) or
// +inf (result is +inf: sum set to 1).
template <class T>
ECIF_INLINE void vmerge(T* ECIF_RESTRICT ref, T* ECIF_RESTRICT sum, const T* ECIF_RESTRICT ref2,
                        const T* ECIF_RESTRICT sum2, int n) {
    using V = typename Vec<T>::V;
    constexpr int W = Vec<T>::W;
    const V one = vsplat(T(1)), pinf = vsplat(kPosInf<T>);
    for (int j = 0; j < n; j += W) {
        const V m1 = vload(ref + j), m2 = vload(ref2 + j);
        const V nm = vmax(m1, m2);
        const V base = vfinite_or_zero(nm);
        V s = vload(sum + j) * vexp<true>(m1 - base) + vload(sum2 + j) * vexp<true>(m2 - base);
        s = vselect(nm == pinf, one, s);
        vstore(ref + j, nm);
        vstore(sum + j, s);
    }
}

// c[MR x NR] (row stride ldc) (+)= a-panel[kc][MR] * b-panel[kc][NR] (the shared micro-kernel)
template <class T>
ECIF_INLINE void micro_kernel(const T* ECIF_RESTRICT a, const T* ECIF_RESTRICT b, int kc,
                              T* ECIF_RESTRICT c, int ldc, bool accumulate) {
    tc_micro<T, Cfg<T>::MR, Cfg<T>::NV, 1, Cfg<T>::MR>(a, b, kc, c, ldc, accumulate);
}

// Pack columns [c0, c0 + tc) of batch b (tc <= TC) into NR-column panels [TC/NR][d][NR], zero padded.
template <class T>
void pack_cols(const LseProblem<T>& p, const i64* ECIF_RESTRICT idx, i64 c0, int tc, T* ECIF_RESTRICT dst) {
    constexpr int NR = Cfg<T>::NR;
    tc_pack_panels<T, NR>(p.V, idx + c0, tc, (tc + NR - 1) / NR * NR, p.d, p.d, dst);
}

template <class T>
void lse_task_impl(const LseProblem<T>& p, i64 b, i64 rt, T* ws, T* colM_big, T* colS_big, i64* colA_big,
                   const T* vpacked) {
    using C = Cfg<T>;
    using V = typename Vec<T>::V;
    constexpr int W = C::W, MR = C::MR, NR = C::NR, TR = C::TR, TC = C::TC, KC = C::KC;
    const i64 d = p.d;
    const i64 off = p.offsets[b];
    const i64 B = p.offsets[b + 1] - off;
    const i64* ECIF_RESTRICT idx = p.perm + off;
    const i64 r0 = rt * TR;
    const int tr = int(imin(TR, B - r0));
    const int npu = (tr + MR - 1) / MR;
    const V vscale = vsplat(p.scale);
    const V vninf = vsplat(kNegInf<T>);
    const V vlo = vsplat(Lim<T>::exp_lo);

    T* ECIF_RESTRICT Up = ws;                // [TR/MR][d][MR]
    T* ECIF_RESTRICT Vp = Up + i64(TR) * d;  // [TC/NR][d][NR] (unused when vpacked)
    T* ECIF_RESTRICT S = Vp + i64(TC) * d;   // [TR][TC] score tile
    T* ECIF_RESTRICT rowM = S + TR * TC;     // [TR] running row reference
    T* ECIF_RESTRICT rowS = rowM + TR;       // [TR] running row sum
    T* ECIF_RESTRICT ta = rowS + TR;         // [TR] tile row max a_i
    T* ECIF_RESTRICT tg = ta + TR;           // [TR] exp(a_i - tmax), then tile row sums
    T* ECIF_RESTRICT smallM = tg + TR;       // [TR] column state of a single-task batch
    T* ECIF_RESTRICT smallS = smallM + TR;   // [TR]
    T* ECIF_RESTRICT tb = smallS + TR;       // [TC] tile column max b_j
    T* ECIF_RESTRICT tcs = tb + TC;          // [TC] tile column sums
    T* ECIF_RESTRICT oldM = tcs + TC;        // [TC] column state, padded
    T* ECIF_RESTRICT oldS = oldM + TC;       // [TC]
    T* ECIF_RESTRICT vmask = oldS + TC;      // [TC] 0 for columns in the batch, -inf past it
    T* ECIF_RESTRICT ti = vmask + TC;        // [TC] row (in the task) of the tile column max (stats)
    // [TR] batch-local column of the running row max, [TR] row of a single-task batch's column max
    i64* ECIF_RESTRICT rowA = reinterpret_cast<i64*>(ti + TC + ((ti + TC - ws) & 1));
    i64* ECIF_RESTRICT smallA = rowA + TR;
    const bool want = p.stats != nullptr;

    tc_pack_panels<T, MR>(p.U, idx + r0, tr, npu * MR, d, d, Up);
    for (int i = 0; i < TR; ++i) {
        rowM[i] = kNegInf<T>;
        rowS[i] = T(0);
        ta[i] = kNegInf<T>;
        tg[i] = T(0);
        rowA[i] = 0;
    }

    const bool single = (B <= TR);  // this task sees every row of the batch
    T* cM = colM_big;
    T* cS = colS_big;
    i64* cA = colA_big;
    if (single) {
        cM = smallM;
        cS = smallS;
        cA = smallA;
        for (i64 j = 0; j < B; ++j) {
            cM[j] = kNegInf<T>;
            cS[j] = T(0);
            cA[j] = 0;
        }
    }

    const i64 nct = (B + TC - 1) / TC;
    for (i64 ct = 0; ct < nct; ++ct) {
        const i64 c0 = ct * TC;
        const int tc = int(imin(TC, B - c0));
        const int npv = (tc + NR - 1) / NR;
        const T* Vt = Vp;
        if (vpacked) {
            Vt = vpacked + ct * TC * d;
        } else {
            pack_cols(p, idx, c0, tc, Vp);
        }

        // 1. Unscaled score tile. GotoBLAS order: a V panel slice stays in L1 while U panels stream.
        for (i64 k0 = 0; k0 < d; k0 += KC) {
            const int kc = int(imin(KC, d - k0));
            for (int q = 0; q < npv; ++q) {
                const T* bp = Vt + (i64(q) * d + k0) * NR;
                for (int pu = 0; pu < npu; ++pu) {
                    const T* ap = Up + (i64(pu) * d + k0) * MR;
                    micro_kernel<T>(ap, bp, kc, S + pu * MR * TC + q * NR, TC, k0 > 0);
                }
            }
        }

        // 2. Scale, mask, row and column maxima of the tile.
        for (int j = 0; j < TC; ++j) {
            vmask[j] = j < tc ? T(0) : kNegInf<T>;
            tb[j] = kNegInf<T>;
            ti[j] = T(0);
        }
        T tmax = kNegInf<T>, amin = kPosInf<T>;
        for (int i = 0; i < tr; ++i) {
            T* s = S + i * TC;
            V rmax = vninf;
            if (want) {
                const V vi = vsplat(T(i));
                for (int j = 0; j < TC; j += W) {
                    const V m = vload(vmask + j);
                    const V v = vselect(m == V{}, vload(s + j) * vscale, m);
                    vstore(s + j, v);
                    rmax = vmax(rmax, v);
                    const V old = vload(tb + j);
                    vstore(ti + j, vselect(v > old, vi, vload(ti + j)));  // the first row wins ties
                    vstore(tb + j, vmax(old, v));
                }
            } else {
                for (int j = 0; j < TC; j += W) {
                    const V m = vload(vmask + j);
                    const V v = vselect(m == V{}, vload(s + j) * vscale, m);
                    vstore(s + j, v);
                    rmax = vmax(rmax, v);
                    vstore(tb + j, vmax(vload(tb + j), v));
                }
            }
            const T a = hmax<T>(rmax);
            if (want && a > rowM[i]) {  // a new row maximum: its first position in the tile
                int ja = 0;
                while (ja < tc - 1 && !(s[ja] == a)) ++ja;
                rowA[i] = c0 + ja;
            }
            ta[i] = a;
            tmax = a > tmax ? a : tmax;
            amin = a < amin ? a : amin;
        }
        T bmin = kPosInf<T>;
        for (int j = 0; j < tc; ++j) bmin = tb[j] < bmin ? tb[j] : bmin;
        const bool reuse = (tmax - bmin <= Lim<T>::reuse_range) && (amin > kNegInf<T>);

        // 3. Row sums (and column sums).
        for (int j = 0; j < TC; ++j) tcs[j] = T(0);
        if (reuse) {
            const V vt = vsplat(tmax);
            for (int i = 0; i < TR; i += W) vstore(tg + i, vexp<true>(vload(ta + i) - vt));
            for (int i = 0; i < tr; ++i) {
                const T* s = S + i * TC;
                const V va = vsplat(ta[i]);
                const V vg = vsplat(tg[i]);
                V rs = V{};
                for (int j = 0; j < TC; j += W) {
                    // s - a <= 0; past-the-batch columns (-inf) clamp to exp(lo) ~ 1e-38 (float),
                    // negligible next to the row max's exp(0) = 1 and never read back for columns.
                    const V e = vexp<false>(vmax(vload(s + j) - va, vlo));
                    rs += e;
                    vstore(tcs + j, vload(tcs + j) + e * vg);
                }
                tg[i] = hsum<T>(rs);
            }
            for (int j = 0; j < TC; j += W)
                vstore(tcs + j, vload(tcs + j) * vexp<true>(vt - vmax(vload(tb + j), vt - vsplat(Lim<T>::reuse_range))));
        } else {
            for (int i = 0; i < tr; ++i) {
                const T* s = S + i * TC;
                const V va = vsplat(ta[i]);
                V rs = V{};
                for (int j = 0; j < TC; j += W) rs += vexp<true>(vload(s + j) - va);
                tg[i] = hsum<T>(rs);
            }
            for (int j = 0; j < TC; j += W) {
                const V vb = vfinite_or_zero(vload(tb + j));
                V cs = V{};
                for (int i = 0; i < tr; ++i) cs += vexp<true>(vload(S + i * TC + j) - vb);
                vstore(tcs + j, cs);
            }
        }
        for (int i = tr; i < TR; ++i) tg[i] = T(0);

        // 4. Fold the tile into the running states.
        vmerge<T>(rowM, rowS, ta, tg, TR);
        for (int j = 0; j < TC; ++j) {
            oldM[j] = j < tc ? cM[c0 + j] : kNegInf<T>;
            oldS[j] = j < tc ? cS[c0 + j] : T(0);
        }
        if (want)
            for (int j = 0; j < tc; ++j)
                if (tb[j] > oldM[j]) cA[c0 + j] = r0 + i64(ti[j]);
        vmerge<T>(oldM, oldS, tb, tcs, TC);
        for (int j = 0; j < tc; ++j) {
            cM[c0 + j] = oldM[j];
            cS[c0 + j] = oldS[j];
        }
    }

    for (int i = 0; i < tr; ++i) {
        const i64 k = idx[r0 + i];
        const T l = std::log(rowS[i]);
        if (p.row) p.row[k] = rowM[i] + l;
        if (want) {
            p.stats->rtop[k] = rowM[i];
            p.stats->rl[k] = l;
            p.stats->rarg[k] = rowA[i];
        }
    }
    if (single) {
        for (i64 j = 0; j < B; ++j) {
            const i64 k = idx[j];
            const T l = std::log(cS[j]);
            if (p.col) p.col[k] = cM[j] + l;
            if (want) {
                p.stats->ctop[k] = cM[j];
                p.stats->cl[k] = l;
                p.stats->carg[k] = cA[j];
            }
        }
    }
}

}  // namespace

void lse_task(const LseProblem<float>& p, std::int64_t b, std::int64_t rt, float* ws, float* colM,
              float* colS, std::int64_t* colA, const float* vpacked) {
    lse_task_impl<float>(p, b, rt, ws, colM, colS, colA, vpacked);
}
void lse_task(const LseProblem<double>& p, std::int64_t b, std::int64_t rt, double* ws, double* colM,
              double* colS, std::int64_t* colA, const double* vpacked) {
    lse_task_impl<double>(p, b, rt, ws, colM, colS, colA, vpacked);
}
void lse_pack_cols(const LseProblem<float>& p, std::int64_t b, std::int64_t ct, float* dst) {
    const std::int64_t off = p.offsets[b], B = p.offsets[b + 1] - off;
    pack_cols<float>(p, p.perm + off, ct * kTileCols, int(imin(kTileCols, B - ct * kTileCols)), dst);
}
void lse_pack_cols(const LseProblem<double>& p, std::int64_t b, std::int64_t ct, double* dst) {
    const std::int64_t off = p.offsets[b], B = p.offsets[b + 1] - off;
    pack_cols<double>(p, p.perm + off, ct * kTileCols, int(imin(kTileCols, B - ct * kTileCols)), dst);
}

}  // namespace ECIF_ISA_NS
}  // namespace ecif
