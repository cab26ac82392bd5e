// A prompt's products on block-quantized weights (Kernels.linear and Kernels.times on a QWeight,
// ../reference.py): every token of the prompt against each weight block while the block is in
// registers, so that a prefill reads each matrix once, not once per token.
//
//   q_linear  y (T, N) = x (T, K) W^T for W (N, K) with blocks along K (q, k, v, o, gate, up,
//             fc1): each token quantized per block to Q8_0 as a decode step quantizes it
//             (quantize_act), each block's dot product an exact integer sum, scaled in fp32:
//             the decode step's q_dot, for T tokens at once. With AVX-512 VNNI: 16 rows at a
//             time, their block gathered as 8 vectors of 4-byte groups (lane r = row r), each
//             token's 4-byte group broadcast against them (vpdpbusd), so that the 16 lanes end
//             as the 16 rows' integer sums with no horizontal reduction. vpdpbusd multiplies
//             unsigned by signed bytes: int8 weights are read as w + 128 (the sum starts at
//             -128 sum(q_x)), int4 ones are unsigned already (q in 0..15, plus m d_x sum(q_x)).
//   q_times   y (T, H) = h (T, I) Wt for Wt (I, H) with blocks along H (down, fc2): h read
//             unquantized in fp32 as the decode step's q_axpy reads it; with AVX-512, each
//             block of 32 columns dequantized once per row and multiplied into up to 12
//             tokens' accumulators; a row whose h is zero for all of them is skipped (dReLU's
//             zeros, the predictor's mask).
//
// Results match the reference up to fp32 summation order, rounded to the activations' dtype.
// Without AVX-512 (VNNI), each token goes through the decode step's primitives (qdot, qaxpy).

#include "quant_blocks.h"

namespace {

// The prompt's tokens quantized as quantize_act quantizes one: q (T, nb * 32), d and s (T, nb);
// corr (T, nb) = -128 sum(q) of the block, the term that reading int8 weights as w + 128 adds.
struct QActs {
  int64_t nb;
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> corr;
};

template <typename T>
QActs quantize_acts(const T* x, int64_t tokens, int64_t k) {
  const int64_t nb = (k + kQBlock - 1) / kQBlock;
  QActs a{nb, std::vector<int8_t>(tokens * nb * kQBlock), std::vector<float>(tokens * nb),
          std::vector<float>(tokens * nb), std::vector<int32_t>(tokens * nb)};
  const int threads = threads_for<T>(tokens * k);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t t = 0; t < tokens; ++t) {
    const QAct one = quantize_act(x + t * k, k, kQ8);
    std::copy(one.q.begin(), one.q.end(), a.q.begin() + t * nb * kQBlock);
    for (int64_t b = 0; b < nb; ++b) {
      int sum = 0;
      for (int j = 0; j < kQBlock; ++j) sum += one.q[b * kQBlock + j];
      a.d[t * nb + b] = one.d(b);
      a.s[t * nb + b] = one.s(b);
      a.corr[t * nb + b] = -128 * sum;
    }
  }
  return a;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define TD_Q_GEMM 1

constexpr int kRows = 16;   // rows per q_linear group: one per 32-bit lane
constexpr int kTokens = 4;  // tokens per pass over a block in registers (4 x 2 independent sums)
constexpr int kTimesTokens = 12;  // tokens per q_times tile: 12 x 2 fp32 accumulators

// Block b of the rows [r0, r0 + 16) (lanes outside `valid` read nothing): W[c] lane r = values
// 4c .. 4c + 3 of row r as unsigned bytes; dv (and mv, int4) the rows' d (and m) in fp32.
template <int FMT>
inline void gather_block(const uint8_t* base, __m512i offs, __mmask16 valid, __m512i W[8], __m512& dv, __m512& mv) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i dm = _mm512_mask_i32gather_epi32(zero, valid, offs, base, 1);  // d, and m or q[0..1]
  dv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
  if constexpr (FMT == kQ8) {
    for (int c = 0; c < 8; ++c)
      W[c] = _mm512_xor_si512(_mm512_mask_i32gather_epi32(zero, valid, offs, base + 2 + 4 * c, 1),
                              _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    mv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)));
    const __m512i low = _mm512_set1_epi8(15);
    for (int c = 0; c < 4; ++c) {  // byte j: value j (low nibble) and value j + 16 (high)
      const __m512i v = _mm512_mask_i32gather_epi32(zero, valid, offs, base + 4 + 4 * c, 1);
      W[c] = _mm512_and_si512(v, low);
      W[c + 4] = _mm512_and_si512(_mm512_srli_epi32(v, 4), low);
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
  for (int j = 0; j < M; ++j) {
    s0[j] = FMT == kQ8 ? _mm512_set1_epi32(x.corr[(t0 + j) * x.nb + b]) : _mm512_setzero_si512();
    s1[j] = _mm512_setzero_si512();
  }
#pragma GCC unroll 4
  for (int c = 0; c < 8; c += 2)
    for (int j = 0; j < M; ++j) {
      const int8_t* xq = x.q.data() + ((t0 + j) * x.nb + b) * kQBlock;
      s0[j] = _mm512_dpbusd_epi32(s0[j], W[c], bcast4(xq + 4 * c));
      s1[j] = _mm512_dpbusd_epi32(s1[j], W[c + 1], bcast4(xq + 4 * c + 4));
    }
  for (int j = 0; j < M; ++j) {
    const int64_t tb = (t0 + j) * x.nb + b;
    float* a = acc + (t0 + j) * kRows;
    __m512 f = _mm512_fmadd_ps(_mm512_mul_ps(dv, _mm512_set1_ps(x.d[tb])),
                               _mm512_cvtepi32_ps(_mm512_add_epi32(s0[j], s1[j])), _mm512_loadu_ps(a));
    if constexpr (FMT == kQ4) f = _mm512_fmadd_ps(mv, _mm512_set1_ps(x.s[tb]), f);
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
  const __mmask16 valid = static_cast<__mmask16>((1u << rows) - 1);
  const __m512i offs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(w.row_bytes)));
  std::fill(acc, acc + tokens * kRows, 0.f);
  for (int64_t b = 0; b < x.nb; ++b) {
    __m512i W[8];
    __m512 dv, mv = _mm512_setzero_ps();
    gather_block<FMT>(w.row(r0) + b * bb, offs, valid, W, dv, mv);
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
