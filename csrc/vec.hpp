// Portable SIMD building blocks for the per-ISA kernel translation units.
//
// Uses GCC/Clang vector extensions (`vector_size`), so there are no intrinsics: the compiler lowers
// the same source to SSE2, AVX2 or AVX-512 instructions depending on the -m flags of the file that
// includes this header. Define ECIF_VEC_BYTES (16, 32 or 64) before including. Everything here has
// internal linkage (anonymous namespace), so variants compiled with different flags never share a
// symbol (no ODR/ifunc hazards when one TU is built with -mavx2 and another without).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if !defined(ECIF_VEC_BYTES)
#error "define ECIF_VEC_BYTES before including vec.hpp"
#endif
#if !defined(__GNUC__)
#error "ecif_fast's C++ kernels need GCC or Clang (vector extensions)"
#endif

#define ECIF_RESTRICT __restrict__
#define ECIF_INLINE inline __attribute__((always_inline))

namespace ecif {
namespace {

typedef float vf_t __attribute__((vector_size(ECIF_VEC_BYTES)));
typedef std::int32_t vi32_t __attribute__((vector_size(ECIF_VEC_BYTES)));
typedef double vd_t __attribute__((vector_size(ECIF_VEC_BYTES)));
typedef std::int64_t vi64_t __attribute__((vector_size(ECIF_VEC_BYTES)));

template <class T>
struct Vec;
template <>
struct Vec<float> {
    using V = vf_t;
    using I = vi32_t;
    static constexpr int W = ECIF_VEC_BYTES / 4;
};
template <>
struct Vec<double> {
    using V = vd_t;
    using I = vi64_t;
    static constexpr int W = ECIF_VEC_BYTES / 8;
};

template <class T>
ECIF_INLINE typename Vec<T>::V vload(const T* p) {
    typename Vec<T>::V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}
template <class T>
ECIF_INLINE void vstore(T* p, typename Vec<T>::V v) {
    std::memcpy(p, &v, sizeof(v));
}
template <class T>
ECIF_INLINE typename Vec<T>::V vsplat(T x) {
    // x - 0 == x exactly (also for -0 and NaN), so this folds to a plain broadcast; `0 + x` would
    // not (0 + -0 = +0) and costs an extra add.
    return x - typename Vec<T>::V{};
}
// mask ? a : b, mask lanes all-ones or all-zeros (result of a vector comparison)
// (Vector ?: lets GCC emit blendv / max / min instead of and-andnot-or sequences.)
template <class V, class I>
ECIF_INLINE V vselect(I mask, V a, V b) {
#if defined(__clang__)
    return (V)(((I)a & mask) | ((I)b & ~mask));
#else
    return mask ? a : b;
#endif
}
// a > b ? a : b lane-wise (x86 maxps semantics: b when either is NaN)
template <class V>
ECIF_INLINE V vmax(V a, V b) {
#if defined(__clang__)
    return vselect(a > b, a, b);
#else
    return a > b ? a : b;
#endif
}
template <class V>
ECIF_INLINE V vmin(V a, V b) {
#if defined(__clang__)
    return vselect(a < b, a, b);
#else
    return a < b ? a : b;
#endif
}
template <class T>
ECIF_INLINE T hmax(typename Vec<T>::V v) {
    T r = v[0];
    for (int l = 1; l < Vec<T>::W; ++l) r = v[l] > r ? v[l] : r;
    return r;
}
template <class T>
ECIF_INLINE T hsum(typename Vec<T>::V v) {
    T r = v[0];
    for (int l = 1; l < Vec<T>::W; ++l) r += v[l];
    return r;
}

template <class T>
ECIF_INLINE T hmin(typename Vec<T>::V v) {
    T r = v[0];
    for (int l = 1; l < Vec<T>::W; ++l) r = v[l] < r ? v[l] : r;
    return r;
}

// exp(x), lane-wise. Cody-Waite reduction x = n ln2 + r (|r| <= ln2/2), polynomial for exp(r),
// 2^n written into the exponent bits; rounding to nearest uses the magic-number trick, so no
// float->int conversion instruction is needed (AVX2 has none for int64). Max error ~2 ulp (float),
// ~1e-16 relative (double).
// Checked = true: any x; x below lo (including -inf) gives exactly 0, x above hi is clamped (the
//   callers only pass x <= 0 or overwrite the result).
// Checked = false: caller guarantees lo <= x <= 0 (float lo = -87, double lo = -708); lanes outside
//   give garbage that the caller must mask away.
template <bool Checked>
ECIF_INLINE vf_t vexp(vf_t x) {
    vi32_t under{};
    if (Checked) {
        under = x < vsplat<float>(-87.0f);
        x = vmax(x, vsplat<float>(-87.0f));
        x = vmin(x, vsplat<float>(88.0f));
    }
    const vf_t magic = vsplat<float>(12582912.0f);  // 1.5 * 2^23
    const vf_t t = x * 1.44269504088896341f + magic;
    const vf_t nf = t - magic;
    const vi32_t ni = (vi32_t)t - (vi32_t)magic;
    vf_t r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    // Cephes expf minimax polynomial.
    vf_t p = vsplat<float>(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vf_t y = p * (vf_t)((ni + 127) << 23);
    if (Checked) return (vf_t)((vi32_t)y & ~under);
    return y;
}

template <bool Checked>
ECIF_INLINE vd_t vexp(vd_t x) {
    vi64_t under{};
    if (Checked) {
        under = x < vsplat<double>(-708.0);
        x = vmax(x, vsplat<double>(-708.0));
        x = vmin(x, vsplat<double>(709.0));
    }
    const vd_t magic = vsplat<double>(6755399441055744.0);  // 1.5 * 2^52
    const vd_t t = x * 1.4426950408889634074 + magic;
    const vd_t nf = t - magic;
    const vi64_t ni = (vi64_t)t - (vi64_t)magic;
    vd_t r = x - nf * 6.93147180369123816490e-01;  // ln2 high part (exact product for |n| < 2^20)
    r = r - nf * 1.90821492927058770002e-10;       // ln2 low part
    // Taylor series to degree 13: truncation error < 5e-18 on |r| <= ln2/2.
    vd_t p = vsplat<double>(1.0 / 6227020800.0);
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const vd_t y = p * (vd_t)((ni + 1023) << 52);
    if (Checked) return (vd_t)((vi64_t)y & ~under);
    return y;
}

}  // namespace
}  // namespace ecif
