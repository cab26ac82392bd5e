// A prompt's products on block-quantized weights, q_times (Kernels.times on a QWeight,
// ../reference.py): y (T, H) = h (T, I) Wt for Wt (I, H) with blocks along H (the down
// projection's neuron-major rows, fc2), every token of the prompt against each weight block while
// the block is in registers (prefill_linear.cpp: the same for blocks along the reduction).
//
// h is read unquantized, times the block values rounded to h's dtype (fp32: exact, as the decode
// step's q_axpy reads them; bf16: nearest-even), in fp32 sums rounded to h's dtype. With
// AVX512-BF16 and a bf16 h: 8 neighbouring block columns' rows converted once per chunk of 128
// rows into bf16 pairs (row i, row i + 1), multiplied into 12 tokens at a time by vdpbf16ps.
// Else, with AVX-512: each block of 32 columns dequantized once per row and multiplied into up to
// 12 tokens' fp32 accumulators; a row whose h is zero for all of them is skipped (dReLU's zeros,
// the predictor's mask). With AVX2 alone: the same, 128 rows' values dequantized into an fp32
// panel once for all tokens. Without SIMD, each token is the decode step's q_axpy (a bf16 h
// then multiplies the exact block values, not rounded).

#include "quant_blocks.h"

namespace {

#if defined(__AVX512F__)
constexpr int kTimesTokens = 12;  // tokens per tile: 12 x 2 fp32 accumulators

// v rounded to bf16 (nearest-even), as fp32.
inline __m512 round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
  return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// One block's 32 values in fp32: w0 columns 0-15, w1 16-31.
template <int FMT>
inline void dequant32(const uint8_t* blk, __m512& w0, __m512& w1) {
  if constexpr (FMT == kQ8) {
    const __m512 d = _mm512_set1_ps(half_at(blk));
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))));
    w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))));
  } else {
    const float dw = half_at(blk);  // w = d q + m, m = -8 d (quant_blocks.h)
    const __m512 d = _mm512_set1_ps(dw), m = _mm512_set1_ps(-8.f * dw);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)), low = _mm_set1_epi8(15);
    w0 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, low))), m);
    w1 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low))), m);
  }
}

// The tokens [t0, t0 + M) of y's column block b: sum over `rows` of h[t, i] * dequantize(Wt[i]) in
// fp32, h (tokens, I) fp32.
template <int FMT, int M, typename T>
void times_tile(const QW& wt, const float* h, int64_t n_in, int64_t t0, const std::vector<int32_t>& rows, int64_t b,
                T* y) {
  const int64_t bb = block_bytes(FMT);
  __m512 a0[M], a1[M];
  for (int j = 0; j < M; ++j) a0[j] = a1[j] = _mm512_setzero_ps();
  const int64_t k = static_cast<int64_t>(rows.size());
  for (int64_t n = 0; n < k; ++n) {
    const int64_t i = rows[n];
    const uint8_t* blk = wt.row(i) + b * bb;
    prefetch(wt.row(rows[std::min(n + 6, k - 1)]) + b * bb);
    __m512 w0, w1;
    dequant32<FMT>(blk, w0, w1);
    if constexpr (std::is_same_v<T, bf16_bits>) {  // the values a bf16 h multiplies (see q_times)
      w0 = round_bf16(w0);
      w1 = round_bf16(w1);
    }
    for (int j = 0; j < M; ++j) {
      const __m512 hv = _mm512_set1_ps(h[(t0 + j) * n_in + i]);
      a0[j] = _mm512_fmadd_ps(hv, w0, a0[j]);
      a1[j] = _mm512_fmadd_ps(hv, w1, a1[j]);
    }
  }
  const int64_t c0 = b * kQBlock, width = std::min<int64_t>(kQBlock, wt.cols - c0);
  alignas(64) float out[kQBlock];
  for (int j = 0; j < M; ++j) {
    _mm512_store_ps(out, a0[j]);
    _mm512_store_ps(out + 16, a1[j]);
    T* yt = y + (t0 + j) * wt.cols + c0;
    for (int64_t c = 0; c < width; ++c) store(yt + c, out[c]);
  }
}

