// The small operations of one decode step, fused so that each is one call instead of a dozen
// tensor operations (at batch 1 their fixed costs add up to more than their arithmetic).
//
//   rms_norm(x, w, eps)    y = w * round(x / sqrt(mean(x^2) + eps))    x (T, H) or (H,), w (H,)
//   decode_attention(q, k, v, k_cache, v_cache, cos, sin_signed, pos, first) -> out (nh * hd,)
//       q (nh * hd,), k, v (nkv * hd,): the projections of the token at position pos; caches
//       (nkv, max_len, hd); cos, sin_signed (hd,): the rotary tables' row for pos. Rotates q
//       and k (RoPE, rotate_half convention: rope(x)_c = x_c cos_c + x_{(c + hd/2) mod hd}
//       sin_signed_c), writes k and v into the caches at pos, and attends with the cached
//       positions first..pos: out_h = sum_t softmax_t(q_h . k_t / sqrt(hd)) v_t, where query
//       head h reads kv head h / (nh / nkv) (grouped-query attention).
//   top_indices(v, k)           the indices of the k largest values of v (N,), ascending
//   indices_over(v, t, incl.)   the indices i with v_i > t (v_i >= t if inclusive), ascending
//                               (the neuron selections of the sparse FFN modes)
//
// Tensors are float32 or bfloat16, all of one dtype. As in the transformers models: norms and
// attention compute in fp32, and a value is rounded to the dtype where HF stores it (the
// normalised x, the rotated q and k, the cached k and v, the outputs).

#include <torch/extension.h>

#include "bf16.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

namespace {

using turbo_demo::bf16_bits;
using turbo_demo::store;
using turbo_demo::to_f32;
template <typename T>
T* ptr_of(const torch::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename T>
inline float rounded(float v) {  // v as it reads back after a store into T
  T t;
  store(&t, v);
  return to_f32(t);
}

template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t rows, int64_t h, float eps) {
  for (int64_t r = 0; r < rows; ++r, x += h, y += h) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < h; ++c) ss += to_f32(x[c]) * to_f32(x[c]);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
    for (int64_t c = 0; c < h; ++c) store(y + c, to_f32(w[c]) * rounded<T>(to_f32(x[c]) * inv));
  }
}

struct Shape {
  int64_t nh, nkv, hd, max_len, pos, first;
};

template <typename T>
void attention_impl(const T* q, const T* k, const T* v, T* kc, T* vc, const T* cos, const T* sin,
                    T* out, Shape s) {
  const int64_t half = s.hd / 2, group = s.nh / s.nkv, n = s.pos - s.first + 1;
  const float scale = 1.f / std::sqrt(static_cast<float>(s.hd));
  auto rope = [&](const T* x, int64_t c) {
    return to_f32(x[c]) * to_f32(cos[c]) + to_f32(x[(c + half) % s.hd]) * to_f32(sin[c]);
  };
  for (int64_t g = 0; g < s.nkv; ++g) {
    T* krow = kc + (g * s.max_len + s.pos) * s.hd;
    T* vrow = vc + (g * s.max_len + s.pos) * s.hd;
    for (int64_t c = 0; c < s.hd; ++c) {
      store(krow + c, rope(k + g * s.hd, c));
      vrow[c] = v[g * s.hd + c];
    }
  }
  // Heads are independent; split them over threads only when the cache is long enough to pay.
  const int threads = n * s.nh * s.hd >= (1 << 18) ? at::get_num_threads() : 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t h = 0; h < s.nh; ++h) {
    std::vector<float> qr(s.hd), p(n), acc(s.hd, 0.f);
    for (int64_t c = 0; c < s.hd; ++c) qr[c] = rounded<T>(rope(q + h * s.hd, c)) * scale;
    const T* keys = kc + ((h / group) * s.max_len + s.first) * s.hd;
    const T* values = vc + ((h / group) * s.max_len + s.first) * s.hd;
    float top = -INFINITY, total = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      float d = 0.f;
#pragma omp simd reduction(+ : d)
      for (int64_t c = 0; c < s.hd; ++c) d += qr[c] * to_f32(keys[t * s.hd + c]);
      p[t] = d;
      top = std::max(top, d);
    }
    for (int64_t t = 0; t < n; ++t) total += p[t] = std::exp(p[t] - top);
    for (int64_t t = 0; t < n; ++t) {
      const float pt = p[t] / total;
#pragma omp simd
      for (int64_t c = 0; c < s.hd; ++c) acc[c] += pt * to_f32(values[t * s.hd + c]);
    }
    for (int64_t c = 0; c < s.hd; ++c) store(out + h * s.hd + c, acc[c]);
  }
}

