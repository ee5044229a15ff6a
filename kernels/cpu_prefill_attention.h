// Causal attention of a prefill chunk on a CPU, bfloat16 or float32 in and out (part
// of the CPU decode kernel's library, cpu_decode.cpp; needs cpu_decode_vec.h).
//
// torch's CPU flash attention takes ~3 ms a layer for a 512-token chunk of the
// bench model (8 heads of 64), as long as all of the layer's projections
// together. Here, per KV head and block of 16 query rows (the group's query
// heads with them), keys are taken 16 at a time: the keys of a block are packed
// once per call as bfloat16 pairs per position (the layout of the weights of
// the decode kernel's products), so one AVX512-BF16 dot product adds a pair of
// each of 16 keys into that key's own float32 lane, and a query's 16 scores
// come out of head_dim / 2 instructions with no horizontal sum. The softmax is
// online (float32 running max and sum per query, its output rescaled when the
// max grows), values are widened to float32 a block at a time and accumulated
// in float32; the output is rounded to bfloat16 once. Query row i of a chunk of
// L rows at the end of a context of C keys sees keys 0 .. C - L + i.
//
// float32 (torch's SDPA took 18% of a 512-token prefill of SmolLM2): the keys of
// a block are packed as 16 keys' values per dimension, and a query's 16 scores
// are FMAs of its broadcast elements with them (D instructions, the same 4-byte
// lanes as a bfloat16 pair); nothing is rounded.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

// keys [C, KVH, D] -> per KV head and block of 16 positions, per 4-byte unit u of a key
// (a bfloat16 pair, or one float32), the unit of each of the 16 keys
// ([KVH][C/16][units][16] int32 bits; zeros past C)
template <typename T>
void pack_keys(const T* k, int C, int KVH, int D, int32_t* kp) {
  const int nkb = (C + 15) / 16, units = D * static_cast<int>(sizeof(T)) / 4;
#pragma omp for schedule(static) collapse(2)
  for (int h = 0; h < KVH; ++h)
    for (int kb = 0; kb < nkb; ++kb) {
      int32_t* dst = kp + (static_cast<size_t>(h) * nkb + kb) * units * 16;
      for (int j = 0; j < 16; ++j) {
        const int t = 16 * kb + j;
        const int32_t* src = reinterpret_cast<const int32_t*>(k + (static_cast<size_t>(t) * KVH + h) * D);
        for (int u = 0; u < units; ++u) dst[u * 16 + j] = t < C ? src[u] : 0;
      }
    }
}

// acc + one unit of a query (its bits broadcast) times that unit of 16 keys, per key
template <typename T>
inline __m512 dot_unit(__m512 acc, __m512i keys, int32_t q) {
  if constexpr (std::is_same_v<T, bf16>)
    return _mm512_dpbf16_ps(acc, (__m512bh)keys, (__m512bh)_mm512_set1_epi32(q));
  else
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_set1_epi32(q)), _mm512_castsi512_ps(keys), acc);
}

