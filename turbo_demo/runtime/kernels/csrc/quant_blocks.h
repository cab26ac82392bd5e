// The block formats of runtime/quant.py (Q8_0 "int8" and Q4_0 "int4", blocks of 32 values along a
// row) and the primitives the q_* kernels of quant_ops.cpp are built from: an activation quantized
// per block (quantize_act), one row's dot product with it (qdot), four rows' (qdot4, and
// qdot_range over a selection of rows) and a weighted sum of up to kGroup rows into fp32
// accumulators (qaxpy, qaxpy_list). See quant_ops.cpp for the arithmetic.

#pragma once

#include "act.h"
#include "gemv.h"

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kQBlock = 32;
enum Fmt { kQ8 = 0, kQ4 = 1 };

// Both formats start with the block's fp16 scale d; its values follow at byte 2 (int8: q[32];
// int4: 16 bytes of nibbles, w = d (q - 8) = d q + m with m = -8 d, so that the kernels sum d q
// over unsigned nibbles and add the block's offset term m once).
constexpr int64_t kQ8Bytes = 2 + kQBlock, kQ4Bytes = 2 + kQBlock / 2;
inline int64_t block_bytes(int fmt) { return fmt == kQ8 ? kQ8Bytes : kQ4Bytes; }

// The decode kernels prefetch the rows they read next one block per block read: a block is
// shorter than a 64-byte line, so every line is asked for. (One per two blocks, 68 bytes apart at
// int8, left one line in 17 to the hardware prefetcher: 5-10% slower from DRAM.) A prompt's tiles
// of four rows (qdot4_q*<NT > 1>) keep one per two blocks: with one per block, a 512-token
// q_linear measured 4-9% slower, though only a group's first tile prefetches.

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

// x quantized per block: q (B * 32,) int8 and ds (2B,) each block's scale d and s = -8 d sum(q),
// interleaved: an int4 block's dot product is d_w d_x sum(q_w q_x) + d_w s_x (its offset term m_w
// d_x sum(q_x), m_w = -8 d_w), so [d_w, d_w] * [d_x, s_x] gives both of its scales at once. With AVX-512 VNNI,
// for int4 weights (fmt), pairs: q per pair of blocks (b, b + 1) as [b 0-15, b+1 0-15, b 16-31,
// b+1 16-31], the order of two int4 blocks' nibbles unpacked into one 512-bit register.
struct QAct {
  std::vector<int8_t> q;
  std::vector<float> ds;
  std::vector<int8_t> pairs;
  float d(int64_t b) const { return ds[2 * b]; }
  float s(int64_t b) const { return ds[2 * b + 1]; }
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TD_Q4_PAIRS 1
#endif

template <typename T>
QAct quantize_act(const T* x, int64_t h, [[maybe_unused]] int fmt) {
  const int64_t nb = (h + kQBlock - 1) / kQBlock;
  QAct a{std::vector<int8_t>(nb * kQBlock, 0), std::vector<float>(2 * nb)};
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
    a.ds[2 * b] = d;
    a.ds[2 * b + 1] = -8.f * d * static_cast<float>(sum);
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

// An int4 block's d twice, as two fp16 in one word: [d, d], the header that multiplies [d_x, s_x].
inline uint32_t q4_dd(const uint8_t* blk) {
  uint16_t d;
  std::memcpy(&d, blk, sizeof d);
  return d | static_cast<uint32_t>(d) << 16;
}

// One block's dot product, added to acc (its scaled integer sum) and mins (int4's offset, d_w s_x).
template <int FMT>
inline void qdot_block(const uint8_t* blk, const QAct& x, int64_t b, DotAcc& acc, float& mins) {
  const float d = half_at(blk) * x.d(b);
  const int8_t* xq = x.q.data() + b * kQBlock;
#if defined(__AVX2__)
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  __m256i isum;
  if constexpr (FMT == kQ8) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    // |w| * (x * sign(w)) = w * x, with an unsigned left operand as the instructions want
    isum = dot_u8s8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
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
    unpack_q4(blk + 2, q);
    for (int j = 0; j < kQBlock; ++j) isum += q[j] * xq[j];
  }
  acc += d * static_cast<float>(isum);
#endif
  if constexpr (FMT == kQ4) mins += half_at(blk) * x.s(b);
}

#if defined(TD_Q4_PAIRS)
// Two int4 blocks (b, b + 1) in one 512-bit dot product, added to acc as qdot_block; their offset
// terms d_w s_x go to lanes 1 and 3 of mins (lanes 0 and 2 collect d_w d_x, not read).
inline void q4_pair(const uint8_t* blk, const QAct& x, int64_t b, __m512& acc, __m128& mins) {
  constexpr int64_t bb = kQ4Bytes;
  const __m256i mask = _mm256_set1_epi8(15);
  const __m256i raw = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(blk + bb + 2),
                                          reinterpret_cast<const __m128i*>(blk + 2));
  const __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, mask)),
                                        _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask), 1);
  const __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(x.pairs.data() + b * kQBlock));
  // both blocks' scales in one conversion: [d_w, d_w, d_w', d_w'] * [d_x, s_x, d_x', s_x']
  const __m128 dm = _mm_cvtph_ps(_mm_unpacklo_epi32(_mm_cvtsi32_si128(static_cast<int>(q4_dd(blk))),
                                                    _mm_cvtsi32_si128(static_cast<int>(q4_dd(blk + bb)))));
  const __m128 prod = _mm_mul_ps(dm, _mm_loadu_ps(x.ds.data() + 2 * b));
  mins = _mm_add_ps(mins, prod);
  // lanes 0-3 and 8-11 hold block b's sums (scale: prod's lane 0), 4-7 and 12-15 block b + 1's (lane 2)
  const __m512 d = _mm512_permutexvar_ps(_mm512_set_epi32(2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0),
                                         _mm512_castps128_ps512(prod));
  acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(isum), acc);
}

