// Fused gather-GEMV kernels for a sparse FFN: the two operations on a subset idx of neurons.
//
//   rows_dot(W, x, idx)    y_j = sum_c W[idx_j, c] * x[c]       W (N, H), x (H,), idx (k,) -> y (k,)
//   rows_axpy(Wt, h, idx)  y_c = sum_j h_j * Wt[idx_j, c]       Wt (N, H), h (k,), idx (k,) -> y (H,)
//
// Both read only the k selected rows of a neuron-major weight, each a contiguous run of H
// values, straight from the weight (no gathered copy). W / Wt are float32 or bfloat16; the
// vectors (x, h) and the result have the weight's dtype. Sums are always accumulated in fp32:
// a bf16 value b converts exactly as float(bits(b) << 16), and bf16 results are rounded to
// nearest-even once at the end. The only allocation is the output tensor.
//
// Threads: at::get_num_threads(), so torch.set_num_threads applies.
//   rows_dot   parallel over j (static schedule): every y_j is written by exactly one thread.
//   rows_axpy  parallel over blocks of columns of y: each thread owns a contiguous slice of y,
//              accumulates it in an fp32 stack buffer while walking all j, and so needs no
//              reduction between threads.
//
// SIMD: AVX-512F or AVX2+FMA intrinsics when the compiler targets them (-march=native), with
// a portable scalar loop (`omp simd`) for the remaining columns and for other CPUs.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

