// One pass-2 task (batch b, row tile rt) of the fused InfoNCE backward: S = t * U_b V_b^T recomputed
// tile by tile, G formed in the cached score tile, dU and dV accumulated by register-blocked
// micro-kernels. Nothing of size B x B is ever stored.
//
// Compiled once per instruction-set variant, like lse_kernel.hpp: the including .cpp defines
// ECIF_ISA_NS, ECIF_VEC_BYTES and optionally ECIF_MR, and is compiled with the matching -m flags.
// Only internal-linkage code (vec.hpp, the anonymous namespace below) is instantiated here.
//
// Per task the kIfRows rows of U are packed twice: as MR-row panels [TR/MR][dp][MR] (the A operand of
// the score product) and as NR-column panels of the row-major rows [dp/NR][TR][NR] (the B operand of
// dV = G^T U). Per column tile the kIfCols columns of V are packed the same two ways. Then
//   1. S tile (TR x TC) = U_tile V_tile^T with the MR x NR micro-kernel (KC-blocked inner dimension);
//   2. G tile in place: g_ij = p_ij + q_ij - 2 delta_ij, scaled by t, with the softmax weights
//      evaluated from the line statistics (problem.hpp, LineStats) as exp((s - top) - l), s - top taken as
//      exactly 0 at the line's maximum (if_form_g). When the tile's maxima are within kReuse of each
//      other (the common case) the column weight reuses the row exponential (one exponential per
//      score instead of two);
//   3. dU_tile (TR x dp) += G (TR x TC) * V_tile, accumulated over all column tiles in the workspace;
//   4. dV_tile (TC x dp)  = G^T (TC x TR) * U_tile, added to the task's destination.
// The same micro-kernel serves all three products: its A operand is read through compile-time
// strides (RS between micro-tile rows, KS along the inner dimension), so G is never repacked: the
// dU product reads G's rows (RS = TC, KS = 1) and the dV product its columns (RS = 1, KS = TC).
//
// infonce_batch (per-batch mode) runs a whole batch with the same pieces: V packed once per batch in
// both layouts, every scaled score tile computed once into the batch cache with the row / column
// line statistics folded from it (running max and sum; a line's maximum is where the cached score
// equals its top, bitwise), then steps 2-4 on the cached tiles, dV accumulated for the whole batch
// in the workspace (no partials, no second score product).
#include <cmath>
#include <cstdint>
#include <limits>

#include "infonce.hpp"
#include "tile_common.hpp"
#include "vec.hpp"

#if !defined(ECIF_ISA_NS)
#error "define ECIF_ISA_NS before including infonce_kernel.hpp"
#endif
#if !defined(ECIF_MR)
#define ECIF_MR 6
#endif

