// A whole decode forward of a Llama-family model on a CPU, in one call.
//
// bfloat16 weights and KV cache, a few single-query rows (decode tokens). The
// eager forward runs ~20 torch ops a layer, each a Python dispatch and (for the
// projections) an OpenMP fork and join; at batch 1 on a small model that is
// most of a token's time. Here the layers run in one OpenMP parallel region,
// the threads meeting at a barrier between phases: matrix-vector products split
// by output rows (AVX512-BF16 dot products, float32 accumulators), attention by
// (row, KV head) straight from the paged cache. Activations are rounded to
// bfloat16 where the eager bfloat16 forward rounds them (norm outputs,
// projections, RoPE, attention output, residual adds, SiLU-and-mul), so the two
// differ only in the order of float32 sums. Built at run time by
// kernels/cpu_decode.py (g++ -march=native -fopenmp).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

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

struct Layer {
  const bf16 *in_norm, *qkv_w, *qkv_b, *o_w, *post_norm, *gate_up_w, *down_w;
  bf16 *k_cache, *v_cache;
};

struct Dims {
  int hidden, inter, heads, kv_heads, head_dim, layers, block_size;
  float eps, scale;
};

// Weights are packed by pack_rows (cpu_decode.py): per block of 16 output rows, per
// pair of inputs (2p, 2p + 1), one 64-byte vector holding the pair for each of the
// 16 rows (rows padded to a multiple of 16 with zeros). A dot-product instruction
// then adds a pair of products into each row's own float32 lane: the 16 rows'
// sums come out in one vector, with no horizontal reduction, and every weight
// vector loaded is used for NB activation rows.
//
// One block of 16 rows against NB activation rows; each row's sum runs in four
// chains (pairs p mod 4: enough in flight to hide the instruction's latency at
// NB = 1), added as (0 + 1) + (2 + 3) at the end, the same order whatever the batch.
template <int NB>
inline void block16(const bf16* wp, int in, const bf16* x, float* y, int ldy, int rows,
                    const bf16* bias) {
  const int pairs = in / 2;
  __m512 a[4][NB];
  for (int c = 0; c < 4; ++c)
    for (int b = 0; b < NB; ++b) a[c][b] = _mm512_setzero_ps();
  const int32_t* xp[NB];
  for (int b = 0; b < NB; ++b) xp[b] = reinterpret_cast<const int32_t*>(x + static_cast<size_t>(b) * in);
  for (int p = 0; p < pairs; p += 4) {
    for (int c = 0; c < 4; ++c) {
      __m512bh w = (__m512bh)_mm512_loadu_si512(wp + 32 * static_cast<size_t>(p + c));
      for (int b = 0; b < NB; ++b)
        a[c][b] = _mm512_dpbf16_ps(a[c][b], w, (__m512bh)_mm512_set1_epi32(xp[b][p + c]));
    }
  }
  __m512 vb = _mm512_setzero_ps();
  __mmask16 live = rows >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << rows) - 1);
  if (bias) {
    __m256i h = _mm256_maskz_loadu_epi16(live, bias);
    vb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  for (int b = 0; b < NB; ++b) {
    __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0][b], a[1][b]),
                                             _mm512_add_ps(a[2][b], a[3][b])), vb);
    // rounded to bfloat16 and back (the eager projection's output dtype)
    __m512 r = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(sum)), 16));
    _mm512_mask_storeu_ps(y + static_cast<size_t>(b) * ldy, live, r);
  }
}

// y[b * ldy + o] = rbf(W[o] . x[b] + bias[o]) for the 16-row blocks [k0, k1); x: B
// rows of `in` bfloat16 values (in % 8 == 0)
void matvec(const bf16* wp, const bf16* bias, const bf16* x, int B, int in, int rows, int k0,
            int k1, float* y, int ldy) {
  for (int k = k0; k < k1; ++k) {
    const bf16* wk = wp + static_cast<size_t>(k) * 16 * in;
    const int o = 16 * k, n = rows - o < 16 ? rows - o : 16;
    const bf16* bo = bias ? bias + o : nullptr;
    int b = 0;
    for (; b + 4 <= B; b += 4)
      block16<4>(wk, in, x + static_cast<size_t>(b) * in, y + static_cast<size_t>(b) * ldy + o, ldy, n, bo);
    const bf16* xb = x + static_cast<size_t>(b) * in;
    float* yb = y + static_cast<size_t>(b) * ldy + o;
    switch (B - b) {
      case 3: block16<3>(wk, in, xb, yb, ldy, n, bo); break;
      case 2: block16<2>(wk, in, xb, yb, ldy, n, bo); break;
      case 1: block16<1>(wk, in, xb, yb, ldy, n, bo); break;
      default: break;
    }
  }
}