using bf16_bits = uint16_t;  // raw storage of c10::BFloat16

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_bits v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void store(float* out, float v) { *out = v; }
inline void store(bf16_bits* out, float v) { *out = c10::BFloat16(v).x; }  // round to nearest even

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vset(float v) { return _mm512_set1_ps(v); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload(const bf16_bits* p) {
  __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kLanes = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vset(float v) { return _mm256_set1_ps(v); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const bf16_bits* p) {
  __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
constexpr int64_t kLanes = 0;  // scalar only
#endif

// dot(a[0:n], b[0:n]) in fp32; a is a weight row, b the input vector, both of type T.
template <typename T>
inline float dot(const T* a, const T* b, int64_t n) {
  float acc = 0.f;
  int64_t c = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  vec s0 = vzero(), s1 = vzero();  // two chains hide the FMA latency
  for (; c + 2 * kLanes <= n; c += 2 * kLanes) {
    s0 = vfma(vload(a + c), vload(b + c), s0);
    s1 = vfma(vload(a + c + kLanes), vload(b + c + kLanes), s1);
  }
  for (; c + kLanes <= n; c += kLanes) s0 = vfma(vload(a + c), vload(b + c), s0);
  acc = vsum(vadd(s0, s1));
#endif
#pragma omp simd reduction(+ : acc)
  for (int64_t t = c; t < n; ++t) acc += to_f32(a[t]) * to_f32(b[t]);
  return acc;
}

// acc[0:n] += w * row[0:n], acc in fp32.
template <typename T>
inline void axpy(float* acc, float w, const T* row, int64_t n) {
  int64_t c = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  vec wv = vset(w);
  for (; c + kLanes <= n; c += kLanes) vstore(acc + c, vfma(wv, vload(row + c), vload(acc + c)));
#endif
#pragma omp simd
  for (int64_t t = c; t < n; ++t) acc[t] += w * to_f32(row[t]);
}

void check_weight(const torch::Tensor& w, const char* fn) {
  TORCH_CHECK(w.device().is_cpu(), fn, ": the weight must be a CPU tensor, got ", w.device());
  TORCH_CHECK(w.dim() == 2, fn, ": the weight must be 2-D (N, H), got shape ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, fn,
              ": the weight must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), fn, ": the weight must be contiguous (neuron-major rows)");
}

void check_vector(const torch::Tensor& v, const char* name, int64_t size, at::ScalarType dtype,
                  const char* fn) {
  TORCH_CHECK(v.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == size, fn, ": ", name, " must have shape (", size,
              ",), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == dtype, fn, ": ", name, " must have the weight's dtype ", dtype,
              ", got ", v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// idx (k,) int64, contiguous, every value in [0, n_rows).
void check_idx(const torch::Tensor& idx, int64_t n_rows, const char* fn) {
  TORCH_CHECK(idx.device().is_cpu(), fn, ": idx must be a CPU tensor, got ", idx.device());
  TORCH_CHECK(idx.dim() == 1, fn, ": idx must be 1-D (k,), got shape ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, fn, ": idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.is_contiguous(), fn, ": idx must be contiguous");
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < idx.size(0); ++j)
    TORCH_CHECK(p[j] >= 0 && p[j] < n_rows, fn, ": idx[", j, "] = ", p[j],
                " is out of range for a weight with ", n_rows, " rows");
}

template <typename T>
void rows_dot_impl(const T* w, const T* x, const int64_t* idx, T* y, int64_t k, int64_t h) {
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (k >= 8)
  for (int64_t j = 0; j < k; ++j) store(y + j, dot(w + idx[j] * h, x, h));
}

template <typename T>
void rows_axpy_impl(const T* wt, const T* hv, const int64_t* idx, T* y, int64_t k, int64_t h) {
  // Column blocks of at most kBlock fp32 accumulators (16 KiB on the stack); with a static
  // schedule each thread gets one contiguous run of blocks, i.e. a contiguous slice of y.
  constexpr int64_t kBlock = 4096;
  const int threads = at::get_num_threads();
  int64_t block = (h + threads - 1) / threads;
  block = std::min(kBlock, std::max<int64_t>(64, (block + 15) / 16 * 16));
  const int64_t n_blocks = (h + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(threads) if (n_blocks > 1 && k >= 8)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t c0 = b * block, n = std::min(block, h - c0);
    float acc[kBlock];
    std::fill(acc, acc + n, 0.f);
    for (int64_t j = 0; j < k; ++j) axpy(acc, to_f32(hv[j]), wt + idx[j] * h + c0, n);
    for (int64_t c = 0; c < n; ++c) store(y + c0 + c, acc[c]);
  }
}

}  // namespace

torch::Tensor rows_dot(const torch::Tensor& w, const torch::Tensor& x, const torch::Tensor& idx) {
  check_weight(w, "rows_dot");
  const int64_t n = w.size(0), h = w.size(1);
  check_vector(x, "x", h, w.scalar_type(), "rows_dot");
  check_idx(idx, n, "rows_dot");
  const int64_t k = idx.size(0);
  auto y = torch::empty({k}, w.options());
  if (w.scalar_type() == at::kFloat)
    rows_dot_impl(w.data_ptr<float>(), x.data_ptr<float>(), idx.data_ptr<int64_t>(),
                  y.data_ptr<float>(), k, h);
  else
    rows_dot_impl(reinterpret_cast<const bf16_bits*>(w.data_ptr<at::BFloat16>()),
                  reinterpret_cast<const bf16_bits*>(x.data_ptr<at::BFloat16>()),
                  idx.data_ptr<int64_t>(),
                  reinterpret_cast<bf16_bits*>(y.data_ptr<at::BFloat16>()), k, h);
  return y;
}

torch::Tensor rows_axpy(const torch::Tensor& wt, const torch::Tensor& hv, const torch::Tensor& idx) {
  check_weight(wt, "rows_axpy");
  const int64_t n = wt.size(0), h = wt.size(1);
  check_idx(idx, n, "rows_axpy");
  const int64_t k = idx.size(0);
  check_vector(hv, "h", k, wt.scalar_type(), "rows_axpy");
  auto y = torch::empty({h}, wt.options());
  if (wt.scalar_type() == at::kFloat)
    rows_axpy_impl(wt.data_ptr<float>(), hv.data_ptr<float>(), idx.data_ptr<int64_t>(),
                   y.data_ptr<float>(), k, h);
  else
    rows_axpy_impl(reinterpret_cast<const bf16_bits*>(wt.data_ptr<at::BFloat16>()),
                   reinterpret_cast<const bf16_bits*>(hv.data_ptr<at::BFloat16>()),
                   idx.data_ptr<int64_t>(),
                   reinterpret_cast<bf16_bits*>(y.data_ptr<at::BFloat16>()), k, h);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused gather-GEMV kernels (rows_dot, rows_axpy) for sparse FFNs on CPU";
  m.def("rows_dot", &rows_dot, "y_j = W[idx_j] . x: W (N, H), x (H,), idx (k,) int64 -> y (k,)",
        py::arg("w"), py::arg("x"), py::arg("idx"));
  m.def("rows_axpy", &rows_axpy, "y = sum_j h_j Wt[idx_j]: Wt (N, H), h (k,), idx (k,) int64 -> y (H,)",
        py::arg("wt"), py::arg("h"), py::arg("idx"));
}