// Ascending indices i < n with keep(i) (0 or 1), written without branches (the outcomes of keep
// are unpredictable, and mispredictions would cost more than the scan) into a (n,) tensor cut
// short.
template <typename Keep>
torch::Tensor indices_where(int64_t n, Keep keep) {
  auto out = torch::empty({n}, torch::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    p[count] = i;
    count += keep(i);
  }
  return out.resize_({count});
}

void check_scores(const torch::Tensor& v, const char* fn) {
  TORCH_CHECK(v.device().is_cpu() && v.is_contiguous() && v.dim() == 1, fn,
              ": v must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kBFloat16, fn,
              ": v must be float32 or bfloat16, got ", v.scalar_type());
}

// Order-preserving map of a float to an unsigned key: a > b exactly when key(a) > key(b).
inline uint32_t key_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T>
torch::Tensor top_impl(const T* v, int64_t n, int64_t k) {
  // Radix selection of the k-th largest key, 11 + 11 + 10 bits from the top: count the keys
  // that share the bits fixed so far, per value of the next bits, and walk down the counts
  // (three linear passes, where sorting or nth_element would compare and branch).
  std::vector<uint32_t> keys(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = key_of(to_f32(v[i]));
  uint32_t prefix = 0, mask = 0;
  int64_t need = k;  // how many keys the remaining range must still supply
  for (const int shift : {21, 10, 0}) {
    const int bits = shift == 0 ? 10 : 11;
    const uint32_t digit_mask = (1u << bits) - 1;
    std::vector<int64_t> count(1u << bits, 0);
    for (int64_t i = 0; i < n; ++i)
      if ((keys[i] & mask) == prefix) ++count[(keys[i] >> shift) & digit_mask];
    uint32_t digit = digit_mask;
    while (count[digit] < need) need -= count[digit--];
    prefix |= digit << shift;
    mask |= digit_mask << shift;
  }
  // one ascending scan: the keys above the k-th, and `need` of those equal to it (ties go to
  // the lower indices)
  const uint32_t kth = prefix;
  return indices_where(n, [&](int64_t i) {
    const int tie = (keys[i] == kth) & (need > 0);  // bitwise: no branch to mispredict
    need -= tie;
    return static_cast<int>(keys[i] > kth) | tie;
  });
}

void check(const torch::Tensor& t, const char* name, at::ScalarType dtype, const char* fn) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), fn, ": ", name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

}  // namespace

torch::Tensor top_indices(const torch::Tensor& v, int64_t k) {
  check_scores(v, "top_indices");
  const int64_t n = v.numel();
  TORCH_CHECK(0 <= k && k <= n, "top_indices: k must be in [0, ", n, "], got ", k);
  if (k == 0) return torch::empty({0}, torch::kLong);
  if (v.scalar_type() == at::kFloat) return top_impl(ptr_of<float>(v), n, k);
  return top_impl(ptr_of<bf16_bits>(v), n, k);
}

