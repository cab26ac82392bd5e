// A prompt's products on block-quantized weights (Kernels.linear and Kernels.times on a QWeight,
// ../reference.py): every token of the prompt against each weight block while the block is in
// registers, so that a prefill reads each matrix once, not once per token.
//
//   q_linear  y (T, N) = x (T, K) W^T for W (N, K) with blocks along K (q, k, v, o, gate, up,
//             fc1): each token quantized per block to Q8_0 as a decode step quantizes it
//             (quantize_act), each block's dot product an exact integer sum, scaled in fp32:
//             the decode step's q_dot, for T tokens at once. With AVX-512 VNNI: 16 rows at a
//             time, their block transposed into 8 vectors of 4-byte groups (lane r = row r), each
//             token's 4-byte group broadcast against them (vpdpbusd), so that the 16 lanes end
//             as the 16 rows' integer sums with no horizontal reduction. vpdpbusd multiplies
//             unsigned by signed bytes: int8 weights are read as w + 128 (the sum starts at
//             -128 sum(q_x)), int4 ones are unsigned already (q in 0..15, plus m d_x sum(q_x)).
//   q_times   y (T, H) = h (T, I) Wt for Wt (I, H) with blocks along H (down, fc2): h read
//             unquantized, times the block values rounded to h's dtype (fp32: exact, as the
//             decode step's q_axpy reads them; bf16: nearest-even). With AVX512-BF16 and a bf16
//             h: 8 neighbouring block columns' rows converted once per chunk of 128 rows into
//             bf16 pairs (row i, row i + 1), multiplied into 12 tokens at a time by vdpbf16ps. Else, with
//             AVX-512: each block of 32 columns dequantized once per row and multiplied into up
//             to 12 tokens' fp32 accumulators; a row whose h is zero for all of them is skipped
//             (dReLU's zeros, the predictor's mask).
//
// Results match the reference up to fp32 summation order, rounded to the activations' dtype.
// Without AVX-512 (VNNI), each token goes through the decode step's primitives (qdot, qaxpy:
// q_times then multiplies a bf16 h by the exact block values, not rounded).

#include "quant_blocks.h"

namespace {

// The prompt's tokens quantized as quantize_act quantizes one, block-major (a block's tokens
// contiguous, as q_linear reads them): q (nb, T, 32), d and s (nb, T); corr (nb, T) = -128 sum(q)
// of the block, the term that reading int8 weights as w + 128 adds.
struct QActs {
  int64_t nb, tokens;
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> corr;
  int64_t at(int64_t b, int64_t t) const { return b * tokens + t; }
};

template <typename T>
QActs quantize_acts(const T* x, int64_t tokens, int64_t k) {
  const int64_t nb = (k + kQBlock - 1) / kQBlock;
  QActs a{nb, tokens, std::vector<int8_t>(tokens * nb * kQBlock), std::vector<float>(tokens * nb),
          std::vector<float>(tokens * nb), std::vector<int32_t>(tokens * nb)};
  const int threads = threads_for<T>(tokens * k);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t t = 0; t < tokens; ++t) {
    const QAct one = quantize_act(x + t * k, k, kQ8);
    for (int64_t b = 0; b < nb; ++b) {
      int sum = 0;
      for (int j = 0; j < kQBlock; ++j) sum += one.q[b * kQBlock + j];
      std::memcpy(a.q.data() + a.at(b, t) * kQBlock, one.q.data() + b * kQBlock, kQBlock);
      a.d[a.at(b, t)] = one.d(b);
      a.s[a.at(b, t)] = one.s(b);
      a.corr[a.at(b, t)] = -128 * sum;
    }
  }
  return a;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define TD_Q_GEMM 1

constexpr int kRows = 16;   // rows per q_linear group: one per 32-bit lane
constexpr int kTokens = 6;  // tokens per pass over a block in registers (6 x 2 independent sums)
constexpr int kTimesTokens = 12;  // tokens per q_times tile: 12 x 2 fp32 accumulators

// Four dwords of each of 16 rows (p[r], r < 16) transposed: V[c] lane r = dword c of row r.
inline void transpose16x4(const uint8_t* const p[kRows], __m512i V[4]) {
  __m512i Z[4];  // Z[k] 128-bit lane j: row k + 4j
  for (int k = 0; k < 4; ++k) {
    __m512i z = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[k])));
    z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[k + 4])), 1);
    z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[k + 8])), 2);
    Z[k] = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[k + 12])), 3);
  }
  // within each 128-bit lane j, a 4 x 4 transpose of rows 4j .. 4j + 3: lane 4j + i = row 4j + i
  const __m512i t0 = _mm512_unpacklo_epi32(Z[0], Z[1]), t1 = _mm512_unpackhi_epi32(Z[0], Z[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(Z[2], Z[3]), t3 = _mm512_unpackhi_epi32(Z[2], Z[3]);
  V[0] = _mm512_unpacklo_epi64(t0, t2);
  V[1] = _mm512_unpackhi_epi64(t0, t2);
  V[2] = _mm512_unpacklo_epi64(t1, t3);
  V[3] = _mm512_unpackhi_epi64(t1, t3);
}

// Block b of 16 rows (rows[r]: row r's block b; rows past the matrix repeat its last one, their
// lanes never stored): W[c] lane r = values 4c .. 4c + 3 of row r as unsigned bytes; dv (and mv,
// int4) the rows' d (and m) in fp32.
template <int FMT>
inline void load_block(const uint8_t* const rows[kRows], __m512i W[8], __m512& dv, __m512& mv) {
  alignas(64) uint32_t dm[kRows];  // each row's first four bytes: d, and m (int4) or q[0..1]
  for (int r = 0; r < kRows; ++r) std::memcpy(&dm[r], rows[r], sizeof dm[r]);
  const __m512i dmv = _mm512_load_si512(dm);
  dv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dmv));
  const uint8_t* p[kRows];
  if constexpr (FMT == kQ8) {
    for (int r = 0; r < kRows; ++r) p[r] = rows[r] + 2;
    transpose16x4(p, W);
    for (int r = 0; r < kRows; ++r) p[r] = rows[r] + 18;
    transpose16x4(p, W + 4);
    for (int c = 0; c < 8; ++c) W[c] = _mm512_xor_si512(W[c], _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    mv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dmv, 16)));
    for (int r = 0; r < kRows; ++r) p[r] = rows[r] + 4;
    __m512i V[4];
    transpose16x4(p, V);
    const __m512i low = _mm512_set1_epi8(15);
    for (int c = 0; c < 4; ++c) {  // byte j: value j (low nibble) and value j + 16 (high)
      W[c] = _mm512_and_si512(V[c], low);
      W[c + 4] = _mm512_and_si512(_mm512_srli_epi32(V[c], 4), low);
    }
  }
}

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

