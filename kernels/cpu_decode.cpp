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
#include <mutex>
#include <vector>

#include "cpu_decode_vec.h"
#include "cpu_decode_attention.h"
#include "cpu_fused_ops.h"
#include "cpu_prefill_attention.h"

namespace {

// One matrix-vector product of a step: y[b * rows + o] = rbf(W[o] . x[b] + bias[o])
struct Job {
  const bf16 *w, *bias, *x;
  int in, rows;
  float* y;
};

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

// One 16-row block k of a product for B rows: y[b * ldy + j] = rbf(W[16k + j] . x[b] +
// bias[16k + j]), y pointing at the block's first row; x: B rows of `in` bfloat16
// values (in % 8 == 0)
void job_block(const Job& job, int B, int k, float* y, int ldy) {
  const bf16* wk = job.w + static_cast<size_t>(k) * 16 * job.in;
  const int in = job.in, o = 16 * k, n = job.rows - o < 16 ? job.rows - o : 16;
  const bf16* bo = job.bias ? job.bias + o : nullptr;
  int b = 0;
  for (; b + 4 <= B; b += 4)
    block16<4>(wk, in, job.x + static_cast<size_t>(b) * in, y + static_cast<size_t>(b) * ldy, ldy, n, bo);
  const bf16* xb = job.x + static_cast<size_t>(b) * in;
  float* yb = y + static_cast<size_t>(b) * ldy;
  switch (B - b) {
    case 3: block16<3>(wk, in, xb, yb, ldy, n, bo); break;
    case 2: block16<2>(wk, in, xb, yb, ldy, n, bo); break;
    case 1: block16<1>(wk, in, xb, yb, ldy, n, bo); break;
    default: break;
  }
}

// What a model's decode steps share: its dimensions and weights, buffers for up to
// max_rows rows, the products as jobs (per layer: qkv, o, gate_up, down).
struct Ctx {
  Dims m;
  PagedShape paged;  // the cache's shape, for attend
  int max_rows, q_size, kv_size, qkv_size, group, width_in;
  const bf16 *embed, *final_norm;
  const float *rope_cos, *rope_sin;
  std::vector<Layer> layers;
  std::vector<float> residual, proj, qkv, gate_up;
  std::vector<bf16> act, attn;  // act: the next product's input
  std::vector<Job> jobs;
  int64_t limits[4];  // token ids, RoPE rows (positions), cache slots, cache blocks
  std::mutex mu;      // one step at a time

