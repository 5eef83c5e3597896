// Per-ISA tasks of the directional ops (ecif_reductions, Gauss-Newton product), see directional.hpp.
//
// Compiled once per instruction-set variant like lse_kernel.hpp / infonce_kernel.hpp: the including
// .cpp defines ECIF_ISA_NS, ECIF_VEC_BYTES and optionally ECIF_MR. A task (batch b, row tile rt)
// packs its rows of U and of every δU_q into MR-row panels, then per column tile:
//   1. S = t U_I V_J^T with the shared micro-kernel (tile_common.hpp);
//   2. the softmax weights the mode needs, once per tile (docs/math.md §3-§4, torch_ref/softmax.py), from the
//      line statistics (problem.hpp, LineStats):
//        P  = exp(z_r - l_r[i]),   Qc = exp(z_c - l_c[j]),   z = S - top off the line's max, 0 at it,
//        Wr = P/(1-P) (exact) or P, 0 at i == j and (exact) at the row max j == arg_r[i],
//        Wc likewise from Qc, 0 at i == j and (exact) at the column max i == arg_c[j],
//        R  = exp((S - rm_r[i]) - rl_r[i]) off the row max, Rc likewise off the column max.
//      No weight carries the rounding of a large lse (eps |S|), and the weight at a line's maximum is
//      exp(-l) whatever rounding the recomputed score got (the statistics may come from the lse
//      kernel);
//      Off a line maximum p <= 1/2, so p/(1-p) has no cancellation; the maxima themselves are handled
//      by the driver in the cancellation-free form (a dot product per line);
//   3. per query, δS = t(δU_I V_J^T + U_I δV_J^T) + δs S (two micro-kernel products into one tile),
//      then the mode's row sums (kept for the whole sweep) and column sums (added per tile to the
//      caller's column accumulator).
// Row sums run along the contiguous tile rows (vector accumulators, one horizontal sum per row);
// column sums are vector accumulators indexed by column. With a batch cache (directional.hpp,
// DirCache) steps 1 and 3's products are replaced by reads of tiles an earlier pass stored.
#include <cmath>
#include <cstdint>
#include <limits>

#include "directional.hpp"
#include "tile_common.hpp"
#include "vec.hpp"

#if !defined(ECIF_ISA_NS)
#error "define ECIF_ISA_NS before including directional_kernel.hpp"
#endif
#if !defined(ECIF_MR)
#define ECIF_MR 6
#endif