template <int FMT, typename T, int M = kTimesTokens>
void times_m(int m, const QW& wt, const float* h, int64_t n_in, int64_t t0, const std::vector<int32_t>& rows,
             int64_t b, T* y) {
  if constexpr (M > 0) {
    if (m == M) return times_tile<FMT, M>(wt, h, n_in, t0, rows, b, y);
    times_m<FMT, T, M - 1>(m, wt, h, n_in, t0, rows, b, y);
  }
}

template <typename T>
void times_impl(const QW& wt, const T* hp, int64_t tokens, T* y) {
  const int64_t n_in = wt.rows, nb = (wt.cols + kQBlock - 1) / kQBlock;
  std::vector<float> h(tokens * n_in);
  for (int64_t j = 0; j < tokens * n_in; ++j) h[j] = to_f32(hp[j]);
  // per tile of tokens: the rows with a non-zero h for at least one of its tokens
  const int64_t tiles = (tokens + kTimesTokens - 1) / kTimesTokens;
  std::vector<std::vector<int32_t>> rows(tiles);
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t t0 = tile * kTimesTokens, t1 = std::min(tokens, t0 + kTimesTokens);
    for (int64_t i = 0; i < n_in; ++i)
      for (int64_t t = t0; t < t1; ++t)
        if (h[t * n_in + i] != 0.f) {
          rows[tile].push_back(static_cast<int32_t>(i));
          break;
        }
  }
  const int threads = threads_for<uint8_t>(wt.rows * wt.row_bytes);
  // by column block, then tile: a thread keeps one block's column of the weight in its caches
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t t0 = tile * kTimesTokens;
      const int m = static_cast<int>(std::min<int64_t>(kTimesTokens, tokens - t0));
      if (wt.fmt == kQ8)
        times_m<kQ8, T>(m, wt, h.data(), n_in, t0, rows[tile], b, y);
      else
        times_m<kQ4, T>(m, wt, h.data(), n_in, t0, rows[tile], b, y);
    }
}
#if defined(__AVX512BF16__)
#define TD_BF16_TIMES 1
// A pass over the rows converts kGroupBlocks neighbouring column blocks of each row (272
// contiguous bytes of an int8 row: a row per page of a large matrix costs one TLB entry for all
// of them, not one per block), kPairChunk row pairs at a time: 8 x 64 x 128 bytes of bf16 pairs.
constexpr int64_t kGroupBlocks = 8;
constexpr int64_t kPairChunk = 64;

// Rows r0 and r1 (null: zeros) of one block as bf16 pairs for vdpbf16ps: lo lane k holds (row r0,
// row r1) of column k for columns 0-15, hi for columns 16-31. Values rounded to nearest-even.
template <int FMT>
inline void pair_block(const uint8_t* r0, const uint8_t* r1, __m512i* out) {
  alignas(64) static constexpr int16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                          21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                          11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(kInterleave);
  __m512 a0, a1, b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  dequant32<FMT>(r0, a0, a1);
  if (r1) dequant32<FMT>(r1, b0, b1);
  out[0] = _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(b0, a0));
  out[1] = _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(b1, a1));
}

// acc (tokens x `stride`, 32 columns from acc) of tokens [t0, t0 + M) += their h (bf16, rows padded
// to an even length n_pad) over the chunk's `np` row pairs from row i0 times the chunk's pairs.
template <int M>
inline void bf16_tokens(const __m512i* pairs, int64_t np, const bf16_bits* h, int64_t n_pad, int64_t t0, int64_t i0,
                        float* acc, int64_t stride) {
  __m512 a0[M], a1[M];
  for (int j = 0; j < M; ++j) {
    a0[j] = _mm512_loadu_ps(acc + (t0 + j) * stride);
    a1[j] = _mm512_loadu_ps(acc + (t0 + j) * stride + 16);
  }
  for (int64_t p = 0; p < np; ++p) {
    const __m512bh lo = (__m512bh)pairs[2 * p], hi = (__m512bh)pairs[2 * p + 1];
    for (int j = 0; j < M; ++j) {
      int32_t pair;
      std::memcpy(&pair, h + (t0 + j) * n_pad + i0 + 2 * p, sizeof pair);
      const __m512bh hv = (__m512bh)_mm512_set1_epi32(pair);
      a0[j] = _mm512_dpbf16_ps(a0[j], lo, hv);
      a1[j] = _mm512_dpbf16_ps(a1[j], hi, hv);
    }
  }
  for (int j = 0; j < M; ++j) {
    _mm512_storeu_ps(acc + (t0 + j) * stride, a0[j]);
    _mm512_storeu_ps(acc + (t0 + j) * stride + 16, a1[j]);
  }
}