// the 16-row blocks of an output of `rows` split over the team
void team_matvec(const bf16* wp, const bf16* bias, const bf16* x, int B, int in, int rows,
                 float* y) {
  const int blocks = (rows + 15) / 16;
#pragma omp for schedule(static)
  for (int k = 0; k < blocks; ++k) matvec(wp, bias, x, B, in, rows, k, k + 1, y, rows);
}

inline __m512 round16(__m512 x) {  // each lane rounded to bfloat16 (nearest even)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

inline void store16(bf16* p, __m512 x) {  // 16 lanes as bfloat16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

// out = rbf(weight * rbf(rms_norm(x))) in bfloat16, as the eager half-precision norm
// (n % 16 == 0)
void rms_norm(const float* x, const bf16* weight, int n, float eps, bf16* out) {
  __m512 ss = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / n + eps));
  for (int i = 0; i < n; i += 16)
    store16(out + i, _mm512_mul_ps(round16(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv)),
                                   load_bf16x16(weight + i)));
}

// r[i] = rbf(r[i] + y[i]): the residual add in bfloat16 (n % 16 == 0)
void add_rounded(float* r, const float* y, int n) {
  for (int i = 0; i < n; i += 16)
    _mm512_storeu_ps(r + i, round16(_mm512_add_ps(_mm512_loadu_ps(r + i), _mm512_loadu_ps(y + i))));
}

// rotate-half RoPE of one head in place (values bfloat16-rounded), cos / sin rows
// rounded to bfloat16 first, each product and the sum rounded, as the eager ops
// (d % 32 == 0)
void rope(float* h, const float* cos, const float* sin, int d) {
  const int half = d / 2;
  for (int i = 0; i < half; i += 16) {
    __m512 x1 = _mm512_loadu_ps(h + i), x2 = _mm512_loadu_ps(h + half + i);
    __m512 c1 = round16(_mm512_loadu_ps(cos + i)), s1 = round16(_mm512_loadu_ps(sin + i));
    __m512 c2 = round16(_mm512_loadu_ps(cos + half + i)), s2 = round16(_mm512_loadu_ps(sin + half + i));
    __m512 neg_x2 = _mm512_sub_ps(_mm512_setzero_ps(), x2);
    _mm512_storeu_ps(h + i, round16(_mm512_add_ps(round16(_mm512_mul_ps(x1, c1)),
                                                  round16(_mm512_mul_ps(neg_x2, s1)))));
    _mm512_storeu_ps(h + half + i, round16(_mm512_add_ps(round16(_mm512_mul_ps(x2, c2)),
                                                         round16(_mm512_mul_ps(x1, s2)))));
  }
}

