// The small operations of one decode step: rms_norm, attention_step (RMSNorm, the q, k, v
// GEMVs and their optional biases and per-head norms, RoPE, the cache write, grouped-query attention over positions first..pos and the
// output projection in one call), predict (and its top_indices), indices_over, argmax and
// sample_top_p. What each computes is the docstring of the same method of Kernels in
// ../reference.py; here they are fused, so that each is one call instead of a dozen tensor
// operations, whose fixed costs at batch 1 add up to more than their arithmetic.
//
// Tensors are float32 or bfloat16, all of one dtype. As in the transformers models: norms and
// attention compute in fp32, and a value is rounded to the dtype where HF stores it (the
// normalised x, the rotated q and k, the cached k and v, the outputs). Sums that decide a
// sampled token are in fp64.

#include "gemv.h"

#include <cmath>
#include <functional>
#include <tuple>
#include <utility>

namespace {

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

// y += b (n,) where the optional bias is given.
template <typename T>
void add_bias(T* y, const c10::optional<torch::Tensor>& b, int64_t n) {
  if (!b) return;
  const T* bp = ptr_of<T>(*b);
  for (int64_t c = 0; c < n; ++c) store(y + c, to_f32(y[c]) + to_f32(bp[c]));
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

// Radix selection of a boundary key, 11 + 11 + 10 bits from the top: with the items ranked by
// key descending, the key of the first item at which the weight ranked above it plus its own
// reaches `target` (the k-th largest key, for unit weights and target k). Per pass, the weight
// of the keys that share the bits fixed so far, per value of the next bits, walked down from the
// top (three linear passes, where sorting or nth_element would compare and branch). Returns the
// key and the weight of the keys above it.
template <typename W, typename Weight>
std::pair<uint32_t, W> radix_boundary(const std::vector<uint32_t>& keys, Weight weight, W target) {
  const int64_t n = static_cast<int64_t>(keys.size());
  uint32_t prefix = 0, mask = 0;
  W above = 0;  // the weight of the keys above those that share the bits fixed so far
  for (const int shift : {21, 10, 0}) {
    const int bits = shift == 0 ? 10 : 11;
    const uint32_t digit_mask = (1u << bits) - 1;
    std::vector<W> sum(1u << bits, 0);
    for (int64_t i = 0; i < n; ++i)
      if ((keys[i] & mask) == prefix) sum[(keys[i] >> shift) & digit_mask] += weight(i);
    uint32_t digit = digit_mask;
    while (digit > 0 && above + sum[digit] < target) above += sum[digit--];
    prefix |= digit << shift;
    mask |= digit_mask << shift;
  }
  return {prefix, above};
}

template <typename T>
torch::Tensor top_impl(const T* v, int64_t n, int64_t k) {
  std::vector<uint32_t> keys(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = key_of(to_f32(v[i]));
  const auto [kth, above] = radix_boundary(keys, [](int64_t) { return int64_t{1}; }, k);
  // one ascending scan: the keys above the k-th, and `need` of those equal to it (ties go to
  // the lower indices)
  int64_t need = k - above;
  return indices_where(n, [&](int64_t i) {
    const int tie = (keys[i] == kth) & (need > 0);  // bitwise: no branch to mispredict
    need -= tie;
    return static_cast<int>(keys[i] > kth) | tie;
  });
}

// Marks the nucleus in kept (n,): with the tokens ranked by p descending (ties: lower index
// first), token i is kept iff the mass ranked above it is < target: the keys above the boundary
// value (radix_boundary weighted by mass), then its ties in index order while the mass above
// them stays below target.
void mark_nucleus(const std::vector<float>& p, double target, std::vector<uint8_t>& kept) {
  const int64_t n = static_cast<int64_t>(p.size());
  std::vector<uint32_t> keys(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = key_of(p[i]);
  auto [boundary, above] = radix_boundary(keys, [&](int64_t i) { return static_cast<double>(p[i]); }, target);
  for (int64_t i = 0; i < n; ++i) {
    const bool tie = keys[i] == boundary && above < target;
    kept[i] = keys[i] > boundary || tie;
    if (tie) above += p[i];
  }
}

template <typename T>
int64_t sample_impl(const T* v, int64_t n, float inv_t, double top_p, double u) {
  float top = -INFINITY;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, to_f32(v[i]));
  TORCH_CHECK(std::isfinite(top), "sample_top_p: the logits have no finite maximum");
  std::vector<float> p(n);
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = std::exp((to_f32(v[i]) - top) * inv_t);
    total += p[i];
  }
  std::vector<uint8_t> kept(n, 1);
  if (top_p < 1.0) mark_nucleus(p, top_p * total, kept);
  double kept_mass = 0.0;
  for (int64_t i = 0; i < n; ++i)
    if (kept[i]) kept_mass += p[i];
  const double r = u * kept_mass;
  double c = 0.0;
  int64_t last = 0;
  for (int64_t i = 0; i < n; ++i)
    if (kept[i]) {
      c += p[i];
      last = i;
      if (c > r) return i;
    }
  return last;  // u * kept_mass rounded up to kept_mass
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

torch::Tensor indices_over(const torch::Tensor& v, double t) {
  check_scores(v, "indices_over");
  const float th = static_cast<float>(t);
  auto over = [&](auto* p) {
    return indices_where(v.numel(), [&](int64_t i) { return static_cast<int>(to_f32(p[i]) > th); });
  };
  if (v.scalar_type() == at::kFloat) return over(ptr_of<float>(v));
  return over(ptr_of<bf16_bits>(v));
}

int64_t argmax(const torch::Tensor& v) {
  check_scores(v, "argmax");
  TORCH_CHECK(v.numel() > 0, "argmax: v is empty");
  int64_t best = 0;
  by_dtype(v, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    const T* x = ptr_of<T>(v);
    float top = to_f32(x[0]);
    for (int64_t i = 1; i < v.numel() && !std::isnan(top); ++i) {
      const float value = to_f32(x[i]);
      if (value > top || std::isnan(value)) {
        top = value;
        best = i;
      }
    }
  });
  return best;
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

torch::Tensor attention_step(const torch::Tensor& x, const torch::Tensor& ln_w, double eps,
                             const torch::Tensor& wq, const torch::Tensor& wk, const torch::Tensor& wv,
                             const torch::Tensor& wo, torch::Tensor& k_cache, torch::Tensor& v_cache,
                             const torch::Tensor& cos, const torch::Tensor& sin_signed, int64_t pos,
                             int64_t first, const c10::optional<torch::Tensor>& bq,
                             const c10::optional<torch::Tensor>& bk, const c10::optional<torch::Tensor>& bv,
                             const c10::optional<torch::Tensor>& bo, const c10::optional<torch::Tensor>& q_norm,
                             const c10::optional<torch::Tensor>& k_norm) {
  const char* fn = "attention_step";
  const auto dtype = x.scalar_type();
  const int64_t h = x.numel();
  for (const torch::Tensor* w : {&wq, &wk, &wv, &wo}) check_weight(*w, fn);
  check_vector(x, "x", wq.size(1), wq.scalar_type(), fn);
  check_vector(ln_w, "ln_w", h, dtype, fn);
  for (const torch::Tensor* t : {&std::as_const(k_cache), &std::as_const(v_cache), &cos, &sin_signed})
    check(*t, "a cache or rotary table", dtype, fn);
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), fn,
              ": the caches must both be (nkv, max_len, hd)");
  Shape s{0, k_cache.size(0), k_cache.size(2), k_cache.size(1), pos, first};
  s.nh = wq.size(0) / s.hd;
  TORCH_CHECK(s.hd % 2 == 0 && cos.dim() == 2 && cos.size(1) == s.hd && sin_signed.sizes() == cos.sizes() &&
              cos.size(0) >= s.max_len, fn, ": the rotary tables must be (max_len, hd)");
  TORCH_CHECK(wq.size(0) == s.nh * s.hd && s.nh % s.nkv == 0 && wk.size(0) == s.nkv * s.hd &&
              wv.size(0) == s.nkv * s.hd && wk.size(1) == h && wv.size(1) == h && wo.size(0) == h &&
              wo.size(1) == s.nh * s.hd, fn, ": projection shapes do not match the caches");
  TORCH_CHECK(0 <= first && first <= pos && pos < s.max_len, fn, ": need 0 <= first <= pos < max_len");
  for (auto [t, name, size] : {std::make_tuple(&bq, "bq", s.nh * s.hd), std::make_tuple(&bk, "bk", s.nkv * s.hd),
                               std::make_tuple(&bv, "bv", s.nkv * s.hd), std::make_tuple(&bo, "bo", h),
                               std::make_tuple(&q_norm, "q_norm", s.hd), std::make_tuple(&k_norm, "k_norm", s.hd)})
    if (*t) check_vector(**t, name, size, dtype, fn);
  auto y = torch::empty({h}, x.options());
  by_dtype(x, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    std::vector<T> n(h), q(s.nh * s.hd), k(s.nkv * s.hd), v(s.nkv * s.hd), out(s.nh * s.hd), o(h);
    rms_norm_impl(ptr_of<T>(x), ptr_of<T>(ln_w), n.data(), 1, h, static_cast<float>(eps));
    const int threads = threads_for<T>((wq.size(0) + wk.size(0) + wv.size(0)) * h);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      dot_rows(ptr_of<T>(wq), n.data(), nullptr, q.data(), wq.size(0), h);
      dot_rows(ptr_of<T>(wk), n.data(), nullptr, k.data(), wk.size(0), h);
      dot_rows(ptr_of<T>(wv), n.data(), nullptr, v.data(), wv.size(0), h);
    }
    add_bias(q.data(), bq, s.nh * s.hd);
    add_bias(k.data(), bk, s.nkv * s.hd);
    add_bias(v.data(), bv, s.nkv * s.hd);
    // in place: rms_norm_impl reads each value before it writes it
    if (q_norm) rms_norm_impl(q.data(), ptr_of<T>(*q_norm), q.data(), s.nh, s.hd, static_cast<float>(eps));
    if (k_norm) rms_norm_impl(k.data(), ptr_of<T>(*k_norm), k.data(), s.nkv, s.hd, static_cast<float>(eps));
    attention_impl(q.data(), k.data(), v.data(), ptr_of<T>(k_cache), ptr_of<T>(v_cache),
                   ptr_of<T>(cos) + pos * s.hd, ptr_of<T>(sin_signed) + pos * s.hd, out.data(), s);
    dot_impl(ptr_of<T>(wo), out.data(), nullptr, o.data(), h, wo.size(1));
    add_bias(o.data(), bo, h);
    const T* xp = ptr_of<T>(x);
    T* yp = ptr_of<T>(y);
    for (int64_t c = 0; c < h; ++c) store(yp + c, to_f32(xp[c]) + to_f32(o[c]));
  });
  return y;
}