// qdot_fmt<kQ4> four blocks at a time, in two chains of pairs; the last nb % 4 blocks as qdot_block.
inline float qdot_q4_pairs(int64_t nb, const uint8_t* row, const uint8_t* next, const QAct& x) {
  constexpr int64_t bb = kQ4Bytes;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m128 mins0 = _mm_setzero_ps(), mins1 = _mm_setzero_ps();
  int64_t b = 0;
  for (; b + 3 < nb; b += 4) {
    prefetch(next + b * bb);
    prefetch(next + b * bb + 64);
    q4_pair(row + b * bb, x, b, acc0, mins0);
    q4_pair(row + (b + 2) * bb, x, b + 2, acc1, mins1);
  }
  DotAcc tail = dot_zero();
  float tail_mins = 0.f;
  for (; b < nb; ++b) qdot_block<kQ4>(row + b * bb, x, b, tail, tail_mins);
  alignas(16) float m[4];
  _mm_store_ps(m, _mm_add_ps(mins0, mins1));
  return (m[1] + m[3] + tail_mins) + _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + dot_sum(tail, dot_zero());
}
#endif

// dequantize(row) . dequantize(Q8(x)) in fp32 for one row of format FMT: even and odd blocks in
// two chains of accumulators (a block's sums need not wait for the previous block's); prefetches
// next, the row read after this one.
template <int FMT>
inline float qdot_fmt(int64_t nb, const uint8_t* row, const uint8_t* next, const QAct& x) {
  constexpr int64_t bb = FMT == kQ8 ? kQ8Bytes : kQ4Bytes;
#if defined(TD_Q4_PAIRS)
  if constexpr (FMT == kQ4) return qdot_q4_pairs(nb, row, next, x);
#endif
  DotAcc acc0 = dot_zero(), acc1 = dot_zero();
  float mins0 = 0.f, mins1 = 0.f;
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    prefetch(next + b * bb);
    prefetch(next + (b + 1) * bb);
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

#if defined(__AVX2__) && defined(__F16C__) && !defined(TD_Q4_PAIRS)
#define TD_QDOT4 1
// Four rows' dot products on AVX2, block by block: one load of the activation block and one
// conversion of the four rows' fp16 headers per block (a row at a time, both are paid per row,
// and the kernel is bound by these instructions, not by memory). Each block's integer sums are
// exact (int16 lanes hold at most 8 products of |q_w| <= 15 (int4) and |q_x| <= 127: 15240),
// scaled in fp32 as qdot_block's; the sum over blocks differs from qdot's in order only.

// The same four rows against NT tokens xs[j] at once (a prompt's tokens: q_linear), out[j][t]: the
// rows' values and headers are unpacked once per block for all NT tokens, and each token's sums
// are formed exactly as for one (bit for bit the decode step's, NT = 1). next (or nullptr): the
// rows read after these, prefetched.

// The fp16 scales of the four rows' blocks at byte off, [d_0, d_1, d_2, d_3], in one conversion.
inline __m128 scales4(const uint8_t* const r[4], int64_t off) {
  uint16_t d[4];
  for (int t = 0; t < 4; ++t) std::memcpy(&d[t], r[t] + off, sizeof d[t]);
  return _mm_cvtph_ps(_mm_setr_epi16(static_cast<short>(d[0]), static_cast<short>(d[1]), static_cast<short>(d[2]),
                                     static_cast<short>(d[3]), 0, 0, 0, 0));
}

// int4: rows in pairs, two rows' 16 nibble bytes in one register ([row 2k | row 2k + 1]) against
// the block's values 0-15 (low nibbles) and 16-31 (high nibbles) in both halves.
template <int NT>
inline void qdot4_q4(int64_t nb, const uint8_t* const r[4], const uint8_t* const* next, const QAct* const xs[],
                     float out[][4]) {
  constexpr int64_t bb = kQ4Bytes;
  const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  // the (d_w d_x) lanes of a block's header products, in the lane order of its integer sums
  const __m256i d_lanes = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3);
  __m256 acc[NT];
  __m128 mins[NT];  // lane t: row t's offset d_w s_x
  for (int j = 0; j < NT; ++j) acc[j] = _mm256_setzero_ps(), mins[j] = _mm_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m128 dw = scales4(r, b * bb);
    if (next && (NT == 1 || b % 2 == 0))  // a prompt's tile: see the prefetch note above
      for (int t = 0; t < 4; ++t) prefetch(next[t] + b * bb);
    __m256i lo[2], hi[2];
    for (int k = 0; k < 2; ++k) {
      const __m256i v = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(r[2 * k + 1] + b * bb + 2),
                                            reinterpret_cast<const __m128i*>(r[2 * k] + b * bb + 2));
      lo[k] = _mm256_and_si256(v, mask);
      hi[k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) {
      const QAct& x = *xs[j];
      const int8_t* xq = x.q.data() + b * kQBlock;
      const __m256i xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq)));
      const __m256i xhi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + 16)));
      const __m128 prod = _mm_mul_ps(dw, _mm_set1_ps(x.d(b)));  // d_t d_x
      mins[j] = _mm_add_ps(mins[j], _mm_mul_ps(dw, _mm_set1_ps(x.s(b))));
      __m256i pair[2];
      for (int k = 0; k < 2; ++k)
        pair[k] = _mm256_add_epi16(_mm256_maddubs_epi16(lo[k], xlo), _mm256_maddubs_epi16(hi[k], xhi));
      // int32 lanes: [row 0, row 0, row 2, row 2 | row 1, row 1, row 3, row 3]
      const __m256i isum = _mm256_madd_epi16(_mm256_hadd_epi16(pair[0], pair[1]), ones);
      const __m256 dd = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(prod), d_lanes);
      acc[j] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc[j]);
    }
  }
  constexpr int lane[4] = {0, 4, 2, 6};  // row t's two lanes: lane[t], lane[t] + 1
  for (int j = 0; j < NT; ++j) {
    alignas(32) float a[8], m[4];
    _mm256_store_ps(a, acc[j]);
    _mm_store_ps(m, mins[j]);
    for (int t = 0; t < 4; ++t) out[j][t] = m[t] + (a[lane[t]] + a[lane[t] + 1]);
  }
}

