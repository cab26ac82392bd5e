// Block-quantized weights (runtime/quant.py: Q8_0 "int8" and Q4_1 "int4" blocks of 32, one row
// per neuron): q_dot (rows_dot and matvec), q_axpy (rows_axpy and vecmat), q_ffn (the dense and
// sparse FFN steps) and q_predict. What each computes is the docstring of the same method of
// Kernels in ../reference.py on a QWeight: the input of a dot product is quantized per block to
// Q8_0 first (fp32 scale d = amax / 127, q = round-half-even(x * (1 / d)), as quant.py's
// quantize_activation, bit for bit), so that each block's dot product is an exact integer sum
// (AVX-512 VNNI's vpdpbusd where the CPU has it, else AVX2's vpmaddubsw + vpmaddwd), scaled in
// fp32: int8 d_w d_x sum(q_w q_x), int4 d_w d_x sum(q_w q_x) + m_w d_x sum(q_x). A weighted sum
// of rows (the down projection) reads h in fp32 and dequantizes each row on the fly. Results
// match the reference up to fp32 summation order; values are rounded to the activations' dtype T
// (fp32 or bf16) where the reference's tensor operations store them.

#include "act.h"
#include "gemv.h"

#include <cmath>
#include <optional>
#include <string>

namespace {

constexpr int64_t kQBlock = 32;
enum Fmt { kQ8 = 0, kQ4 = 1 };

inline int64_t block_bytes(int fmt) { return fmt == kQ8 ? 2 + kQBlock : 4 + kQBlock / 2; }

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof bits);
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

// A quantized weight: rows of `row_bytes` bytes (blocks), `cols` values each.
struct QW {
  const uint8_t* data;
  int64_t rows, row_bytes, cols;
  int fmt;
  const uint8_t* row(int64_t i) const { return data + i * row_bytes; }
};

// x quantized per block: q (B * 32,) int8, d (B,) the scales, s (B,) d * sum(q) (int4's min term).
// With AVX-512 VNNI, for int4 weights (fmt), pairs: q per pair of blocks (b, b + 1) as [b 0-15, b+1 0-15, b 16-31,
// b+1 16-31], the order of two int4 blocks' nibbles unpacked into one 512-bit register.
struct QAct {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int8_t> pairs;
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TD_Q4_PAIRS 1
#endif

template <typename T>
QAct quantize_act(const T* x, int64_t h, [[maybe_unused]] int fmt) {
  const int64_t nb = (h + kQBlock - 1) / kQBlock;
  QAct a{std::vector<int8_t>(nb * kQBlock, 0), std::vector<float>(nb), std::vector<float>(nb)};
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t c0 = b * kQBlock, c1 = std::min(h, c0 + kQBlock);
    float amax = 0.f;
    for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(to_f32(x[c])));
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const float v = std::min(127.f, std::max(-127.f, std::nearbyint(to_f32(x[c]) * inv)));
      a.q[c] = static_cast<int8_t>(v);
      sum += a.q[c];
    }
    a.d[b] = d;
    a.s[b] = d * static_cast<float>(sum);
  }
#if defined(TD_Q4_PAIRS)
  if (fmt != kQ4) return a;  // only int4 rows read the pairs
  a.pairs.assign(nb * kQBlock, 0);
  for (int64_t b = 0; b + 1 < nb; b += 2)
    for (int half = 0; half < 2; ++half)
      for (int j = 0; j < 16; ++j) {
        a.pairs[b * kQBlock + 32 * half + j] = a.q[b * kQBlock + 16 * half + j];
        a.pairs[b * kQBlock + 32 * half + 16 + j] = a.q[(b + 1) * kQBlock + 16 * half + j];
      }
#endif
  return a;
}

// The 32 values of an int4 block's nibbles as bytes 0..15: value j at byte j.
inline void unpack_q4(const uint8_t* nibbles, uint8_t* out) {
  for (int j = 0; j < 16; ++j) {
    out[j] = nibbles[j] & 15;
    out[j + 16] = nibbles[j] >> 4;
  }
}