// The middle of attention_step, for projections computed elsewhere (the quantized kernels):
// q (nh * hd,), k, v (nkv * hd,) in the caches' dtype -> decode_attention's output (nh * hd,).
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache,
                     torch::Tensor& v_cache, const torch::Tensor& cos, const torch::Tensor& sin_signed, int64_t pos,
                     int64_t first) {
  const char* fn = "attend";
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, fn, ": float32 or bfloat16 only");
  for (const torch::Tensor* t : {&q, &k, &v, &std::as_const(k_cache), &std::as_const(v_cache), &cos, &sin_signed})
    check(*t, "a vector, cache or rotary table", dtype, fn);
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), fn, ": the caches must both be (nkv, max_len, hd)");
  Shape s{0, k_cache.size(0), k_cache.size(2), k_cache.size(1), pos, first};
  s.nh = q.numel() / s.hd;
  TORCH_CHECK(s.hd % 2 == 0 && q.numel() == s.nh * s.hd && s.nh % s.nkv == 0 && k.numel() == s.nkv * s.hd &&
                  v.numel() == s.nkv * s.hd && cos.dim() == 2 && cos.size(1) == s.hd &&
                  sin_signed.sizes() == cos.sizes() && cos.size(0) >= s.max_len,
              fn, ": shapes do not match the caches and rotary tables");
  TORCH_CHECK(0 <= first && first <= pos && pos < s.max_len, fn, ": need 0 <= first <= pos < max_len");
  auto out = torch::empty({s.nh * s.hd}, q.options());
  by_dtype(q, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    attention_impl(ptr_of<T>(q), ptr_of<T>(k), ptr_of<T>(v), ptr_of<T>(k_cache), ptr_of<T>(v_cache),
                   ptr_of<T>(cos) + pos * s.hd, ptr_of<T>(sin_signed) + pos * s.hd, ptr_of<T>(out), s);
  });
  return out;
}

