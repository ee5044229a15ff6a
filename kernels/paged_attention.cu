// Paged decode attention: one query token per sequence against its paged K/V.
//
// Caches are [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]; block_tables
// [num_seqs, max_blocks] int32; context_lens [num_seqs] int32. One CTA handles
// one (kv head, sequence, split): every K/V row is read once for all the query
// heads of its GQA group. Warps stride over tokens with an online softmax in
// fp32; the CTA's warps are merged through shared memory. With num_splits > 1
// (flash-decoding) each CTA covers tokens_per_split tokens (or, when that is 0,
// its split's share of its own sequence's context) and writes a normalised
// partial output plus its max and sum; paged_decode_reduce merges.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace {

// -inf without <cmath> (NVRTC, which CuPy compiles with, has no host headers)
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

constexpr int WARP = 32;
constexpr int NUM_WARPS = 4;
constexpr int MAX_GROUP = 8;

__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T, int HEAD_DIM, int BLOCK_SIZE>
__device__ void paged_decode(T* __restrict__ out, float* __restrict__ part_out,
                             float* __restrict__ part_max, float* __restrict__ part_sum,
                             const T* __restrict__ q, const T* __restrict__ k_cache,
                             const T* __restrict__ v_cache, const int* __restrict__ block_tables,
                             const int* __restrict__ context_lens, int max_blocks,
                             int num_kv_heads, int group, float scale, int num_splits,
                             int tokens_per_split) {
  constexpr int PER_LANE = HEAD_DIM / WARP;
  __shared__ float sm_m[NUM_WARPS][MAX_GROUP];
  __shared__ float sm_l[NUM_WARPS][MAX_GROUP];
  __shared__ float sm_acc[NUM_WARPS][MAX_GROUP][HEAD_DIM];

  const int kv_head = blockIdx.x, seq = blockIdx.y, split = blockIdx.z;
  const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
  const int num_heads = num_kv_heads * group;
  const int ctx = context_lens[seq];
  // tokens_per_split <= 0: each sequence divides its own context among the splits
  // (a CUDA graph fixes the split count but not the context lengths)
  const int per_split = tokens_per_split > 0 ? tokens_per_split : (ctx + num_splits - 1) / num_splits;
  const int start = split * per_split;
  const int end = min(ctx, start + per_split);

  float qv[MAX_GROUP][PER_LANE], acc[MAX_GROUP][PER_LANE], m[MAX_GROUP], l[MAX_GROUP];
#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g) {
    m[g] = neg_inf();
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      acc[g][i] = 0.f;
      qv[g][i] = g < group
          ? to_f32(q[((size_t)seq * num_heads + kv_head * group + g) * HEAD_DIM + lane * PER_LANE + i]) * scale
          : 0.f;
    }
  }

  const int* table = block_tables + (size_t)seq * max_blocks;
  for (int t = start + warp; t < end; t += NUM_WARPS) {
    const size_t row = ((size_t)table[t / BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE) * num_kv_heads + kv_head;
    const T* kp = k_cache + row * HEAD_DIM + lane * PER_LANE;
    const T* vp = v_cache + row * HEAD_DIM + lane * PER_LANE;
    float kv[PER_LANE], vv[PER_LANE], s[MAX_GROUP];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) kv[i] = to_f32(kp[i]);
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      float d = 0.f;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) d += qv[g][i] * kv[i];
      s[g] = warp_sum(d);
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) vv[i] = to_f32(vp[i]);
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      if (g >= group) break;
      const float m_new = fmaxf(m[g], s[g]);
      const float c = __expf(m[g] - m_new);  // 0 on the first token (m = -inf)
      const float p = __expf(s[g] - m_new);
      l[g] = l[g] * c + p;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) acc[g][i] = acc[g][i] * c + p * vv[i];
      m[g] = m_new;
    }
  }

