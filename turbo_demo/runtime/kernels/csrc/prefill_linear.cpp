// A prompt's products on block-quantized weights, q_linear (Kernels.linear on a QWeight,
// ../reference.py): y (T, N) = x (T, K) W^T for W (N, K) with blocks along K (q, k, v, o, gate,
// up, fc1), every token of the prompt against each weight block while the block is in registers,
// so that a prefill reads each matrix once, not once per token (prefill_times.cpp: the same for
// the down projection's layout).
//
// Each token is quantized per block to Q8_0 as a decode step quantizes it (quantize_act), each
// block's dot product an exact integer sum, scaled in fp32: the decode step's q_dot, for T tokens
// at once. With AVX-512 VNNI: 16 rows at a time, their block transposed into 8 vectors of 4-byte
// groups (lane r = row r), each token's 4-byte group broadcast against them (vpdpbusd), so that
// the 16 lanes end as the 16 rows' integer sums with no horizontal reduction. vpdpbusd multiplies
// unsigned by signed bytes: int8 weights are read as w + 128 (the sum starts at -128 sum(q_x)),
// int4 ones are unsigned already (q in 0..15, plus the block's offset d_w s_x, quantize_act).
// Results match the reference up to fp32 summation order, rounded to x's dtype. Without AVX-512
// VNNI, each token's products are the decode step's four-row dot products, four rows against
// several tokens at a time.

#include "quant_blocks.h"

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
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

constexpr int kRows = 16;   // rows per q_linear group: one per 32-bit lane
constexpr int kTokens = 6;  // tokens per pass over a block in registers (6 x 2 independent sums)

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
// lanes never stored): W[c] lane r = values 4c .. 4c + 3 of row r as unsigned bytes; dv the rows'
// d in fp32 (int4: mv too, the d that multiplies a token's offset term s_x).
template <int FMT>
inline void load_block(const uint8_t* const rows[kRows], __m512i W[8], __m512& dv, __m512& mv) {
  alignas(64) uint32_t dm[kRows];  // each row's first four bytes: d, then q[0..1] or nibbles
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
    mv = dv;
    for (int r = 0; r < kRows; ++r) p[r] = rows[r] + 2;
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

#elif defined(TD_QDOT4)
// On AVX2: a thread takes its rows four at a time, and the prompt's tokens kTile at a time against
// them (qdot4_q8 / qdot4_q4 for NT tokens: each token's products are the decode step's, bit for
// bit, with the rows' values and headers unpacked once per block for all NT tokens), so that each
// row is read from memory once (then from L1).
constexpr int kTile = 4;

template <int FMT, int NT = kTile>
inline void tile_m(int m, int64_t nb, const uint8_t* const r[4], const uint8_t* const* next, const QAct* const xs[],
                   float out[][4]) {
  if constexpr (NT > 0) {
    if (m != NT) return tile_m<FMT, NT - 1>(m, nb, r, next, xs, out);
    if constexpr (FMT == kQ8)
      qdot4_q8<NT>(nb, r, next, xs, out);
    else
      qdot4_q4<NT>(nb, r, next, xs, out);
  }
}

// y[:, 4g : 4g + 4] for every token.
template <int FMT, typename T>
void linear_rows4(const QW& w, const std::vector<QAct>& xs, int64_t tokens, int64_t g, T* y) {
  const int64_t r0 = 4 * g, nb = (w.cols + kQBlock - 1) / kQBlock;
  const uint8_t *rows[4], *next[4];
  rows4([&](int64_t r) { return w.row(r); }, r0, w.rows, rows, next);
  for (int64_t t = 0; t < tokens; t += kTile) {
    const int m = static_cast<int>(std::min<int64_t>(kTile, tokens - t));
    const QAct* xt[kTile];
    for (int j = 0; j < m; ++j) xt[j] = &xs[t + j];
    float out[kTile][4];
    // the first tile prefetches the next group's rows; the others read cached ones
    tile_m<FMT>(m, nb, rows, t == 0 ? next : nullptr, xt, out);
    for (int j = 0; j < m; ++j)
      for (int i = 0; i < 4 && r0 + i < w.rows; ++i) store(y + (t + j) * w.rows + r0 + i, out[j][i]);
  }
}

template <typename T>
void linear_impl(const QW& w, const T* xp, int64_t tokens, T* y) {
  std::vector<QAct> xs(tokens);
  const int64_t groups = (w.rows + 3) / 4;
  const int threads = threads_for<uint8_t>(w.rows * w.row_bytes);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) xs[t] = quantize_act(xp + t * w.cols, w.cols, w.fmt);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      if (w.fmt == kQ8)
        linear_rows4<kQ8>(w, xs, tokens, g, y);
      else
        linear_rows4<kQ4>(w, xs, tokens, g, y);
    }
  }
}

#else
// Without AVX2: each token's products are the decode step's four-row dot product (qdot4),
// and a thread takes its rows four at a time against every token of the prompt, so that each row
// is read from memory once (then from L1), not once per token.

template <typename T>
void linear_impl(const QW& w, const T* xp, int64_t tokens, T* y) {
  std::vector<QAct> xs(tokens);
  const int64_t groups = (w.rows + 3) / 4;
  const int threads = threads_for<uint8_t>(w.rows * w.row_bytes);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) xs[t] = quantize_act(xp + t * w.cols, w.cols, w.fmt);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t r0 = 4 * g;
      const uint8_t *rows[4], *next[4];
      rows4([&](int64_t r) { return w.row(r); }, r0, w.rows, rows, next);
      for (int64_t t = 0; t < tokens; ++t) {
        float out[4];
        // the first token's pass prefetches the next group's rows; the others read cached ones
        qdot4(w, rows, t == 0 ? next : rows, xs[t], out);
        for (int i = 0; i < 4 && r0 + i < w.rows; ++i) store(y + t * w.rows + r0 + i, out[i]);
      }
    }
  }
}

#endif

}  // namespace

torch::Tensor q_linear(const torch::Tensor& x, const torch::Tensor& w, int64_t fmt, int64_t cols) {
  const QW qw = qw_of(w, fmt, cols, "q_linear");
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

void register_prefill_linear(pybind11::module& m) {
  m.def("q_linear", &q_linear, "see Kernels.linear on a QWeight (reference.py)", py::arg("x"), py::arg("w"),
        py::arg("fmt"), py::arg("cols"));
}