std::tuple<torch::Tensor, int64_t> predict(const torch::Tensor& fc1, const torch::Tensor& fc2_t,
                                           const torch::Tensor& r, double threshold, int64_t budget) {
  const char* fn = "predict";
  check_weight(fc1, fn);
  check_weight(fc2_t, fn);
  TORCH_CHECK(fc2_t.size(0) == fc1.size(0) && fc2_t.scalar_type() == fc1.scalar_type(), fn,
              ": fc2_t must be (rank, I) with fc1's rank and dtype");
  check_vector(r, "r", fc1.size(1), fc1.scalar_type(), fn);
  const int64_t rank = fc1.size(0), n = fc2_t.size(1);
  TORCH_CHECK(budget <= n, fn, ": budget ", budget, " exceeds the ", n, " neurons");
  auto score = torch::empty({n}, r.options());
  int64_t rows = 0;
  by_dtype(r, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    std::vector<T> z(rank);
    std::vector<int64_t> all(rank);
    dot_impl(ptr_of<T>(fc1), ptr_of<T>(r), nullptr, z.data(), rank, fc1.size(1));
    for (int64_t j = 0; j < rank; ++j) {
      all[j] = j;
      store(&z[j], std::max(to_f32(z[j]), 0.f));
      rows += to_f32(z[j]) != 0.f;
    }
    axpy_impl(ptr_of<T>(fc2_t), z.data(), all.data(), ptr_of<T>(score), rank, n);  // skips z_j = 0
  });
  auto idx = budget > 0 ? top_indices(score, budget) : indices_over(score, threshold);
  return {idx, rows};
}