namespace ecif {
namespace ECIF_ISA_NS {
namespace {

using i64 = std::int64_t;

template <class T>
using IfCfg = TileCfg<T, ECIF_MR, kIfRows, kIfCols, kIfPad>;  // TC % NR == 0 also gives TC % W == 0

template <class T>
struct IfLim;
template <>
struct IfLim<float> {
    static constexpr float reuse = 40.0f;  // exp(40 - 87) ~ 4e-21
};
template <>
struct IfLim<double> {
    static constexpr double reuse = 500.0;  // exp(500 - 708) ~ 5e-91
};

ECIF_INLINE i64 if_imin(i64 a, i64 b) { return tc_imin(a, b); }

// The shared micro-kernel (tile_common.hpp) at this file's micro-tile shape.
template <class T, int RS, int KS>
ECIF_INLINE void if_micro(const T* ECIF_RESTRICT a, const T* ECIF_RESTRICT b, int kc, T* ECIF_RESTRICT c,
                          i64 ldc, bool accumulate) {
    tc_micro<T, IfCfg<T>::MR, IfCfg<T>::NV, RS, KS>(a, b, kc, c, ldc, accumulate);
}
template <class T, int MH>
void if_pack_panels(const T* ECIF_RESTRICT src, const i64* ECIF_RESTRICT idx, int cnt, int tot, i64 d, i64 dp,
                    T* ECIF_RESTRICT P) {
    tc_pack_panels<T, MH>(src, idx, cnt, tot, d, dp, P);
}
template <class T>
void if_pack_rows(const T* ECIF_RESTRICT src, const i64* ECIF_RESTRICT idx, int cnt, int tot, i64 d, i64 dp,
                  T* ECIF_RESTRICT Q) {
    tc_pack_rows<T, IfCfg<T>::NR>(src, idx, cnt, tot, d, dp, Q);
}

// Line statistics of one score tile in the layout the G step reads (problem.hpp, LineStats): per row i
// (< TR) its top, l and the tile-local column of its maximum (-1 when that lies in another column
// tile); per column j (< TC) the same with the tile-local row, 1 / 0 for columns in / past the batch
// (past it: top = +inf and l = 0, so that every weight there is 0) and j itself. Ar, Bc and
// exp(-l_j): the factors of the one-exponential path (reuse below).
template <class T>
struct IfTile {
    T* rtop;
    T* rl;
    T* ra;
    T* Ar;
    T* ctop;
    T* cl;
    T* ca;
    T* ecl;
    T* Bc;
    T* vm;
    T* cix;
    // carve the arrays out of `w` (IfCfg<T>::TR * 4 + IfCfg<T>::TC * 7 elements)
    explicit IfTile(T* w) {
        constexpr int TR = IfCfg<T>::TR, TC = IfCfg<T>::TC;
        rtop = w;
        rl = rtop + TR;
        ra = rl + TR;
        Ar = ra + TR;
        ctop = Ar + TR;
        cl = ctop + TC;
        ca = cl + TC;
        ecl = ca + TC;
        Bc = ecl + TC;
        vm = Bc + TC;
        cix = vm + TC;
        for (int j = 0; j < TC; ++j) cix[j] = T(j);
    }
    static constexpr i64 elems() { return 4 * i64(IfCfg<T>::TR) + 7 * i64(IfCfg<T>::TC); }
};

// Rows [r0, r0 + tr) of the batch (idx: the batch's pairs): top and l; whether their log-sum-exps
// are close enough for the one-exponential path (then Ar_i = exp(lse_i - R), R = the largest top).
template <class T>
bool if_load_rows(const LineStats<T>& st, const i64* ECIF_RESTRICT idx, i64 r0, int tr, IfTile<T>& ts, T& R) {
    constexpr int TR = IfCfg<T>::TR;
    T tmin = std::numeric_limits<T>::infinity();
    R = -std::numeric_limits<T>::infinity();
    for (int i = 0; i < TR; ++i) {
        const i64 k = i < tr ? idx[r0 + i] : 0;
        ts.rtop[i] = i < tr ? st.rtop[k] : T(0);
        ts.rl[i] = i < tr ? st.rl[k] : T(0);
        if (i < tr) {
            R = ts.rtop[i] > R ? ts.rtop[i] : R;
            tmin = ts.rtop[i] < tmin ? ts.rtop[i] : tmin;
        }
    }
    const bool ok = (R - tmin <= IfLim<T>::reuse) && std::isfinite(R) && std::isfinite(tmin);
    if (ok)
        for (int i = 0; i < TR; ++i) ts.Ar[i] = i < tr ? std::exp((ts.rtop[i] - R) + ts.rl[i]) : T(0);
    return ok;
}

// Column tile [c0, c0 + tc) against the row tile [r0, r0 + tr): the rows' argmax columns (or none:
// `args` false, when the statistics were folded from the very tiles the G step reads) and the
// columns' statistics; returns whether the one-exponential path applies (rows_ok: if_load_rows).
template <class T>
bool if_load_cols(const LineStats<T>& st, const i64* ECIF_RESTRICT idx, i64 r0, int tr, i64 c0, int tc,
                  bool rows_ok, T R, bool args, IfTile<T>& ts) {
    using V = typename Vec<T>::V;
    constexpr int W = IfCfg<T>::W, TR = IfCfg<T>::TR, TC = IfCfg<T>::TC;
    constexpr T kInfT = std::numeric_limits<T>::infinity();
    for (int i = 0; i < TR; ++i) {
        const i64 a = args && i < tr ? st.rarg[idx[r0 + i]] - c0 : -1;
        ts.ra[i] = a >= 0 && a < tc ? T(a) : T(-1);
    }
    T cmin = kInfT;
    bool cfin = true;
    for (int j = 0; j < TC; ++j) {
        const bool in = j < tc;
        const i64 k = in ? idx[c0 + j] : 0;
        const i64 a = args && in ? st.carg[k] - r0 : -1;
        ts.ctop[j] = in ? st.ctop[k] : kInfT;
        ts.cl[j] = in ? st.cl[k] : T(0);
        ts.ca[j] = a >= 0 && a < tr ? T(a) : T(-1);
        ts.vm[j] = in ? T(1) : T(0);
        if (in) {
            cmin = ts.ctop[j] < cmin ? ts.ctop[j] : cmin;
            cfin = cfin && std::isfinite(ts.ctop[j]);
        }
    }
    const bool reuse = rows_ok && cfin && (R - cmin <= IfLim<T>::reuse);
    if (reuse) {  // (past the batch: top = +inf, so both are exp(-inf) = 0)
        const V vR = vsplat(R);
        for (int j = 0; j < TC; j += W) {
            vstore(ts.ecl + j, vexp<true>(-vload(ts.cl + j)) * vload(ts.vm + j));
            vstore(ts.Bc + j, vexp<true>((vR - vload(ts.ctop + j)) - vload(ts.cl + j)));
        }
    }
    return reuse;
}

// t * G in place over rows [0, tr) of a score tile (kScaled: the tile holds t*S, else S), for
// G = P + Qc - 2I with P = exp(z_r - l_i), Qc = exp(z_c - l_j), z = S - top off the line's maximum
// and 0 at it (at its arg, and wherever S == top: exactly 0 then anyway). The one-exponential path
// (reuse) writes Qc = P * Ar_i * Bc_j off the column maxima (exp(S - lse_j) = exp(S - lse_i)
// exp(lse_i - R) exp(R - lse_j): every factor is bounded, and a term lost to underflow of P is
// < exp(kReuse + exp_lo), negligible) and exp(-l_j) at them. jd0: row i holds the diagonal at column
// i + jd0. Returns the tile's sum of G o S.
template <class T, bool kScaled>
double if_form_g(T* ECIF_RESTRICT S, int tr, int tc, i64 jd0, const IfTile<T>& ts, bool reuse, T t) {
    using V = typename Vec<T>::V;
    constexpr int W = IfCfg<T>::W, TC = IfCfg<T>::TC;
    const V vt = vsplat(t);
    V vdls = V{};
    double dls = 0.0;
    for (int i = 0; i < tr; ++i) {
        T* ECIF_RESTRICT s = S + i * TC;
        const i64 jd = i + jd0;
        const bool has_diag = jd >= 0 && jd < tc;
        const T sdiag = has_diag ? (kScaled ? s[jd] : s[jd] * t) : T(0);
        const V vtop = vsplat(ts.rtop[i]), vl = vsplat(ts.rl[i]), vra = vsplat(ts.ra[i]), vi = vsplat(T(i));
        if (reuse) {
            const V vA = vsplat(ts.Ar[i]);
            for (int j = 0; j < TC; j += W) {
                const V sv = kScaled ? vload(s + j) : vload(s + j) * vt;
                const V e = vexp<true>(vselect(vload(ts.cix + j) == vra, V{}, sv - vtop) - vl);
                const auto cmax = (vload(ts.ca + j) == vi) | (sv == vload(ts.ctop + j));
                const V qc = vselect(cmax, vload(ts.ecl + j), e * (vA * vload(ts.Bc + j)));
                const V g = e * vload(ts.vm + j) + qc;
                vdls += g * sv;
                vstore(s + j, g * vt);
            }
        } else {
            for (int j = 0; j < TC; j += W) {
                const V sv = kScaled ? vload(s + j) : vload(s + j) * vt;
                const V zr = vselect(vload(ts.cix + j) == vra, V{}, sv - vtop);
                const V zc = vselect(vload(ts.ca + j) == vi, V{}, sv - vload(ts.ctop + j));
                const V g = vexp<true>(zr - vl) * vload(ts.vm + j) + vexp<true>(zc - vload(ts.cl + j));
                vdls += g * sv;
                vstore(s + j, g * vt);
            }
        }
        if (has_diag) {
            s[jd] -= T(2) * t;
            dls -= 2.0 * double(sdiag);
        }
    }
    return dls + double(hsum<T>(vdls));
}

template <class T>
void infonce_task_impl(const InfonceProblem<T>& p, i64 b, i64 rt, T* ws, T* dVdst, bool with_scale,
                       double* dls, const T* vpacked, i64 ct0, i64 ct1) {
    using C = IfCfg<T>;
    constexpr int MR = C::MR, NR = C::NR, TR = C::TR, TC = C::TC, KC = C::KC;
    const i64 d = p.d;
    const i64 dp = infonce_padded_d(d);
    const i64 off = p.offsets[b];
    const i64 B = p.offsets[b + 1] - off;
    const i64* ECIF_RESTRICT idx = p.perm + off;
    const i64 r0 = rt * TR;
    const int tr = int(if_imin(TR, B - r0));
    const int npu = (tr + MR - 1) / MR;
    const T t = p.scale;

    T* ECIF_RESTRICT Up = ws;                  // [TR/MR][dp][MR]
    T* ECIF_RESTRICT Uq = Up + i64(TR) * dp;   // [dp/NR][TR][NR]
    T* ECIF_RESTRICT Vp = Uq + i64(TR) * dp;   // [TC/NR][dp][NR]  (NR-row panels of V: B of S)
    T* ECIF_RESTRICT Vq = Vp + i64(TC) * dp;   // [dp/NR][TC][NR]
    T* ECIF_RESTRICT dUa = Vq + i64(TC) * dp;  // [TR][dp] dU accumulator
    T* ECIF_RESTRICT dVt = dUa + i64(TR) * dp; // [TC][dp] dV of one column tile
    T* ECIF_RESTRICT S = dVt + i64(TC) * dp;   // [TR][TC] score tile, then t*G
    IfTile<T> ts(S + TR * TC);                 // line statistics of the tile

    if_pack_panels<T, MR>(p.U, idx + r0, tr, TR, d, dp, Up);
    if_pack_rows<T>(p.U, idx + r0, tr, TR, d, dp, Uq);
    if (ct0 == 0) {
        for (i64 q = 0; q < i64(TR) * dp; ++q) dUa[q] = T(0);
    } else {  // continue the row tile's dU sum from the previous column chunk (stored exactly in p.dU)
        for (int i = 0; i < TR; ++i) {
            T* ECIF_RESTRICT a = dUa + i64(i) * dp;
            if (i < tr) {
                const T* ECIF_RESTRICT src = p.dU + idx[r0 + i] * d;
                for (i64 k = 0; k < d; ++k) a[k] = src[k];
                for (i64 k = d; k < dp; ++k) a[k] = T(0);
            } else {
                for (i64 k = 0; k < dp; ++k) a[k] = T(0);
            }
        }
    }
    T R;
    const bool rows_ok = if_load_rows(p.stats, idx, r0, tr, ts, R);
    double dls_local = 0.0;

    for (i64 ct = ct0; ct < ct1; ++ct) {
        const i64 c0 = ct * TC;
        const int tc = int(if_imin(TC, B - c0));
        const int npc = (tc + MR - 1) / MR;
        const T* ECIF_RESTRICT Vt = Vp;
        if (vpacked) {
            Vt = vpacked + ct * TC * dp;
        } else {
            if_pack_panels<T, NR>(p.V, idx + c0, tc, TC, d, dp, Vp);
        }
        if_pack_rows<T>(p.V, idx + c0, tc, TC, d, dp, Vq);
        const bool reuse = if_load_cols(p.stats, idx, r0, tr, c0, tc, rows_ok, R, true, ts);

        // 1. Unscaled score tile (rows past the batch are zero panels; computed, then overwritten).
        if (d == 0)
            for (int q = 0; q < TR * TC; ++q) S[q] = T(0);
        for (i64 k0 = 0; k0 < d; k0 += KC) {
            const int kc = int(if_imin(KC, d - k0));
            for (int q = 0; q < TC / NR; ++q) {  // all panels: columns past the batch are zero, not garbage
                const T* bp = Vt + (i64(q) * dp + k0) * NR;
                for (int pu = 0; pu < npu; ++pu)
                    if_micro<T, 1, MR>(Up + (i64(pu) * dp + k0) * MR, bp, kc, S + pu * MR * TC + q * NR, TC,
                                       k0 > 0);
            }
        }

        // 2. t * G in place (rows past the batch: zero; columns past it: masked to zero).
        const double g_s = if_form_g<T, false>(S, tr, tc, r0 - c0, ts, reuse, t);
        for (int q = tr * TC; q < TR * TC; ++q) S[q] = T(0);
        if (with_scale) dls_local += g_s;

        // 3. dU_tile += (tG) V_tile
        for (i64 q = 0; q < dp / NR; ++q) {
            const T* bp = Vq + q * TC * NR;
            for (int pu = 0; pu < npu; ++pu)
                if_micro<T, TC, 1>(S + pu * MR * TC, bp, tc, dUa + pu * MR * dp + q * NR, dp, true);
        }
        // 4. dV_tile = (tG)^T U_tile, added to (or, single-task batch, written to) its destination
        for (i64 q = 0; q < dp / NR; ++q) {
            const T* bp = Uq + q * TR * NR;
            for (int pc = 0; pc < npc; ++pc)
                if_micro<T, 1, TC>(S + pc * MR, bp, tr, dVt + pc * MR * dp + q * NR, dp, false);
        }
        if (dVdst) {
            for (int j = 0; j < tc; ++j) {
                T* ECIF_RESTRICT dst = dVdst + (c0 - ct0 * TC + j) * d;
                const T* ECIF_RESTRICT src = dVt + j * dp;
                for (i64 k = 0; k < d; ++k) dst[k] += src[k];
            }
        } else {
            for (int j = 0; j < tc; ++j) {
                T* ECIF_RESTRICT dst = p.dV + idx[c0 + j] * d;
                const T* ECIF_RESTRICT src = dVt + j * dp;
                for (i64 k = 0; k < d; ++k) dst[k] = src[k];
            }
        }
    }

    for (int i = 0; i < tr; ++i) {
        T* ECIF_RESTRICT dst = p.dU + idx[r0 + i] * d;
        const T* ECIF_RESTRICT src = dUa + i * dp;
        for (i64 k = 0; k < d; ++k) dst[k] = src[k];
    }
    if (with_scale) *dls += dls_local;
}

// ---- Per-batch mode: a whole batch on one thread, its score tiles cached ---------------------------

// Row i of a tile: fold the scores s[0..TC) (columns with vm == 0 excluded) into the running
// (max, sum of exp(x - max)) state (M, Ssum).
template <class T>
ECIF_INLINE void if_row_fold(const T* ECIF_RESTRICT s, const T* ECIF_RESTRICT vm, T& M, T& Ssum) {
    using V = typename Vec<T>::V;
    constexpr int W = Vec<T>::W, TC = IfCfg<T>::TC;
    const V vninf = vsplat(-std::numeric_limits<T>::infinity()), vzero = V{};
    V mx = vninf;
    for (int j = 0; j < TC; j += W) mx = vmax(mx, vselect(vload(vm + j) > vzero, vload(s + j), vninf));
    const T a = hmax<T>(mx);
    const T Mn = a > M ? a : M;
    if (!(Mn > -std::numeric_limits<T>::infinity())) return;  // nothing finite yet
    const V vM = vsplat(Mn);
    V acc = V{};
    for (int j = 0; j < TC; j += W) acc += vexp<true>(vload(s + j) - vM) * vload(vm + j);
    Ssum = (Ssum != T(0) ? Ssum * std::exp(M - Mn) : T(0)) + hsum<T>(acc);
    M = Mn;
}

template <class T>
void infonce_batch_impl(const InfonceProblem<T>& p, i64 b, T* ws, T* cache, bool with_scale, double* dls) {
    using C = IfCfg<T>;
    using V = typename Vec<T>::V;
    constexpr int W = C::W, MR = C::MR, NR = C::NR, TR = C::TR, TC = C::TC, KC = C::KC;
    constexpr T kInfT = std::numeric_limits<T>::infinity();
    const i64 d = p.d;
    const i64 dp = infonce_padded_d(d);
    const i64 off = p.offsets[b];
    const i64 B = p.offsets[b + 1] - off;
    const i64* ECIF_RESTRICT idx = p.perm + off;
    const i64 nrt = (B + TR - 1) / TR, nct = (B + TC - 1) / TC;
    const i64 Bp = nct * TC;
    const T t = p.scale;
    const V vt = vsplat(t);
    const LineStats<T>& st = p.stats;

    T* ECIF_RESTRICT Vp = ws;                  // nct x [TC/NR][dp][NR]  (B operand of S)
    T* ECIF_RESTRICT Vq = Vp + Bp * dp;        // nct x [dp/NR][TC][NR]  (B operand of dU)
    T* ECIF_RESTRICT dVa = Vq + Bp * dp;       // [Bp][dp] dV accumulator of the batch
    T* ECIF_RESTRICT Up = dVa + Bp * dp;       // [TR/MR][dp][MR]        (A operand of S)
    T* ECIF_RESTRICT Uq = Up + i64(TR) * dp;   // [dp/NR][TR][NR]        (B operand of dV)
    T* ECIF_RESTRICT dUa = Uq + i64(TR) * dp;  // [TR][dp] dU accumulator of a row tile
    T* ECIF_RESTRICT cM = dUa + i64(TR) * dp;  // [Bp] running column max
    T* ECIF_RESTRICT cS = cM + Bp;             // [Bp] running column sum of exp(s - cM)
    T* ECIF_RESTRICT rM = cS + Bp;             // [TR] running row max
    T* ECIF_RESTRICT rS = rM + TR;             // [TR] running row sum
    T* ECIF_RESTRICT vm = rS + TR;             // [TC] 1 for columns in the batch, 0 past it
    IfTile<T> ts(vm + TC);                     // line statistics of a tile (pass 2)

    for (i64 ct = 0; ct < nct; ++ct) {
        const int tc = int(if_imin(TC, B - ct * TC));
        if_pack_panels<T, NR>(p.V, idx + ct * TC, tc, TC, d, dp, Vp + ct * TC * dp);
        if_pack_rows<T>(p.V, idx + ct * TC, tc, TC, d, dp, Vq + ct * TC * dp);
    }
    for (i64 j = 0; j < Bp; ++j) {
        cM[j] = -kInfT;
        cS[j] = T(0);
    }
    for (i64 q = 0; q < Bp * dp; ++q) dVa[q] = T(0);

    // Pass 1: every scaled score tile once (kept in the cache), row and column line statistics (top
    // and l; pass 2 reads the same cached tiles, so a line's maximum is where S == top exactly).
    for (i64 rt = 0; rt < nrt; ++rt) {
        const i64 r0 = rt * TR;
        const int tr = int(if_imin(TR, B - r0));
        const int npu = (tr + MR - 1) / MR;
        if_pack_panels<T, MR>(p.U, idx + r0, tr, TR, d, dp, Up);
        for (int i = 0; i < TR; ++i) {
            rM[i] = -kInfT;
            rS[i] = T(0);
        }
        for (i64 ct = 0; ct < nct; ++ct) {
            const i64 c0 = ct * TC;
            const int tc = int(if_imin(TC, B - c0));
            T* ECIF_RESTRICT S = cache + (rt * nct + ct) * TR * TC;
            const T* Vt = Vp + ct * TC * dp;
            const int nq = (tc + NR - 1) / NR;  // column panels holding batch columns
            if (d == 0)
                for (int q = 0; q < TR * TC; ++q) S[q] = T(0);
            for (i64 k0 = 0; k0 < d; k0 += KC) {
                const int kc = int(if_imin(KC, d - k0));
                for (int q = 0; q < nq; ++q) {
                    const T* bp = Vt + (i64(q) * dp + k0) * NR;
                    for (int pu = 0; pu < npu; ++pu)
                        if_micro<T, 1, MR>(Up + (i64(pu) * dp + k0) * MR, bp, kc, S + pu * MR * TC + q * NR, TC,
                                           k0 > 0);
                }
            }
            // Rows [tr, npu*MR) are zero (zero panels) up to column nq*NR; rows past tr are only read
            // there (the dU product's inner dimension is tc); rows past npu*MR are never read. Columns
            // past the batch are zero (finite; those past nq*NR zeroed here) and masked out of the
            // statistics.
            for (int i = 0; i < tr; ++i) {
                for (int j = 0; j < nq * NR; j += W) vstore(S + i * TC + j, vload(S + i * TC + j) * vt);
                for (int j = nq * NR; j < TC; ++j) S[i * TC + j] = T(0);
            }
            for (int j = 0; j < TC; ++j) vm[j] = j < tc ? T(1) : T(0);
            for (int i = 0; i < tr; ++i) if_row_fold<T>(S + i * TC, vm, rM[i], rS[i]);
            for (int j = 0; j < TC; j += W) {  // columns, vectorised along j
                V mx = vload(cM + c0 + j);
                for (int i = 0; i < tr; ++i) mx = vmax(mx, vload(S + i * TC + j));
                V acc = V{};
                for (int i = 0; i < tr; ++i) acc += vexp<true>(vload(S + i * TC + j) - mx);
                // old sum rescaled; exp(-inf - finite) = 0 (vexp<true> flushes underflow)
                vstore(cS + c0 + j, vload(cS + c0 + j) * vexp<true>(vload(cM + c0 + j) - mx) + acc);
                vstore(cM + c0 + j, mx);
            }
        }
        for (int i = 0; i < tr; ++i) {
            const i64 k = idx[r0 + i];
            st.rtop[k] = rM[i];
            st.rl[k] = std::log(rS[i]);
        }
    }
    for (i64 j = 0; j < B; ++j) {
        const i64 k = idx[j];
        st.ctop[k] = cM[j];
        st.cl[k] = std::log(cS[j]);
    }

    // Pass 2: G in each cached tile, dU = t G V (per row tile), dV = t G^T U (whole batch).
    double dls_local = 0.0;
    for (i64 rt = 0; rt < nrt; ++rt) {
        const i64 r0 = rt * TR;
        const int tr = int(if_imin(TR, B - r0));
        const int npu = (tr + MR - 1) / MR;
        if_pack_rows<T>(p.U, idx + r0, tr, TR, d, dp, Uq);
        for (i64 q = 0; q < i64(TR) * dp; ++q) dUa[q] = T(0);
        T R;
        const bool rows_ok = if_load_rows(st, idx, r0, tr, ts, R);

        for (i64 ct = 0; ct < nct; ++ct) {
            const i64 c0 = ct * TC;
            const int tc = int(if_imin(TC, B - c0));
            const int npc = (tc + MR - 1) / MR;
            T* ECIF_RESTRICT S = cache + (rt * nct + ct) * TR * TC;
            const bool reuse = if_load_cols(st, idx, r0, tr, c0, tc, rows_ok, R, false, ts);

            // t * G in place (the tile holds scaled scores; rows past the batch stay zero).
            const double g_s = if_form_g<T, true>(S, tr, tc, r0 - c0, ts, reuse, t);
            if (with_scale) dls_local += g_s;

            // dU_tile += (tG) V_tile
            const T* Vr = Vq + ct * TC * dp;
            for (i64 q = 0; q < dp / NR; ++q) {
                const T* bp = Vr + q * TC * NR;
                for (int pu = 0; pu < npu; ++pu)
                    if_micro<T, TC, 1>(S + pu * MR * TC, bp, tc, dUa + pu * MR * dp + q * NR, dp, true);
            }
            // dV_tile += (tG)^T U_tile, straight into the batch accumulator
            T* dVt = dVa + c0 * dp;
            for (i64 q = 0; q < dp / NR; ++q) {
                const T* bp = Uq + q * TR * NR;
                for (int pc = 0; pc < npc; ++pc)
                    if_micro<T, 1, TC>(S + pc * MR, bp, tr, dVt + pc * MR * dp + q * NR, dp, true);
            }
        }
        for (int i = 0; i < tr; ++i) {
            T* ECIF_RESTRICT dst = p.dU + idx[r0 + i] * d;
            const T* ECIF_RESTRICT src = dUa + i * dp;
            for (i64 k = 0; k < d; ++k) dst[k] = src[k];
        }
    }
    for (i64 j = 0; j < B; ++j) {
        T* ECIF_RESTRICT dst = p.dV + idx[j] * d;
        const T* ECIF_RESTRICT src = dVa + j * dp;
        for (i64 k = 0; k < d; ++k) dst[k] = src[k];
    }
    if (with_scale) *dls += dls_local;
}

}  // namespace

void infonce_task(const InfonceProblem<float>& p, std::int64_t b, std::int64_t rt, float* ws, float* dVdst,
                  bool with_scale, double* dls, const float* vpacked, std::int64_t ct0, std::int64_t ct1) {
    infonce_task_impl<float>(p, b, rt, ws, dVdst, with_scale, dls, vpacked, ct0, ct1);
}
void infonce_task(const InfonceProblem<double>& p, std::int64_t b, std::int64_t rt, double* ws,
                  double* dVdst, bool with_scale, double* dls, const double* vpacked, std::int64_t ct0,
                  std::int64_t ct1) {
    infonce_task_impl<double>(p, b, rt, ws, dVdst, with_scale, dls, vpacked, ct0, ct1);
}
void infonce_pack_cols(const InfonceProblem<float>& p, std::int64_t b, std::int64_t ct, float* dst) {
    const i64 off = p.offsets[b], B = p.offsets[b + 1] - off;
    if_pack_panels<float, IfCfg<float>::NR>(p.V, p.perm + off + ct * kIfCols, int(if_imin(kIfCols, B - ct * kIfCols)),
                                            int(kIfCols), p.d, infonce_padded_d(p.d), dst);
}
void infonce_pack_cols(const InfonceProblem<double>& p, std::int64_t b, std::int64_t ct, double* dst) {
    const i64 off = p.offsets[b], B = p.offsets[b + 1] - off;
    if_pack_panels<double, IfCfg<double>::NR>(p.V, p.perm + off + ct * kIfCols, int(if_imin(kIfCols, B - ct * kIfCols)),
                                              int(kIfCols), p.d, infonce_padded_d(p.d), dst);
}

void infonce_batch(const InfonceProblem<float>& p, std::int64_t b, float* ws, float* cache, bool with_scale,
                   double* dls) {
    infonce_batch_impl<float>(p, b, ws, cache, with_scale, dls);
}
void infonce_batch(const InfonceProblem<double>& p, std::int64_t b, double* ws, double* cache, bool with_scale,
                   double* dls) {
    infonce_batch_impl<double>(p, b, ws, cache, with_scale, dls);
}

}  // namespace ECIF_ISA_NS
}  // namespace ecif