torch::Tensor indices_over(const torch::Tensor& v, double t, bool inclusive) {
  check_scores(v, "indices_over");
  const float th = static_cast<float>(t);
  auto over = [&](auto* p) {
    return indices_where(v.numel(), [&](int64_t i) {
      const float x = to_f32(p[i]);
      return static_cast<int>(x > th) | (static_cast<int>(inclusive) & static_cast<int>(x == th));
    });
  };
  if (v.scalar_type() == at::kFloat) return over(ptr_of<float>(v));
  return over(ptr_of<bf16_bits>(v));
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "rms_norm: float32 or bfloat16 only");
  check(x, "x", dtype, "rms_norm");
  check(w, "w", dtype, "rms_norm");
  const int64_t h = w.numel();
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == h, "rms_norm: x must end in the weight's size ", h);
  auto y = torch::empty_like(x);
  if (dtype == at::kFloat)
    rms_norm_impl(ptr_of<float>(x), ptr_of<float>(w), ptr_of<float>(y), x.numel() / h, h, eps);
  else
    rms_norm_impl(ptr_of<bf16_bits>(x), ptr_of<bf16_bits>(w), ptr_of<bf16_bits>(y), x.numel() / h, h, eps);
  return y;
}

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& cos,
                               const torch::Tensor& sin_signed, int64_t pos, int64_t first) {
  const char* fn = "decode_attention";
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, fn, ": float32 or bfloat16 only");
  const torch::Tensor* all[] = {&q, &k, &v, &k_cache, &v_cache, &cos, &sin_signed};
  const char* names[] = {"q", "k", "v", "k_cache", "v_cache", "cos", "sin_signed"};
  for (int i = 0; i < 7; ++i) check(*all[i], names[i], dtype, fn);
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), fn,
              ": the caches must both be (nkv, max_len, hd)");
  Shape s{0, k_cache.size(0), k_cache.size(2), k_cache.size(1), pos, first};
  s.nh = q.numel() / s.hd;
  TORCH_CHECK(s.hd % 2 == 0 && cos.numel() == s.hd && sin_signed.numel() == s.hd, fn,
              ": cos and sin_signed must have the (even) head size ", s.hd);
  TORCH_CHECK(q.numel() == s.nh * s.hd && s.nh % s.nkv == 0, fn, ": q must hold a multiple of nkv heads");
  TORCH_CHECK(k.numel() == s.nkv * s.hd && v.numel() == s.nkv * s.hd, fn, ": k and v must be (nkv * hd,)");
  TORCH_CHECK(0 <= first && first <= pos && pos < s.max_len, fn, ": need 0 <= first <= pos < max_len");
  auto out = torch::empty({s.nh * s.hd}, q.options());
  if (dtype == at::kFloat)
    attention_impl(ptr_of<float>(q), ptr_of<float>(k), ptr_of<float>(v), ptr_of<float>(k_cache), ptr_of<float>(v_cache),
                   ptr_of<float>(cos), ptr_of<float>(sin_signed), ptr_of<float>(out), s);
  else
    attention_impl(ptr_of<bf16_bits>(q), ptr_of<bf16_bits>(k), ptr_of<bf16_bits>(v), ptr_of<bf16_bits>(k_cache),
                   ptr_of<bf16_bits>(v_cache), ptr_of<bf16_bits>(cos), ptr_of<bf16_bits>(sin_signed),
                   ptr_of<bf16_bits>(out), s);
  return out;
}

void register_decode_ops(pybind11::module& m) {
  m.def("rms_norm", &rms_norm, "y = w * x / sqrt(mean(x^2) + eps) over the last dim", py::arg("x"),
        py::arg("w"), py::arg("eps"));
  m.def("top_indices", &top_indices, "indices of the k largest values of v (N,), ascending",
        py::arg("v"), py::arg("k"));
  m.def("indices_over", &indices_over, "ascending indices i with v_i > t (>= t if inclusive)",
        py::arg("v"), py::arg("t"), py::arg("inclusive"));
  m.def("decode_attention", &decode_attention,
        "one token's RoPE, KV-cache write and grouped-query attention -> (nh * hd,)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cos"),
        py::arg("sin_signed"), py::arg("pos"), py::arg("first"));
}
