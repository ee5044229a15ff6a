// The CUDA built-ins a kernel of kernels/ uses, on the CPU, so that its own source
// runs here against the torch reference (compiled with g++ -DLLMESH_HOST_EMULATION
// -include this file). Each CUDA thread of a CTA is a fiber (ucontext); the CTA's
// fibers run one at a time and switch only at a barrier: __syncthreads (the CTA) or
// a warp collective (__shfl_xor_sync, mma). A barrier that some thread never
// reaches is reported as a deadlock, not a hang. The mma instruction is computed
// from the fragment layouts the PTX ISA documents for mma.m16n8k16 (A row-major,
// B column-major, fp32 accumulators): each lane publishes its registers, every
// lane then reads the whole tiles back through the same layouts.
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __restrict__ __restrict
#define __align__(n) alignas(n)

struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };

struct __half { unsigned short bits; };
struct __nv_bfloat16 { unsigned short bits; };
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };

inline float __bfloat162float(__nv_bfloat16 h) {
  unsigned u = static_cast<unsigned>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even
  unsigned u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {static_cast<unsigned short>(0x7fc0)};
  u += 0x7fff + ((u >> 16) & 1);
  return {static_cast<unsigned short>(u >> 16)};
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}
inline __half __float2half(float f) {
  _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16(lo), __float2bfloat16(hi)};
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half(lo), __float2half(hi)}; }

namespace emu {

constexpr int WARP = 32;

struct Barrier {
  int arrived = 0;
  std::vector<int> waiting;
};

struct Cta {
  emu_dim3 block_idx;
  unsigned block_threads = 0;
  std::vector<unsigned char> smem;
  std::vector<ucontext_t> contexts;
  std::vector<std::vector<char>> stacks;
  std::vector<char> finished;
  std::deque<int> ready;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<std::vector<unsigned>> warp_scratch;  // per warp: what its lanes publish
  ucontext_t scheduler;
  int current = -1;
  const std::function<void()>* body = nullptr;
};

inline Cta*& cta() {
  static Cta* c = nullptr;
  return c;
}

struct ThreadIdx {
  unsigned x;
};

inline void arrive(Barrier& b, int count) {
  Cta& c = *cta();
  if (++b.arrived == count) {
    b.arrived = 0;
    for (int t : b.waiting) c.ready.push_back(t);
    b.waiting.clear();
    return;
  }
  b.waiting.push_back(c.current);
  swapcontext(&c.contexts[c.current], &c.scheduler);
}

inline void thread_entry() {
  Cta& c = *cta();
  (*c.body)();
  c.finished[c.current] = 1;
}

// Run `body` as every thread of every CTA of `grid`; false on a deadlock (a barrier
// that some thread of the CTA did not reach).
inline bool launch(emu_dim3 grid, unsigned block_threads, size_t smem_bytes,
                   const std::function<void()>& body) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Cta c;
        c.block_idx = {x, y, z};
        c.block_threads = block_threads;
        c.smem.assign(smem_bytes + 16, 0xcd);  // garbage, as on a GPU
        c.contexts.resize(block_threads);
        c.stacks.assign(block_threads, std::vector<char>(256 * 1024));
        c.finished.assign(block_threads, 0);
        c.warp_barriers.resize((block_threads + WARP - 1) / WARP);
        c.warp_scratch.assign(c.warp_barriers.size(), std::vector<unsigned>(WARP * 10));
        c.body = &body;
        cta() = &c;
        for (unsigned t = 0; t < block_threads; ++t) {
          getcontext(&c.contexts[t]);
          c.contexts[t].uc_stack.ss_sp = c.stacks[t].data();
          c.contexts[t].uc_stack.ss_size = c.stacks[t].size();
          c.contexts[t].uc_link = &c.scheduler;
          makecontext(&c.contexts[t], thread_entry, 0);
          c.ready.push_back(static_cast<int>(t));
        }
        while (!c.ready.empty()) {
          c.current = c.ready.front();
          c.ready.pop_front();
          swapcontext(&c.scheduler, &c.contexts[c.current]);
        }
        cta() = nullptr;
        for (char f : c.finished)
          if (!f) return false;
      }
  return true;
}

inline unsigned thread_x() { return static_cast<unsigned>(cta()->current); }
inline unsigned lane() { return thread_x() % WARP; }
inline unsigned warp() { return thread_x() / WARP; }
inline void sync_warp() { arrive(cta()->warp_barriers[warp()], WARP); }

inline float shfl_xor(float v, int mask) {
  std::vector<unsigned>& s = cta()->warp_scratch[warp()];
  std::memcpy(&s[lane()], &v, 4);
  sync_warp();
  float out;
  std::memcpy(&out, &s[lane() ^ mask], 4);
  sync_warp();
  return out;
}

inline float element(unsigned reg, int half, const __nv_bfloat16*) {
  return __bfloat162float({static_cast<unsigned short>(half ? reg >> 16 : reg & 0xffff)});
}
inline float element(unsigned reg, int half, const __half*) {
  return __half2float({static_cast<unsigned short>(half ? reg >> 16 : reg & 0xffff)});
}

template <typename T>
inline void mma_16816(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2], const T* tag) {
  std::vector<unsigned>& s = cta()->warp_scratch[warp()];
  const unsigned me = lane();
  for (int i = 0; i < 4; ++i) s[me * 6 + i] = a[i];
  for (int i = 0; i < 2; ++i) s[me * 6 + 4 + i] = b[i];
  sync_warp();
  // element i of A (a0..a7) at (row, k): the lane (row % 8) * 4 + (k % 8) / 2, with
  // i = 2 * (row >= 8) + 4 * (k >= 8) + k % 2; of B (b0..b3) at (k, n): the lane
  // n * 4 + (k % 8) / 2, with i = 2 * (k >= 8) + k % 2; element i sits in register
  // i / 2, low half first
  auto A = [&](int row, int k) {
    const int i = 2 * (row >= 8) + 4 * (k >= 8) + k % 2;
    return element(s[((row % 8) * 4 + (k % 8) / 2) * 6 + i / 2], i % 2, tag);
  };
  auto B = [&](int k, int n) {
    const int i = 2 * (k >= 8) + k % 2;
    return element(s[(n * 4 + (k % 8) / 2) * 6 + 4 + i / 2], i % 2, tag);
  };
  const int g = me / 4, t = me % 4;
  for (int e = 0; e < 4; ++e) {  // c0,c1 at (g, 2t..2t+1), c2,c3 at (g + 8, 2t..)
    const int row = g + 8 * (e >= 2), col = 2 * t + e % 2;
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    c[e] += acc;
  }
  sync_warp();
}

}  // namespace emu

#define threadIdx (emu::ThreadIdx{emu::thread_x()})
#define blockIdx (emu::cta()->block_idx)
#define DYNAMIC_SMEM(name) \
  unsigned char* name = reinterpret_cast<unsigned char*>( \
      (reinterpret_cast<size_t>(emu::cta()->smem.data()) + 15) & ~size_t(15))

inline void __syncthreads() { emu::arrive(emu::cta()->block_barrier, emu::cta()->block_threads); }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return emu::shfl_xor(v, mask); }
inline float pf_neg_inf() { return -INFINITY; }
using emu::mma_16816;
