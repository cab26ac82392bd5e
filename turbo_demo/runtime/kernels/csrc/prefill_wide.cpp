// A prompt's x W^T on weights held as tensors (fp32 or bf16), for a CPU without bf16 dot products
// (where the CPU has them, torch's bf16 GEMM runs on them: CppKernels): wide_linear, y (T, N) fp32
// = x (T, K) fp32 . W (N, K)^T, each weight value widened to fp32 in a register as it is loaded.
// A bf16 value is exact in fp32, so the products are those of a bf16 GEMM and the sums fp32's,
// as torch's; only their order differs.
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

}  // namespace

torch::Tensor wide_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "wide_linear: w must be a contiguous 2-D float32 or bfloat16 CPU tensor");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(k > 0, "wide_linear: w has no columns");
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 && x.scalar_type() == at::kFloat,
              "wide_linear: x must be a contiguous float32 CPU tensor");
  TORCH_CHECK(x.size(-1) == k, "wide_linear: x has ", x.size(-1), " values per token, the weight takes ", k);
  auto shape = x.sizes().vec();
  shape.back() = n;
  auto y = torch::empty(shape, x.options());
  by_dtype(w, [&](auto* p) {
    using TW = std::remove_pointer_t<decltype(p)>;
    wide_impl(x.data_ptr<float>(), ptr_of<TW>(w), x.numel() / k, n, k, y.data_ptr<float>());
  });
  return y;
}

void register_prefill_wide(pybind11::module& m) {
  m.def("wide_linear", &wide_linear, "x (..., K) float32 . w (N, K)^T, w float32 or bfloat16 (prefill_wide.cpp)",
        py::arg("x"), py::arg("w"));
}