#if defined(__AVX2__)
// The eight int32 partial sums of 32 products u8 * s8 (u < 128 or u <= 15: no int16 overflow).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

using DotAcc = __m256;  // a dot product's partial sums
inline DotAcc dot_zero() { return _mm256_setzero_ps(); }
inline float dot_sum(DotAcc a, DotAcc b) { return hsum8(_mm256_add_ps(a, b)); }
#else
using DotAcc = float;
inline DotAcc dot_zero() { return 0.f; }
inline float dot_sum(DotAcc a, DotAcc b) { return a + b; }
#endif

// One block's dot product, added to acc (its scaled integer sum) and mins (int4's m_w d_x sum(q_x)).
template <int FMT>
inline void qdot_block(const uint8_t* blk, const QAct& x, int64_t b, DotAcc& acc, float& mins) {
  const float d = half_at(blk) * x.d[b];
  const int8_t* xq = x.q.data() + b * kQBlock;
#if defined(__AVX2__)
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  __m256i isum;
  if constexpr (FMT == kQ8) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    // |w| * (x * sign(w)) = w * x, with an unsigned left operand as the instructions want
    isum = dot_u8s8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
    isum = dot_u8s8(_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(15)), xv);
  }
  acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(isum), acc);
#else
  int isum = 0;
  if constexpr (FMT == kQ8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    for (int j = 0; j < kQBlock; ++j) isum += q[j] * xq[j];
  } else {
    uint8_t q[kQBlock];
    unpack_q4(blk + 4, q);
    for (int j = 0; j < kQBlock; ++j) isum += q[j] * xq[j];
  }
  acc += d * static_cast<float>(isum);
#endif
  if constexpr (FMT == kQ4) mins += half_at(blk + 2) * x.s[b];
}

#if defined(TD_Q4_PAIRS)
// Two int4 blocks (b, b + 1) in one 512-bit dot product, added to acc and mins as qdot_block.
inline void q4_pair(const uint8_t* blk, const QAct& x, int64_t b, __m512& acc, float& mins) {
  constexpr int64_t bb = 4 + kQBlock / 2;
  const __m256i mask = _mm256_set1_epi8(15);
  const __m256i raw = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(blk + bb + 4),
                                          reinterpret_cast<const __m128i*>(blk + 4));
  const __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, mask)),
                                        _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask), 1);
  const __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(x.pairs.data() + b * kQBlock));
  // lanes 0-3 and 8-11 hold block b's sums, 4-7 and 12-15 block b + 1's
  const __m512 d = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(half_at(blk) * x.d[b]),
                                        _mm512_set1_ps(half_at(blk + bb) * x.d[b + 1]));
  acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(isum), acc);
  mins += half_at(blk + 2) * x.s[b] + half_at(blk + bb + 2) * x.s[b + 1];
}

// qdot_fmt<kQ4> four blocks at a time, in two chains of pairs; the last nb % 4 blocks as qdot_block.
inline float qdot_q4_pairs(int64_t nb, const uint8_t* row, const uint8_t* next, const QAct& x) {
  constexpr int64_t bb = 4 + kQBlock / 2;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  float mins0 = 0.f, mins1 = 0.f;
  int64_t b = 0;
  for (; b + 3 < nb; b += 4) {
    prefetch(next + b * bb);
    prefetch(next + b * bb + 64);
    q4_pair(row + b * bb, x, b, acc0, mins0);
    q4_pair(row + (b + 2) * bb, x, b + 2, acc1, mins1);
  }
  DotAcc tail = dot_zero();
  for (; b < nb; ++b) qdot_block<kQ4>(row + b * bb, x, b, tail, mins0);
  return (mins0 + mins1) + _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + dot_sum(tail, dot_zero());
}
#endif