  Ctx(const int64_t* dims, float eps, float scale, void* const* ptrs, int rows)
      : m{static_cast<int>(dims[0]), static_cast<int>(dims[1]), static_cast<int>(dims[2]),
          static_cast<int>(dims[3]), static_cast<int>(dims[4]), static_cast<int>(dims[5]),
          static_cast<int>(dims[6]), eps, scale},
        paged{m.head_dim, m.block_size, m.kv_heads, m.scale},
        max_rows(rows) {
    const int d = m.head_dim;
    q_size = m.heads * d;
    kv_size = m.kv_heads * d;
    qkv_size = q_size + 2 * kv_size;
    group = m.heads / m.kv_heads;
    width_in = q_size > m.inter ? (q_size > m.hidden ? q_size : m.hidden)
                                : (m.inter > m.hidden ? m.inter : m.hidden);
    embed = static_cast<const bf16*>(ptrs[0]);
    final_norm = static_cast<const bf16*>(ptrs[1]);
    rope_cos = static_cast<const float*>(ptrs[2]);
    rope_sin = static_cast<const float*>(ptrs[3]);
    const size_t R = static_cast<size_t>(rows);
    residual.assign(R * m.hidden, 0.f);
    proj.assign(R * m.hidden, 0.f);
    qkv.assign(R * qkv_size, 0.f);
    gate_up.assign(R * 2 * m.inter, 0.f);
    act.assign(R * width_in, 0);
    attn.assign(R * q_size, 0);
    for (int l = 0; l < m.layers; ++l) {
      void* const* p = ptrs + 4 + 9 * l;
      auto w = [&](int i) { return static_cast<const bf16*>(p[i]); };
      layers.push_back(Layer{w(0), w(1), w(2), w(3), w(4), w(5), w(6), static_cast<bf16*>(p[7]),
                             static_cast<bf16*>(p[8])});
      const Layer& L = layers.back();
      jobs.push_back(Job{L.qkv_w, L.qkv_b, act.data(), m.hidden, qkv_size, qkv.data()});
      jobs.push_back(Job{L.o_w, nullptr, attn.data(), q_size, m.hidden, proj.data()});
      jobs.push_back(Job{L.gate_up_w, nullptr, act.data(), m.hidden, 2 * m.inter, gate_up.data()});
      jobs.push_back(Job{L.down_w, nullptr, act.data(), m.inter, m.hidden, proj.data()});
    }
  }
};

// job j's 16-row blocks split over the team
void product(Ctx& c, int j, int B) {
  const Job& job = c.jobs[j];
  const int blocks = (job.rows + 15) / 16;
#pragma omp for schedule(static)
  for (int k = 0; k < blocks; ++k) job_block(job, B, k, job.y + 16 * k, job.rows);
}

// the forward's body, run by each member of a team (or by one thread alone)
void forward(Ctx& c, int B, const int64_t* ids, const int64_t* positions, const int64_t* slots,
             const int32_t* tables, int width, const int32_t* ctx_lens, int max_ctx, bf16* out) {
  const Dims& m = c.m;
  const int d = m.head_dim, q_size = c.q_size, kv_size = c.kv_size, qkv_size = c.qkv_size;
  const int group = c.group;
  float* residual = c.residual.data();
  float* qkv = c.qkv.data();
  float* proj = c.proj.data();
  bf16* act = c.act.data();
  std::vector<float> scores(static_cast<size_t>(group) * max_ctx);
#pragma omp for schedule(static)
  for (int b = 0; b < B; ++b) {  // the embedding is the first residual
    const bf16* e = c.embed + static_cast<size_t>(ids[b]) * m.hidden;
    for (int i = 0; i < m.hidden; i += 16)
      _mm512_storeu_ps(residual + static_cast<size_t>(b) * m.hidden + i, load_bf16x16(e + i));
    rms_norm(residual + static_cast<size_t>(b) * m.hidden, c.layers[0].in_norm, m.hidden, m.eps,
             act + static_cast<size_t>(b) * m.hidden);
  }
  for (int l = 0; l < m.layers; ++l) {
    const Layer& L = c.layers[l];
    product(c, 4 * l, B);
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {  // RoPE on the query and key heads, K/V to the cache
      float* row = qkv + static_cast<size_t>(b) * qkv_size;
      const float* cs = c.rope_cos + positions[b] * d;
      const float* sn = c.rope_sin + positions[b] * d;
      for (int h = 0; h < m.heads + m.kv_heads; ++h) rope(row + h * d, cs, sn, d);
      size_t base = static_cast<size_t>(slots[b]) * kv_size;
      for (int i = 0; i < kv_size; i += 16) {
        store16(L.k_cache + base + i, _mm512_loadu_ps(row + q_size + i));
        store16(L.v_cache + base + i, _mm512_loadu_ps(row + q_size + kv_size + i));
      }
    }
#pragma omp for schedule(static) collapse(2)
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < m.kv_heads; ++h)
        attend(qkv + static_cast<size_t>(b) * qkv_size + h * group * d, L.k_cache, L.v_cache,
               tables + static_cast<size_t>(b) * width, ctx_lens[b], c.paged, h, group, scores.data(),
               c.attn.data() + static_cast<size_t>(b) * q_size + h * group * d);
    product(c, 4 * l + 1, B);
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {  // residual add, then the MLP's norm
      float* r = residual + static_cast<size_t>(b) * m.hidden;
      add_rounded(r, proj + static_cast<size_t>(b) * m.hidden, m.hidden);
      rms_norm(r, L.post_norm, m.hidden, m.eps, act + static_cast<size_t>(b) * m.hidden);
    }
    product(c, 4 * l + 2, B);
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {  // SiLU(gate) * up
      const float* g = c.gate_up.data() + static_cast<size_t>(b) * 2 * m.inter;
      silu_and_mul(g, g + m.inter, m.inter, act + static_cast<size_t>(b) * m.inter);
    }
    product(c, 4 * l + 3, B);
    const bf16* next_norm = l + 1 < m.layers ? c.layers[l + 1].in_norm : c.final_norm;
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {  // residual add, then the next layer's (or the final) norm
      float* r = residual + static_cast<size_t>(b) * m.hidden;
      add_rounded(r, proj + static_cast<size_t>(b) * m.hidden, m.hidden);
      rms_norm(r, next_norm, m.hidden, m.eps,
               l + 1 < m.layers ? act + static_cast<size_t>(b) * m.hidden : out + static_cast<size_t>(b) * m.hidden);
    }
  }
}

}  // namespace

