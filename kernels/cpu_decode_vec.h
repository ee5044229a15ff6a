// Vector helpers of the CPU decode kernel (cpu_decode.cpp): bfloat16 loads and
// rounding, exp, and the element-wise steps of a decoder layer over values stored
// as T (bfloat16 or float32), each rounding to T where the eager forward in T
// rounds (for float32: nowhere).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace {

typedef uint16_t bf16;

// (in the comments below, rbf(x) is x rounded to bfloat16, nearest even)

inline __m512 load_bf16x16(const bf16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 exp512(__m512 x) {  // e^x, float32, ~1 ulp over the softmax's range
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 round16(__m512 x) {  // each lane rounded to bfloat16 (nearest even)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

inline void store16(bf16* p, __m512 x) {  // 16 lanes as bfloat16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

// 16 values stored as T, widened to float32 / stored as T; rnd<T>(x): x rounded to T
inline __m512 load16(const bf16* p) { return load_bf16x16(p); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
template <typename T> inline __m512 rnd(__m512 x);
template <> inline __m512 rnd<bf16>(__m512 x) { return round16(x); }
template <> inline __m512 rnd<float>(__m512 x) { return x; }

// out = rbf(weight * rbf(rms_norm(x))) in bfloat16, as the eager half-precision norm
// (for float32 no rounding; n % 16 == 0)
template <typename T>
void rms_norm(const float* x, const T* weight, int n, float eps, T* out) {
  __m512 ss = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / n + eps));
  for (int i = 0; i < n; i += 16)
    store16(out + i, _mm512_mul_ps(rnd<T>(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv)),
                                   load16(weight + i)));
}

// r[i] = rbf(r[i] + y[i]): the residual add in T (n % 16 == 0)
template <typename T>
void add_rounded(float* r, const float* y, int n) {
  for (int i = 0; i < n; i += 16)
    _mm512_storeu_ps(r + i, rnd<T>(_mm512_add_ps(_mm512_loadu_ps(r + i), _mm512_loadu_ps(y + i))));
}

// rotate-half RoPE of one head in place (values rounded to T), cos / sin rows
// rounded to T first, each product and the sum rounded, as the eager ops
// (d % 32 == 0)
template <typename T>
void rope(float* h, const float* cos, const float* sin, int d) {
  const int half = d / 2;
  for (int i = 0; i < half; i += 16) {
    __m512 x1 = _mm512_loadu_ps(h + i), x2 = _mm512_loadu_ps(h + half + i);
    __m512 c1 = rnd<T>(_mm512_loadu_ps(cos + i)), s1 = rnd<T>(_mm512_loadu_ps(sin + i));
    __m512 c2 = rnd<T>(_mm512_loadu_ps(cos + half + i)), s2 = rnd<T>(_mm512_loadu_ps(sin + half + i));
    __m512 neg_x2 = _mm512_sub_ps(_mm512_setzero_ps(), x2);
    _mm512_storeu_ps(h + i, rnd<T>(_mm512_add_ps(rnd<T>(_mm512_mul_ps(x1, c1)),
                                                  rnd<T>(_mm512_mul_ps(neg_x2, s1)))));
    _mm512_storeu_ps(h + half + i, rnd<T>(_mm512_add_ps(rnd<T>(_mm512_mul_ps(x2, c2)),
                                                         rnd<T>(_mm512_mul_ps(x1, s2)))));
  }
}

// act = rbf(rbf(silu(gate)) * up) (n % 16 == 0)
template <typename T>
void silu_and_mul(const float* gate, const float* up, int n, T* act) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int i = 0; i < n; i += 16) {
    __m512 g = _mm512_loadu_ps(gate + i);
    __m512 silu = rnd<T>(_mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
    store16(act + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
  }
}

// the lanes of each of 16 vectors summed: lane i of the result is a[i]'s sum
inline __m512 hsum16(const __m512* a) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: four vectors' partial sums
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: [0-3, 0-3, 4-7, 4-7] (of 8 vectors)
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

}  // namespace
