// Decode attention over a paged KV cache on a CPU: one query per row
// (part of the CPU decode kernel's library, cpu_decode.cpp; needs
// cpu_decode_vec.h). The whole-forward kernel calls `attend` for its rows; the
// eager forward's decode rows (steps too big for that kernel) call
// `decode_attention`, the same function over (row, KV head) pairs, so a row's
// attention is one function of its query and cache whichever path its step
// took, the same bits whatever else the step holds.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

struct PagedShape {
  int head_dim, block_size, kv_heads;
  float scale;
};

// one row's query heads of one KV head over its paged keys and values (stored as T,
// bfloat16 or float32); the cache is read a block at a time, 16 positions per step:
// a query head's 16 scores come out of dot products (bfloat16: AVX512-BF16 pairs,
// exact since the query's values are bfloat16 already; float32: FMAs) and one
// transposing sum
template <typename T>
void attend(const float* q, const T* k_cache, const T* v_cache, const int32_t* table,
            int ctx, const PagedShape& m, int kv_head, int group, float* scores, T* out) {
  constexpr bool half = std::is_same<T, bf16>::value;
  static const T zeros[256] = {};
  const int d = m.head_dim, bs = m.block_size, kvh = m.kv_heads, vecs = d / 16, pairs = d / 32;
  const int lines = d * static_cast<int>(sizeof(T)) / 64;  // cache lines of a position's head
  const size_t stride = static_cast<size_t>(kvh) * d;  // between positions in the cache
  __m512bh qb[8][8];  // [group][d / 32]: the query heads as bfloat16 pairs (bfloat16 caches)
  if constexpr (half)
    for (int g = 0; g < group; ++g)
      for (int v = 0; v < pairs; ++v)
        qb[g][v] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + g * d + 32 * v + 16),
                                       _mm512_loadu_ps(q + g * d + 32 * v));
  const int step = 16 < bs ? 16 : bs;
  // the cache's rows come from memory (the weights streamed through the caches since
  // the last step): the next chunk's rows are asked for while this one is computed
  auto chunk_rows = [&](int t0) {
    const int in_block = t0 % bs;
    int n = ctx - t0 < step ? ctx - t0 : step;
    return n < bs - in_block ? n : bs - in_block;
  };
  auto row_at = [&](const T* cache, int t) {
    return cache + (static_cast<size_t>(table[t / bs]) * bs + t % bs) * stride + kv_head * d;
  };
  for (int t0 = 0, n = 0; t0 < ctx; t0 += n) {
    n = chunk_rows(t0);
    const T* first = row_at(k_cache, t0);
    if (t0 + n < ctx) {
      const T* next = row_at(k_cache, t0 + n);
      for (int r = 0, nn = chunk_rows(t0 + n); r < nn; ++r)
        for (int l = 0; l < lines; ++l)
          _mm_prefetch(reinterpret_cast<const char*>(next + r * stride) + 64 * l, _MM_HINT_T0);
    }
    const T* rows[16];
    for (int r = 0; r < 16; ++r) rows[r] = r < n ? first + r * stride : zeros;
    for (int g = 0; g < group; ++g) {
      __m512 acc[16];
      for (int r = 0; r < 16; ++r) {
        __m512 a = _mm512_setzero_ps();
        if constexpr (half)
          for (int v = 0; v < pairs; ++v)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(rows[r] + 32 * v), qb[g][v]);
        else
          for (int v = 0; v < vecs; ++v)
            a = _mm512_fmadd_ps(load16(rows[r] + 16 * v), _mm512_loadu_ps(q + g * d + 16 * v), a);
        acc[r] = a;
      }
      const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
      _mm512_mask_storeu_ps(scores + static_cast<size_t>(g) * ctx + t0, live,
                            _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(m.scale)));
    }
  }
  for (int g = 0; g < group; ++g) {  // softmax, in place
    float* s = scores + static_cast<size_t>(g) * ctx;
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    for (int t = 0; t < ctx; t += 16) {
      const __mmask16 mask = ctx - t >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (ctx - t)) - 1);
      vmx = _mm512_mask_max_ps(vmx, mask, vmx, _mm512_maskz_loadu_ps(mask, s + t));
    }
    vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmx));
    __m512 vsum = _mm512_setzero_ps();
    for (int t = 0; t < ctx; t += 16) {
      const __mmask16 mask = ctx - t >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (ctx - t)) - 1);
      __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + t), vmx));
      _mm512_mask_storeu_ps(s + t, mask, e);
      vsum = _mm512_mask_add_ps(vsum, mask, vsum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    for (int t = 0; t < ctx; t += 16) {
      const __mmask16 mask = ctx - t >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (ctx - t)) - 1);
      _mm512_mask_storeu_ps(s + t, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + t), inv));
    }
  }
  __m512 acc[8 * 16];  // group <= 8, head_dim <= 256
  for (int i = 0; i < group * vecs; ++i) acc[i] = _mm512_setzero_ps();
  constexpr int AHEAD = 48;  // rows of V asked for ahead of their use
  for (int t = 0; t < ctx && t < AHEAD; ++t)
    for (int l = 0; l < lines; ++l)
      _mm_prefetch(reinterpret_cast<const char*>(row_at(v_cache, t)) + 64 * l, _MM_HINT_T0);
  for (int b0 = 0; b0 < ctx; b0 += bs) {
    const int n = ctx - b0 < bs ? ctx - b0 : bs;
    const T* v = v_cache + static_cast<size_t>(table[b0 / bs]) * bs * stride + kv_head * d;
    for (int r = 0; r < n; ++r, v += stride) {
      if (b0 + r + AHEAD < ctx) {
        const T* ahead = r + AHEAD < n ? v + AHEAD * stride : row_at(v_cache, b0 + r + AHEAD);
        for (int l = 0; l < lines; ++l)
          _mm_prefetch(reinterpret_cast<const char*>(ahead) + 64 * l, _MM_HINT_T0);
      }
      for (int w = 0; w < vecs; ++w) {
        __m512 vv = load16(v + 16 * w);
        for (int g = 0; g < group; ++g)
          acc[g * vecs + w] = _mm512_fmadd_ps(_mm512_set1_ps(scores[static_cast<size_t>(g) * ctx + b0 + r]),
                                              vv, acc[g * vecs + w]);
      }
    }
  }
  for (int g = 0; g < group; ++g)
    for (int w = 0; w < vecs; ++w) store16(out + g * d + 16 * w, acc[g * vecs + w]);
}