extern "C" {

// A model's decode context. dims: hidden, inter, heads, kv_heads, head_dim, layers,
// block_size. ptrs: embed, final norm, rope cos, rope sin (float32 [positions,
// head_dim]), then per layer in_norm, qkv_w, qkv_b (or null), o_w, post_norm,
// gate_up_w, down_w, k_cache, v_cache; they must stay in place while it lives.
// limits: the bounds a step's indices are checked against (token ids, positions,
// slots, block ids).
void* llmesh_cpu_decode_new(const int64_t* dims, float eps, float scale, void* const* ptrs,
                            int max_rows, const int64_t* limits) {
  if (max_rows < 1) return nullptr;
  Ctx* c = new Ctx(dims, eps, scale, ptrs, max_rows);
  for (int i = 0; i < 4; ++i) c->limits[i] = limits[i];
  return c;
}

void llmesh_cpu_decode_free(void* ctx) { delete static_cast<Ctx*>(ctx); }

// One decode step: B rows (at most the context's max_rows), each one token at
// `positions[b]` written to `slots[b]`, attending over ctx_lens[b] keys through its
// row of `tables` ([B, width] block ids). out: [B, hidden] bfloat16, the final
// norm's output. threads: the OpenMP team's size. Returns 0, or (nothing run) -1
// for B out of range, -2 a token id, -3 a position, -4 a slot, -5 a block id out
// of range, -6 a context length of 0 or past its block table.
int llmesh_cpu_decode_run(void* ctx, int B, const int64_t* ids, const int64_t* positions,
                          const int64_t* slots, const int32_t* tables, int width,
                          const int32_t* ctx_lens, bf16* out, int threads) {
  Ctx& c = *static_cast<Ctx*>(ctx);
  if (B < 1 || B > c.max_rows) return -1;
  for (int b = 0; b < B; ++b) {  // every index the forward reads unchecked
    if (ids[b] < 0 || ids[b] >= c.limits[0]) return -2;
    if (positions[b] < 0 || positions[b] >= c.limits[1]) return -3;
    if (slots[b] < 0 || slots[b] >= c.limits[2]) return -4;
    for (int i = 0; i < width; ++i)
      if (tables[b * width + i] < 0 || tables[b * width + i] >= c.limits[3]) return -5;
    if (ctx_lens[b] < 1 || static_cast<int64_t>(ctx_lens[b]) > static_cast<int64_t>(width) * c.m.block_size)
      return -6;
  }
  std::lock_guard<std::mutex> hold(c.mu);
  int max_ctx = 1;
  for (int b = 0; b < B; ++b) max_ctx = ctx_lens[b] > max_ctx ? ctx_lens[b] : max_ctx;
  if (threads <= 1) {  // (no parallel region: its worksharing loops run whole here)
    forward(c, B, ids, positions, slots, tables, width, ctx_lens, max_ctx, out);
    return 0;
  }
#pragma omp parallel num_threads(threads)
  forward(c, B, ids, positions, slots, tables, width, ctx_lens, max_ctx, out);
  return 0;
}

// One product on its own (the decode step's LM head): y [B, rows] float32 = W x[b] +
// bias, rounded to bfloat16 (the eager projection's output dtype); W [rows, in] packed
// by pack_rows, x [B, in] bfloat16, bias bfloat16 or null; the 16-row blocks split
// over `threads`.
void llmesh_cpu_product(const bf16* w, const bf16* bias, int in, int rows, const bf16* x, int B,
                        float* y, int threads) {
  const Job job{w, bias, x, in, rows, y};
  const int blocks = (rows + 15) / 16;
  if (threads <= 1) {
    for (int k = 0; k < blocks; ++k) job_block(job, B, k, y + 16 * k, rows);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int k = 0; k < blocks; ++k) job_block(job, B, k, y + 16 * k, rows);
}

// The eager bfloat16 forward's element-wise steps (cpu_fused_ops.h), on [N, W] rows.
void llmesh_cpu_rms_norm(const bf16* x, bf16* residual, const bf16* weight, int N, int W,
                         float eps, bf16* out, int threads) {
  rows_rms_norm(x, residual, weight, N, W, eps, out, threads);
}

int llmesh_cpu_rope(bf16* qkv, int N, int stride, const int64_t* positions, const float* cos,
                    const float* sin, int64_t num_positions, int heads, int d, int threads) {
  return rows_rope(qkv, N, stride, positions, cos, sin, num_positions, heads, d, threads);
}

void llmesh_cpu_silu_and_mul(const bf16* gate_up, int N, int I, bf16* out, int threads) {
  rows_silu_and_mul(gate_up, N, I, out, threads);
}

// Causal attention of a prefill chunk at the end of its context
// (cpu_prefill_attention.h): q [L, H, D], k and v [C, KVH, D], out [L, H, D], bfloat16,
// contiguous; row i sees keys 0 .. C - L + i.
void llmesh_cpu_prefill_attention(const bf16* q, const bf16* k, const bf16* v, int L, int C,
                                  int H, int KVH, int D, float scale, bf16* out, int threads) {
  prefill_attention(q, k, v, L, C, H, KVH, D, scale, out, threads);
}

// Decode attention of B single-query rows (cpu_decode_attention.h): q and out [B, H,
// D] bfloat16; caches [num_blocks, block_size, KVH, D] bfloat16; tables [B, width]
// int32 block ids; ctx_lens [B] int32. Returns 0, or (nothing run) -5 for a block id
// out of range, -6 for a context length of 0 or past its block table.
int llmesh_cpu_decode_attention(const bf16* q, const bf16* k_cache, const bf16* v_cache,
                                const int32_t* tables, int width, const int32_t* ctx_lens, int B,
                                int H, int KVH, int D, int block_size, int64_t num_blocks,
                                float scale, bf16* out, int threads) {
  return decode_attention(q, k_cache, v_cache, tables, width, ctx_lens, B, H,
                          PagedShape{D, block_size, KVH, scale}, num_blocks, out, threads);
}

}  // extern "C"
