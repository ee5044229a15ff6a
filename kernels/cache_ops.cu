// KV cache maintenance: write a step's new K/V into their slots, copy blocks (CoW).
// Both work on 2-byte elements (fp16 / bf16 share the bit width) or fp32.
// No host headers: CuPy compiles this with NVRTC, which has none.
typedef long long i64;
typedef unsigned short u16;

namespace {

// k, v: [num_tokens, row_elems] (row = num_kv_heads * head_dim);
// caches: [num_slots, row_elems]; slot < 0 skips the token (padding).
template <typename E>
__device__ void write_kv(const E* __restrict__ k, const E* __restrict__ v, E* __restrict__ k_cache,
                         E* __restrict__ v_cache, const i64* __restrict__ slots,
                         int row_elems) {
  const int token = blockIdx.x;
  const i64 slot = slots[token];
  if (slot < 0) return;
  for (int i = threadIdx.x; i < row_elems; i += blockDim.x) {
    k_cache[slot * row_elems + i] = k[(i64)token * row_elems + i];
    v_cache[slot * row_elems + i] = v[(i64)token * row_elems + i];
  }
}

// pairs: [num_pairs, 2] (src block, dst block); a block is block_elems elements.
template <typename E>
__device__ void copy_blocks(E* __restrict__ cache, const i64* __restrict__ pairs,
                            i64 block_elems) {
  const i64 src = pairs[2 * blockIdx.x], dst = pairs[2 * blockIdx.x + 1];
  for (i64 i = threadIdx.x; i < block_elems; i += blockDim.x)
    cache[dst * block_elems + i] = cache[src * block_elems + i];
}

}  // namespace

extern "C" __global__ void reshape_and_cache_16(const u16* k, const u16* v,
                                                u16* k_cache, u16* v_cache,
                                                const i64* slots, int row_elems) {
  write_kv(k, v, k_cache, v_cache, slots, row_elems);
}

extern "C" __global__ void reshape_and_cache_32(const float* k, const float* v, float* k_cache,
                                                float* v_cache, const i64* slots,
                                                int row_elems) {
  write_kv(k, v, k_cache, v_cache, slots, row_elems);
}

extern "C" __global__ void copy_blocks_16(u16* cache, const i64* pairs,
                                          i64 block_elems) {
  copy_blocks(cache, pairs, block_elems);
}

extern "C" __global__ void copy_blocks_32(float* cache, const i64* pairs,
                                          i64 block_elems) {
  copy_blocks(cache, pairs, block_elems);
}
