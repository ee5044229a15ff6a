// Paged prefill attention: the multi-token chunks of a step against their paged K/V,
// causal, on tensor cores, with no gather.
//
// A step's prefill chunks are rows of one flat q [num_tokens, num_heads, HEAD_DIM];
// chunk c owns rows q_starts[c] .. + q_lens[c], its queries sit at positions
// ctx_lens[c] - q_lens[c] .. ctx_lens[c] - 1 (the tokens before them are already in
// the cache), and its keys 0 .. ctx_lens[c] - 1 live in the blocks of
// block_tables[c] (caches [num_blocks, block_size, num_kv_heads, HEAD_DIM]; this
// step's own K/V are written there first). A query sees every key at or before
// its position.
//
// One CTA (4 warps) handles 64 query rows of one chunk for one query head; each
// warp owns 16 rows (flash-attention 2): per tile of BLOCK_N keys it stages K and
// V in shared memory straight from their cache blocks, computes S = Q K^T with
// mma.m16n8k16 (fp32 accumulators), keeps the online softmax per row in
// registers (each row's max and sum live in the 4 lanes that hold it), and
// feeds P (rounded to the input type, as the accumulators of S become the A
// fragments of P V) back into the tensor cores. Rows past the chunk's end are
// computed as its last row and not written. Keys past the causal edge are
// masked; the key tiles stop at the tile's last query.
//
// Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
// point type" (g = lane / 4, t = lane % 4):
//   A (16x16): a0,a1 (g, 2t..2t+1), a2,a3 (g+8, 2t..), a4,a5 (g, 2t+8..), a6,a7 (g+8, 2t+8..)
//   B (16x8):  b0,b1 (k = 2t..2t+1, n = g), b2,b3 (k = 2t+8.., n = g)
//   C (16x8):  c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..)
// The tests run this file on the CPU too (tests/unit/cuda_emulation.h stands in
// for the CUDA built-ins and the mma instruction), so the device-only parts sit
// behind LLMESH_HOST_EMULATION.
#ifndef LLMESH_HOST_EMULATION
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace {

typedef long long i64;
typedef unsigned int u32;

constexpr int PF_THREADS = 128;  // 4 warps
constexpr int PF_ROWS = 64;      // query rows per CTA, 16 per warp
constexpr int PF_PAD = 8;        // shared-memory row padding (elements): fewer bank conflicts

#ifndef LLMESH_HOST_EMULATION
__device__ __forceinline__ float pf_neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ void mma_16816(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2],
                                          const __nv_bfloat16*) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2],
                                          const __half*) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// two floats as one register of two 16-bit elements (the first in the low half)
__device__ __forceinline__ u32 pack2(float lo, float hi, const __nv_bfloat16*) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<u32*>(&v);
}
__device__ __forceinline__ u32 pack2(float lo, float hi, const __half*) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<u32*>(&v);
}
// two 16-bit elements from two places as one register
template <typename T>
__device__ __forceinline__ u32 join2(const T* lo, const T* hi) {
  const unsigned short a = *reinterpret_cast<const unsigned short*>(lo);
  const unsigned short b = *reinterpret_cast<const unsigned short*>(hi);
  return static_cast<u32>(a) | (static_cast<u32>(b) << 16);
}
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }
__device__ __forceinline__ void store_out(__half* p, float x) { *p = __float2half(x); }

