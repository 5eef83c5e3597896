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
//   2. G tile in place: g_ij = exp(s_ij - r_i) + exp(s_ij - c_j) - 2 delta_ij, scaled by t.
//      When the tile's log-sum-exps are within kReuse of each other (the common case) the column
//      term reuses the row exponential: exp(s - c_j) = exp(s - r_i) * exp(r_i - m) * exp(m - c_j)
//      (m = max r_i; every factor is bounded, and a term lost to underflow of exp(s - r_i) is
//      < exp(kReuse + exp_lo), negligible): one exponential per score instead of two;
//   3. dU_tile (TR x dp) += G (TR x TC) * V_tile, accumulated over all column tiles in the workspace;
//   4. dV_tile (TC x dp)  = G^T (TC x TR) * U_tile, added to the task's destination.
// The same micro-kernel serves all three products: its A operand is read through compile-time
// strides (RS between micro-tile rows, KS along the inner dimension), so G is never repacked: the
// dU product reads G's rows (RS = TC, KS = 1) and the dV product its columns (RS = 1, KS = TC).
//
// infonce_batch (per-batch mode) runs a whole batch with the same pieces: V packed once per batch in
// both layouts, every scaled score tile computed once into the batch cache with the row / column
// log-sum-exps folded from it (running max and sum), then steps 2-4 on the cached tiles, dV
// accumulated for the whole batch in the workspace (no partials, no second score product).
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

