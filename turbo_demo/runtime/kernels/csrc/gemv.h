// The GEMV core shared by the kernel files: y_j = W[idx_j] . x (dot_impl) and
// y = sum_j h_j Wt[idx_j] (axpy_impl) over a selection idx of rows (null: every row), and the
// argument checks of the Python-facing functions.
//
// Batch-1 decoding is bound by memory bandwidth, so the loops are shaped for streaming:
//   - four rows at a time: four independent read streams, one load of x (dot) or one
//     load/store of the accumulators (axpy) per four rows, while the next four rows are
//     prefetched (a gathered row is a jump no hardware prefetcher predicts);
//   - threads split the rows, so each thread reads whole rows (long contiguous runs that
//     the hardware prefetcher follows); rows_axpy gives each thread private fp32 partial
//     sums added up at the end, except for few rows of many columns, where it splits the
//     columns instead (adding up H partial sums would cost more than the rows themselves);
//   - small problems run on one thread: waking the pool costs more than it saves.
// Threads: at::get_num_threads(), so torch.set_num_threads applies.
//
// SIMD: AVX-512F or AVX2+FMA when the compiler targets them (-march=native), and the
// AVX512-BF16 dot-product instruction (vdpbf16ps: pairs of bf16 products added in fp32) for
// bf16 dots; a portable scalar loop (`omp simd`) covers the remaining columns and other CPUs.

#pragma once

#include <torch/extension.h>

#include "bf16.h"
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define TD_SIMD 1
#endif

namespace {

using turbo_demo::bf16_bits;
using turbo_demo::rounded;
using turbo_demo::store;
using turbo_demo::to_f32;

// The storage of a float32 (T = float) or bfloat16 (T = bf16_bits) tensor.
template <typename T>
T* ptr_of(const torch::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

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
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(TD_SIMD)
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
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// Weights of fewer bytes than this run on one thread: below it, waking the thread pool costs
// more than the second thread saves (the limit is in bytes, so a bf16 pass of the same shape
// stays on one thread longer than an fp32 one).
constexpr int64_t kParallelMinBytes = 64 << 10;

// The threads for a pass over `elements` weights of type T.
template <typename T>
inline int threads_for(int64_t elements) {
  return elements * static_cast<int64_t>(sizeof(T)) >= kParallelMinBytes ? std::max(1, at::get_num_threads()) : 1;
}

// Asks for the cache line at p ahead of its use: the next group's rows are fetched while the
// current group's are summed (the hardware prefetcher cannot guess a jump to a gathered row,
// and restarts at every row of a dense one).
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// out[t] = r[t][0:n] . x[0:n] for four rows r[0..3], in fp32; prefetches next[0..3][0:n].
template <typename T>
inline void dot4(const T* const r[4], const T* const next[4], const T* x, int64_t n, float out[4]) {
  int64_t c = 0;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bf16_bits>) {
    __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; c + 32 <= n; c += 32) {  // 32 bf16 = one 64-byte line per row
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + c);
      for (int t = 0; t < 4; ++t) {
        prefetch(next[t] + c);
        s[t] = _mm512_dpbf16_ps(s[t], (__m512bh)_mm512_loadu_si512(r[t] + c), xv);
      }
    }
    for (int t = 0; t < 4; ++t) acc[t] = _mm512_reduce_add_ps(s[t]);
  }
#endif
#if defined(TD_SIMD)
  vec s[4] = {vzero(), vzero(), vzero(), vzero()};
  for (; c + kLanes <= n; c += kLanes) {
    const vec xv = vload(x + c);
    for (int t = 0; t < 4; ++t) {
      prefetch(next[t] + c);
      s[t] = vfma(vload(r[t] + c), xv, s[t]);
    }
  }
  for (int t = 0; t < 4; ++t) acc[t] += vsum(s[t]);
#endif
  for (int t = 0; t < 4; ++t) {
    float tail = 0.f;
#pragma omp simd reduction(+ : tail)
    for (int64_t i = c; i < n; ++i) tail += to_f32(r[t][i]) * to_f32(x[i]);
    out[t] = acc[t] + tail;
  }
}