// act = rbf(rbf(silu(gate)) * up) (n % 16 == 0)
void silu_and_mul(const float* gate, const float* up, int n, bf16* act) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int i = 0; i < n; i += 16) {
    __m512 g = _mm512_loadu_ps(gate + i);
    __m512 silu = round16(_mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
    store16(act + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
  }
}

// one row's query heads of one KV head over its paged keys and values
void attend(const float* q, const bf16* k_cache, const bf16* v_cache, const int32_t* table,
            int ctx, const Dims& m, int kv_head, int group, float* scores, bf16* out) {
  const int d = m.head_dim, bs = m.block_size, kvh = m.kv_heads, vecs = d / 16;
  for (int t = 0; t < ctx; ++t) {
    size_t slot = static_cast<size_t>(table[t / bs]) * bs + t % bs;
    const bf16* k = k_cache + (slot * kvh + kv_head) * d;
    for (int g = 0; g < group; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int v = 0; v < vecs; ++v)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + 16 * v), load_bf16x16(k + 16 * v), acc);
      scores[static_cast<size_t>(g) * ctx + t] = _mm512_reduce_add_ps(acc) * m.scale;
    }
  }
  for (int g = 0; g < group; ++g) {
    float* s = scores + static_cast<size_t>(g) * ctx;
    float mx = -INFINITY;
    for (int t = 0; t < ctx; ++t) mx = s[t] > mx ? s[t] : mx;
    __m512 vmx = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
    int t = 0;
    for (; t + 16 <= ctx; t += 16) {
      __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), vmx));
      _mm512_storeu_ps(s + t, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    float sum = _mm512_reduce_add_ps(vsum);
    if (t < ctx) {
      __mmask16 mask = static_cast<__mmask16>((1u << (ctx - t)) - 1);
      __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + t), vmx));
      _mm512_mask_storeu_ps(s + t, mask, e);
      sum += _mm512_mask_reduce_add_ps(mask, e);
    }
    float inv = 1.0f / sum;
    for (int i = 0; i < ctx; ++i) s[i] *= inv;
  }
  __m512 acc[8 * 16];  // group <= 8, head_dim <= 256
  for (int i = 0; i < group * vecs; ++i) acc[i] = _mm512_setzero_ps();
  for (int t = 0; t < ctx; ++t) {
    size_t slot = static_cast<size_t>(table[t / bs]) * bs + t % bs;
    const bf16* v = v_cache + (slot * kvh + kv_head) * d;
    for (int w = 0; w < vecs; ++w) {
      __m512 vv = load_bf16x16(v + 16 * w);
      for (int g = 0; g < group; ++g)
        acc[g * vecs + w] = _mm512_fmadd_ps(_mm512_set1_ps(scores[static_cast<size_t>(g) * ctx + t]),
                                            vv, acc[g * vecs + w]);
    }
  }
  for (int g = 0; g < group; ++g)
    for (int w = 0; w < vecs; ++w) store16(out + g * d + 16 * w, acc[g * vecs + w]);
}

}  // namespace