template <int M = kTimesTokens>
inline void bf16_tail(int m, const __m512i* pairs, int64_t np, const bf16_bits* h, int64_t n_pad, int64_t t0,
                      int64_t i0, float* acc, int64_t stride) {
  if constexpr (M > 0) {
    if (m == M) return bf16_tokens<M>(pairs, np, h, n_pad, t0, i0, acc, stride);
    bf16_tail<M - 1>(m, pairs, np, h, n_pad, t0, i0, acc, stride);
  }
}

// times_impl for bf16 h: each group of column blocks' rows converted to bf16 pairs once per chunk
// of rows (for every tile of tokens, not once per tile), then vdpbf16ps, two products per lane.
template <int FMT>
void times_bf16(const QW& wt, const bf16_bits* hp, int64_t tokens, bf16_bits* y) {
  const int64_t n_in = wt.rows, n_pad = n_in + (n_in & 1), nb = (wt.cols + kQBlock - 1) / kQBlock;
  const int64_t groups = (nb + kGroupBlocks - 1) / kGroupBlocks, stride = kGroupBlocks * kQBlock;
  const int64_t bb = block_bytes(FMT);
  std::vector<bf16_bits> h(tokens * n_pad, 0);  // rows of even length: the last pair's second is 0
  for (int64_t t = 0; t < tokens; ++t) std::memcpy(h.data() + t * n_pad, hp + t * n_in, n_in * sizeof(bf16_bits));
  const int threads = threads_for<uint8_t>(wt.rows * wt.row_bytes);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<__m512i> pairs(kGroupBlocks * 2 * kPairChunk);  // [block][pair][lo, hi]
    std::vector<float> acc(tokens * stride);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b0 = g * kGroupBlocks, n_blocks = std::min(kGroupBlocks, nb - b0);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i0 = 0; i0 < n_in; i0 += 2 * kPairChunk) {
        const int64_t np = std::min(kPairChunk, (n_in - i0 + 1) / 2);
        for (int64_t p = 0; p < np; ++p) {
          const int64_t i = i0 + 2 * p;
          const uint8_t* r0 = wt.row(i) + b0 * bb;
          const uint8_t* r1 = i + 1 < n_in ? wt.row(i + 1) + b0 * bb : nullptr;
          for (int64_t k = 0; k < n_blocks; ++k)
            pair_block<FMT>(r0 + k * bb, r1 ? r1 + k * bb : nullptr, &pairs[(k * kPairChunk + p) * 2]);
        }
        for (int64_t k = 0; k < n_blocks; ++k)
          for (int64_t t0 = 0; t0 < tokens; t0 += kTimesTokens)
            bf16_tail(static_cast<int>(std::min<int64_t>(kTimesTokens, tokens - t0)), &pairs[k * kPairChunk * 2], np,
                      h.data(), n_pad, t0, i0, acc.data() + k * kQBlock, stride);
      }
      const int64_t c0 = b0 * kQBlock, width = std::min(stride, wt.cols - c0);
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t c = 0; c < width; ++c) store(y + t * wt.cols + c0 + c, acc[t * stride + c]);
    }
  }
}
#endif
#elif defined(TD_SIMD)
// With AVX2 (no AVX-512): a thread takes kTimesBlocks neighbouring column blocks of y at a time. Their
// values in kTimesChunk rows are dequantized once into an fp32 panel (rounded to h's dtype, as
// above), which then multiplies into every token's accumulators, over the rows whose h is not zero
// for that token. The panel is filled eight values per instruction, and its rows' bytes (36 at
// int4, 68 at int8, one row of the matrix apart) are asked for 16 rows ahead, both ends. A panel
// of 128 rows (32 KB, L1's size on Zen 3) pays a token's accumulator loads and its loop exit once
// per 128 rows: with the predictor's mask a token has about 13 non-zero h there. (Measured on
// Zen 3, 2 threads, 32 tokens against a 14336 x 4096 int4 matrix, h 90% zeros: 77 ms with the
// panel filled a value at a time, 64 rows and one line asked for 8 rows ahead; 15-19 ms so.)
constexpr int64_t kTimesBlocks = 2, kTimesCols = kTimesBlocks * kQBlock, kTimesChunk = 128;
constexpr int64_t kColVecs = kTimesCols / kLanes;