// acc[0:n] += sum_t w[t] * r[t][0:n] for four rows, acc in fp32; prefetches next[0..3][0:n].
template <typename T>
inline void axpy4(float* acc, const float w[4], const T* const r[4], const T* const next[4], int64_t n) {
  int64_t c = 0;
#if defined(TD_SIMD)
  const vec w0 = vset(w[0]), w1 = vset(w[1]), w2 = vset(w[2]), w3 = vset(w[3]);
  for (; c + kLanes <= n; c += kLanes) {
    for (int t = 0; t < 4; ++t) prefetch(next[t] + c);
    vec a = vload(acc + c);
    a = vfma(w0, vload(r[0] + c), a);
    a = vfma(w1, vload(r[1] + c), a);
    a = vfma(w2, vload(r[2] + c), a);
    a = vfma(w3, vload(r[3] + c), a);
    vstore(acc + c, a);
  }
#endif
#pragma omp simd
  for (int64_t i = c; i < n; ++i)
    acc[i] += w[0] * to_f32(r[0][i]) + w[1] * to_f32(r[1][i]) + w[2] * to_f32(r[2][i]) +
              w[3] * to_f32(r[3][i]);
}

// The rows j0..j1-1 of the selection (idx, or 0..N-1 when idx is null), in groups of four: r
// gets the group at j, next the group after it (or r again at the end). A short group repeats
// its first row with weight 0 (dot results past j1 are dropped).
template <typename T>
inline void group(const T* w, const int64_t* idx, int64_t j, int64_t j1, int64_t h, const T* r[4],
                  const T* next[4]) {
  for (int t = 0; t < 4; ++t) {
    const int64_t jj = j + t < j1 ? j + t : j;
    const int64_t jn = j + 4 + t < j1 ? j + 4 + t : jj;
    r[t] = w + (idx ? idx[jj] : jj) * h;
    next[t] = w + (idx ? idx[jn] : jn) * h;
  }
}

// Whether a weighted sum of k rows of h columns, on `threads` threads, splits the threads over
// its rows (each summing into private fp32 partial sums, added up at the end) rather than its
// columns: few rows of many columns (4k < h) split the columns, where adding up threads x h
// partial sums would cost more than the rows themselves.
inline bool split_rows(int threads, int64_t k, int64_t h) { return threads > 1 && 4 * k >= h; }

// Thread t's share [lo, hi) of 0..n split nt ways, cut at multiples of `align` (the last share
// ends at n).
inline std::pair<int64_t, int64_t> share(int64_t n, int t, int nt, int64_t align) {
  return {n * t / nt / align * align, t + 1 == nt ? n : n * (t + 1) / nt / align * align};
}

// y (h,) = the sum of the threads' fp32 partial sums (threads x h), rounded to T once; with
// add_to (h,), add_to + that rounded sum, rounded again (as a separate tensor add would).
template <typename T>
void store_sum(const std::vector<float>& partial, int threads, int64_t h, T* y, const T* add_to = nullptr) {
  for (int64_t c = 0; c < h; ++c) {
    float s = 0.f;
    for (int t = 0; t < threads; ++t) s += partial[static_cast<size_t>(t) * h + c];
    store(y + c, add_to ? to_f32(add_to[c]) + rounded<T>(s) : s);
  }
}

// Calls fn with a null T* of the tensor's dtype (float or bf16_bits) to select the instantiation.
template <typename Fn>
void by_dtype(const torch::Tensor& t, Fn fn) {
  if (t.scalar_type() == at::kFloat)
    fn(static_cast<float*>(nullptr));
  else
    fn(static_cast<bf16_bits*>(nullptr));
}

// dot_impl's loop, shared among the threads of the enclosing parallel region (an orphaned
// `omp for`, without the barrier at its end): several products in one region, as
// attention_step's q, k and v, cost one fork and join instead of one each.
template <typename T>
void dot_rows(const T* w, const T* x, const int64_t* idx, T* y, int64_t k, int64_t h) {
  const int64_t groups = (k + 3) / 4;
#pragma omp for schedule(static) nowait
  for (int64_t g = 0; g < groups; ++g) {
    const T *r[4], *next[4];
    float out[4];
    group(w, idx, 4 * g, k, h, r, next);
    dot4(r, next, x, h, out);
    for (int t = 0; t < 4 && 4 * g + t < k; ++t) store(y + 4 * g + t, out[t]);
  }
}

