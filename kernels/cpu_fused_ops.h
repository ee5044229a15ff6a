// The element-wise steps of the eager bfloat16 forward on a CPU, over [N, W] rows of
// bfloat16 (part of the CPU decode kernel's library, cpu_decode.cpp; needs
// cpu_decode_vec.h): the norms with the residual add before them, RoPE and
// SiLU-and-mul, each one pass over its rows with the rounding of the torch ops it
// replaces (the whole-forward kernel's helpers), rows split over the threads. In
// torch each is 3-8 ops over the batch, a fifth of a 49-row decode step and a
// tenth of a 512-token prefill of the bench model.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace {

inline void widen(const bf16* x, int n, float* out) {
  for (int i = 0; i < n; i += 16) _mm512_storeu_ps(out + i, load_bf16x16(x + i));
}

inline int team(int threads, int rows) { return threads < 1 ? 1 : (threads < rows ? threads : rows); }

// out = norm(x) (residual null), or residual = rbf(x + residual), then out = norm(residual);
// norm as the eager half-precision RMSNorm; W % 16 == 0; out may be x
void rows_rms_norm(const bf16* x, bf16* residual, const bf16* weight, int N, int W, float eps,
                   bf16* out, int threads) {
#pragma omp parallel num_threads(team(threads, N))
  {
    std::vector<float> row(W);
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      const size_t at = static_cast<size_t>(n) * W;
      widen(x + at, W, row.data());
      if (residual) {
        for (int i = 0; i < W; i += 16) {
          const __m512 r = round16(_mm512_add_ps(load_bf16x16(residual + at + i), _mm512_loadu_ps(row.data() + i)));
          _mm512_storeu_ps(row.data() + i, r);
          store16(residual + at + i, r);
        }
      }
      rms_norm(row.data(), weight, W, eps, out + at);
    }
  }
}

// rotate-half RoPE, in place, of the first `heads` heads of each row (row i at
// qkv + i * stride) at positions[i]; cos / sin float32 [num_positions, d]; d % 32 == 0.
// Returns 0, or (nothing run) -3 for a position outside the tables.
int rows_rope(bf16* qkv, int N, int stride, const int64_t* positions, const float* cos,
              const float* sin, int64_t num_positions, int heads, int d, int threads) {
  for (int n = 0; n < N; ++n)
    if (positions[n] < 0 || positions[n] >= num_positions) return -3;
#pragma omp parallel num_threads(team(threads, N))
  {
    std::vector<float> h(d);
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      const float* c = cos + positions[n] * d;
      const float* s = sin + positions[n] * d;
      for (int k = 0; k < heads; ++k) {
        bf16* p = qkv + static_cast<size_t>(n) * stride + static_cast<size_t>(k) * d;
        widen(p, d, h.data());
        rope<bf16>(h.data(), c, s, d);
        for (int i = 0; i < d; i += 16) store16(p + i, _mm512_loadu_ps(h.data() + i));
      }
    }
  }
  return 0;
}

// out [N, I] = rbf(rbf(silu(gate)) * up) of gate_up [N, 2I] (gate then up); I % 16 == 0
void rows_silu_and_mul(const bf16* gate_up, int N, int I, bf16* out, int threads) {
#pragma omp parallel num_threads(team(threads, N))
  {
    std::vector<float> g(2 * static_cast<size_t>(I));
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
      widen(gate_up + static_cast<size_t>(n) * 2 * I, 2 * I, g.data());
      silu_and_mul(g.data(), g.data() + I, I, out + static_cast<size_t>(n) * I);
    }
  }
}

}  // namespace
