// A prompt's products on weights held as tensors (fp32 or bf16), for a CPU without bf16 dot
// products (where the CPU has them, torch's bf16 GEMM runs on them: CppKernels): wide_linear,
// y (T, N) fp32 = x (T, K) fp32 . W (N, K)^T, each weight value widened to fp32 in a register as
// it is loaded, and wide_times (below), y = h . Wt, its rows widened into a panel in cache. A
// bf16 value is exact in fp32, so the products are those of a bf16 GEMM and the sums fp32's, as
// torch's; only their order differs.
//
// Three rows against four tokens at a time (12 accumulators, three weight vectors and one token's:
// AVX2's 16 registers), so that each weight vector loaded and widened serves four tokens and each
// token's vector three rows. A thread walks its rows three at a time through 32 tokens at a time:
// the three rows (24 KB at K = 4096 in bf16) stay in L1 or L2 while every tile of those tokens
// reads them. (Measured on Zen 3, 2 threads, 14336 x 4096 bf16: 32 tokens 44 ms against 269 ms
// for torch's fp32 GEMM on rows widened in memory; 4 tokens 8 ms against 210; 512 tokens 707 ms
// against 860.)

#include "gemv.h"

namespace {

constexpr int kWideRows = 3, kWideTokens = 4, kWideBlock = 32;  // kWideBlock: tokens per pass over the rows

// out[t][r] = w[r] . x[t] over K values, for R rows and NT tokens, in fp32.
template <typename TW, int R, int NT>
inline void wide_tile(const TW* const w[R], const float* const x[NT], int64_t k, float out[NT][R]) {
  int64_t c = 0;
  float acc[R][NT] = {};
#if defined(TD_SIMD)
  vec a[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) a[r][t] = vzero();
  for (; c + kLanes <= k; c += kLanes) {
    vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vload(w[r] + c);
    for (int t = 0; t < NT; ++t) {
      const vec xv = vload(x[t] + c);
      for (int r = 0; r < R; ++r) a[r][t] = vfma(wv[r], xv, a[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = vsum(a[r][t]);
#endif
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) {
      float tail = 0.f;
      for (int64_t i = c; i < k; ++i) tail += to_f32(w[r][i]) * x[t][i];
      out[t][r] = acc[r][t] + tail;
    }
}

// Tokens [t0, t0 + m) against the rows r0 .. r0 + 2 (a short group repeats its last row; those
// results are not stored), m <= NT.
template <typename TW, int NT = kWideTokens>
inline void wide_tokens(int m, const TW* const w[kWideRows], const float* x, int64_t k, int64_t t0, int64_t n,
                        int64_t r0, float* y) {
  if constexpr (NT > 0) {
    if (m != NT) return wide_tokens<TW, NT - 1>(m, w, x, k, t0, n, r0, y);
    const float* xs[NT];
    for (int t = 0; t < NT; ++t) xs[t] = x + (t0 + t) * k;
    float out[NT][kWideRows];
    wide_tile<TW, kWideRows, NT>(w, xs, k, out);
    for (int t = 0; t < NT; ++t)
      for (int r = 0; r < kWideRows && r0 + r < n; ++r) y[(t0 + t) * n + r0 + r] = out[t][r];
  }
}

template <typename TW>
void wide_impl(const float* x, const TW* w, int64_t tokens, int64_t n, int64_t k, float* y) {
  const int64_t groups = (n + kWideRows - 1) / kWideRows;
  const int threads = threads_for<TW>(n * k);
#pragma omp parallel num_threads(threads) if (threads > 1)
  for (int64_t b0 = 0; b0 < tokens; b0 += kWideBlock) {
    const int64_t b1 = std::min(tokens, b0 + kWideBlock);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t r0 = g * kWideRows;
      const TW* rows[kWideRows];
      for (int r = 0; r < kWideRows; ++r) rows[r] = w + std::min(r0 + r, n - 1) * k;
      for (int64_t t = b0; t < b1; t += kWideTokens)
        wide_tokens<TW>(static_cast<int>(std::min<int64_t>(kWideTokens, b1 - t)), rows, x, k, t, n, r0, y);
    }
  }
}

// wide_times: y (T, N) fp32 = h (T, M) fp32 . Wt (M, N), Wt's rows along y's columns (the down
// projection's neuron-major rows). A thread takes a strip of four vectors of columns (a 64-byte
// line of bf16 on AVX2) and widens kTimesRows of its rows into a contiguous fp32 panel (16 KB on
// AVX2): read in place, the strip's rows are a row apart, all in the same cache set and each on
// its own page, and every tile of tokens would fetch them again. Three tokens at a time (12
// accumulators) then read the panel, every row: skipping the rows whose h is zero for all three
// (dReLU's zeros at random) made 32 tokens with 90% zeros slower than dense ones (92 against 67
// ms at 14336 x 4096), the branch unpredictable. Past a few hundred tokens, torch's fp32 GEMM
// (its blocking for many tokens) wins: CppKernels.widened_times chooses.
constexpr int kStripVecs = 4, kTimesTokens = 3;
constexpr int64_t kTimesRows = 128;

#if defined(TD_SIMD)
constexpr int64_t kStrip = kStripVecs * kLanes;  // columns per strip

// Rows [i0, i1) of the strip from column c0, widened to fp32 into panel (kTimesRows x kStrip);
// asks for the rows 16 ahead (both ends of the strip's bytes).
template <typename TW>
inline void fill_strip(const TW* wt, int64_t m, int64_t n, int64_t i0, int64_t i1, int64_t c0, float* panel) {
  for (int64_t i = i0; i < i1; ++i) {
    const TW* ahead = wt + std::min(i + 16, m - 1) * n + c0;
    prefetch(ahead);
    prefetch(ahead + kStrip - 1);
    for (int v = 0; v < kStripVecs; ++v) vstore(panel + (i - i0) * kStrip + v * kLanes, vload(wt + i * n + c0 + v * kLanes));
  }
}

// y[t][c0 : c0 + kStrip] += sum over the panel's rows i of [i0, i1) of h[t][i] panel[i - i0],
// for the NT tokens from t0.
template <int NT>
inline void strip_tokens(const float* panel, const float* h, int64_t m, int64_t n, int64_t i0, int64_t i1, int64_t t0,
                         int64_t c0, float* y) {
  vec a[NT][kStripVecs];
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < kStripVecs; ++v) a[t][v] = vload(y + (t0 + t) * n + c0 + v * kLanes);
  for (int64_t i = i0; i < i1; ++i) {
    vec w[kStripVecs];
    for (int v = 0; v < kStripVecs; ++v) w[v] = vload(panel + (i - i0) * kStrip + v * kLanes);
    for (int t = 0; t < NT; ++t) {
      const vec b = vset(h[(t0 + t) * m + i]);
      for (int v = 0; v < kStripVecs; ++v) a[t][v] = vfma(b, w[v], a[t][v]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < kStripVecs; ++v) vstore(y + (t0 + t) * n + c0 + v * kLanes, a[t][v]);
}

template <int NT = kTimesTokens>
inline void strip_tail(int r, const float* panel, const float* h, int64_t m, int64_t n, int64_t i0, int64_t i1,
                       int64_t t0, int64_t c0, float* y) {
  if constexpr (NT > 0) {
    if (r != NT) return strip_tail<NT - 1>(r, panel, h, m, n, i0, i1, t0, c0, y);
    strip_tokens<NT>(panel, h, m, n, i0, i1, t0, c0, y);
  }
}
#else
constexpr int64_t kStrip = 0;  // no vectors: every column is a tail column
#endif

// y (tokens, n) = h (tokens, m) . wt (m, n), y zeroed by the caller.
template <typename TW>
void times_wide_impl(const float* h, const TW* wt, int64_t tokens, int64_t m, int64_t n, float* y) {
  const int64_t strips = kStrip > 0 ? n / kStrip : 0, c_tail = strips * kStrip;
  const int threads = threads_for<TW>(m * n);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#if defined(TD_SIMD)
    std::vector<float> panel(kTimesRows * kStrip);
#pragma omp for schedule(static)
    for (int64_t s = 0; s < strips; ++s)
      for (int64_t i0 = 0; i0 < m; i0 += kTimesRows) {
        const int64_t i1 = std::min(m, i0 + kTimesRows);
        fill_strip(wt, m, n, i0, i1, s * kStrip, panel.data());
        for (int64_t t = 0; t < tokens; t += kTimesTokens)
          strip_tail(static_cast<int>(std::min<int64_t>(kTimesTokens, tokens - t)), panel.data(), h, m, n, i0, i1, t,
                     s * kStrip, y);
      }
#endif
    // the columns past the last strip (none where n is a multiple of kStrip), a token at a time
    if (c_tail < n) {  // the same on every thread: all of them meet the loop, or none
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t i = 0; i < m; ++i)
          if (const float hv = h[t * m + i]; hv != 0.f)
            for (int64_t c = c_tail; c < n; ++c) y[t * n + c] += hv * to_f32(wt[i * n + c]);
    }
  }
}

// x (..., k) fp32 and w (2-D fp32 or bf16), contiguous CPU tensors, checked, k > 0 (k: the
// weight's dim the product sums over) -> y, x's shape with its last dim `out`, zeroed; fn names
// the kernel in the error.
torch::Tensor checked_output(const torch::Tensor& x, const torch::Tensor& w, int64_t k, int64_t out, const char* fn) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              fn, ": the weight must be a contiguous 2-D float32 or bfloat16 CPU tensor");
  TORCH_CHECK(k > 0, fn, ": the weight sums over no values");
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 && x.scalar_type() == at::kFloat, fn,
              ": the activations must be a contiguous float32 CPU tensor");
  TORCH_CHECK(x.size(-1) == k, fn, ": ", x.size(-1), " values per token, the weight takes ", k);
  auto shape = x.sizes().vec();
  shape.back() = out;
  return torch::zeros(shape, x.options());
}

}  // namespace