template <typename T>
void dot_impl(const T* w, const T* x, const int64_t* idx, T* y, int64_t k, int64_t h) {
  const int threads = threads_for<T>(k * h);
#pragma omp parallel num_threads(threads) if (threads > 1)
  dot_rows(w, x, idx, y, k, h);
}

template <typename T>
void axpy_impl(const T* wt, const T* hv, const int64_t* idx, T* y, int64_t k, int64_t h) {
  // The rows to read and their weights in fp32: with idx, the rows of non-zero weight only.
  std::vector<int64_t> rows;
  std::vector<float> weight;
  weight.reserve(k);
  if (idx != nullptr) {
    rows.reserve(k);
    for (int64_t j = 0; j < k; ++j)
      if (to_f32(hv[j]) != 0.f) {
        rows.push_back(idx[j]);
        weight.push_back(to_f32(hv[j]));
      }
    idx = rows.data();
    k = static_cast<int64_t>(rows.size());
  } else {
    for (int64_t j = 0; j < k; ++j) weight.push_back(to_f32(hv[j]));
  }
  // Threads split the rows, each summing its rows into private fp32 partial sums added up at
  // the end (threads x H floats); or, for few rows of many columns (4k < H), where adding up
  // would cost more than the sums, the columns (at cache-line multiples), each thread writing
  // its own part of y. Column blocks of at most kBlock fp32 accumulators (16 KiB on the stack,
  // within L1).
  constexpr int64_t kBlock = 4096, kAlign = 32;
  const int threads = threads_for<T>(k * h);
  const bool by_rows = split_rows(threads, k, h);
  std::vector<float> partial(by_rows ? threads * h : 0, 0.f);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int rt = by_rows ? t : 0, rn = by_rows ? nt : 1, ct = by_rows ? 0 : t, cn = by_rows ? 1 : nt;
    const auto [j0, j1] = share(k, rt, rn, 1);
    const auto [c_lo, c_hi] = share(h, ct, cn, kAlign);
    float acc[kBlock];
    for (int64_t c0 = c_lo; c0 < c_hi; c0 += kBlock) {
      const int64_t n = std::min(kBlock, c_hi - c0);
      std::fill(acc, acc + n, 0.f);
      for (int64_t j = j0; j < j1; j += 4) {
        const T *r[4], *next[4];
        float wj[4];
        group(wt, idx, j, j1, h, r, next);
        for (int u = 0; u < 4; ++u) {
          wj[u] = j + u < j1 ? weight[j + u] : 0.f;
          r[u] += c0;
          next[u] += c0;
        }
        axpy4(acc, wj, r, next, n);
      }
      if (by_rows)
        std::copy(acc, acc + n, partial.data() + t * h + c0);
      else
        for (int64_t c = 0; c < n; ++c) store(y + c0 + c, acc[c]);
    }
  }
  if (by_rows) store_sum(partial, threads, h, y);
}

inline void check_weight(const torch::Tensor& w, const char* fn) {
  TORCH_CHECK(w.device().is_cpu(), fn, ": the weight must be a CPU tensor, got ", w.device());
  TORCH_CHECK(w.dim() == 2, fn, ": the weight must be 2-D (N, H), got shape ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, fn,
              ": the weight must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), fn, ": the weight must be contiguous (neuron-major rows)");
}

inline void check_vector(const torch::Tensor& v, const char* name, int64_t size, at::ScalarType dtype,
                  const char* fn) {
  TORCH_CHECK(v.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == size, fn, ": ", name, " must have shape (", size,
              ",), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == dtype, fn, ": ", name, " must have the weight's dtype ", dtype,
              ", got ", v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// idx (k,) int64, contiguous, every value in [0, n_rows).
inline void check_idx(const torch::Tensor& idx, int64_t n_rows, const char* fn) {
  TORCH_CHECK(idx.device().is_cpu(), fn, ": idx must be a CPU tensor, got ", idx.device());
  TORCH_CHECK(idx.dim() == 1, fn, ": idx must be 1-D (k,), got shape ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, fn, ": idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.is_contiguous(), fn, ": idx must be contiguous");
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < idx.size(0); ++j)
    TORCH_CHECK(p[j] >= 0 && p[j] < n_rows, fn, ": idx[", j, "] = ", p[j],
                " is out of range for a weight with ", n_rows, " rows");
}

}  // namespace