// v as T would hold it: fp32 as it is, bf16 rounded to nearest even (c10::BFloat16's rounding of
// a finite value; block values are finite).
template <typename T>
inline __m256 rounded8(__m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    return _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
}

// Rows [i0, i0 + rows) of column blocks [b0, b0 + n_blocks) in fp32 (as T), into panel (rows x
// kTimesCols; the columns of absent blocks zero).
template <int FMT, typename T>
void fill_panel(const QW& wt, int64_t i0, int64_t rows, int64_t b0, int64_t n_blocks, float* panel) {
  constexpr int64_t bb = FMT == kQ8 ? kQ8Bytes : kQ4Bytes;
  if (n_blocks < kTimesBlocks) std::fill(panel, panel + kTimesChunk * kTimesCols, 0.f);
  for (int64_t i = 0; i < rows; ++i) {
    {
      const uint8_t* ahead = wt.row(std::min(i0 + i + 16, wt.rows - 1)) + b0 * bb;
      prefetch(ahead);
      prefetch(ahead + kTimesBlocks * bb - 1);
    }
    for (int64_t k = 0; k < n_blocks; ++k) {
      const uint8_t* blk = wt.row(i0 + i) + (b0 + k) * bb;
      float* out = panel + i * kTimesCols + k * kQBlock;
      const __m256 d = _mm256_set1_ps(half_at(blk));
      if constexpr (FMT == kQ8) {
        for (int v = 0; v < 4; ++v) {
          const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * v)));
          _mm256_storeu_ps(out + 8 * v, rounded8<T>(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q))));
        }
      } else {
        const __m256 m = _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
        const __m256i mask = _mm256_set1_epi32(15);
        // nibble bytes 0-7 hold values 0-7 (low) and 16-23 (high); bytes 8-15 values 8-15 and 24-31
        for (int v = 0; v < 2; ++v) {
          const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * v)));
          _mm256_storeu_ps(out + 8 * v, rounded8<T>(_mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(q, mask)), m)));
          _mm256_storeu_ps(out + 16 + 8 * v, rounded8<T>(_mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), m)));
        }
      }
    }
  }
}

