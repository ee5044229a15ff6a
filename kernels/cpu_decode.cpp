// A whole decode forward of a Llama-family model on a CPU, in one call.
//
// bfloat16 or float32 weights and KV cache, a few single-query rows (decode tokens). The
// eager forward runs ~20 torch ops a layer, each a Python dispatch and (for the
// projections) an OpenMP fork and join; at batch 1 on a small model that is
// most of a token's time. Here the layers run in one OpenMP parallel region,
// the threads meeting at a barrier between phases: matrix-vector products split
// by output rows (cpu_decode_products.h: float32 accumulators), attention by
// (row, KV head) straight from the paged cache. Activations are rounded to
// bfloat16 where the eager bfloat16 forward rounds them (norm outputs,
// projections, RoPE, attention output, residual adds, SiLU-and-mul); in float32
// nothing is rounded; either way the kernel and the eager forward differ only in
// the order of float32 sums. Built at run time by
// kernels/cpu_decode.py (g++ -march=native -fopenmp).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#include "cpu_decode_vec.h"
#include "cpu_decode_attention.h"
#include "cpu_decode_products.h"
#include "cpu_fused_ops.h"
#include "cpu_prefill_attention.h"

namespace {

template <typename T>
struct Layer {
  const T *in_norm, *qkv_w, *qkv_b, *o_w, *post_norm, *gate_up_w, *down_w;
  T *k_cache, *v_cache;
};

struct Dims {
  int hidden, inter, heads, kv_heads, head_dim, layers, block_size;
  float eps, scale;
};

// vectors' storage on 64-byte boundaries: a product's activation rows are loaded a
// vector at a time, and a vector split over two cache lines costs two loads (float32
// steps of four rows took 1.5-1.9x as long with malloc's alignment)
template <typename T>
struct Aligned {
  typedef T value_type;
  Aligned() = default;
  template <typename U> Aligned(const Aligned<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U> bool operator==(const Aligned<U>&) const { return true; }
  template <typename U> bool operator!=(const Aligned<U>&) const { return false; }
};
template <typename T> using Buffer = std::vector<T, Aligned<T>>;

// a step's entry, whatever the model's dtype
struct Decoder {
  virtual ~Decoder() = default;
  virtual int run(int B, const int64_t* ids, const int64_t* positions, const int64_t* slots,
                  const int32_t* tables, int width, const int32_t* ctx_lens, void* out,
                  int threads) = 0;
};

// What a model's decode steps share: its dimensions and weights, buffers for up to
// max_rows rows, the products as jobs (per layer: qkv, o, gate_up, down); T: the
// weights', caches' and activations' type (bfloat16 or float32).
template <typename T>
struct Ctx : Decoder {
  Dims m;
  PagedShape paged;  // the cache's shape, for attend
  int max_rows, q_size, kv_size, qkv_size, group, width_in;
  const T *embed, *final_norm;
  const float *rope_cos, *rope_sin;
  std::vector<Layer<T>> layers;
  Buffer<float> residual, proj, qkv, gate_up;
  Buffer<T> act, attn;  // act: the next product's input
  std::vector<Job<T>> jobs;
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
    embed = static_cast<const T*>(ptrs[0]);
    final_norm = static_cast<const T*>(ptrs[1]);
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
      auto w = [&](int i) { return static_cast<const T*>(p[i]); };
      layers.push_back(Layer<T>{w(0), w(1), w(2), w(3), w(4), w(5), w(6), static_cast<T*>(p[7]),
                                static_cast<T*>(p[8])});
      const Layer<T>& L = layers.back();
      jobs.push_back(Job<T>{L.qkv_w, L.qkv_b, act.data(), m.hidden, qkv_size, qkv.data()});
      jobs.push_back(Job<T>{L.o_w, nullptr, attn.data(), q_size, m.hidden, proj.data()});
      jobs.push_back(Job<T>{L.gate_up_w, nullptr, act.data(), m.hidden, 2 * m.inter, gate_up.data()});
      jobs.push_back(Job<T>{L.down_w, nullptr, act.data(), m.inter, m.hidden, proj.data()});
    }
  }