int64_t sample_top_p(const torch::Tensor& v, double temperature, double top_p, double u) {
  check_scores(v, "sample_top_p");
  TORCH_CHECK(v.numel() > 0, "sample_top_p: v is empty");
  TORCH_CHECK(temperature > 0, "sample_top_p: temperature must be > 0 (0 is greedy: argmax)");
  TORCH_CHECK(top_p > 0, "sample_top_p: top_p must be > 0, got ", top_p);
  TORCH_CHECK(0 <= u && u < 1, "sample_top_p: u must be in [0, 1), got ", u);
  const float inv_t = static_cast<float>(1.0 / temperature);
  if (v.scalar_type() == at::kFloat) return sample_impl(ptr_of<float>(v), v.numel(), inv_t, top_p, u);
  return sample_impl(ptr_of<bf16_bits>(v), v.numel(), inv_t, top_p, u);
}

void register_decode_ops(pybind11::module& m) {
  m.def("rms_norm", &rms_norm, "see Kernels.rms_norm (reference.py)", py::arg("x"),
        py::arg("w"), py::arg("eps"));
  m.def("argmax", &argmax, "see Kernels.argmax (reference.py)",
        py::arg("v"));
  m.def("sample_top_p", &sample_top_p, "see Kernels.sample_top_p (reference.py)",
        py::arg("v"), py::arg("temperature"), py::arg("top_p"), py::arg("u"));
  m.def("indices_over", &indices_over, "see Kernels.indices_over (reference.py)",
        py::arg("v"), py::arg("t"));
  m.def("attention_step", &attention_step, "see Kernels.attention_step (reference.py)", py::arg("x"),
        py::arg("ln_w"), py::arg("eps"), py::arg("wq"), py::arg("wk"), py::arg("wv"), py::arg("wo"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("cos"), py::arg("sin_signed"), py::arg("pos"),
        py::arg("first"), py::arg("bq") = py::none(), py::arg("bk") = py::none(), py::arg("bv") = py::none(),
        py::arg("bo") = py::none(), py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none());
  m.def("attend", &attend, "decode_attention (reference.py) on projections computed elsewhere", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cos"), py::arg("sin_signed"),
        py::arg("pos"), py::arg("first"));
  m.def("predict", &predict, "see Kernels.predict (reference.py)",
        py::arg("fc1"), py::arg("fc2_t"), py::arg("r"), py::arg("threshold"), py::arg("budget"));
}
