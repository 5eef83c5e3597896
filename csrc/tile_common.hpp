// Building blocks shared by the per-ISA tile kernels (lse_kernel.hpp, infonce_kernel.hpp,
// directional_kernel.hpp): the register-blocked micro-kernel and the two packed layouts.
//
// Like vec.hpp, everything has internal linkage and is instantiated once per instruction-set
// translation unit (the includer defines ECIF_VEC_BYTES and is compiled with the matching -m flags).
//
// Layouts (rows gathered through an index list, zero padded):
//   panels  P[tot/MH][dp][MH]: MH consecutive rows interleaved along the inner dimension. The A operand
//           of a score product uses MH = MR (broadcast one element per micro-tile row), the B operand
//           MH = NR (one NR-wide vector load per inner index);
//   rows    Q[dp/NR][tot][NR]: NR-column chunks of the row-major rows, the B operand of the products
//           G·X whose inner dimension is the tile's row/column index.
#pragma once

#include <cstdint>

#include "vec.hpp"

namespace ecif {
namespace {

using tc_i64 = std::int64_t;

ECIF_INLINE tc_i64 tc_imin(tc_i64 a, tc_i64 b) { return a < b ? a : b; }

// Geometry of the square-tile kernels (infonce, directional): MR x NR micro-tiles (NR = NV vectors),
// TR x TC score tiles, d padded to a multiple of PAD in the packed panels, KC-blocked inner dimension.
// Both tile sides serve as either operand, so each must be a multiple of MR and of NR.
template <class T, int MR_, tc_i64 TR_, tc_i64 TC_, tc_i64 PAD>
struct TileCfg {
    static constexpr int W = Vec<T>::W;
    static constexpr int MR = MR_;
    static constexpr int NV = 2;
    static constexpr int NR = NV * W;
    static constexpr int TR = int(TR_);
    static constexpr int TC = int(TC_);
    static constexpr int KC = 256;
    static_assert(TR % MR == 0 && TC % MR == 0, "tiles must be multiples of MR");
    static_assert(TR % NR == 0 && TC % NR == 0, "tiles must be multiples of NR");
    static_assert(PAD % NR == 0, "the d padding must be a multiple of NR");
};

// c[MR x NV*W] (row stride ldc) (+)= sum_k a[k*KS + r*RS] * b[k*NR + v], NR = NV*W.
// The A operand is read through compile-time strides: RS between micro-tile rows, KS along the
// inner dimension, so a row-major tile G serves as A (RS = ld, KS = 1) and so does its transpose
// (RS = 1, KS = ld) without repacking.
template <class T, int MR, int NV, int RS, int KS>
ECIF_INLINE void tc_micro(const T* ECIF_RESTRICT a, const T* ECIF_RESTRICT b, int kc, T* ECIF_RESTRICT c,
                          tc_i64 ldc, bool accumulate) {
    using V = typename Vec<T>::V;
    constexpr int W = Vec<T>::W, NR = NV * W;
    V acc[MR][NV];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V{};
    for (int k = 0; k < kc; ++k) {
        V bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) bv[v] = vload(b + k * NR + v * W);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
            const V ar = vsplat(a[k * KS + r * RS]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
            T* dst = c + r * ldc + v * W;
            vstore(dst, accumulate ? vload(dst) + acc[r][v] : acc[r][v]);
        }
}

// Pack `cnt` (<= `tot`) gathered rows src[idx[0..cnt)] (length d) as panels P[tot/MH][dp][MH], zero
// padded to tot rows and dp columns. Writes are sequential; the reads walk MH rows in step.
template <class T, int MH>
void tc_pack_panels(const T* ECIF_RESTRICT src, const tc_i64* ECIF_RESTRICT idx, int cnt, int tot, tc_i64 d,
                    tc_i64 dp, T* ECIF_RESTRICT P) {
    for (int g = 0; g < tot / MH; ++g) {
        T* ECIF_RESTRICT out = P + tc_i64(g) * dp * MH;
        const int m = int(tc_imin(MH, tc_i64(cnt) - tc_i64(g) * MH));
        if (m <= 0) {
            for (tc_i64 q = 0; q < dp * MH; ++q) out[q] = T(0);
            continue;
        }
        const T* rows[MH];
        for (int c = 0; c < m; ++c) rows[c] = src + idx[g * MH + c] * d;
        for (tc_i64 k = 0; k < d; ++k) {
            for (int c = 0; c < m; ++c) out[k * MH + c] = rows[c][k];
            for (int c = m; c < MH; ++c) out[k * MH + c] = T(0);
        }
        for (tc_i64 q = d * MH; q < dp * MH; ++q) out[q] = T(0);
    }
}

// The same rows as NR-column chunks Q[dp/NR][tot][NR] (dp a multiple of NR).
template <class T, int NR>
void tc_pack_rows(const T* ECIF_RESTRICT src, const tc_i64* ECIF_RESTRICT idx, int cnt, int tot, tc_i64 d,
                  tc_i64 dp, T* ECIF_RESTRICT Q) {
    const tc_i64 full = d / NR;  // chunks without padding
    for (int i = 0; i < tot; ++i) {
        T* ECIF_RESTRICT qq = Q + tc_i64(i) * NR;
        if (i < cnt) {
            const T* ECIF_RESTRICT s = src + idx[i] * d;
            for (tc_i64 q = 0; q < full; ++q)
                for (int c = 0; c < NR; ++c) qq[q * tot * NR + c] = s[q * NR + c];
            for (tc_i64 q = full; q < dp / NR; ++q)
                for (int c = 0; c < NR; ++c) {
                    const tc_i64 k = q * NR + c;
                    qq[q * tot * NR + c] = k < d ? s[k] : T(0);
                }
        } else {
            for (tc_i64 q = 0; q < dp / NR; ++q)
                for (int c = 0; c < NR; ++c) qq[q * tot * NR + c] = T(0);
        }
    }
}

}  // namespace
}  // namespace ecif