// dequantize(row) . dequantize(Q8(x)) in fp32 for one row of format FMT: even and odd blocks in
// two chains of accumulators (a block's sums need not wait for the previous block's); prefetches
// next, the row read after this one.
template <int FMT>
inline float qdot_fmt(int64_t nb, const uint8_t* row, const uint8_t* next, const QAct& x) {
  constexpr int64_t bb = FMT == kQ8 ? 2 + kQBlock : 4 + kQBlock / 2;
#if defined(TD_Q4_PAIRS)
  if constexpr (FMT == kQ4) return qdot_q4_pairs(nb, row, next, x);
#endif
  DotAcc acc0 = dot_zero(), acc1 = dot_zero();
  float mins0 = 0.f, mins1 = 0.f;
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    prefetch(next + b * bb);
    qdot_block<FMT>(row + b * bb, x, b, acc0, mins0);
    qdot_block<FMT>(row + (b + 1) * bb, x, b + 1, acc1, mins1);
  }
  if (b < nb) qdot_block<FMT>(row + b * bb, x, b, acc0, mins0);
  return (mins0 + mins1) + dot_sum(acc0, acc1);
}

inline float qdot(const QW& w, const uint8_t* row, const uint8_t* next, const QAct& x) {
  const int64_t nb = (w.cols + kQBlock - 1) / kQBlock;
  return w.fmt == kQ8 ? qdot_fmt<kQ8>(nb, row, next, x) : qdot_fmt<kQ4>(nb, row, next, x);
}

constexpr int kGroup = 8;  // rows per pass of qaxpy over the accumulators

// acc[0 : B * 32] += sum_{r < M} coef[r] * dequantize(rows[r]) for M <= kGroup rows of format FMT,
// in fp32: one load and store of the accumulators per block for all M rows (a row at a time,
// they would cost as much as the row's own bytes); prefetches next[r], the rows read after
// these, where next is given.
template <int FMT, int M>
inline void qaxpy_group(int64_t nb, const uint8_t* const rows[], const float coef[], const uint8_t* const* next,
                        float* acc) {
  constexpr int64_t bb = FMT == kQ8 ? 2 + kQBlock : 4 + kQBlock / 2;
  for (int64_t b = 0; b < nb; ++b, acc += kQBlock) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_loadu_ps(acc), a1 = _mm512_loadu_ps(acc + 16);
    float mins = 0.f;  // int4: sum_r coef[r] * m_r, the same for the block's 32 values
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const uint8_t* blk = rows[r] + b * bb;
      if (next && b % 2 == 0) prefetch(next[r] + b * bb);
      const __m512 dv = _mm512_set1_ps(coef[r] * half_at(blk));
      __m128i lo, hi;
      if constexpr (FMT == kQ8) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        lo = _mm256_castsi256_si128(q);
        hi = _mm256_extracti128_si256(q, 1);
        a0 = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), a0);
        a1 = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), a1);
      } else {
        mins += coef[r] * half_at(blk + 2);
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4)), mask = _mm_set1_epi8(15);
        lo = _mm_and_si128(raw, mask);
        hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        a0 = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), a0);
        a1 = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), a1);
      }
    }
    if constexpr (FMT == kQ4) {
      a0 = _mm512_add_ps(a0, _mm512_set1_ps(mins));
      a1 = _mm512_add_ps(a1, _mm512_set1_ps(mins));
    }
    _mm512_storeu_ps(acc, a0);
    _mm512_storeu_ps(acc + 16, a1);
#else
    for (int r = 0; r < M; ++r) {
      const uint8_t* blk = rows[r] + b * bb;
      if (next && b % 2 == 0) prefetch(next[r] + b * bb);
      const float d = coef[r] * half_at(blk);
      if constexpr (FMT == kQ8) {
        const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
#pragma omp simd
        for (int c = 0; c < kQBlock; ++c) acc[c] += d * static_cast<float>(q[c]);
      } else {
        const float mm = coef[r] * half_at(blk + 2);
        uint8_t q[kQBlock];
        unpack_q4(blk + 4, q);
#pragma omp simd
        for (int c = 0; c < kQBlock; ++c) acc[c] += d * static_cast<float>(q[c]) + mm;
      }
    }