torch::Tensor wide_linear(const torch::Tensor& x, const torch::Tensor& w) {
  auto y = checked_output(x, w, w.size(-1), w.size(0), "wide_linear");
  by_dtype(w, [&](auto* p) {
    using TW = std::remove_pointer_t<decltype(p)>;
    wide_impl(x.data_ptr<float>(), ptr_of<TW>(w), x.numel() / w.size(1), w.size(0), w.size(1), y.data_ptr<float>());
  });
  return y;
}

torch::Tensor wide_times(const torch::Tensor& h, const torch::Tensor& wt) {
  auto y = checked_output(h, wt, wt.size(0), wt.size(-1), "wide_times");
  by_dtype(wt, [&](auto* p) {
    using TW = std::remove_pointer_t<decltype(p)>;
    times_wide_impl(h.data_ptr<float>(), ptr_of<TW>(wt), h.numel() / wt.size(0), wt.size(0), wt.size(1),
                    y.data_ptr<float>());
  });
  return y;
}

void register_prefill_wide(pybind11::module& m) {
  m.def("wide_linear", &wide_linear, "x (..., K) float32 . w (N, K)^T, w float32 or bfloat16 (prefill_wide.cpp)",
        py::arg("x"), py::arg("w"));
  m.def("wide_times", &wide_times, "h (..., M) float32 . wt (M, N), wt float32 or bfloat16 (prefill_wide.cpp)",
        py::arg("h"), py::arg("wt"));
}