#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g) {
    if (g >= group) break;
    if (lane == 0) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = l[g];
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) sm_acc[warp][g][lane * PER_LANE + i] = acc[g][i];
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < group * HEAD_DIM; idx += blockDim.x) {
    const int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
    float big = neg_inf();
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) big = fmaxf(big, sm_m[w][g]);
    float sum = 0.f, a = 0.f;
    if (big != neg_inf()) {
#pragma unroll
      for (int w = 0; w < NUM_WARPS; ++w) {
        if (sm_m[w][g] == neg_inf()) continue;
        const float c = __expf(sm_m[w][g] - big);
        sum += sm_l[w][g] * c;
        a += sm_acc[w][g][d] * c;
      }
    }
    const int head = kv_head * group + g;
    const float o = sum > 0.f ? a / sum : 0.f;
    if (num_splits == 1) {
      store(out + ((size_t)seq * num_heads + head) * HEAD_DIM + d, o);
    } else {
      const size_t ps = ((size_t)seq * num_heads + head) * num_splits + split;
      part_out[ps * HEAD_DIM + d] = o;
      if (d == 0) {
        part_max[ps] = big;
        part_sum[ps] = sum;
      }
    }
  }
}

// Merge the splits of one (sequence, head): weights sum_s * exp(max_s - max).
template <typename T, int HEAD_DIM>
__device__ void paged_decode_reduce(T* __restrict__ out, const float* __restrict__ part_out,
                                    const float* __restrict__ part_max,
                                    const float* __restrict__ part_sum, int num_heads,
                                    int num_splits) {
  const int head = blockIdx.x, seq = blockIdx.y;
  const size_t base = ((size_t)seq * num_heads + head) * num_splits;
  float big = neg_inf();
  for (int s = 0; s < num_splits; ++s) big = fmaxf(big, part_max[base + s]);
  for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    if (big != neg_inf()) {
      for (int s = 0; s < num_splits; ++s) {
        if (part_max[base + s] == neg_inf()) continue;
        const float w = part_sum[base + s] * __expf(part_max[base + s] - big);
        num += w * part_out[(base + s) * HEAD_DIM + d];
        den += w;
      }
    }
    store(out + ((size_t)seq * num_heads + head) * HEAD_DIM + d, den > 0.f ? num / den : 0.f);
  }
}

}  // namespace

#define DECODE_KERNEL(NAME, T, HD, BS)                                                          \
  extern "C" __global__ void __launch_bounds__(NUM_WARPS * WARP) NAME(                          \
      T* out, float* part_out, float* part_max, float* part_sum, const T* q, const T* k_cache,  \
      const T* v_cache, const int* block_tables, const int* context_lens, int max_blocks,       \
      int num_kv_heads, int group, float scale, int num_splits, int tokens_per_split) {         \
    paged_decode<T, HD, BS>(out, part_out, part_max, part_sum, q, k_cache, v_cache,             \
                            block_tables, context_lens, max_blocks, num_kv_heads, group, scale, \
                            num_splits, tokens_per_split);                                      \
  }

#define REDUCE_KERNEL(NAME, T, HD)                                                              \
  extern "C" __global__ void NAME(T* out, const float* part_out, const float* part_max,         \
                                  const float* part_sum, int num_heads, int num_splits) {       \
    paged_decode_reduce<T, HD>(out, part_out, part_max, part_sum, num_heads, num_splits);       \
  }

DECODE_KERNEL(paged_decode_f16_d64_b16, __half, 64, 16)
DECODE_KERNEL(paged_decode_f16_d64_b32, __half, 64, 32)
DECODE_KERNEL(paged_decode_f16_d128_b16, __half, 128, 16)
DECODE_KERNEL(paged_decode_f16_d128_b32, __half, 128, 32)
DECODE_KERNEL(paged_decode_bf16_d64_b16, __nv_bfloat16, 64, 16)
DECODE_KERNEL(paged_decode_bf16_d64_b32, __nv_bfloat16, 64, 32)
DECODE_KERNEL(paged_decode_bf16_d128_b16, __nv_bfloat16, 128, 16)
DECODE_KERNEL(paged_decode_bf16_d128_b32, __nv_bfloat16, 128, 32)
REDUCE_KERNEL(paged_decode_reduce_f16_d64, __half, 64)
REDUCE_KERNEL(paged_decode_reduce_f16_d128, __half, 128)
REDUCE_KERNEL(paged_decode_reduce_bf16_d64, __nv_bfloat16, 64)
REDUCE_KERNEL(paged_decode_reduce_bf16_d128, __nv_bfloat16, 128)