#endif
  }
}

template <int FMT, int M = kGroup>
inline void qaxpy_m(int m, int64_t nb, const uint8_t* const rows[], const float coef[], const uint8_t* const* next,
                    float* acc) {
  if constexpr (M > 0) {
    if (m == M) return qaxpy_group<FMT, M>(nb, rows, coef, next, acc);
    qaxpy_m<FMT, M - 1>(m, nb, rows, coef, next, acc);
  }
}

// acc += sum_r coef[r] * dequantize(rows[r]) for m <= kGroup rows of w (see qaxpy_group).
inline void qaxpy(const QW& w, const uint8_t* const rows[], const float coef[], int m, const uint8_t* const* next,
                  float* acc) {
  const int64_t nb = (w.cols + kQBlock - 1) / kQBlock;
  if (w.fmt == kQ8)
    qaxpy_m<kQ8>(m, nb, rows, coef, next, acc);
  else
    qaxpy_m<kQ4>(m, nb, rows, coef, next, acc);
}

// acc += sum_j coef[j] * dequantize(rows[j]) over a list of rows of w, kGroup rows per pass,
// each pass prefetching the next pass's rows.
inline void qaxpy_list(const QW& w, const std::vector<const uint8_t*>& rows, const std::vector<float>& coef,
                       float* acc) {
  const int64_t k = static_cast<int64_t>(rows.size());
  for (int64_t j = 0; j < k; j += kGroup) {
    const int m = static_cast<int>(std::min<int64_t>(kGroup, k - j));
    const uint8_t* next[kGroup];
    for (int r = 0; r < kGroup; ++r) next[r] = rows[std::min(j + kGroup + r, k - 1)];
    qaxpy(w, rows.data() + j, coef.data() + j, m, next, acc);
  }
}

void check_qweight(const torch::Tensor& data, int64_t fmt, int64_t cols, const char* fn) {
  TORCH_CHECK(fmt == kQ8 || fmt == kQ4, fn, ": unknown block format ", fmt);
  TORCH_CHECK(data.device().is_cpu() && data.dim() == 2 && data.scalar_type() == at::kByte && data.is_contiguous(), fn,
              ": a quantized weight must be a contiguous 2-D CPU uint8 tensor");
  TORCH_CHECK(data.size(1) == (cols + kQBlock - 1) / kQBlock * block_bytes(fmt), fn, ": ", data.size(1),
              " bytes per row do not hold ", cols, " values in this format");
}

QW qw_of(const torch::Tensor& data, int64_t fmt, int64_t cols, const char* fn) {
  check_qweight(data, fmt, cols, fn);
  return {data.data_ptr<uint8_t>(), data.size(0), data.size(1), cols, static_cast<int>(fmt)};
}

void check_act(const torch::Tensor& x, int64_t size, const char* name, const char* fn) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, fn, ": ", name,
              " must be float32 or bfloat16, got ", x.scalar_type());
  check_vector(x, name, size, x.scalar_type(), fn);
}

// The neuron at position j of the selection (idx, or every row).
inline int64_t pick(const int64_t* idx, int64_t j) { return idx ? idx[j] : j; }

// threads x hp fp32 partial sums -> y (h,) in T, plus add_to where given (rounded as separate
// tensor operations would).
template <typename T>
void reduce(const std::vector<float>& partial, int threads, int64_t hp, int64_t h, T* y, const T* add_to) {
  for (int64_t c = 0; c < h; ++c) {
    float s = 0.f;
    for (int t = 0; t < threads; ++t) s += partial[static_cast<size_t>(t) * hp + c];
    store(y + c, add_to ? to_f32(add_to[c]) + rounded<T>(s) : s);
  }
}