// Single-query rows over their blocks: q and out [B, H, D] bfloat16; caches [blocks,
// block_size, KVH, D]; tables [B, width] int32; ctx_lens [B]. Returns 0, or (nothing
// run) -5 for a block id the row reads outside [0, num_blocks), -6 for a context
// length of 0 or past its block table.
int decode_attention(const bf16* q, const bf16* k_cache, const bf16* v_cache,
                     const int32_t* tables, int width, const int32_t* ctx_lens, int B, int H,
                     const PagedShape& m, int64_t num_blocks, bf16* out, int threads) {
  int max_ctx = 1;
  for (int b = 0; b < B; ++b) {
    const int64_t ctx = ctx_lens[b];
    if (ctx < 1 || ctx > static_cast<int64_t>(width) * m.block_size) return -6;
    for (int i = 0; i < (ctx + m.block_size - 1) / m.block_size; ++i)
      if (tables[static_cast<size_t>(b) * width + i] < 0 ||
          tables[static_cast<size_t>(b) * width + i] >= num_blocks) return -5;
    max_ctx = ctx > max_ctx ? static_cast<int>(ctx) : max_ctx;
  }
  const int group = H / m.kv_heads, d = m.head_dim;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    std::vector<float> scores(static_cast<size_t>(group) * max_ctx), qf(static_cast<size_t>(group) * d);
    // (rows' contexts differ: pairs handed out one at a time)
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < m.kv_heads; ++h) {
        const size_t at = (static_cast<size_t>(b) * H + static_cast<size_t>(h) * group) * d;
        for (int i = 0; i < group * d; i += 16) _mm512_storeu_ps(qf.data() + i, load_bf16x16(q + at + i));
        attend(qf.data(), k_cache, v_cache, tables + static_cast<size_t>(b) * width, ctx_lens[b],
               m, h, group, scores.data(), out + at);
      }
  }
  return 0;
}

}  // namespace
