// Fused elementwise ops of the decoder's hot path: RMSNorm, residual add + RMSNorm,
// NeoX rotary embedding (in place on the qkv projection), SiLU-and-mul.
//
// Each saves the round trips through HBM that the torch expressions make (one
// kernel and one read/write of the row instead of several). Math is fp32; the
// roundings to the storage dtype are placed where services/executor/model.py
// rounds, so results match it up to reduction order (RMSNorm) or one rounding
// (RoPE, SiLU, where torch rounds after every op).
//
// Rows are read 16 bytes (8 elements) at a time when the row length is a
// multiple of 8 and every pointer is 16-byte aligned; otherwise a scalar path
// (a sliced tensor can start anywhere). The choice is uniform per launch.
//
// No host headers: CuPy compiles this with NVRTC, which has none.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef long long i64;
typedef unsigned long long u64;

namespace {

constexpr int WARP = 32;
constexpr int VEC = 8;  // elements of a 2-byte dtype in 16 bytes

__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
// the value after a round trip through T: what torch's `.to(dtype)` leaves
template <typename T> __device__ __forceinline__ float round_to(float x) {
  return to_f32(from_f32<T>(x));
}

__device__ __forceinline__ bool aligned16(const void* p) { return ((u64)p & 15u) == 0; }

// 8 elements through one 128-bit load / store
template <typename T> struct alignas(16) Pack { T v[VEC]; };
template <typename T> __device__ __forceinline__ Pack<T> load8(const T* p) {
  Pack<T> r;
  *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
  return r;
}
__device__ __forceinline__ void load8(const float* p, float* out) {
  *reinterpret_cast<float4*>(out) = *reinterpret_cast<const float4*>(p);
  *reinterpret_cast<float4*>(out + 4) = *reinterpret_cast<const float4*>(p + 4);
}
template <typename T> __device__ __forceinline__ void store8(T* p, const Pack<T>& r) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sum over the CTA, returned to every thread. blockDim.x is a multiple of 32 (the
// wrappers launch so); called once per kernel, so the shared slots are not reused.
__device__ float block_sum(float x) {
  __shared__ float partial[32];
  const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
  x = warp_sum(x);
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  return warp_sum(lane < (int)(blockDim.x / WARP) ? partial[lane] : 0.f);
}

// HF's half-precision RMSNorm: normalise in fp32, round to T, then weight * that in T.
template <typename T>
__device__ __forceinline__ T norm_scale(float x, float inv, T w) {
  return from_f32<T>(to_f32(w) * round_to<T>(x * inv));
}

// out = rms_norm(in) for one row; the second pass re-reads `in` (L1/L2-resident).
template <typename T>
__device__ void norm_row(T* out, const T* in, const T* __restrict__ weight,
                         float sumsq, float eps, int hidden, bool vec) {
  const float inv = rsqrtf(block_sum(sumsq) * (1.f / hidden) + eps);
  if (vec) {
    for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
      const Pack<T> x = load8(in + i), w = load8(weight + i);
      Pack<T> y;
#pragma unroll
      for (int j = 0; j < VEC; ++j) y.v[j] = norm_scale(to_f32(x.v[j]), inv, w.v[j]);
      store8(out + i, y);
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
      out[i] = norm_scale(to_f32(in[i]), inv, weight[i]);
  }
}

// out may be x (in place): each thread reads an element before it writes it.
template <typename T>
__device__ void rms_norm(T* out, const T* x, const T* __restrict__ weight, float eps,
                         int hidden) {
  const i64 row = (i64)blockIdx.x * hidden;
  x += row;
  out += row;
  const bool vec = hidden % VEC == 0 && aligned16(x) && aligned16(out) && aligned16(weight);
  float sumsq = 0.f;
  if (vec) {
    for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
      const Pack<T> p = load8(x + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sumsq += to_f32(p.v[j]) * to_f32(p.v[j]);
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) sumsq += to_f32(x[i]) * to_f32(x[i]);
  }
  norm_row(out, x, weight, sumsq, eps, hidden, vec);
}

// residual = T(residual + x); x = rms_norm(residual). Each thread re-reads only the
// residual elements it wrote itself, so no extra barrier is needed between passes.
template <typename T>
__device__ void fused_add_rms_norm(T* __restrict__ x, T* __restrict__ residual,
                                   const T* __restrict__ weight, float eps, int hidden) {
  const i64 row = (i64)blockIdx.x * hidden;
  x += row;
  residual += row;
  const bool vec = hidden % VEC == 0 && aligned16(x) && aligned16(residual) && aligned16(weight);
  float sumsq = 0.f;
  if (vec) {
    for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
      const Pack<T> a = load8(x + i), r = load8(residual + i);
      Pack<T> h;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        h.v[j] = from_f32<T>(to_f32(r.v[j]) + to_f32(a.v[j]));
        const float f = to_f32(h.v[j]);  // the rounded sum is what gets normalised
        sumsq += f * f;
      }
      store8(residual + i, h);
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
      const T h = from_f32<T>(to_f32(residual[i]) + to_f32(x[i]));
      residual[i] = h;
      sumsq += to_f32(h) * to_f32(h);
    }
  }
  norm_row(x, residual, weight, sumsq, eps, hidden, vec);
}