// y (h,) = sum_j coef_j Wt[rows_j] over the k given rows, threads over rows.
template <typename T>
void axpy_rows(const QW& wt, const std::vector<float>& coef, const std::vector<int64_t>& rows, T* y) {
  const int64_t k = static_cast<int64_t>(rows.size()), hp = (wt.cols + kQBlock - 1) / kQBlock * kQBlock;
  const int threads = threads_for<uint8_t>(k * wt.row_bytes);
  std::vector<float> partial(static_cast<size_t>(threads) * hp, 0.f);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const auto [j0, j1] = share(k, t, nt, 1);
    std::vector<const uint8_t*> mine;
    for (int64_t j = j0; j < j1; ++j) mine.push_back(wt.row(rows[j]));
    qaxpy_list(wt, mine, std::vector<float>(coef.begin() + j0, coef.begin() + j1),
               partial.data() + static_cast<size_t>(t) * hp);
  }
  reduce(partial, threads, hp, wt.cols, y, static_cast<const T*>(nullptr));
}

// One FFN step over the candidates (idx (k,), or every neuron), in one parallel region, each
// thread over its share of them in three passes, each streaming one matrix's rows (interleaved,
// the three streams read slower): the gate rows (unless a_given), the up rows where the gate
// value is non-zero (every one when dense), the down rows where h is non-zero (every one when
// dense), summed into the thread's fp32 partial y. Returns (up rows read, active).
template <typename T>
std::pair<int64_t, int64_t> qffn_impl(const QW& wg, const QW& wu, const QW& wd, const QAct& x, const T* a_given,
                                      const int64_t* idx, int64_t k, Act act, bool act_up, bool dense, T* y,
                                      const T* add_to, int32_t* counts) {
  const int64_t hp = (wd.cols + kQBlock - 1) / kQBlock * kQBlock;
  const int threads = threads_for<uint8_t>(3 * k * wu.row_bytes);
  std::vector<float> partial(static_cast<size_t>(threads) * hp, 0.f);
  int64_t up_rows = 0, active = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(+ : up_rows, active)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const auto [j0, j1] = share(k, t, nt, 1);
    std::vector<float> gate(j1 - j0);  // dense: W_gate x; else a = relu(W_gate x)
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n = pick(idx, j), nn = pick(idx, std::min(j + 1, j1 - 1));
      if (a_given)
        gate[j - j0] = to_f32(a_given[j]);
      else {
        const float g = rounded<T>(qdot(wg, wg.row(n), wg.row(nn), x));
        gate[j - j0] = dense ? g : std::max(g, 0.f);
      }
    }
    std::vector<int64_t> up;  // the candidates whose up row is read
    for (int64_t j = j0; j < j1; ++j)
      if (dense || gate[j - j0] != 0.f) up.push_back(j);
    std::vector<const uint8_t*> down;
    std::vector<float> hs;
    const int64_t m = static_cast<int64_t>(up.size());
    for (int64_t i = 0; i < m; ++i) {
      const int64_t j = up[i], n = pick(idx, j), nn = pick(idx, up[std::min(i + 1, m - 1)]);
      const float u = rounded<T>(qdot(wu, wu.row(n), wu.row(nn), x));
      float hv;
      if (dense) {
        const float a = rounded<T>(apply(act, gate[j - j0]));
        hv = rounded<T>(a * (act_up ? rounded<T>(apply(act, u)) : u));
      } else {
        hv = rounded<T>(gate[j - j0] * (act_up ? std::max(u, 0.f) : u));
      }
      if (hv != 0.f) {
        ++active;
        if (counts) {
#pragma omp atomic
          ++counts[n];
        }
      }
      if (hv != 0.f || dense) {
        down.push_back(wd.row(n));
        hs.push_back(hv);
      }
    }
    up_rows += m;
    qaxpy_list(wd, down, hs, partial.data() + static_cast<size_t>(t) * hp);
  }
  reduce(partial, threads, hp, wd.cols, y, add_to);
  return {up_rows, active};
}

}  // namespace