// int8: each row's sums as qdot_block's, reduced to one int32 lane per row ([row 0..3 | row 0..3]).
template <int NT>
inline void qdot4_q8(int64_t nb, const uint8_t* const r[4], const uint8_t* const* next, const QAct* const xs[],
                     float out[][4]) {
  constexpr int64_t bb = kQ8Bytes;
  __m256 acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m128 dw = scales4(r, b * bb);
    if (next && (NT == 1 || b % 2 == 0))  // a prompt's tile: see the prefetch note above
      for (int t = 0; t < 4; ++t) prefetch(next[t] + b * bb);
    __m256i wv[4], aw[4];  // the rows' q and |q|
    for (int t = 0; t < 4; ++t) {
      wv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[t] + b * bb + 2));
      aw[t] = _mm256_sign_epi8(wv[t], wv[t]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) {
      const QAct& x = *xs[j];
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + b * kQBlock));
      const __m128 d4 = _mm_mul_ps(dw, _mm_set1_ps(x.d(b)));
      __m256i isum[4];
      for (int t = 0; t < 4; ++t) isum[t] = dot_u8s8(aw[t], _mm256_sign_epi8(xv, wv[t]));
      const __m256i rows =
          _mm256_hadd_epi32(_mm256_hadd_epi32(isum[0], isum[1]), _mm256_hadd_epi32(isum[2], isum[3]));
      acc[j] = _mm256_fmadd_ps(_mm256_set_m128(d4, d4), _mm256_cvtepi32_ps(rows), acc[j]);
    }
  }
  for (int j = 0; j < NT; ++j) {
    alignas(32) float a[8];
    _mm256_store_ps(a, acc[j]);
    for (int t = 0; t < 4; ++t) out[j][t] = a[t] + a[t + 4];
  }
}
#endif

