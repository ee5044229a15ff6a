// The matrix-vector products of the CPU decode kernel (cpu_decode.cpp; needs
// cpu_decode_vec.h): y[b * ldy + o] = rT(W[o] . x[b] + bias[o]) for a few activation
// rows x[b], each output row's sum in float32, in an order that does not depend
// on how many rows the batch holds (a row's result is the same bits alone or in
// any batch), rounded to T (bfloat16: as the eager projection's output; float32:
// not at all). Output rows go 16 at a time, a team's threads taking whole blocks.
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>

namespace {

// bfloat16 weights are packed by pack_rows (cpu_decode.py): per block of 16 output
// rows, per pair of inputs (2p, 2p + 1), one 64-byte vector holding the pair for
// each of the 16 rows (rows padded to a multiple of 16 with zeros). A dot-product
// instruction then adds a pair of products into each row's own float32 lane: the
// 16 rows' sums come out in one vector, with no horizontal reduction, and every
// weight vector loaded is used for NB activation rows.
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
    _mm512_mask_storeu_ps(y + static_cast<size_t>(b) * ldy, live, round16(sum));
  }
}

// float32 weights are read as the model holds them, [rows, in] row-major: a block of
// 16 output rows is one contiguous stretch of memory. Each row's products add up in
// one chain, input vector by input vector; R rows go at once (R chains per
// activation row in flight, each weight vector loaded once for NB activation rows,
// each activation vector once for R weight rows), and the 16 rows' sums come out of
// one transposing sum (hsum16). A row's order of sums does not depend on R or NB.
template <int NB, int R>
inline void rows16(const float* w, int in, const float* x, int rows, __m512 (*s)[16]) {
  const int vecs = in / 16;
  for (int r0 = 0; r0 < 16; r0 += R) {
    const float* wr[R];  // (rows past the last read the last one again, never stored)
    for (int r = 0; r < R; ++r)
      wr[r] = w + static_cast<size_t>(r0 + r < rows ? r0 + r : rows - 1) * in;
    __m512 a[NB][R];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) a[b][r] = _mm512_setzero_ps();
    for (int v = 0; v < vecs; ++v) {
      __m512 xv[NB];
      for (int b = 0; b < NB; ++b) xv[b] = _mm512_loadu_ps(x + static_cast<size_t>(b) * in + 16 * v);
      for (int r = 0; r < R; ++r) {
        if (NB > 1)  // (the next R rows, asked for ahead: the loop is too slow to do it)
          _mm_prefetch(reinterpret_cast<const char*>(wr[r] + static_cast<size_t>(R) * in + 16 * v), _MM_HINT_T0);
        const __m512 wv = _mm512_loadu_ps(wr[r] + 16 * v);
        for (int b = 0; b < NB; ++b) a[b][r] = _mm512_fmadd_ps(wv, xv[b], a[b][r]);
      }
    }
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) s[b][r0 + r] = a[b][r];
  }
}

template <int NB>
inline void block16(const float* w, int in, const float* x, float* y, int ldy, int rows,
                    const float* bias) {
  __m512 s[NB][16];
  rows16<NB, (NB == 1 ? 8 : 4)>(w, in, x, rows, s);
  const __mmask16 live = rows >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << rows) - 1);
  const __m512 vb = bias ? _mm512_maskz_loadu_ps(live, bias) : _mm512_setzero_ps();
  for (int b = 0; b < NB; ++b)
    _mm512_mask_storeu_ps(y + static_cast<size_t>(b) * ldy, live, _mm512_add_ps(hsum16(s[b]), vb));
}

// One matrix-vector product of a step: y[b * rows + o] = rT(W[o] . x[b] + bias[o])
template <typename T>
struct Job {
  const T *w, *bias, *x;
  int in, rows;
  float* y;
};

// One 16-row block k of a product for B rows: y[b * ldy + j] = rT(W[16k + j] . x[b] +
// bias[16k + j]), y pointing at the block's first row; x: B rows of `in` values
// (in % 32 == 0). (Both layouts put block k's weights 16 * k * in values in.)
template <typename T>
void job_block(const Job<T>& job, int B, int k, float* y, int ldy) {
  const T* wk = job.w + static_cast<size_t>(k) * 16 * job.in;
  const int in = job.in, o = 16 * k, n = job.rows - o < 16 ? job.rows - o : 16;
  const T* bo = job.bias ? job.bias + o : nullptr;
  int b = 0;
  for (; b + 4 <= B; b += 4)
    block16<4>(wk, in, job.x + static_cast<size_t>(b) * in, y + static_cast<size_t>(b) * ldy, ldy, n, bo);
  const T* xb = job.x + static_cast<size_t>(b) * in;
  float* yb = y + static_cast<size_t>(b) * ldy;
  switch (B - b) {
    case 3: block16<3>(wk, in, xb, yb, ldy, n, bo); break;
    case 2: block16<2>(wk, in, xb, yb, ldy, n, bo); break;
    case 1: block16<1>(wk, in, xb, yb, ldy, n, bo); break;
    default: break;
  }
}

// a whole product, its 16-row blocks split over `threads`
template <typename T>
void product_rows(const Job<T>& job, int B, int threads) {
  const int blocks = (job.rows + 15) / 16;
  if (threads <= 1) {
    for (int k = 0; k < blocks; ++k) job_block(job, B, k, job.y + 16 * k, job.rows);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int k = 0; k < blocks; ++k) job_block(job, B, k, job.y + 16 * k, job.rows);
}

}  // namespace