torch::Tensor top_indices(const torch::Tensor& v, int64_t k);  // decode_ops.cpp
torch::Tensor indices_over(const torch::Tensor& v, double t);  // decode_ops.cpp

torch::Tensor q_dot(const torch::Tensor& w, int64_t fmt, int64_t cols, const torch::Tensor& x,
                    const std::optional<torch::Tensor>& idx) {
  const QW qw = qw_of(w, fmt, cols, "q_dot");
  check_act(x, cols, "x", "q_dot");
  if (idx) check_idx(*idx, qw.rows, "q_dot");
  const int64_t* ip = idx ? idx->data_ptr<int64_t>() : nullptr;
  const int64_t k = idx ? idx->size(0) : qw.rows;
  auto y = torch::empty({k}, x.options());
  by_dtype(x, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    const QAct xa = quantize_act(ptr_of<T>(x), cols, qw.fmt);
    T* yp = ptr_of<T>(y);
    const int threads = threads_for<uint8_t>(k * qw.row_bytes);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t j = 0; j < k; ++j) store(yp + j, qdot(qw, qw.row(pick(ip, j)), qw.row(pick(ip, std::min(j + 1, k - 1))), xa));
  });
  return y;
}

torch::Tensor q_axpy(const torch::Tensor& wt, int64_t fmt, int64_t cols, const torch::Tensor& hv,
                     const std::optional<torch::Tensor>& idx) {
  const QW qw = qw_of(wt, fmt, cols, "q_axpy");
  if (idx) check_idx(*idx, qw.rows, "q_axpy");
  const int64_t k = idx ? idx->size(0) : qw.rows;
  check_act(hv, k, "h", "q_axpy");
  auto y = torch::empty({cols}, hv.options());
  by_dtype(hv, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    const T* hp = ptr_of<T>(hv);
    std::vector<float> coef;
    std::vector<int64_t> rows;
    for (int64_t j = 0; j < k; ++j)
      if (to_f32(hp[j]) != 0.f) {
        coef.push_back(to_f32(hp[j]));
        rows.push_back(idx ? idx->data_ptr<int64_t>()[j] : j);
      }
    axpy_rows(qw, coef, rows, ptr_of<T>(y));
  });
  return y;
}

std::tuple<torch::Tensor, int64_t, int64_t> q_ffn(const torch::Tensor& wg, const torch::Tensor& wu,
                                                  const torch::Tensor& wd_t, int64_t fmt, int64_t cols,
                                                  const torch::Tensor& x, const std::optional<torch::Tensor>& idx,
                                                  const std::optional<torch::Tensor>& a_given,
                                                  const std::string& act_name, bool act_up, bool dense,
                                                  const std::optional<torch::Tensor>& add_to,
                                                  const std::optional<torch::Tensor>& counts) {
  const char* fn = "q_ffn";
  const QW g = qw_of(wg, fmt, cols, fn), u = qw_of(wu, fmt, cols, fn), d = qw_of(wd_t, fmt, cols, fn);
  TORCH_CHECK(g.rows == u.rows && d.rows == u.rows, fn, ": the three weights must have one shape");
  check_act(x, cols, "x", fn);
  if (idx) check_idx(*idx, u.rows, fn);
  const int64_t k = idx ? idx->size(0) : u.rows;
  TORCH_CHECK(!(dense && (idx || a_given)), fn, ": a dense step takes neither idx nor a");
  if (a_given) check_vector(*a_given, "a", k, x.scalar_type(), fn);
  if (add_to) check_vector(*add_to, "add_to", cols, x.scalar_type(), fn);
  int32_t* cp = nullptr;
  if (counts) {
    TORCH_CHECK(counts->device().is_cpu() && counts->is_contiguous() && counts->dim() == 1 &&
                    counts->size(0) == u.rows && counts->scalar_type() == at::kInt,
                fn, ": counts must be a contiguous CPU int32 tensor of shape (", u.rows, ",)");
    cp = counts->data_ptr<int32_t>();
  }
  const Act act = act_of(act_name);
  auto y = torch::empty({cols}, x.options());
  std::pair<int64_t, int64_t> rows_active;
  by_dtype(x, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    const QAct xa = quantize_act(ptr_of<T>(x), cols, g.fmt);
    rows_active = qffn_impl(g, u, d, xa, a_given ? ptr_of<T>(*a_given) : static_cast<const T*>(nullptr),
                            idx ? idx->data_ptr<int64_t>() : nullptr, k, act, act_up, dense, ptr_of<T>(y),
                            add_to ? ptr_of<T>(*add_to) : static_cast<const T*>(nullptr), cp);
  });
  return {y, rows_active.first, rows_active.second};
}