// out[t] = qdot of row r[t] for four rows of w, prefetching next[t] (the rows read after these).
inline void qdot4(const QW& w, const uint8_t* const r[4], const uint8_t* const next[4], const QAct& x, float out[4]) {
#if defined(TD_QDOT4)
  const int64_t nb = (w.cols + kQBlock - 1) / kQBlock;
  const QAct* xs[1] = {&x};
  float one[1][4];
  if (w.fmt == kQ8)
    qdot4_q8<1>(nb, r, next, xs, one);
  else
    qdot4_q4<1>(nb, r, next, xs, one);
  std::copy(one[0], one[0] + 4, out);
#else
  for (int t = 0; t < 4; ++t) out[t] = qdot(w, r[t], next[t], x);
#endif
}

// The group of four rows at j of the rows row_at(j0 .. j1 - 1) (r) and the group after it (next),
// for qdot4: a short group repeats the last row (its results are dropped by the caller).
template <typename RowAt>
inline void rows4(RowAt row_at, int64_t j, int64_t j1, const uint8_t* r[4], const uint8_t* next[4]) {
  for (int t = 0; t < 4; ++t) {
    r[t] = row_at(std::min(j + t, j1 - 1));
    next[t] = row_at(std::min(j + 4 + t, j1 - 1));
  }
}

// fn(j, row_at(j) . x) for each j in [j0, j1), in increasing j, four rows at a time (rows4), each
// group prefetching the next.
template <typename RowAt, typename Fn>
inline void qdot_range(const QW& w, int64_t j0, int64_t j1, RowAt row_at, const QAct& x, Fn fn) {
  for (int64_t j = j0; j < j1; j += 4) {
    const uint8_t *r[4], *next[4];
    rows4(row_at, j, j1, r, next);
    float out[4];
    qdot4(w, r, next, x, out);
    for (int t = 0; t < 4 && j + t < j1; ++t) fn(j + t, out[t]);
  }
}

constexpr int kGroup = 8;  // rows per pass of qaxpy over the accumulators