// a*c + b*s with each op rounded (no FMA contraction): the same fp32 value as torch's
// `x * cos + rotated * sin`, on either load path
__device__ __forceinline__ float rotate(float a, float c, float b, float s) {
  return __fadd_rn(__fmul_rn(a, c), __fmul_rn(b, s));
}

// NeoX rotation of the first num_heads * head_dim columns of one token's row.
// cos/sin rows are the (freqs, freqs) tables; both halves are read as given.
template <typename T>
__device__ void rope_neox(T* qk, i64 row_stride, const i64* __restrict__ positions,
                          const float* __restrict__ cos, const float* __restrict__ sin,
                          int num_heads, int head_dim) {
  const int half = head_dim / 2;
  T* row = qk + (i64)blockIdx.x * row_stride;
  const i64 pos = positions[blockIdx.x];
  const float* c = cos + pos * head_dim;
  const float* s = sin + pos * head_dim;
  const bool vec = half % VEC == 0 && row_stride % VEC == 0 && aligned16(qk) &&
                   aligned16(cos) && aligned16(sin);
  if (vec) {
    const int per_head = half / VEC;
    for (int k = threadIdx.x; k < num_heads * per_head; k += blockDim.x) {
      const int i = (k % per_head) * VEC;
      T* p = row + (k / per_head) * head_dim + i;
      const Pack<T> a = load8(p), b = load8(p + half);
      alignas(16) float c1[VEC], s1[VEC], c2[VEC], s2[VEC];
      load8(c + i, c1);
      load8(s + i, s1);
      load8(c + i + half, c2);
      load8(s + i + half, s2);
      Pack<T> lo, hi;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float x1 = to_f32(a.v[j]), x2 = to_f32(b.v[j]);
        lo.v[j] = from_f32<T>(rotate(x1, c1[j], -x2, s1[j]));
        hi.v[j] = from_f32<T>(rotate(x2, c2[j], x1, s2[j]));
      }
      store8(p, lo);
      store8(p + half, hi);
    }
  } else {
    for (int k = threadIdx.x; k < num_heads * half; k += blockDim.x) {
      const int i = k % half;
      T* p = row + (k / half) * head_dim + i;
      const float x1 = to_f32(p[0]), x2 = to_f32(p[half]);
      p[0] = from_f32<T>(rotate(x1, c[i], -x2, s[i]));
      p[half] = from_f32<T>(rotate(x2, c[i + half], x1, s[i + half]));
    }
  }
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

// out[t, i] = silu(gate) * up over x = [gate | up]. Purely elementwise, so a row
// is spread over gridDim.y CTAs: a one-token decode step still fills the GPU.
template <typename T>
__device__ void silu_and_mul(T* __restrict__ out, const T* __restrict__ x, int inter) {
  const T* gate = x + (i64)blockIdx.x * 2 * inter;
  const T* up = gate + inter;
  out += (i64)blockIdx.x * inter;
  const int first = blockIdx.y * blockDim.x + threadIdx.x, step = gridDim.y * blockDim.x;
  if (inter % VEC == 0 && aligned16(x) && aligned16(out)) {
    for (int i = first * VEC; i < inter; i += step * VEC) {
      const Pack<T> g = load8(gate + i), u = load8(up + i);
      Pack<T> y;
#pragma unroll
      for (int j = 0; j < VEC; ++j) y.v[j] = from_f32<T>(silu(to_f32(g.v[j])) * to_f32(u.v[j]));
      store8(out + i, y);
    }
  } else {
    for (int i = first; i < inter; i += step)
      out[i] = from_f32<T>(silu(to_f32(gate[i])) * to_f32(up[i]));
  }
}

}  // namespace

#define FUSED_KERNELS(TAG, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(1024)                                           \
      rms_norm_##TAG(T* out, const T* x, const T* weight, float eps, int hidden) {             \
    rms_norm<T>(out, x, weight, eps, hidden);                                                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(1024) fused_add_rms_norm_##TAG(                 \
      T* x, T* residual, const T* weight, float eps, int hidden) {                             \
    fused_add_rms_norm<T>(x, residual, weight, eps, hidden);                                   \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(1024)                                           \
      rope_neox_##TAG(T* qk, i64 row_stride, const i64* positions, const float* cos,           \
                      const float* sin, int num_heads, int head_dim) {                         \
    rope_neox<T>(qk, row_stride, positions, cos, sin, num_heads, head_dim);                    \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(1024)                                           \
      silu_and_mul_##TAG(T* out, const T* x, int inter) {                                      \
    silu_and_mul<T>(out, x, inter);                                                            \
  }

FUSED_KERNELS(f16, __half)
FUSED_KERNELS(bf16, __nv_bfloat16)