std::tuple<torch::Tensor, int64_t> q_predict(const torch::Tensor& fc1, int64_t fmt1, const torch::Tensor& fc2_t,
                                             int64_t fmt2, int64_t n, const torch::Tensor& r, double threshold,
                                             int64_t budget) {
  const char* fn = "q_predict";
  const int64_t h = r.numel();
  const QW w1 = qw_of(fc1, fmt1, h, fn), w2 = qw_of(fc2_t, fmt2, n, fn);
  TORCH_CHECK(w2.rows == w1.rows, fn, ": fc2_t must be (rank, I) with fc1's rank");
  check_act(r, h, "r", fn);
  TORCH_CHECK(budget <= n, fn, ": budget ", budget, " exceeds the ", n, " neurons");
  auto score = torch::empty({n}, r.options());
  int64_t live = 0;
  by_dtype(r, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    const QAct ra = quantize_act(ptr_of<T>(r), h, w1.fmt);
    std::vector<float> all(w1.rows);
    const int threads = threads_for<uint8_t>(w1.rows * w1.row_bytes);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t j = 0; j < w1.rows; ++j)
      all[j] = std::max(rounded<T>(qdot(w1, w1.row(j), w1.row(std::min(j + 1, w1.rows - 1)), ra)), 0.f);
    std::vector<float> z;
    std::vector<int64_t> rows;
    for (int64_t j = 0; j < w1.rows; ++j)
      if (all[j] != 0.f) {
        z.push_back(all[j]);
        rows.push_back(j);
      }
    live = static_cast<int64_t>(rows.size());
    axpy_rows(w2, z, rows, ptr_of<T>(score));  // the rows with z_j = 0 add nothing: not read
  });
  auto idx = budget > 0 ? top_indices(score, budget) : indices_over(score, threshold);
  return {idx, live};
}

void register_quant_ops(pybind11::module& m) {
  m.def("q_dot", &q_dot, "see Kernels.rows_dot / matvec on a QWeight (reference.py)", py::arg("w"),
        py::arg("fmt"), py::arg("cols"), py::arg("x"), py::arg("idx") = py::none());
  m.def("q_axpy", &q_axpy, "see Kernels.rows_axpy / vecmat on a QWeight (reference.py)", py::arg("wt"),
        py::arg("fmt"), py::arg("cols"), py::arg("h"), py::arg("idx") = py::none());
  m.def("q_ffn", &q_ffn, "see Kernels.ffn_dense / ffn_exact / up_down on QWeights (reference.py)", py::arg("wg"),
        py::arg("wu"), py::arg("wd_t"), py::arg("fmt"), py::arg("cols"), py::arg("x"), py::arg("idx") = py::none(),
        py::arg("a") = py::none(), py::arg("act") = "relu", py::arg("act_up") = false, py::arg("dense") = false,
        py::arg("add_to") = py::none(), py::arg("counts") = py::none());
  m.def("q_predict", &q_predict, "see Kernels.predict on QWeights (reference.py)", py::arg("fc1"), py::arg("fmt1"),
        py::arg("fc2_t"), py::arg("fmt2"), py::arg("n"), py::arg("r"), py::arg("threshold"), py::arg("budget"));
}