template <typename T, int HEAD_DIM, int BLOCK_N>
__device__ void paged_prefill(T* __restrict__ out, const T* __restrict__ q,
                              const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                              const int* __restrict__ block_tables,
                              const int* __restrict__ q_starts, const int* __restrict__ q_lens,
                              const int* __restrict__ ctx_lens, int max_blocks, int num_heads,
                              int num_kv_heads, float scale_log2, int block_shift) {
  constexpr int LD = HEAD_DIM + PF_PAD;     // shared row stride (elements)
  constexpr int KSTEPS = HEAD_DIM / 16;     // k-steps of S = Q K^T
  constexpr int NTILES = BLOCK_N / 8;       // 8-key column tiles of S
  constexpr int DTILES = HEAD_DIM / 8;      // 8-wide column tiles of O
  constexpr int VEC = 8;                    // 16-byte loads of 2-byte elements
  const int head = blockIdx.x, tile = blockIdx.y, chunk = blockIdx.z;
  const int q_len = q_lens[chunk];
  const int row0 = tile * PF_ROWS;          // the CTA's first row within the chunk
  if (row0 >= q_len) return;                // (uniform across the CTA)
  const int ctx = ctx_lens[chunk];
  const int first_pos = ctx - q_len;        // position of the chunk's first query
  const int kv_head = head / (num_heads / num_kv_heads);
  const int* table = block_tables + static_cast<i64>(chunk) * max_blocks;
  const int block_mask = (1 << block_shift) - 1;

  DYNAMIC_SMEM(smem_raw);
  T* ks = reinterpret_cast<T*>(smem_raw);   // [BLOCK_N][LD]
  T* vs = ks + BLOCK_N * LD;                // [BLOCK_N][LD]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  // this lane's two rows (within the chunk), clamped to its last row
  int rows[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};
  int pos[2];
  for (int r = 0; r < 2; ++r) {
    rows[r] = rows[r] < q_len ? rows[r] : q_len - 1;
    pos[r] = first_pos + rows[r];
  }
  const i64 q_stride = static_cast<i64>(num_heads) * HEAD_DIM;
  const T* q_a = q + (q_starts[chunk] + rows[0]) * q_stride + head * HEAD_DIM;
  const T* q_b = q + (q_starts[chunk] + rows[1]) * q_stride + head * HEAD_DIM;
  // Q's A fragments, kept in registers for the whole key loop
  u32 qf[KSTEPS][4];
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s) {
    const int c = s * 16 + 2 * t;
    qf[s][0] = *reinterpret_cast<const u32*>(q_a + c);
    qf[s][1] = *reinterpret_cast<const u32*>(q_b + c);
    qf[s][2] = *reinterpret_cast<const u32*>(q_a + c + 8);
    qf[s][3] = *reinterpret_cast<const u32*>(q_b + c + 8);
  }

  float o[DTILES][4];