template <class T>
void infonce_task_impl(const InfonceProblem<T>& p, i64 b, i64 rt, T* ws, T* dVdst, bool with_scale,
                       double* dls, const T* vpacked, i64 ct0, i64 ct1) {
    using C = IfCfg<T>;
    using V = typename Vec<T>::V;
    constexpr int W = C::W, MR = C::MR, NR = C::NR, TR = C::TR, TC = C::TC, KC = C::KC;
    const i64 d = p.d;
    const i64 dp = infonce_padded_d(d);
    const i64 off = p.offsets[b];
    const i64 B = p.offsets[b + 1] - off;
    const i64* ECIF_RESTRICT idx = p.perm + off;
    const i64 r0 = rt * TR;
    const int tr = int(if_imin(TR, B - r0));
    const int npu = (tr + MR - 1) / MR;
    const T t = p.scale;
    const V vt = vsplat(t);

    T* ECIF_RESTRICT Up = ws;                  // [TR/MR][dp][MR]
    T* ECIF_RESTRICT Uq = Up + i64(TR) * dp;   // [dp/NR][TR][NR]
    T* ECIF_RESTRICT Vp = Uq + i64(TR) * dp;   // [TC/NR][dp][NR]  (NR-row panels of V: B of S)
    T* ECIF_RESTRICT Vq = Vp + i64(TC) * dp;   // [dp/NR][TC][NR]
    T* ECIF_RESTRICT dUa = Vq + i64(TC) * dp;  // [TR][dp] dU accumulator
    T* ECIF_RESTRICT dVt = dUa + i64(TR) * dp; // [TC][dp] dV of one column tile
    T* ECIF_RESTRICT S = dVt + i64(TC) * dp;   // [TR][TC] score tile, then t*G
    T* ECIF_RESTRICT rl = S + TR * TC;         // [TR] row log-sum-exps
    T* ECIF_RESTRICT Ar = rl + TR;             // [TR] exp(r_i - m)
    T* ECIF_RESTRICT cl = Ar + TR;             // [TC] column log-sum-exps (+inf past the batch)
    T* ECIF_RESTRICT Bc = cl + TC;             // [TC] exp(m - c_j) (0 past the batch)
    T* ECIF_RESTRICT vm = Bc + TC;             // [TC] 1 for columns in the batch, 0 past it

    if_pack_panels<T, MR>(p.U, idx + r0, tr, TR, d, dp, Up);
    if_pack_rows<T>(p.U, idx + r0, tr, TR, d, dp, Uq);
    for (int i = 0; i < TR; ++i) rl[i] = i < tr ? p.row[idx[r0 + i]] : T(0);
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
    T rmax = -std::numeric_limits<T>::infinity(), rmin = std::numeric_limits<T>::infinity();
    for (int i = 0; i < tr; ++i) {
        rmax = rl[i] > rmax ? rl[i] : rmax;
        rmin = rl[i] < rmin ? rl[i] : rmin;
    }
    const bool rows_ok = (rmax - rmin <= IfLim<T>::reuse) && std::isfinite(rmax) && std::isfinite(rmin);
    if (rows_ok)
        for (int i = 0; i < TR; ++i) Ar[i] = i < tr ? std::exp(rl[i] - rmax) : T(0);
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
        T cmin = std::numeric_limits<T>::infinity();
        bool cfin = true;
        for (int j = 0; j < TC; ++j) {
            const bool in = j < tc;
            cl[j] = in ? p.col[idx[c0 + j]] : std::numeric_limits<T>::infinity();
            vm[j] = in ? T(1) : T(0);
            if (in) {
                cmin = cl[j] < cmin ? cl[j] : cmin;
                cfin = cfin && std::isfinite(cl[j]);
            }
        }
        const bool reuse = rows_ok && cfin && (rmax - cmin <= IfLim<T>::reuse);
        if (reuse)
            for (int j = 0; j < TC; ++j) Bc[j] = j < tc ? std::exp(rmax - cl[j]) : T(0);

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
        const i64 jd0 = r0 - c0;  // row i holds the diagonal at column i + jd0
        V vdls = V{};
        for (int i = 0; i < tr; ++i) {
            T* ECIF_RESTRICT s = S + i * TC;
            const i64 jd = i + jd0;
            const bool has_diag = jd >= 0 && jd < tc;
            const T sdiag = has_diag ? s[jd] * t : T(0);
            const V va = vsplat(rl[i]);
            if (reuse) {
                const V vA = vsplat(Ar[i]);
                for (int j = 0; j < TC; j += W) {
                    const V sv = vload(s + j) * vt;
                    const V e = vexp<true>(sv - va);
                    const V g = e * (vload(vm + j) + vA * vload(Bc + j));
                    vdls += g * sv;
                    vstore(s + j, g * vt);
                }
            } else {
                for (int j = 0; j < TC; j += W) {
                    const V sv = vload(s + j) * vt;
                    const V g = vexp<true>(sv - va) * vload(vm + j) + vexp<true>(sv - vload(cl + j));
                    vdls += g * sv;
                    vstore(s + j, g * vt);
                }
            }
            if (has_diag) {
                s[jd] -= T(2) * t;
                dls_local -= 2.0 * double(sdiag);
            }
        }
        for (int q = tr * TC; q < TR * TC; ++q) S[q] = T(0);
        if (with_scale) dls_local += double(hsum<T>(vdls));

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

    T* ECIF_RESTRICT Vp = ws;                  // nct x [TC/NR][dp][NR]  (B operand of S)
    T* ECIF_RESTRICT Vq = Vp + Bp * dp;        // nct x [dp/NR][TC][NR]  (B operand of dU)
    T* ECIF_RESTRICT dVa = Vq + Bp * dp;       // [Bp][dp] dV accumulator of the batch
    T* ECIF_RESTRICT Up = dVa + Bp * dp;       // [TR/MR][dp][MR]        (A operand of S)
    T* ECIF_RESTRICT Uq = Up + i64(TR) * dp;   // [dp/NR][TR][NR]        (B operand of dV)
    T* ECIF_RESTRICT dUa = Uq + i64(TR) * dp;  // [TR][dp] dU accumulator of a row tile
    T* ECIF_RESTRICT cM = dUa + i64(TR) * dp;  // [Bp] running column max
    T* ECIF_RESTRICT cS = cM + Bp;             // [Bp] running column sum of exp(s - cM)
    T* ECIF_RESTRICT clB = cS + Bp;            // [Bp] column log-sum-exps (+inf past the batch)
    T* ECIF_RESTRICT rlB = clB + Bp;           // [nrt*TR] row log-sum-exps
    T* ECIF_RESTRICT Ar = rlB + nrt * TR;      // [TR] exp(r_i - m)
    T* ECIF_RESTRICT Bc = Ar + TR;             // [TC] exp(m - c_j) (0 past the batch)
    T* ECIF_RESTRICT vm = Bc + TC;             // [TC] 1 for columns in the batch, 0 past it
    T* ECIF_RESTRICT rM = vm + TC;             // [TR] running row max
    T* ECIF_RESTRICT rS = rM + TR;             // [TR] running row sum

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

    // Pass 1: every scaled score tile once (kept in the cache), row and column log-sum-exps.
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
            const T r = rM[i] + std::log(rS[i]);
            rlB[r0 + i] = r;
            p.row[idx[r0 + i]] = r;
        }
    }
    for (i64 j = 0; j < Bp; ++j) {
        if (j < B) {
            const T c = cM[j] + std::log(cS[j]);
            clB[j] = c;
            p.col[idx[j]] = c;
        } else {
            clB[j] = kInfT;
        }
    }

    // Pass 2: G in each cached tile, dU = t G V (per row tile), dV = t G^T U (whole batch).
    double dls_local = 0.0;
    for (i64 rt = 0; rt < nrt; ++rt) {
        const i64 r0 = rt * TR;
        const int tr = int(if_imin(TR, B - r0));
        const int npu = (tr + MR - 1) / MR;
        if_pack_rows<T>(p.U, idx + r0, tr, TR, d, dp, Uq);
        for (i64 q = 0; q < i64(TR) * dp; ++q) dUa[q] = T(0);
        const T* rl = rlB + r0;
        T rmax = -kInfT, rmin = kInfT;
        for (int i = 0; i < tr; ++i) {
            rmax = rl[i] > rmax ? rl[i] : rmax;
            rmin = rl[i] < rmin ? rl[i] : rmin;
        }
        const bool rows_ok = (rmax - rmin <= IfLim<T>::reuse) && std::isfinite(rmax) && std::isfinite(rmin);
        if (rows_ok)
            for (int i = 0; i < TR; ++i) Ar[i] = i < tr ? std::exp(rl[i] - rmax) : T(0);

        for (i64 ct = 0; ct < nct; ++ct) {
            const i64 c0 = ct * TC;
            const int tc = int(if_imin(TC, B - c0));
            const int npc = (tc + MR - 1) / MR;
            const T* ECIF_RESTRICT cl = clB + c0;
            T* ECIF_RESTRICT S = cache + (rt * nct + ct) * TR * TC;
            T cmin = kInfT;
            bool cfin = true;
            for (int j = 0; j < TC; ++j) {
                vm[j] = j < tc ? T(1) : T(0);
                if (j < tc) {
                    cmin = cl[j] < cmin ? cl[j] : cmin;
                    cfin = cfin && std::isfinite(cl[j]);
                }
            }
            const bool reuse = rows_ok && cfin && (rmax - cmin <= IfLim<T>::reuse);
            if (reuse)
                for (int j = 0; j < TC; ++j) Bc[j] = j < tc ? std::exp(rmax - cl[j]) : T(0);

            // t * G in place (the tile holds scaled scores; rows past the batch stay zero).
            const i64 jd0 = r0 - c0;
            V vdls = V{};
            for (int i = 0; i < tr; ++i) {
                T* ECIF_RESTRICT s = S + i * TC;
                const i64 jd = i + jd0;
                const bool has_diag = jd >= 0 && jd < tc;
                const T sdiag = has_diag ? s[jd] : T(0);
                const V va = vsplat(rl[i]);
                if (reuse) {
                    const V vA = vsplat(Ar[i]);
                    for (int j = 0; j < TC; j += W) {
                        const V sv = vload(s + j);
                        const V e = vexp<true>(sv - va);
                        const V g = e * (vload(vm + j) + vA * vload(Bc + j));
                        vdls += g * sv;
                        vstore(s + j, g * vt);
                    }
                } else {
                    for (int j = 0; j < TC; j += W) {
                        const V sv = vload(s + j);
                        const V g = vexp<true>(sv - va) * vload(vm + j) + vexp<true>(sv - vload(cl + j));
                        vdls += g * sv;
                        vstore(s + j, g * vt);
                    }
                }
                if (has_diag) {
                    s[jd] -= T(2) * t;
                    dls_local -= 2.0 * double(sdiag);
                }
            }
            if (with_scale) dls_local += double(hsum<T>(vdls));

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