// one KV head's query heads for rows [r0, r0 + nr) of the chunk, four query vectors at a
// time (their dot products and sums interleaved: enough in flight to hide the
// instructions' latency); o ((nq + 3) x D), vf (16 x D): scratch
template <typename T>
void prefill_block(const T* q, const int32_t* kp, const T* v, int L, int C, int H, int KVH,
                   int D, float scale, int h, int r0, int nr, T* out, float* o, float* vf) {
  const int group = H / KVH, nq = nr * group, vecs = D / 16, nkb = (C + 15) / 16;
  const int units = D * static_cast<int>(sizeof(T)) / 4;
  const int first_pos = C - L + r0;  // the first row's position (it sees keys 0 .. pos)
  std::vector<float> m(nq, -INFINITY), l(nq, 0.f);
  alignas(64) float s[4][16];
  for (int i = 0; i < (nq + 3) * D; ++i) o[i] = 0.f;
  const int last_kb = (first_pos + nr - 1) / 16;  // (keys past the last row's position: none)
  for (int kb = 0; kb <= last_kb && kb < nkb; ++kb) {
    const int j0 = 16 * kb, nk = C - j0 < 16 ? C - j0 : 16;
    const int32_t* kblock = kp + (static_cast<size_t>(h) * nkb + kb) * units * 16;
    for (int j = 0; j < nk; ++j)  // the block's values, widened once for every query
      for (int w = 0; w < vecs; ++w)
        _mm512_storeu_ps(vf + j * D + 16 * w, load16(v + (static_cast<size_t>(j0 + j) * KVH + h) * D + 16 * w));
    for (int q0 = 0; q0 < nq; q0 += 4) {
      const int32_t* qp[4];
      int seen[4], most = 0;
      for (int i = 0; i < 4; ++i) {
        const int qi = q0 + i < nq ? q0 + i : q0;  // (a spare lane repeats the first)
        const int r = qi / group, head = h * group + qi % group, pos = first_pos + r;
        qp[i] = reinterpret_cast<const int32_t*>(q + (static_cast<size_t>(r0 + r) * H + head) * D);
        // keys j0 .. j0 + seen - 1 (none when every key of the block is after it)
        seen[i] = q0 + i >= nq || pos < j0 ? 0 : (pos - j0 + 1 < nk ? pos - j0 + 1 : nk);
        most = seen[i] > most ? seen[i] : most;
      }
      if (most == 0) continue;
      __m512 a[4][2];
      for (int i = 0; i < 4; ++i) a[i][0] = a[i][1] = _mm512_setzero_ps();
      for (int u = 0; u < units; u += 2) {
        const __m512i k0 = _mm512_loadu_si512(kblock + u * 16);
        const __m512i k1 = _mm512_loadu_si512(kblock + (u + 1) * 16);
        for (int i = 0; i < 4; ++i) {
          a[i][0] = dot_unit<T>(a[i][0], k0, qp[i][u]);
          a[i][1] = dot_unit<T>(a[i][1], k1, qp[i][u + 1]);
        }
      }
      for (int i = 0; i < 4; ++i) {  // online softmax: s[i] the block's weights (0 past seen)
        _mm512_store_ps(s[i], _mm512_setzero_ps());
        if (seen[i] == 0) continue;
        const int qi = q0 + i;
        const __mmask16 live = static_cast<__mmask16>((1u << seen[i]) - 1);
        const __m512 sc = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY),
                                               _mm512_mul_ps(_mm512_add_ps(a[i][0], a[i][1]), _mm512_set1_ps(scale)));
        const float mx = _mm512_reduce_max_ps(sc), m_new = mx > m[qi] ? mx : m[qi];
        const __m512 p16 = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(sc, _mm512_set1_ps(m_new))));
        _mm512_store_ps(s[i], p16);
        if (m_new > m[qi]) {  // the running max grew: what was summed so far shrinks
          const float alpha = m[qi] == -INFINITY ? 0.f : std::exp(m[qi] - m_new);
          l[qi] *= alpha;
          float* oq = o + static_cast<size_t>(qi) * D;
          for (int w = 0; w < vecs; ++w)
            _mm512_storeu_ps(oq + 16 * w, _mm512_mul_ps(_mm512_loadu_ps(oq + 16 * w), _mm512_set1_ps(alpha)));
          m[qi] = m_new;
        }
        l[qi] += _mm512_reduce_add_ps(p16);
      }
      // (always four rows of o, in registers: past nq they are the scratch's spare rows,
      // with weights 0)
      float* o4 = o + static_cast<size_t>(q0) * D;
      for (int w = 0; w < vecs; ++w) {
        __m512 acc0 = _mm512_loadu_ps(o4 + 16 * w), acc1 = _mm512_loadu_ps(o4 + D + 16 * w);
        __m512 acc2 = _mm512_loadu_ps(o4 + 2 * D + 16 * w), acc3 = _mm512_loadu_ps(o4 + 3 * D + 16 * w);
        for (int j = 0; j < most; ++j) {
          const __m512 vv = _mm512_loadu_ps(vf + j * D + 16 * w);
          acc0 = _mm512_fmadd_ps(_mm512_set1_ps(s[0][j]), vv, acc0);
          acc1 = _mm512_fmadd_ps(_mm512_set1_ps(s[1][j]), vv, acc1);
          acc2 = _mm512_fmadd_ps(_mm512_set1_ps(s[2][j]), vv, acc2);
          acc3 = _mm512_fmadd_ps(_mm512_set1_ps(s[3][j]), vv, acc3);
        }
        _mm512_storeu_ps(o4 + 16 * w, acc0);
        _mm512_storeu_ps(o4 + D + 16 * w, acc1);
        _mm512_storeu_ps(o4 + 2 * D + 16 * w, acc2);
        _mm512_storeu_ps(o4 + 3 * D + 16 * w, acc3);
      }
    }
  }
  for (int qi = 0; qi < nq; ++qi) {
    const int r = qi / group, head = h * group + qi % group;
    const __m512 inv = _mm512_set1_ps(1.0f / l[qi]);
    for (int w = 0; w < vecs; ++w)
      store16(out + (static_cast<size_t>(r0 + r) * H + head) * D + 16 * w,
              _mm512_mul_ps(_mm512_loadu_ps(o + static_cast<size_t>(qi) * D + 16 * w), inv));
  }
}

// q [L, H, D], k and v [C, KVH, D] (the context, the chunk's own keys last), out
// [L, H, D]; D % 32 == 0, D <= 256, H / KVH <= 8
template <typename T>
void prefill_attention(const T* q, const T* k, const T* v, int L, int C, int H, int KVH,
                       int D, float scale, T* out, int threads) {
  const int nkb = (C + 15) / 16, nrb = (L + 15) / 16, group = H / KVH;
  std::vector<int32_t> kp(static_cast<size_t>(KVH) * nkb * 16 * D * sizeof(T) / 4);
#pragma omp parallel num_threads(threads)
  {
    // (o: a row per query vector, and three spare ones for the last group of four)
    std::vector<float> o(static_cast<size_t>(16 * group + 3) * D), vf(static_cast<size_t>(16) * D);
    pack_keys(k, C, KVH, D, kp.data());  // (a barrier at its end)
#pragma omp for schedule(dynamic) collapse(2)
    for (int h = 0; h < KVH; ++h)
      for (int rb = nrb - 1; rb >= 0; --rb) {  // (the longest blocks, the last rows, first)
        const int r0 = 16 * rb, nr = L - r0 < 16 ? L - r0 : 16;
        prefill_block(q, kp.data(), v, L, C, H, KVH, D, scale, h, r0, nr, out, o.data(), vf.data());
      }
  }
}

}  // namespace