namespace ecif {
namespace ECIF_ISA_NS {
namespace {

using i64 = std::int64_t;

template <class T>
using DirCfg = TileCfg<T, ECIF_MR, kDirRows, kDirCols, kDirPad>;

template <class T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// C (TR x TC, row stride TC) (+)= A-panels (npu MR-row panels) x B-panels (TC/NR NR-column panels)
template <class T>
void dir_gemm(const T* ECIF_RESTRICT Ap, const T* ECIF_RESTRICT Bp, int npu, i64 d, i64 dp, T* ECIF_RESTRICT C,
              bool accumulate) {
    using Cf = DirCfg<T>;
    constexpr int MR = Cf::MR, NR = Cf::NR, TC = Cf::TC, KC = Cf::KC;
    if (d == 0) {
        if (!accumulate)
            for (int q = 0; q < Cf::TR * TC; ++q) C[q] = T(0);
        return;
    }
    for (i64 k0 = 0; k0 < d; k0 += KC) {
        const int kc = int(tc_imin(KC, d - k0));
        for (int q = 0; q < TC / NR; ++q) {
            const T* bp = Bp + (i64(q) * dp + k0) * NR;
            for (int pu = 0; pu < npu; ++pu)
                tc_micro<T, MR, Cf::NV, 1, MR>(Ap + (i64(pu) * dp + k0) * MR, bp, kc, C + pu * MR * TC + q * NR,
                                               TC, accumulate || k0 > 0);
        }
    }
}

template <class T>
struct DirPack {
    const T* Vp;   // [TC/NR][dp][NR]
    const T* Vr;   // [dp/NR][TC][NR]
    const T* dVp;  // Q x [TC/NR][dp][NR], stride TC*dp
};

template <class T>
void pack_col_tile(const DirProblem<T>& p, const i64* idx, int tc, bool rows, T* dst) {
    constexpr int NR = DirCfg<T>::NR, TC = DirCfg<T>::TC;
    const i64 d = p.d, dp = dir_padded_d(d), tsz = i64(TC) * dp;
    tc_pack_panels<T, NR>(p.V, idx, tc, TC, d, dp, dst);
    if (rows) tc_pack_rows<T, NR>(p.V, idx, tc, TC, d, dp, dst + tsz);
    for (i64 q = 0; q < p.Q; ++q) tc_pack_panels<T, NR>(p.dV + q * p.n * d, idx, tc, TC, d, dp, dst + (2 + q) * tsz);
}

template <class T>
DirPack<T> col_tile(const DirProblem<T>& p, const T* vpk, i64 ct, const i64* idx, int tc, bool rows, T* local) {
    const i64 dp = dir_padded_d(p.d), tsz = i64(DirCfg<T>::TC) * dp;
    const T* base;
    if (vpk) {
        base = vpk + ct * dir_tile_elems(p.d, p.Q);
    } else {
        pack_col_tile(p, idx + ct * DirCfg<T>::TC, tc, rows, local);
        base = local;
    }
    return DirPack<T>{base, base + tsz, base + 2 * tsz};
}

// ---- pass 1 of ecif_reductions: line statistics ----------------------------------------------------

template <class T>
void stats_task_impl(const DirProblem<T>& p, i64 b, i64 rt, T* ws, T* cTop, i64* cArg, T* cRM, T* cRS,
                     const T* vpk, T* cache) {
    using Cf = DirCfg<T>;
    using V = typename Vec<T>::V;
    constexpr int W = Cf::W, MR = Cf::MR, TR = Cf::TR, TC = Cf::TC;
    const i64 d = p.d, dp = dir_padded_d(d);
    const i64 off = p.offsets[b], B = p.offsets[b + 1] - off;
    const i64* ECIF_RESTRICT idx = p.perm + off;
    const i64 r0 = rt * TR;
    const int tr = int(tc_imin(TR, B - r0));
    const int npu = (tr + MR - 1) / MR;
    const V vt = vsplat(p.scale), vninf = vsplat(-kInf<T>);

    T* Up = ws;                          // [TR/MR][dp][MR]
    T* Vloc = Up + i64(TR) * dp;         // one packed column tile (one-task batches)
    T* S0 = Vloc + dir_tile_elems(d, p.Q);  // [TR][TC]
    T* rTop = S0 + TR * TC;              // [TR] row states
    T* rRM = rTop + TR;
    T* rRS = rRM + TR;
    T* cm = rRS + TR;   // [TC] tile column max
    T* ci = cm + TC;    // [TC] its row (as T)
    T* c2 = ci + TC;    // [TC] tile column second max
    T* csum = c2 + TC;  // [TC]
    T* cTopL = csum + TC;  // [TC] column states of a one-task batch
    T* cRML = cTopL + TC;
    T* cRSL = cRML + TC;
    i64* rArg = reinterpret_cast<i64*>(cRSL + TC);  // [TR]
    i64* cArgL = rArg + TR;                          // [TC]

    const bool single = vpk == nullptr;
    if (single) {
        cTop = cTopL;
        cRM = cRML;
        cRS = cRSL;
        cArg = cArgL;
        for (i64 j = 0; j < B; ++j) {
            cTop[j] = cRM[j] = -kInf<T>;
            cRS[j] = T(0);
            cArg[j] = 0;
        }
    }
    tc_pack_panels<T, MR>(p.U, idx + r0, tr, TR, d, dp, Up);
    for (int i = 0; i < TR; ++i) {
        rTop[i] = rRM[i] = -kInf<T>;
        rRS[i] = T(0);
        rArg[i] = 0;
    }

    const i64 nct = (B + TC - 1) / TC;
    for (i64 ct = 0; ct < nct; ++ct) {
        const i64 c0 = ct * TC;
        const int tc = int(tc_imin(TC, B - c0));
        const DirPack<T> pk = col_tile(p, vpk, ct, idx, tc, false, Vloc);
        T* S = cache ? cache + (rt * nct + ct) * TR * TC : S0;  // the cached tile is kept for later passes
        dir_gemm<T>(Up, pk.Vp, npu, d, dp, S, false);
        // scale; columns past the batch -> -inf
        for (int i = 0; i < tr; ++i) {
            T* s = S + i * TC;
            for (int j = 0; j < TC; j += W) vstore(s + j, vload(s + j) * vt);
            for (int j = tc; j < TC; ++j) s[j] = -kInf<T>;
        }
        // rows
        for (int i = 0; i < tr; ++i) {
            T* s = S + i * TC;
            V mx = vninf;
            for (int j = 0; j < TC; j += W) mx = vmax(mx, vload(s + j));
            const T a = hmax<T>(mx);
            int ja = 0;
            while (ja < tc - 1 && !(s[ja] == a)) ++ja;
            const T saved = s[ja];
            s[ja] = -kInf<T>;
            V m2 = vninf;
            for (int j = 0; j < TC; j += W) m2 = vmax(m2, vload(s + j));
            const T b2 = hmax<T>(m2);
            const V vb = vsplat(std::isfinite(b2) ? b2 : T(0));
            V acc = V{};
            for (int j = 0; j < TC; j += W) acc += vexp<true>(vload(s + j) - vb);
            s[ja] = saved;
            line_merge<T>(rTop[i], rArg[i], rRM[i], rRS[i], a, c0 + ja, b2, hsum<T>(acc));
        }
        // columns (vectorised along j)
        for (int j = 0; j < TC; j += W) {
            V vm = vninf, vi = V{};
            for (int i = 0; i < tr; ++i) {
                const V x = vload(S + i * TC + j);
                const auto gt = x > vm;
                vm = vselect(gt, x, vm);
                vi = vselect(gt, vsplat(T(i)), vi);
            }
            V v2 = vninf;
            for (int i = 0; i < tr; ++i) {
                const V x = vload(S + i * TC + j);
                v2 = vmax(v2, vselect(vi == vsplat(T(i)), vninf, x));
            }
            const V vb = vselect(v2 - v2 == V{}, v2, V{});
            V acc = V{};
            for (int i = 0; i < tr; ++i) {
                const V x = vload(S + i * TC + j);
                acc += vselect(vi == vsplat(T(i)), V{}, vexp<true>(x - vb));
            }
            vstore(cm + j, vm);
            vstore(ci + j, vi);
            vstore(c2 + j, v2);
            vstore(csum + j, acc);
        }
        for (int j = 0; j < tc; ++j)
            line_merge<T>(cTop[c0 + j], cArg[c0 + j], cRM[c0 + j], cRS[c0 + j], cm[j], r0 + i64(ci[j]), c2[j],
                          csum[j]);
        if (cache)  // the passes expect finite (zero) scores past the batch
            for (int i = 0; i < tr; ++i)
                for (int j = tc; j < TC; ++j) S[i * TC + j] = T(0);
    }
    // l = log(1 + exp(rest - top)) with rest - top = (rM - top) + log rS: no large lse is ever rounded
    auto finish = [&](T top, T rM, T rS, i64 arg, i64 k, T* otop, T* ol, i64* oarg, T* orm, T* orl) {
        const T lrs = rS > T(0) ? std::log(rS) : T(0);
        otop[k] = top;
        ol[k] = rS > T(0) ? std::log1p(std::exp((rM - top) + lrs)) : T(0);
        oarg[k] = arg;
        orm[k] = rS > T(0) ? rM : -kInf<T>;
        orl[k] = lrs;
    };
    for (int i = 0; i < tr; ++i)
        finish(rTop[i], rRM[i], rRS[i], rArg[i], idx[r0 + i], p.st.rtop, p.st.rl, p.st.rarg, p.rrm, p.rrl);
    if (single)
        for (i64 j = 0; j < B; ++j)
            finish(cTop[j], cRM[j], cRS[j], cArg[j], idx[j], p.st.ctop, p.st.cl, p.st.carg, p.crm, p.crl);
}

// ---- passes that use δS ------------------------------------------------------------------------------

template <class T, int MODE>
void pass_task_impl(const DirProblem<T>& p, i64 b, i64 rt, T* ws, T* colacc, i64 cstride, double* gs,
                    const T* vpk, T* cache, int cflags) {
    using Cf = DirCfg<T>;
    using V = typename Vec<T>::V;
    constexpr int W = Cf::W, MR = Cf::MR, NR = Cf::NR, TR = Cf::TR, TC = Cf::TC;
    constexpr bool kRed = MODE == kDirRed2 || MODE == kDirRed3;
    constexpr bool kNeedD = MODE != kDirRed3;
    constexpr int KC = MODE == kDirRed2 ? 3 : 1;  // column sums per query (not kDirGn3)
    const bool exact = p.exact;
    const i64 d = p.d, dp = dir_padded_d(d), n = p.n, Q = p.Q;
    const i64 off = p.offsets[b], B = p.offsets[b + 1] - off;
    const i64* ECIF_RESTRICT idx = p.perm + off;
    const i64 r0 = rt * TR;
    const int tr = int(tc_imin(TR, B - r0));
    const int npu = (tr + MR - 1) / MR;
    const T t = p.scale;
    const V vt = vsplat(t), vhalf = vsplat(T(0.5)), vone = vsplat(T(1));
    const bool single = vpk == nullptr;

    T* ECIF_RESTRICT Up = ws;                        // [TR/MR][dp][MR]
    T* ECIF_RESTRICT Ur = Up + i64(TR) * dp;         // [dp/NR][TR][NR]     (kDirGn3)
    T* ECIF_RESTRICT dUp = Ur + i64(TR) * dp;        // Q x [TR/MR][dp][MR]
    T* ECIF_RESTRICT gUa = dUp + Q * TR * dp;        // Q x [TR][dp]        (kDirGn3)
    T* ECIF_RESTRICT dVt = gUa + Q * TR * dp;        // [TC][dp]            (kDirGn3)
    T* ECIF_RESTRICT Vloc = dVt + i64(TC) * dp;      // one packed column tile
    T* ECIF_RESTRICT S0 = Vloc + dir_tile_elems(d, Q);  // [TR][TC] scaled scores
    T* ECIF_RESTRICT D0 = S0 + TR * TC;              // [TR][TC] δS, then t*G
    T* ECIF_RESTRICT Pw = D0 + TR * TC;              // weight tiles
    T* ECIF_RESTRICT Qw = Pw + TR * TC;
    T* ECIF_RESTRICT Wr = Qw + TR * TC;
    T* ECIF_RESTRICT Wc = Wr + TR * TC;
    T* ECIF_RESTRICT Rw = Wc + TR * TC;
    T* ECIF_RESTRICT Rcw = Rw + TR * TC;
    T* ECIF_RESTRICT rowacc = Rcw + TR * TC;         // [Q][KR][TR]
    T* ECIF_RESTRICT cacc = rowacc + Q * 3 * TR;     // [Q][KC][TC]
    T* ECIF_RESTRICT mv = cacc + Q * 3 * TC;         // [Q][TR] m of the rows    (kDirRed3, kDirGn3)
    T* ECIF_RESTRICT mcv = mv + Q * TR;              // [Q][TC] mc of the columns (kDirRed3, kDirGn3)
    T* ECIF_RESTRICT rtp = mcv + Q * TC;             // [TR] row top
    T* ECIF_RESTRICT rl = rtp + TR;                  // [TR] row l = lse - top
    T* ECIF_RESTRICT rm = rl + TR;                   // [TR] row rest = rm + rr
    T* ECIF_RESTRICT rr = rm + TR;                   // [TR]
    T* ECIF_RESTRICT ra = rr + TR;                   // [TR] row arg (tile-local column, -1 off the tile)
    T* ECIF_RESTRICT ctp = ra + TR;                  // [TC] column top (+inf past the batch)
    T* ECIF_RESTRICT cl = ctp + TC;                  // [TC] column l (0 past the batch)
    T* ECIF_RESTRICT cm = cl + TC;                   // [TC] column rest = cm + cr (+inf past the batch)
    T* ECIF_RESTRICT cr = cm + TC;                   // [TC]
    T* ECIF_RESTRICT ca = cr + TC;                   // [TC] column arg (tile-local row, -1 off the tile)
    T* ECIF_RESTRICT cidx = ca + TC;                 // [TC] tile-local column index
    T* ECIF_RESTRICT vm = cidx + TC;                 // [TC] 1 in the batch, 0 past it

    tc_pack_panels<T, MR>(p.U, idx + r0, tr, TR, d, dp, Up);
    for (i64 q = 0; q < Q; ++q) tc_pack_panels<T, MR>(p.dU + q * n * d, idx + r0, tr, TR, d, dp, dUp + q * TR * dp);
    if (MODE == kDirGn3) {
        tc_pack_rows<T, NR>(p.U, idx + r0, tr, TR, d, dp, Ur);
        for (i64 q = 0; q < Q * TR * dp; ++q) gUa[q] = T(0);
    }
    for (i64 q = 0; q < Q * 3 * TR; ++q) rowacc[q] = T(0);
    for (int i = 0; i < TR; ++i) {
        const bool in = i < tr;
        const i64 k = in ? idx[r0 + i] : 0;
        rtp[i] = in ? p.st.rtop[k] : T(0);
        rl[i] = in ? p.st.rl[k] : T(0);
        if (kRed) {
            rm[i] = in ? p.rrm[k] : T(0);
            rr[i] = in ? p.rrl[k] : T(0);
        }
        if (MODE == kDirRed3 || MODE == kDirGn3)
            for (i64 q = 0; q < Q; ++q) mv[q * TR + i] = in ? p.m[q * n + k] : T(0);
    }
    const T* ds = p.ds;

    const i64 nct = (B + TC - 1) / TC;
    for (i64 ct = 0; ct < nct; ++ct) {
        const i64 c0 = ct * TC;
        const int tc = int(tc_imin(TC, B - c0));
        const int npc = (tc + MR - 1) / MR;
        const DirPack<T> pk = col_tile(p, vpk, ct, idx, tc, MODE == kDirGn3, Vloc);
        for (int i = 0; i < TR; ++i) {
            const i64 a = i < tr ? p.st.rarg[idx[r0 + i]] - c0 : -1;
            ra[i] = a >= 0 && a < tc ? T(a) : T(-1);
        }
        for (int j = 0; j < TC; ++j) {
            const bool in = j < tc;
            const i64 k = in ? idx[c0 + j] : 0;
            const i64 a = in ? p.st.carg[k] - r0 : -1;
            ctp[j] = in ? p.st.ctop[k] : kInf<T>;
            cl[j] = in ? p.st.cl[k] : T(0);
            ca[j] = a >= 0 && a < tr ? T(a) : T(-1);
            if (kRed) {
                cm[j] = in ? p.crm[k] : kInf<T>;
                cr[j] = in ? p.crl[k] : T(0);
            }
            cidx[j] = T(j);
            vm[j] = in ? T(1) : T(0);
            if (MODE == kDirRed3 || MODE == kDirGn3)
                for (i64 q = 0; q < Q; ++q) mcv[q * TC + j] = in ? p.mc[q * n + k] : T(0);
        }

        // 1. scores (from the batch cache when an earlier pass left them there)
        const i64 nrt = (B + TR - 1) / TR, toff = (rt * nct + ct) * TR * TC;
        T* ECIF_RESTRICT S = cache ? cache + toff : S0;
        if (!(cache && (cflags & kDirReadS))) {
            dir_gemm<T>(Up, pk.Vp, npu, d, dp, S, false);
            for (int i = 0; i < tr; ++i)
                for (int j = 0; j < TC; j += W) vstore(S + i * TC + j, vload(S + i * TC + j) * vt);
        }

        // 2. weights (rows past the batch are never read)
        for (int i = 0; i < tr; ++i) {
            const T* s = S + i * TC;
            const V vrt = vsplat(rtp[i]), vrl = vsplat(rl[i]), vra = vsplat(ra[i]), vgi = vsplat(T(i));
            const V vdg = vsplat(T(r0 + i - c0));  // the diagonal's tile-local column (maybe off the tile)
            for (int j = 0; j < TC; j += W) {
                const i64 o = i64(i) * TC + j;
                const V sv = vload(s + j), msk = vload(vm + j), cj = vload(cidx + j);
                const auto rmax = cj == vra;
                const auto cmax = vload(ca + j) == vgi;
                const V P = vexp<true>(vselect(rmax, V{}, sv - vrt) - vrl) * msk;
                const V Qc = vexp<true>(vselect(cmax, V{}, sv - vload(ctp + j)) - vload(cl + j));
                if (MODE == kDirGn2 || MODE == kDirGn3 || MODE == kDirRed2) {
                    vstore(Pw + o, P);
                    vstore(Qw + o, Qc);
                }
                if (kRed) {
                    const auto diag = cj == vdg;
                    if (exact) {
                        vstore(Wr + o, vselect(diag | rmax, V{}, P / (vone - vmin(P, vhalf))));
                        vstore(Wc + o, vselect(diag | cmax, V{}, Qc / (vone - vmin(Qc, vhalf))));
                        if (MODE == kDirRed2) {
                            const V R = vexp<true>((sv - vsplat(rm[i])) - vsplat(rr[i]));
                            vstore(Rw + o, vselect(rmax, V{}, R * msk));
                            vstore(Rcw + o, vselect(cmax, V{}, vexp<true>((sv - vload(cm + j)) - vload(cr + j))));
                        }
                    } else {
                        vstore(Wr + o, vselect(diag, V{}, P));
                        vstore(Wc + o, vselect(diag, V{}, Qc));
                    }
                }
            }
        }

        // 3. per query
        for (i64 q = 0; q < Q; ++q) {
            const bool dcached = cache && (cflags & (kDirFillD | kDirReadD));
            T* ECIF_RESTRICT D = dcached ? cache + (1 + q) * nrt * nct * TR * TC + toff : D0;
            if (kNeedD && !(dcached && (cflags & kDirReadD))) {
                dir_gemm<T>(dUp + q * TR * dp, pk.Vp, npu, d, dp, D, false);
                dir_gemm<T>(Up, pk.dVp + q * TC * dp, npu, d, dp, D, true);
                const V vds = vsplat(ds ? ds[q] : T(0));
                if (ds) {
                    for (int i = 0; i < tr; ++i)
                        for (int j = 0; j < TC; j += W) {
                            const i64 o = i64(i) * TC + j;
                            vstore(D + o, vload(D + o) * vt + vds * vload(S + o));
                        }
                } else {
                    for (int i = 0; i < tr; ++i)
                        for (int j = 0; j < TC; j += W) {
                            const i64 o = i64(i) * TC + j;
                            vstore(D + o, vload(D + o) * vt);
                        }
                }
            }
            T* ra0 = rowacc + q * 3 * TR;
            T* ca0 = cacc + q * 3 * TC;
            if (MODE != kDirGn3)
                for (int j = 0; j < KC * TC; ++j) ca0[j] = T(0);
            if (MODE == kDirRed2) {
                for (int i = 0; i < tr; ++i) {
                    V am = V{}, ac = V{}, ar = V{};
                    for (int j = 0; j < TC; j += W) {
                        const i64 o = i64(i) * TC + j;
                        const V dv = vload(D + o);
                        am += vload(Pw + o) * dv;
                        ac += vload(Wc + o) * dv;
                        vstore(ca0 + j, vload(ca0 + j) + vload(Qw + o) * dv);
                        vstore(ca0 + TC + j, vload(ca0 + TC + j) + vload(Wr + o) * dv);
                        if (exact) {
                            ar += vload(Rw + o) * dv;
                            vstore(ca0 + 2 * TC + j, vload(ca0 + 2 * TC + j) + vload(Rcw + o) * dv);
                        }
                    }
                    ra0[i] += hsum<T>(am);
                    ra0[TR + i] += hsum<T>(ac);
                    ra0[2 * TR + i] += hsum<T>(ar);
                }
            } else if (MODE == kDirRed3) {
                const T* mcq = mcv + q * TC;
                for (int i = 0; i < tr; ++i) {
                    V ac = V{};
                    const V mi = vsplat(mv[q * TR + i]);
                    for (int j = 0; j < TC; j += W) {
                        const i64 o = i64(i) * TC + j;
                        ac += vload(Wc + o) * vload(mcq + j);
                        vstore(ca0 + j, vload(ca0 + j) + vload(Wr + o) * mi);
                    }
                    ra0[i] += hsum<T>(ac);
                }
            } else if (MODE == kDirGn2) {
                for (int i = 0; i < tr; ++i) {
                    V am = V{};
                    for (int j = 0; j < TC; j += W) {
                        const i64 o = i64(i) * TC + j;
                        const V dv = vload(D + o);
                        am += vload(Pw + o) * dv;
                        vstore(ca0 + j, vload(ca0 + j) + vload(Qw + o) * dv);
                    }
                    ra0[i] += hsum<T>(am);
                }
            } else {  // kDirGn3: G = P (δS - m_i) + Qc (δS - mc_j); D <- t G
                const T* mcq = mcv + q * TC;
                V vgs = V{};
                for (int i = 0; i < tr; ++i) {
                    const V mi = vsplat(mv[q * TR + i]);
                    for (int j = 0; j < TC; j += W) {
                        const i64 o = i64(i) * TC + j;
                        const V dv = vload(D + o);
                        const V g = vload(Pw + o) * (dv - mi) + vload(Qw + o) * (dv - vload(mcq + j));
                        vgs += g * vload(S + o);
                        vstore(D + o, g * vt);
                    }
                }
                for (int q2 = tr * TC; q2 < TR * TC; ++q2) D[q2] = T(0);
                if (ds) gs[q] += double(hsum<T>(vgs));
                // gU_I += (tG) V_J
                T* gq = gUa + q * TR * dp;
                for (i64 c = 0; c < dp / NR; ++c) {
                    const T* bp = pk.Vr + c * TC * NR;
                    for (int pu = 0; pu < npu; ++pu)
                        tc_micro<T, MR, Cf::NV, TC, 1>(D + pu * MR * TC, bp, tc, gq + pu * MR * dp + c * NR, dp, true);
                }
                // gV_J = (tG)^T U_I
                for (i64 c = 0; c < dp / NR; ++c) {
                    const T* bp = Ur + c * TR * NR;
                    for (int pc = 0; pc < npc; ++pc)
                        tc_micro<T, MR, Cf::NV, 1, TC>(D + pc * MR, bp, tr, dVt + pc * MR * dp + c * NR, dp, false);
                }
                if (single) {
                    for (int j = 0; j < tc; ++j) {
                        T* dst = p.gV + (q * n + idx[c0 + j]) * d;
                        const T* src = dVt + j * dp;
                        for (i64 k = 0; k < d; ++k) dst[k] = src[k];
                    }
                } else {
                    for (int j = 0; j < tc; ++j) {
                        T* dst = colacc + q * cstride + (c0 + j) * d;
                        const T* src = dVt + j * dp;
                        for (i64 k = 0; k < d; ++k) dst[k] += src[k];
                    }
                }
            }
            if (MODE != kDirGn3) {
                for (int kk = 0; kk < KC; ++kk) {
                    const T* src = ca0 + kk * TC;
                    if (single) {
                        T* out = MODE == kDirRed2 ? (kk == 0 ? p.mc : kk == 1 ? p.a1 : p.rc)
                                                  : (MODE == kDirRed3 ? p.mW : p.mc);
                        for (int j = 0; j < tc; ++j) out[q * n + idx[c0 + j]] = src[j];
                    } else {
                        T* dst = colacc + (kk * Q + q) * cstride + c0;
                        for (int j = 0; j < tc; ++j) dst[j] += src[j];
                    }
                }
            }
        }
    }

    for (i64 q = 0; q < Q; ++q) {
        const T* ra0 = rowacc + q * 3 * TR;
        for (int i = 0; i < tr; ++i) {
            const i64 k = idx[r0 + i];
            if (MODE == kDirRed2) {
                p.m[q * n + k] = ra0[i];
                p.c1[q * n + k] = ra0[TR + i];
                p.rr[q * n + k] = ra0[2 * TR + i];
            } else if (MODE == kDirRed3) {
                p.mcX[q * n + k] = ra0[i];
            } else if (MODE == kDirGn2) {
                p.m[q * n + k] = ra0[i];
            } else {
                T* dst = p.gU + (q * n + k) * d;
                const T* src = gUa + (q * TR + i) * dp;
                for (i64 c = 0; c < d; ++c) dst[c] = src[c];
            }
        }
    }
}

template <class T>
void pass_task(const DirProblem<T>& p, int mode, i64 b, i64 rt, T* ws, T* colacc, i64 cstride, double* gs,
               const T* vpk, T* cache, int cflags) {
    switch (mode) {
        case kDirRed2: pass_task_impl<T, kDirRed2>(p, b, rt, ws, colacc, cstride, gs, vpk, cache, cflags); break;
        case kDirRed3: pass_task_impl<T, kDirRed3>(p, b, rt, ws, colacc, cstride, gs, vpk, cache, cflags); break;
        case kDirGn2: pass_task_impl<T, kDirGn2>(p, b, rt, ws, colacc, cstride, gs, vpk, cache, cflags); break;
        default: pass_task_impl<T, kDirGn3>(p, b, rt, ws, colacc, cstride, gs, vpk, cache, cflags); break;
    }
}

template <class T>
void pack_cols_impl(const DirProblem<T>& p, i64 b, i64 ct, bool rows, T* dst) {
    const i64 off = p.offsets[b], B = p.offsets[b + 1] - off;
    const i64 c0 = ct * kDirCols;
    pack_col_tile(p, p.perm + off + c0, int(tc_imin(kDirCols, B - c0)), rows, dst);
}

}  // namespace

#define ECIF_DEFINE_DIR_TASK_T(T)                                                                           \
    void dir_stats_task(const DirProblem<T>& p, std::int64_t b, std::int64_t rt, T* ws, T* cTop,             \
                        std::int64_t* cArg, T* cRM, T* cRS, const T* vpk, T* cache) {                        \
        stats_task_impl<T>(p, b, rt, ws, cTop, cArg, cRM, cRS, vpk, cache);                                  \
    }                                                                                                        \
    void dir_pass_task(const DirProblem<T>& p, int mode, std::int64_t b, std::int64_t rt, T* ws, T* colacc, \
                       std::int64_t cstride, double* gs, const T* vpk, T* cache, int cflags) {              \
        pass_task<T>(p, mode, b, rt, ws, colacc, cstride, gs, vpk, cache, cflags);                           \
    }                                                                                                        \
    void dir_pack_cols(const DirProblem<T>& p, std::int64_t b, std::int64_t ct, bool rows, T* dst) {         \
        pack_cols_impl<T>(p, b, ct, rows, dst);                                                              \
    }
ECIF_DEFINE_DIR_TASK_T(float)
ECIF_DEFINE_DIR_TASK_T(double)
#undef ECIF_DEFINE_DIR_TASK_T

}  // namespace ECIF_ISA_NS
}  // namespace ecif
