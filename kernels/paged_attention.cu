// Paged decode attention: one query token per sequence against its paged K/V.
//
// Caches are [num_blocks, block_size, num_kv_heads, HEAD_DIM]; block_tables
// [num_seqs, max_blocks] int32; context_lens [num_seqs] int32. One CTA handles
// one (kv head, sequence, split), and every K/V row it reads serves all the
// query heads of its GQA group.
//
// Built for the memory-bandwidth limit (a decode step reads the whole context's
// K and V once and does little arithmetic on it):
// - a K/V row (HEAD_DIM elements) is read by HEAD_DIM / 8 threads, 16 bytes
//   each, so the CTA's 128 threads cover 1024 / HEAD_DIM rows per load;
// - each such row group keeps UNROLL rows' loads in flight before it uses them;
// - a row's dot products are summed with 3 to 5 shuffles inside its row group,
//   and each row group keeps its own online softmax (max, sum, accumulator per
//   query head, fp32); the row groups are merged through shared memory at the end.
// The loop bound is uniform across the CTA (rows past the end are masked), so
// every lane reaches every shuffle.
//
// With num_splits > 1 (flash-decoding) each CTA covers its split's share of its
// own sequence's context (a CUDA graph fixes the split count, not the lengths)
// and writes a normalised partial output plus its max and sum;
// paged_decode_reduce merges the splits.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace {

typedef long long i64;

// -inf without <cmath> (NVRTC, which CuPy compiles with, has no host headers)
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

constexpr int NUM_THREADS = 128;
constexpr int VEC = 8;     // 2-byte elements in one 16-byte load
constexpr int UNROLL = 4;  // rows a row group loads before it uses them

__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[VEC], const __half*) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC / 2; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[VEC],
                                       const __nv_bfloat16*) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC / 2; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T, int HEAD_DIM, int MAX_G>
__device__ void paged_decode(T* __restrict__ out, float* __restrict__ part_out,
                             float* __restrict__ part_max, float* __restrict__ part_sum,
                             const T* __restrict__ q, const T* __restrict__ k_cache,
                             const T* __restrict__ v_cache, const int* __restrict__ block_tables,
                             const int* __restrict__ context_lens, int max_blocks,
                             int num_kv_heads, int group, float scale, int num_splits,
                             int block_shift) {
  constexpr int LANES = HEAD_DIM / VEC;      // threads per K/V row: 8, 16 or 32
  constexpr int ROWS = NUM_THREADS / LANES;  // row groups: 16, 8 or 4
  __shared__ float sm_m[ROWS][MAX_G];
  __shared__ float sm_l[ROWS][MAX_G];
  __shared__ float sm_acc[ROWS][MAX_G][HEAD_DIM];

  const int kv_head = blockIdx.x, seq = blockIdx.y, split = blockIdx.z;
  const int row = threadIdx.x / LANES, lane = threadIdx.x % LANES;
  const int num_heads = num_kv_heads * group;
  const int ctx = context_lens[seq];
  const int per_split = (ctx + num_splits - 1) / num_splits;
  const int start = split * per_split;
  const int end = min(ctx, start + per_split);

  float qv[MAX_G][VEC], acc[MAX_G][VEC], m[MAX_G], l[MAX_G];
#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    m[g] = neg_inf();
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      acc[g][i] = 0.f;
      qv[g][i] = 0.f;
    }
    if (g < group) {  // (a group smaller than MAX_G: the other heads are not this CTA's)
      const T* qp = q + ((i64)seq * num_heads + kv_head * group + g) * HEAD_DIM + lane * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) qv[g][i] = to_f32(qp[i]) * scale;
    }
  }

  const int* table = block_tables + (i64)seq * max_blocks;
  const int in_block = (1 << block_shift) - 1;
  const i64 slot_stride = (i64)num_kv_heads * HEAD_DIM;  // elements from one slot to the next
  const T* k_row0 = k_cache + (i64)kv_head * HEAD_DIM + lane * VEC;
  const T* v_row0 = v_cache + (i64)kv_head * HEAD_DIM + lane * VEC;
  for (int t0 = start; t0 < end; t0 += ROWS * UNROLL) {
    uint4 kr[UNROLL], vr[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int t = t0 + u * ROWS + row;
      if (t < end) {
        const i64 slot = ((i64)table[t >> block_shift] << block_shift) + (t & in_block);
        kr[u] = *reinterpret_cast<const uint4*>(k_row0 + slot * slot_stride);
        vr[u] = *reinterpret_cast<const uint4*>(v_row0 + slot * slot_stride);
      } else {
        kr[u] = make_uint4(0u, 0u, 0u, 0u);
        vr[u] = kr[u];
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float kf[VEC], s[MAX_G];
      unpack(kr[u], kf, k_cache);
#pragma unroll
      for (int g = 0; g < MAX_G; ++g) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) d += qv[g][i] * kf[i];
#pragma unroll
        for (int o = LANES / 2; o > 0; o /= 2) d += __shfl_xor_sync(0xffffffffu, d, o);
        s[g] = d;
      }
      if (t0 + u * ROWS + row < end) {  // (the same for every lane of the row group)
        float vf[VEC];
        unpack(vr[u], vf, v_cache);
#pragma unroll
        for (int g = 0; g < MAX_G; ++g) {
          if (g >= group) break;
          const float m_new = fmaxf(m[g], s[g]);
          const float c = __expf(m[g] - m_new);  // 0 on the first row (m = -inf)
          const float p = __expf(s[g] - m_new);
          l[g] = l[g] * c + p;
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[g][i] = acc[g][i] * c + p * vf[i];
          m[g] = m_new;
        }
      }
    }
  }

