// Causal attention of a prefill chunk on a CPU, bfloat16 in and out (part of the
// CPU decode kernel's library, cpu_decode.cpp; needs cpu_decode_vec.h).
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
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// keys [C, KVH, D] -> per KV head and block of 16 positions, per pair p of D, the
// pair of each of the 16 keys ([KVH][C/16][D/2][16] int32; zeros past C)
void pack_keys(const bf16* k, int C, int KVH, int D, int32_t* kp) {
  const int nkb = (C + 15) / 16, pairs = D / 2;
#pragma omp for schedule(static) collapse(2)
  for (int h = 0; h < KVH; ++h)
    for (int kb = 0; kb < nkb; ++kb) {
      int32_t* dst = kp + (static_cast<size_t>(h) * nkb + kb) * pairs * 16;
      for (int j = 0; j < 16; ++j) {
        const int t = 16 * kb + j;
        const int32_t* src = reinterpret_cast<const int32_t*>(k + (static_cast<size_t>(t) * KVH + h) * D);
        for (int p = 0; p < pairs; ++p) dst[p * 16 + j] = t < C ? src[p] : 0;
      }
    }
}

// one KV head's query heads for rows [r0, r0 + nr) of the chunk, four query vectors at a
// time (their dot products and sums interleaved: enough in flight to hide the
// instructions' latency); o ((nq + 3) x D), vf (16 x D): scratch
void prefill_block(const bf16* q, const int32_t* kp, const bf16* v, int L, int C, int H, int KVH,
                   int D, float scale, int h, int r0, int nr, bf16* out, float* o, float* vf) {
  const int group = H / KVH, nq = nr * group, pairs = D / 2, vecs = D / 16, nkb = (C + 15) / 16;
  const int first_pos = C - L + r0;  // the first row's position (it sees keys 0 .. pos)
  std::vector<float> m(nq, -INFINITY), l(nq, 0.f);
  alignas(64) float s[4][16];
  for (int i = 0; i < (nq + 3) * D; ++i) o[i] = 0.f;
  const int last_kb = (first_pos + nr - 1) / 16;  // (keys past the last row's position: none)
  for (int kb = 0; kb <= last_kb && kb < nkb; ++kb) {
    const int j0 = 16 * kb, nk = C - j0 < 16 ? C - j0 : 16;
    const int32_t* kblock = kp + (static_cast<size_t>(h) * nkb + kb) * pairs * 16;
    for (int j = 0; j < nk; ++j)  // the block's values, widened once for every query
      for (int w = 0; w < vecs; ++w)
        _mm512_storeu_ps(vf + j * D + 16 * w, load_bf16x16(v + (static_cast<size_t>(j0 + j) * KVH + h) * D + 16 * w));
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
      for (int p = 0; p < pairs; p += 2) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kblock + p * 16);
        const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kblock + (p + 1) * 16);
        for (int i = 0; i < 4; ++i) {
          a[i][0] = _mm512_dpbf16_ps(a[i][0], k0, (__m512bh)_mm512_set1_epi32(qp[i][p]));
          a[i][1] = _mm512_dpbf16_ps(a[i][1], k1, (__m512bh)_mm512_set1_epi32(qp[i][p + 1]));
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
void prefill_attention(const bf16* q, const bf16* k, const bf16* v, int L, int C, int H, int KVH,
                       int D, float scale, bf16* out, int threads) {
  const int nkb = (C + 15) / 16, nrb = (L + 15) / 16, group = H / KVH;
  std::vector<int32_t> kp(static_cast<size_t>(KVH) * nkb * 16 * D / 2);
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