// acc[0 : B * 32] += sum_{r < M} coef[r] * dequantize(rows[r]) for M <= kGroup rows of format FMT,
// in fp32: one load and store of the accumulators per block for all M rows (a row at a time,
// they would cost as much as the row's own bytes); prefetches next[r], the rows read after
// these, where next is given.
template <int FMT, int M>
inline void qaxpy_group(int64_t nb, const uint8_t* const rows[], const float coef[], const uint8_t* const* next,
                        float* acc) {
  constexpr int64_t bb = FMT == kQ8 ? kQ8Bytes : kQ4Bytes;
#if defined(__AVX512F__)
  [[maybe_unused]] const __m512 nibbles = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#endif
  for (int64_t b = 0; b < nb; ++b, acc += kQBlock) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_loadu_ps(acc), a1 = _mm512_loadu_ps(acc + 16);
    // int4: sum_r coef[r] d_r; the block's offset sum_r coef[r] m_r is -8 times it (exact: a
    // power of two scales every rounding alike)
    float dsum = 0.f;
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const uint8_t* blk = rows[r] + b * bb;
      if (next) prefetch(next[r] + b * bb);
      if constexpr (FMT == kQ8) {
        const __m512 dv = _mm512_set1_ps(coef[r] * half_at(blk));
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        a0 = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), a0);
        a1 = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), a1);
      } else {
        const float cd = coef[r] * half_at(blk);
        dsum += cd;
        const __m512 dv = _mm512_set1_ps(cd);
        // byte j holds value j (low nibble) and value j + 16 (high nibble): one widening for both;
        // a nibble's fp32 value by one vpermps from the table 0..15, which reads the low four bits
        // of each lane (the low nibbles need no mask and no conversion)
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
        a0 = _mm512_fmadd_ps(dv, _mm512_permutexvar_ps(v, nibbles), a0);
        a1 = _mm512_fmadd_ps(dv, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), nibbles), a1);
      }
    }
    if constexpr (FMT == kQ4) {
      const __m512 mv = _mm512_set1_ps(-8.f * dsum);
      a0 = _mm512_add_ps(a0, mv);
      a1 = _mm512_add_ps(a1, mv);
    }
    _mm512_storeu_ps(acc, a0);
    _mm512_storeu_ps(acc + 16, a1);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    // a[i] holds values 8i .. 8i + 7 of the block
    __m256 a[4] = {_mm256_loadu_ps(acc), _mm256_loadu_ps(acc + 8), _mm256_loadu_ps(acc + 16),
                   _mm256_loadu_ps(acc + 24)};
    float dsum = 0.f;  // as above
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const uint8_t* blk = rows[r] + b * bb;
      if (next) prefetch(next[r] + b * bb);
      if constexpr (FMT == kQ8) {
        const __m256 dv = _mm256_set1_ps(coef[r] * half_at(blk));
        for (int i = 0; i < 4; ++i) {
          const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * i));
          a[i] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), a[i]);
        }
      } else {
        const float cd = coef[r] * half_at(blk);
        dsum += cd;
        const __m256 dv = _mm256_set1_ps(cd);
        const __m256i mask = _mm256_set1_epi32(15);
        // nibble bytes 0-7 hold values 0-7 (low) and 16-23 (high); bytes 8-15 values 8-15 and 24-31
        for (int i = 0; i < 2; ++i) {
          const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * i)));
          a[i] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), a[i]);
          a[i + 2] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), a[i + 2]);
        }
      }
    }
    if constexpr (FMT == kQ4) {
      const __m256 mv = _mm256_set1_ps(-8.f * dsum);
      for (int i = 0; i < 4; ++i) a[i] = _mm256_add_ps(a[i], mv);
    }
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(acc + 8 * i, a[i]);
#else
    for (int r = 0; r < M; ++r) {
      const uint8_t* blk = rows[r] + b * bb;
      if (next) prefetch(next[r] + b * bb);
      const float d = coef[r] * half_at(blk);
      if constexpr (FMT == kQ8) {
        const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
#pragma omp simd
        for (int c = 0; c < kQBlock; ++c) acc[c] += d * static_cast<float>(q[c]);
      } else {
        const float mm = -8.f * d;  // m = -8 d, scaled by coef[r] as d is (exact)
        uint8_t q[kQBlock];
        unpack_q4(blk + 2, q);
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

// A QWeight's tensor checked (format, layout, row bytes for `cols` values) and described; fn
// names the kernel in the error.
inline void check_qweight(const torch::Tensor& data, int64_t fmt, int64_t cols, const char* fn) {
  TORCH_CHECK(fmt == kQ8 || fmt == kQ4, fn, ": unknown block format ", fmt);
  TORCH_CHECK(data.device().is_cpu() && data.dim() == 2 && data.scalar_type() == at::kByte && data.is_contiguous(), fn,
              ": a quantized weight must be a contiguous 2-D CPU uint8 tensor");
  TORCH_CHECK(data.size(1) == (cols + kQBlock - 1) / kQBlock * block_bytes(fmt), fn, ": ", data.size(1),
              " bytes per row do not hold ", cols, " values in this format");
}

inline QW qw_of(const torch::Tensor& data, int64_t fmt, int64_t cols, const char* fn) {
  check_qweight(data, fmt, cols, fn);
  return {data.data_ptr<uint8_t>(), data.size(0), data.size(1), cols, static_cast<int>(fmt)};
}

// A prompt's activations x (..., n), contiguous, fp32 or bf16 -> the number of its rows (tokens).
inline int64_t tokens_of(const torch::Tensor& x, int64_t n, const char* fn) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1, fn, ": x must be a contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, fn,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(-1) == n, fn, ": x has ", x.size(-1), " values per token, the weight takes ", n);
  return x.numel() / n;
}

}  // namespace