  int run(int B, const int64_t* ids, const int64_t* positions, const int64_t* slots,
          const int32_t* tables, int width, const int32_t* ctx_lens, void* out,
          int threads) override;
};

// job j's 16-row blocks split over the team
template <typename T>
void product(Ctx<T>& c, int j, int B) {
  const Job<T>& job = c.jobs[j];
  const int blocks = (job.rows + 15) / 16;
#pragma omp for schedule(static)
  for (int k = 0; k < blocks; ++k) job_block(job, B, k, job.y + 16 * k, job.rows);
}

// the forward's body, run by each member of a team (or by one thread alone)
template <typename T>
void forward(Ctx<T>& c, int B, const int64_t* ids, const int64_t* positions, const int64_t* slots,
             const int32_t* tables, int width, const int32_t* ctx_lens, int max_ctx, T* out) {
  const Dims& m = c.m;
  const int d = m.head_dim, q_size = c.q_size, kv_size = c.kv_size, qkv_size = c.qkv_size;
  const int group = c.group;
  float* residual = c.residual.data();
  float* qkv = c.qkv.data();
  float* proj = c.proj.data();
  T* act = c.act.data();
  std::vector<float> scores(static_cast<size_t>(group) * max_ctx);
#pragma omp for schedule(static)
  for (int b = 0; b < B; ++b) {  // the embedding is the first residual
    const T* e = c.embed + static_cast<size_t>(ids[b]) * m.hidden;
    for (int i = 0; i < m.hidden; i += 16)
      _mm512_storeu_ps(residual + static_cast<size_t>(b) * m.hidden + i, load16(e + i));
    rms_norm(residual + static_cast<size_t>(b) * m.hidden, c.layers[0].in_norm, m.hidden, m.eps,
             act + static_cast<size_t>(b) * m.hidden);
  }
  for (int l = 0; l < m.layers; ++l) {
    const Layer<T>& L = c.layers[l];
    product(c, 4 * l, B);
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {  // RoPE on the query and key heads, K/V to the cache
      float* row = qkv + static_cast<size_t>(b) * qkv_size;
      const float* cs = c.rope_cos + positions[b] * d;
      const float* sn = c.rope_sin + positions[b] * d;
      for (int h = 0; h < m.heads + m.kv_heads; ++h) rope<T>(row + h * d, cs, sn, d);
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
      add_rounded<T>(r, proj + static_cast<size_t>(b) * m.hidden, m.hidden);
      rms_norm(r, L.post_norm, m.hidden, m.eps, act + static_cast<size_t>(b) * m.hidden);
    }
    product(c, 4 * l + 2, B);
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {  // SiLU(gate) * up
      const float* g = c.gate_up.data() + static_cast<size_t>(b) * 2 * m.inter;
      silu_and_mul(g, g + m.inter, m.inter, act + static_cast<size_t>(b) * m.inter);
    }
    product(c, 4 * l + 3, B);
    const T* next_norm = l + 1 < m.layers ? c.layers[l + 1].in_norm : c.final_norm;
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {  // residual add, then the next layer's (or the final) norm
      float* r = residual + static_cast<size_t>(b) * m.hidden;
      add_rounded<T>(r, proj + static_cast<size_t>(b) * m.hidden, m.hidden);
      rms_norm(r, next_norm, m.hidden, m.eps,
               l + 1 < m.layers ? act + static_cast<size_t>(b) * m.hidden : out + static_cast<size_t>(b) * m.hidden);
    }
  }
}