template <typename T>
void times_impl(const QW& wt, const T* hp, int64_t tokens, T* y) {
  const int64_t n_in = wt.rows, nb = (wt.cols + kQBlock - 1) / kQBlock;
  const int64_t groups = (nb + kTimesBlocks - 1) / kTimesBlocks;
  // each token's non-zero h as (row, value) lists, token after token from start[t]: the panel's
  // rows are then walked without a branch per row (dReLU's zeros fall at random)
  std::vector<int32_t> nz_row;
  std::vector<float> nz_h;
  std::vector<int64_t> start(tokens + 1, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < n_in; ++i)
      if (const float v = to_f32(hp[t * n_in + i]); v != 0.f) {
        nz_row.push_back(static_cast<int32_t>(i));
        nz_h.push_back(v);
      }
    start[t + 1] = static_cast<int64_t>(nz_row.size());
  }
  const int threads = threads_for<uint8_t>(wt.rows * wt.row_bytes);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> panel(kTimesChunk * kTimesCols), acc(tokens * kTimesCols);
    std::vector<int64_t> pos(tokens);  // per token: its first non-zero at or after the chunk
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b0 = g * kTimesBlocks, n_blocks = std::min(kTimesBlocks, nb - b0);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::copy(start.begin(), start.end() - 1, pos.begin());
      for (int64_t i0 = 0; i0 < n_in; i0 += kTimesChunk) {
        const int64_t rows = std::min(kTimesChunk, n_in - i0);
        if (wt.fmt == kQ8)
          fill_panel<kQ8, T>(wt, i0, rows, b0, n_blocks, panel.data());
        else
          fill_panel<kQ4, T>(wt, i0, rows, b0, n_blocks, panel.data());
        for (int64_t t = 0; t < tokens; ++t) {
          float* at = acc.data() + t * kTimesCols;
          vec a[kColVecs];
          for (int64_t v = 0; v < kColVecs; ++v) a[v] = vload(at + v * kLanes);
          int64_t p = pos[t];
          for (; p < start[t + 1] && nz_row[p] < i0 + rows; ++p) {
            const vec hv = vset(nz_h[p]);
            const float* w = panel.data() + (nz_row[p] - i0) * kTimesCols;
            for (int64_t v = 0; v < kColVecs; ++v) a[v] = vfma(hv, vload(w + v * kLanes), a[v]);
          }
          pos[t] = p;
          for (int64_t v = 0; v < kColVecs; ++v) vstore(at + v * kLanes, a[v]);
        }
      }
      const int64_t c0 = b0 * kQBlock, width = std::min(kTimesCols, wt.cols - c0);
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t c = 0; c < width; ++c) store(y + t * wt.cols + c0 + c, acc[t * kTimesCols + c]);
    }
  }
}
#else
// Without SIMD: each token as a decode step computes it, tokens in parallel.
template <typename T>
void times_impl(const QW& wt, const T* hp, int64_t tokens, T* y) {
  const int64_t hp_cols = (wt.cols + kQBlock - 1) / kQBlock * kQBlock;
  const int threads = threads_for<uint8_t>(wt.rows * wt.row_bytes);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<const uint8_t*> rows;
    std::vector<float> coef, acc(hp_cols, 0.f);
    for (int64_t i = 0; i < wt.rows; ++i)
      if (to_f32(hp[t * wt.rows + i]) != 0.f) {
        rows.push_back(wt.row(i));
        coef.push_back(to_f32(hp[t * wt.rows + i]));
      }
    qaxpy_list(wt, rows, coef, acc.data());
    for (int64_t c = 0; c < wt.cols; ++c) store(y + t * wt.cols + c, acc[c]);
  }
}
#endif

}  // namespace

torch::Tensor q_times(const torch::Tensor& h, const torch::Tensor& wt, int64_t fmt, int64_t cols) {
  const QW qw = qw_of(wt, fmt, cols, "q_times");
  const int64_t tokens = tokens_of(h, qw.rows, "q_times");
  auto shape = h.sizes().vec();
  shape.back() = cols;
  auto y = torch::empty(shape, h.options());
#if defined(TD_BF16_TIMES)
  if (h.scalar_type() == at::kBFloat16) {
    const bf16_bits* hp = ptr_of<bf16_bits>(h);
    if (qw.fmt == kQ8)
      times_bf16<kQ8>(qw, hp, tokens, ptr_of<bf16_bits>(y));
    else
      times_bf16<kQ4>(qw, hp, tokens, ptr_of<bf16_bits>(y));
    return y;
  }
#endif
  by_dtype(h, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    times_impl(qw, ptr_of<T>(h), tokens, ptr_of<T>(y));
  });
  return y;
}

void register_prefill_times(pybind11::module& m) {
  m.def("q_times", &q_times, "see Kernels.times on a QWeight (reference.py)", py::arg("h"), py::arg("wt"),
        py::arg("fmt"), py::arg("cols"));
}