#pragma unroll
  for (int g = 0; g < MAX_G; ++g) {
    if (g >= group) break;
    if (lane == 0) {
      sm_m[row][g] = m[g];
      sm_l[row][g] = l[g];
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sm_acc[row][g][lane * VEC + i] = acc[g][i];
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < group * HEAD_DIM; idx += NUM_THREADS) {
    const int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
    float big = neg_inf();
#pragma unroll
    for (int r = 0; r < ROWS; ++r) big = fmaxf(big, sm_m[r][g]);
    float sum = 0.f, a = 0.f;
    if (big != neg_inf()) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (sm_m[r][g] == neg_inf()) continue;
        const float c = __expf(sm_m[r][g] - big);
        sum += sm_l[r][g] * c;
        a += sm_acc[r][g][d] * c;
      }
    }
    const int head = kv_head * group + g;
    const float o = sum > 0.f ? a / sum : 0.f;
    if (num_splits == 1) {
      store(out + ((i64)seq * num_heads + head) * HEAD_DIM + d, o);
    } else {
      const i64 ps = ((i64)seq * num_heads + head) * num_splits + split;
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

#define DECODE_KERNEL(NAME, T, HD, G)                                                           \
  extern "C" __global__ void __launch_bounds__(NUM_THREADS) NAME(                               \
      T* out, float* part_out, float* part_max, float* part_sum, const T* q, const T* k_cache,  \
      const T* v_cache, const int* block_tables, const int* context_lens, int max_blocks,       \
      int num_kv_heads, int group, float scale, int num_splits, int block_shift) {              \
    paged_decode<T, HD, G>(out, part_out, part_max, part_sum, q, k_cache, v_cache,              \
                           block_tables, context_lens, max_blocks, num_kv_heads, group, scale,  \
                           num_splits, block_shift);                                            \
  }

#define REDUCE_KERNEL(NAME, T, HD)                                                              \
  extern "C" __global__ void NAME(T* out, const float* part_out, const float* part_max,         \
                                  const float* part_sum, int num_heads, int num_splits) {       \
    paged_decode_reduce<T, HD>(out, part_out, part_max, part_sum, num_heads, num_splits);       \
  }

// paged_decode_<dtype>_d<head dim>_g<largest GQA group served>
#define DECODE_GROUPS(T, TAG, HD)                      \
  DECODE_KERNEL(paged_decode_##TAG##_d##HD##_g1, T, HD, 1) \
  DECODE_KERNEL(paged_decode_##TAG##_d##HD##_g2, T, HD, 2) \
  DECODE_KERNEL(paged_decode_##TAG##_d##HD##_g4, T, HD, 4) \
  DECODE_KERNEL(paged_decode_##TAG##_d##HD##_g8, T, HD, 8)

DECODE_GROUPS(__half, f16, 64)
DECODE_GROUPS(__half, f16, 128)
DECODE_GROUPS(__half, f16, 256)
DECODE_GROUPS(__nv_bfloat16, bf16, 64)
DECODE_GROUPS(__nv_bfloat16, bf16, 128)
DECODE_GROUPS(__nv_bfloat16, bf16, 256)
REDUCE_KERNEL(paged_decode_reduce_f16_d64, __half, 64)
REDUCE_KERNEL(paged_decode_reduce_f16_d128, __half, 128)
REDUCE_KERNEL(paged_decode_reduce_f16_d256, __half, 256)
REDUCE_KERNEL(paged_decode_reduce_bf16_d64, __nv_bfloat16, 64)
REDUCE_KERNEL(paged_decode_reduce_bf16_d128, __nv_bfloat16, 128)
REDUCE_KERNEL(paged_decode_reduce_bf16_d256, __nv_bfloat16, 256)