// acc[t][0:16] += the 16 rows' block b against tokens t0 .. t0 + M - 1.
template <int FMT, int M>
inline void linear_tokens(const __m512i W[8], __m512 dv, __m512 mv, const QActs& x, int64_t b, int64_t t0,
                          float* acc) {
  __m512i s0[M], s1[M];
  const int64_t tb0 = x.at(b, t0);
  const int8_t* xq = x.q.data() + tb0 * kQBlock;  // the M tokens' blocks, one after another
  for (int j = 0; j < M; ++j) {
    s0[j] = FMT == kQ8 ? _mm512_set1_epi32(x.corr[tb0 + j]) : _mm512_setzero_si512();
    s1[j] = _mm512_setzero_si512();
  }
#pragma GCC unroll 4
  for (int c = 0; c < 8; c += 2)
    for (int j = 0; j < M; ++j) {
      s0[j] = _mm512_dpbusd_epi32(s0[j], W[c], bcast4(xq + j * kQBlock + 4 * c));
      s1[j] = _mm512_dpbusd_epi32(s1[j], W[c + 1], bcast4(xq + j * kQBlock + 4 * c + 4));
    }
  for (int j = 0; j < M; ++j) {
    float* a = acc + (t0 + j) * kRows;
    __m512 f = _mm512_fmadd_ps(_mm512_mul_ps(dv, _mm512_set1_ps(x.d[tb0 + j])),
                               _mm512_cvtepi32_ps(_mm512_add_epi32(s0[j], s1[j])), _mm512_loadu_ps(a));
    if constexpr (FMT == kQ4) f = _mm512_fmadd_ps(mv, _mm512_set1_ps(x.s[tb0 + j]), f);
    _mm512_storeu_ps(a, f);
  }
}

template <int FMT, int M = kTokens>
inline void linear_tail(int m, const __m512i W[8], __m512 dv, __m512 mv, const QActs& x, int64_t b, int64_t t0,
                        float* acc) {
  if constexpr (M > 0) {
    if (m == M) return linear_tokens<FMT, M>(W, dv, mv, x, b, t0, acc);
    linear_tail<FMT, M - 1>(m, W, dv, mv, x, b, t0, acc);
  }
}

// y[:, r0 : r0 + 16] for every token, through acc (tokens x 16 fp32).
template <int FMT, typename T>
void linear_group(const QW& w, const QActs& x, int64_t tokens, int64_t r0, float* acc, T* y) {
  const int64_t bb = block_bytes(FMT), rows = std::min<int64_t>(kRows, w.rows - r0);
  std::fill(acc, acc + tokens * kRows, 0.f);
  const uint8_t* blocks[kRows];
  for (int64_t b = 0; b < x.nb; ++b) {
    for (int r = 0; r < kRows; ++r) blocks[r] = w.row(r0 + std::min<int64_t>(r, rows - 1)) + b * bb;
    __m512i W[8];
    __m512 dv, mv = _mm512_setzero_ps();
    load_block<FMT>(blocks, W, dv, mv);
    int64_t t = 0;
    for (; t + kTokens <= tokens; t += kTokens) linear_tokens<FMT, kTokens>(W, dv, mv, x, b, t, acc);
    if (t < tokens) linear_tail<FMT>(static_cast<int>(tokens - t), W, dv, mv, x, b, t, acc);
  }
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < rows; ++r) store(y + t * w.rows + r0 + r, acc[t * kRows + r]);
}