#pragma unroll
  for (int d = 0; d < DTILES; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m[2] = {pf_neg_inf(), pf_neg_inf()};  // running max (log2 units), per row
  float l[2] = {0.f, 0.f};                    // this lane's share of the running sum

  // keys up to the CTA's last query
  const int last_row = row0 + PF_ROWS < q_len ? row0 + PF_ROWS : q_len;
  const int kv_end = first_pos + last_row;
  const i64 row_stride = static_cast<i64>(num_kv_heads) * HEAD_DIM;
  for (int kv0 = 0; kv0 < kv_end; kv0 += BLOCK_N) {
    __syncthreads();  // the previous tile's K/V are no longer read
    for (int i = threadIdx.x; i < BLOCK_N * (HEAD_DIM / VEC); i += PF_THREADS) {
      const int r = i / (HEAD_DIM / VEC), c = (i % (HEAD_DIM / VEC)) * VEC;
      const int key = kv0 + r;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (key < kv_end) {
        const i64 slot = static_cast<i64>(table[key >> block_shift]) * (block_mask + 1)
                         + (key & block_mask);
        const i64 at = slot * row_stride + kv_head * HEAD_DIM + c;
        kv = *reinterpret_cast<const uint4*>(k_cache + at);
        vv = *reinterpret_cast<const uint4*>(v_cache + at);
      }
      *reinterpret_cast<uint4*>(ks + r * LD + c) = kv;
      *reinterpret_cast<uint4*>(vs + r * LD + c) = vv;
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows: B[k][n] = K[n][k], a K row's pairs are contiguous
    float s[NTILES][4];
#pragma unroll
    for (int n = 0; n < NTILES; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      const T* krow = ks + (n * 8 + g) * LD + 2 * t;
#pragma unroll
      for (int k = 0; k < KSTEPS; ++k) {
        const u32 b[2] = {*reinterpret_cast<const u32*>(krow + k * 16),
                          *reinterpret_cast<const u32*>(krow + k * 16 + 8)};
        mma_16816(s[n], qf[k], b, q);
      }
    }
    // mask, scale (log2 units), and the online softmax per row
    float tile_max[2] = {pf_neg_inf(), pf_neg_inf()};
#pragma unroll
    for (int n = 0; n < NTILES; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kv0 + n * 8 + 2 * t + (e & 1), r = e >> 1;
        s[n][e] = key <= pos[r] ? s[n][e] * scale_log2 : pf_neg_inf();
        tile_max[r] = fmaxf(tile_max[r], s[n][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the 4 lanes of a row agree on its max
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float m_new = fmaxf(m[r], tile_max[r]);  // finite: key 0 is in the first tile
      alpha[r] = exp2f(m[r] - m_new);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < NTILES; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = exp2f(s[n][e] - m[e >> 1]);
        l[e >> 1] += s[n][e];
      }
    }
#pragma unroll
    for (int d = 0; d < DTILES; ++d) {
      o[d][0] *= alpha[0];
      o[d][1] *= alpha[0];
      o[d][2] *= alpha[1];
      o[d][3] *= alpha[1];
    }
    // O += P V: S's accumulators of two 8-key tiles are the A fragment of one 16-key step
#pragma unroll
    for (int k = 0; k < BLOCK_N / 16; ++k) {
      const u32 a[4] = {pack2(s[2 * k][0], s[2 * k][1], q), pack2(s[2 * k][2], s[2 * k][3], q),
                        pack2(s[2 * k + 1][0], s[2 * k + 1][1], q),
                        pack2(s[2 * k + 1][2], s[2 * k + 1][3], q)};
      const T* v0 = vs + (k * 16 + 2 * t) * LD + g;
#pragma unroll
      for (int d = 0; d < DTILES; ++d) {
        const T* v = v0 + d * 8;
        const u32 b[2] = {join2(v, v + LD), join2(v + 8 * LD, v + 9 * LD)};
        mma_16816(o[d], a, b, q);
      }
    }
  }
  // each row's sum over its 4 lanes, then the normalised output of the rows that exist
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const int mine[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (mine[r] >= q_len) continue;
    T* dst = out + (q_starts[chunk] + mine[r]) * q_stride + head * HEAD_DIM + 2 * t;
    const float inv = 1.f / l[r];
#pragma unroll
    for (int d = 0; d < DTILES; ++d) {
      store_out(dst + d * 8, o[d][2 * r] * inv);
      store_out(dst + d * 8 + 1, o[d][2 * r + 1] * inv);
    }
  }
}

}  // namespace

// paged_prefill_<dtype>_d<head dim>: BLOCK_N keys a tile (32 for head_dim 256, where
// Q's fragments and O's accumulators take most of the registers)
#define PREFILL_KERNEL(NAME, T, HD, BN)                                                         \
  extern "C" __global__ void __launch_bounds__(PF_THREADS) NAME(                                \
      T* out, const T* q, const T* k_cache, const T* v_cache, const int* block_tables,          \
      const int* q_starts, const int* q_lens, const int* ctx_lens, int max_blocks,              \
      int num_heads, int num_kv_heads, float scale_log2, int block_shift) {                     \
    paged_prefill<T, HD, BN>(out, q, k_cache, v_cache, block_tables, q_starts, q_lens,          \
                             ctx_lens, max_blocks, num_heads, num_kv_heads, scale_log2,         \
                             block_shift);                                                      \
  }

PREFILL_KERNEL(paged_prefill_f16_d64, __half, 64, 64)
PREFILL_KERNEL(paged_prefill_f16_d128, __half, 128, 64)
PREFILL_KERNEL(paged_prefill_f16_d256, __half, 256, 32)
PREFILL_KERNEL(paged_prefill_bf16_d64, __nv_bfloat16, 64, 64)
PREFILL_KERNEL(paged_prefill_bf16_d128, __nv_bfloat16, 128, 64)
PREFILL_KERNEL(paged_prefill_bf16_d256, __nv_bfloat16, 256, 32)