extern "C" {

// One decode step: B rows, each one token at `positions[b]` written to `slots[b]`,
// attending over ctx_lens[b] keys through its row of `tables` ([B, width] block ids).
// dims: hidden, inter, heads, kv_heads, head_dim, layers, block_size. ptrs: embed,
// final norm, rope cos, rope sin (float32 [positions, head_dim]), then per layer
// in_norm, qkv_w, qkv_b (or null), o_w, post_norm, gate_up_w, down_w, k_cache,
// v_cache. out: [B, hidden] bfloat16, the final norm's output.
int llmesh_cpu_decode(const int64_t* dims, float eps, float scale, void* const* ptrs, int B,
                      const int64_t* ids, const int64_t* positions, const int64_t* slots,
                      const int32_t* tables, int width, const int32_t* ctx_lens, bf16* out,
                      int threads) {
  Dims m{static_cast<int>(dims[0]), static_cast<int>(dims[1]), static_cast<int>(dims[2]),
         static_cast<int>(dims[3]), static_cast<int>(dims[4]), static_cast<int>(dims[5]),
         static_cast<int>(dims[6]), eps, scale};
  const int d = m.head_dim, q_size = m.heads * d, kv_size = m.kv_heads * d;
  const int qkv_size = q_size + 2 * kv_size, group = m.heads / m.kv_heads;
  const int width_in = q_size > m.inter ? (q_size > m.hidden ? q_size : m.hidden)
                                        : (m.inter > m.hidden ? m.inter : m.hidden);
  const bf16* embed = static_cast<const bf16*>(ptrs[0]);
  const bf16* final_norm = static_cast<const bf16*>(ptrs[1]);
  const float* rope_cos = static_cast<const float*>(ptrs[2]);
  const float* rope_sin = static_cast<const float*>(ptrs[3]);
  std::vector<Layer> layers(m.layers);
  for (int l = 0; l < m.layers; ++l) {
    void* const* p = ptrs + 4 + 9 * l;
    layers[l] = Layer{static_cast<const bf16*>(p[0]), static_cast<const bf16*>(p[1]),
                      static_cast<const bf16*>(p[2]), static_cast<const bf16*>(p[3]),
                      static_cast<const bf16*>(p[4]), static_cast<const bf16*>(p[5]),
                      static_cast<const bf16*>(p[6]), static_cast<bf16*>(p[7]),
                      static_cast<bf16*>(p[8])};
  }
  int max_ctx = 1;
  for (int b = 0; b < B; ++b) max_ctx = ctx_lens[b] > max_ctx ? ctx_lens[b] : max_ctx;
  std::vector<float> residual(static_cast<size_t>(B) * m.hidden), proj(static_cast<size_t>(B) * m.hidden);
  std::vector<float> qkv(static_cast<size_t>(B) * qkv_size), gate_up(static_cast<size_t>(B) * 2 * m.inter);
  std::vector<bf16> act(static_cast<size_t>(B) * width_in);  // the next projection's input
  std::vector<bf16> attn(static_cast<size_t>(B) * q_size);

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores(static_cast<size_t>(group) * max_ctx);
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {  // the embedding is the first residual
      const bf16* e = embed + static_cast<size_t>(ids[b]) * m.hidden;
      for (int i = 0; i < m.hidden; i += 16)
        _mm512_storeu_ps(&residual[static_cast<size_t>(b) * m.hidden + i], load_bf16x16(e + i));
      rms_norm(&residual[static_cast<size_t>(b) * m.hidden], layers[0].in_norm, m.hidden, m.eps,
               &act[static_cast<size_t>(b) * m.hidden]);
    }
    for (int l = 0; l < m.layers; ++l) {
      const Layer& L = layers[l];
      team_matvec(L.qkv_w, L.qkv_b, act.data(), B, m.hidden, qkv_size, qkv.data());
#pragma omp for schedule(static)
      for (int b = 0; b < B; ++b) {  // RoPE on the query and key heads, K/V to the cache
        float* row = &qkv[static_cast<size_t>(b) * qkv_size];
        const float* c = rope_cos + positions[b] * d;
        const float* s = rope_sin + positions[b] * d;
        for (int h = 0; h < m.heads + m.kv_heads; ++h) rope(row + h * d, c, s, d);
        size_t base = static_cast<size_t>(slots[b]) * kv_size;
        for (int i = 0; i < kv_size; i += 16) {
          store16(L.k_cache + base + i, _mm512_loadu_ps(row + q_size + i));
          store16(L.v_cache + base + i, _mm512_loadu_ps(row + q_size + kv_size + i));
        }
      }
#pragma omp for schedule(static) collapse(2)
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < m.kv_heads; ++h)
          attend(&qkv[static_cast<size_t>(b) * qkv_size + h * group * d], L.k_cache, L.v_cache,
                 tables + static_cast<size_t>(b) * width, ctx_lens[b], m, h, group,
                 scores.data(), &attn[static_cast<size_t>(b) * q_size + h * group * d]);
      team_matvec(L.o_w, nullptr, attn.data(), B, q_size, m.hidden, proj.data());
#pragma omp for schedule(static)
      for (int b = 0; b < B; ++b) {  // residual add, then the MLP's norm
        float* r = &residual[static_cast<size_t>(b) * m.hidden];
        add_rounded(r, &proj[static_cast<size_t>(b) * m.hidden], m.hidden);
        rms_norm(r, L.post_norm, m.hidden, m.eps, &act[static_cast<size_t>(b) * m.hidden]);
      }
      team_matvec(L.gate_up_w, nullptr, act.data(), B, m.hidden, 2 * m.inter, gate_up.data());
#pragma omp for schedule(static)
      for (int b = 0; b < B; ++b) {  // SiLU(gate) * up
        const float* g = &gate_up[static_cast<size_t>(b) * 2 * m.inter];
        silu_and_mul(g, g + m.inter, m.inter, &act[static_cast<size_t>(b) * m.inter]);
      }
      team_matvec(L.down_w, nullptr, act.data(), B, m.inter, m.hidden, proj.data());
      const bf16* next_norm = l + 1 < m.layers ? layers[l + 1].in_norm : final_norm;
#pragma omp for schedule(static)
      for (int b = 0; b < B; ++b) {  // residual add, then the next layer's (or the final) norm
        float* r = &residual[static_cast<size_t>(b) * m.hidden];
        add_rounded(r, &proj[static_cast<size_t>(b) * m.hidden], m.hidden);
        rms_norm(r, next_norm, m.hidden, m.eps,
                 l + 1 < m.layers ? &act[static_cast<size_t>(b) * m.hidden] : out + static_cast<size_t>(b) * m.hidden);
      }
    }
  }
  return 0;
}

}  // extern "C"