template <typename T>
int Ctx<T>::run(int B, const int64_t* ids, const int64_t* positions, const int64_t* slots,
                const int32_t* tables, int width, const int32_t* ctx_lens, void* out_,
                int threads) {
  if (B < 1 || B > max_rows) return -1;
  for (int b = 0; b < B; ++b) {  // every index the forward reads unchecked
    if (ids[b] < 0 || ids[b] >= limits[0]) return -2;
    if (positions[b] < 0 || positions[b] >= limits[1]) return -3;
    if (slots[b] < 0 || slots[b] >= limits[2]) return -4;
    for (int i = 0; i < width; ++i)
      if (tables[b * width + i] < 0 || tables[b * width + i] >= limits[3]) return -5;
    if (ctx_lens[b] < 1 || static_cast<int64_t>(ctx_lens[b]) > static_cast<int64_t>(width) * m.block_size)
      return -6;
  }
  std::lock_guard<std::mutex> hold(mu);
  T* out = static_cast<T*>(out_);
  int max_ctx = 1;
  for (int b = 0; b < B; ++b) max_ctx = ctx_lens[b] > max_ctx ? ctx_lens[b] : max_ctx;
  if (threads <= 1) {  // (no parallel region: its worksharing loops run whole here)
    forward(*this, B, ids, positions, slots, tables, width, ctx_lens, max_ctx, out);
    return 0;
  }
#pragma omp parallel num_threads(threads)
  forward(*this, B, ids, positions, slots, tables, width, ctx_lens, max_ctx, out);
  return 0;
}

template <typename T>
Decoder* make(const int64_t* dims, float eps, float scale, void* const* ptrs, int max_rows,
              const int64_t* limits) {
  auto* c = new Ctx<T>(dims, eps, scale, ptrs, max_rows);
  for (int i = 0; i < 4; ++i) c->limits[i] = limits[i];
  return c;
}

}  // namespace

extern "C" {

// A model's decode context. dims: hidden, inter, heads, kv_heads, head_dim, layers,
// block_size. ptrs: embed, final norm, rope cos, rope sin (float32 [positions,
// head_dim]), then per layer in_norm, qkv_w, qkv_b (or null), o_w, post_norm,
// gate_up_w, down_w, k_cache, v_cache; they must stay in place while it lives.
// dtype: 0 for bfloat16 tensors (projections packed by pack_rows), 1 for float32
// (projections as the model holds them). limits: the bounds a step's indices are
// checked against (token ids, positions, slots, block ids).
void* llmesh_cpu_decode_new(const int64_t* dims, float eps, float scale, void* const* ptrs,
                            int max_rows, const int64_t* limits, int dtype) {
  if (max_rows < 1 || (dtype != 0 && dtype != 1)) return nullptr;
  return dtype == 0 ? make<bf16>(dims, eps, scale, ptrs, max_rows, limits)
                    : make<float>(dims, eps, scale, ptrs, max_rows, limits);
}

void llmesh_cpu_decode_free(void* ctx) { delete static_cast<Decoder*>(ctx); }

// One decode step: B rows (at most the context's max_rows), each one token at
// `positions[b]` written to `slots[b]`, attending over ctx_lens[b] keys through its
// row of `tables` ([B, width] block ids). out: [B, hidden] in the model's dtype, the
// final norm's output. threads: the OpenMP team's size. Returns 0, or (nothing run)
// -1 for B out of range, -2 a token id, -3 a position, -4 a slot, -5 a block id out
// of range, -6 a context length of 0 or past its block table.
int llmesh_cpu_decode_run(void* ctx, int B, const int64_t* ids, const int64_t* positions,
                          const int64_t* slots, const int32_t* tables, int width,
                          const int32_t* ctx_lens, void* out, int threads) {
  return static_cast<Decoder*>(ctx)->run(B, ids, positions, slots, tables, width, ctx_lens, out,
                                         threads);
}

// One product on its own (the decode step's LM head): y [B, rows] float32 = W x[b] +
// bias, rounded to the dtype (0: bfloat16, W packed by pack_rows; 1: float32, W as
// the model holds it); W [rows, in], x [B, in] and bias (or null) in that dtype; the
// 16-row blocks split over `threads`.
void llmesh_cpu_product(const void* w, const void* bias, int in, int rows, const void* x, int B,
                        float* y, int threads, int dtype) {
  if (dtype == 0)
    product_rows(Job<bf16>{static_cast<const bf16*>(w), static_cast<const bf16*>(bias),
                           static_cast<const bf16*>(x), in, rows, y}, B, threads);
  else
    product_rows(Job<float>{static_cast<const float*>(w), static_cast<const float*>(bias),
                            static_cast<const float*>(x), in, rows, y}, B, threads);
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