template <typename T>
void linear_impl(const QW& w, const T* xp, int64_t tokens, T* y) {
  const QActs x = quantize_acts(xp, tokens, w.cols);
  const int64_t groups = (w.rows + kRows - 1) / kRows;
  const int threads = threads_for<uint8_t>(w.rows * w.row_bytes);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> acc(tokens * kRows);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      if (w.fmt == kQ8)
        linear_group<kQ8>(w, x, tokens, g * kRows, acc.data(), y);
      else
        linear_group<kQ4>(w, x, tokens, g * kRows, acc.data(), y);
    }
  }
}

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
    const __m512 d = _mm512_set1_ps(half_at(blk)), m = _mm512_set1_ps(half_at(blk + 2));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4)), low = _mm_set1_epi8(15);
    w0 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, low))), m);
    w1 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low))), m);
  }
}

// The tokens [t0, t0 + M) of y's column block b: sum over `rows` of h[t, i] * dequantize(Wt[i]) in
// fp32, h (tokens, I) fp32.
template <int FMT, int M, typename T>
void times_tile(const QW& wt, const float* h, int64_t n_in, int64_t t0, const std::vector<int32_t>& rows, int64_t b,
                T* y) {
  constexpr int64_t bb = FMT == kQ8 ? 2 + kQBlock : 4 + kQBlock / 2;
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
  constexpr int64_t bb = FMT == kQ8 ? 2 + kQBlock : 4 + kQBlock / 2;
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
#else
// Without AVX-512 VNNI: each token as a decode step computes it, rows (linear) or tokens (times)
// in parallel.
template <typename T>
void linear_impl(const QW& w, const T* xp, int64_t tokens, T* y) {
  for (int64_t t = 0; t < tokens; ++t) {
    const QAct x = quantize_act(xp + t * w.cols, w.cols, w.fmt);
    const int threads = threads_for<uint8_t>(w.rows * w.row_bytes);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < w.rows; ++r)
      store(y + t * w.rows + r, qdot(w, w.row(r), w.row(std::min(r + 1, w.rows - 1)), x));
  }
}

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

QW checked_qweight(const torch::Tensor& data, int64_t fmt, int64_t cols, const char* fn) {
  TORCH_CHECK(fmt == kQ8 || fmt == kQ4, fn, ": unknown block format ", fmt);
  TORCH_CHECK(data.device().is_cpu() && data.dim() == 2 && data.scalar_type() == at::kByte && data.is_contiguous(), fn,
              ": a quantized weight must be a contiguous 2-D CPU uint8 tensor");
  TORCH_CHECK(data.size(1) == (cols + kQBlock - 1) / kQBlock * block_bytes(fmt), fn, ": ", data.size(1),
              " bytes per row do not hold ", cols, " values in this format");
  return {data.data_ptr<uint8_t>(), data.size(0), data.size(1), cols, static_cast<int>(fmt)};
}

// x (..., n) contiguous, fp32 or bf16 -> the number of its rows (tokens).
int64_t tokens_of(const torch::Tensor& x, int64_t n, const char* fn) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1, fn, ": x must be a contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, fn,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(-1) == n, fn, ": x has ", x.size(-1), " values per token, the weight takes ", n);
  return x.numel() / n;
}

}  // namespace

torch::Tensor q_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t fmt, int64_t cols) {
  const QW qw = checked_qweight(w, fmt, cols, "q_linear");
  const int64_t tokens = tokens_of(x, cols, "q_linear");
  auto shape = x.sizes().vec();
  shape.back() = qw.rows;
  auto y = torch::empty(shape, x.options());
  by_dtype(x, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    linear_impl(qw, ptr_of<T>(x), tokens, ptr_of<T>(y));
  });
  return y;
}

torch::Tensor q_times(const torch::Tensor& h, const torch::Tensor& wt, int64_t fmt, int64_t cols) {
  const QW qw = checked_qweight(wt, fmt, cols, "q_times");
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

void register_prefill_ops(pybind11::module& m) {
  m.def("q_linear", &q_linear, "see Kernels.linear on a QWeight (reference.py)", py::arg("x"), py::arg("w"),
        py::arg("fmt"), py::arg("cols"));
  m.def("q_times", &q_times, "see Kernels.times on a QWeight (reference.py)", py::arg("h"), py::arg("wt"),
        py::arg("fmt"), py::arg("cols"));
}
