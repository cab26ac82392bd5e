// Whole FFN steps of one token, one call each: at batch 1 the fixed cost of the five to ten
// tensor operations a step takes otherwise outweighs the arithmetic of a small layer.
//
//   ffn_dense(Wg, Wu, Wd_t, x, act, act_up) -> (y, active)
//       h = act(Wg x) * (act(Wu x) if act_up else Wu x), y = h Wd_t over every row of Wd_t,
//       active = #{i : h_i != 0}; act: "relu", "silu" (x sigmoid(x)) or "gelu" (erf form)
//   ffn_exact(Wg, Wu, Wd_t, x, relu_up) -> (y, computed, active)
//       g = Wg x, S = {i : g_i > 0} (computed = |S|), then up_down on S with a = g[S]: equal to
//       ffn_dense with act = relu, reading only the rows of S in Wu and of the active in Wd_t;
//       in one pass, the scattered up and down rows of each block of neurons read right after
//       its gate rows
//   up_down(Wu, Wd_t, x, idx, a, relu_up, Wg) -> (y, up_rows, active)
//       a sparse FFN step on the neurons idx once their activated gate values a (k,) are known,
//       or with a = None, a = relu(Wg[idx] . x): h_j = a_j * act(Wu[idx_j] . x), act = relu or
//       identity, y = rows_axpy(Wd_t, h, idx), active = #{j : h_j != 0}; the up row of a
//       neuron with a_j = 0 is not read (its h_j is 0 anyway): up_rows = #{j : a_j != 0}
//
// Weights are neuron-major (N, H): Wg, Wu as stored by HF, Wd_t the transposed down projection.
// Every intermediate value is rounded to the dtype where the separate operations would store
// it, so the results match the PyTorch compositions in kernels.py up to summation order.

#include "gemv.h"

#include <cmath>
#include <optional>
#include <utility>
#include <string>

namespace {

using turbo_demo::rounded;

enum class Act { kRelu, kSilu, kGelu };

Act act_of(const std::string& name) {
  if (name == "relu") return Act::kRelu;
  if (name == "silu") return Act::kSilu;
  TORCH_CHECK(name == "gelu", "ffn_dense: act must be relu, silu or gelu, got ", name);
  return Act::kGelu;
}

inline float apply(Act act, float v) {
  switch (act) {
    case Act::kRelu: return std::max(v, 0.f);
    case Act::kSilu: return v / (1.f + std::exp(-v));
    default: return 0.5f * v * (1.f + std::erf(v * 0.70710678f));
  }
}

void check_ffn(const torch::Tensor& wg, const torch::Tensor& wu, const torch::Tensor& wd_t,
               const torch::Tensor& x, const char* fn) {
  for (const torch::Tensor* w : {&wg, &wu, &wd_t}) {
    check_weight(*w, fn);
    TORCH_CHECK(w->sizes() == wu.sizes() && w->scalar_type() == wu.scalar_type(), fn,
                ": the weights must have one shape and dtype");
  }
  check_vector(x, "x", wu.size(1), wu.scalar_type(), fn);
}

// h_j = a_j * act(Wu[idx_j] x) and y = sum_j h_j Wd_t[idx_j]; with wg, first a = relu(Wg[idx] x).
// A neuron with a_j = 0 has h_j = 0 whatever its up value: its row of Wu is not read. a is a (k,)
// buffer; returns (rows of Wu read, number of non-zero h_j).
template <typename T>
std::pair<int64_t, int64_t> up_down_impl(const T* wu, const T* wd_t, const T* x, const int64_t* idx,
                                         int64_t k, int64_t h, const T* wg, T* a, T* y, bool relu_up) {
  if (wg != nullptr) {  // a = relu(Wg[idx] x), rounded as rows_dot rounds it
    dot_impl(wg, x, idx, a, k, h);
    for (int64_t j = 0; j < k; ++j) store(a + j, std::max(to_f32(a[j]), 0.f));
  }
  std::vector<int64_t> live(k);  // the neurons with a_j != 0, compacted without branches
  std::vector<T> a_live(k), hv(k);
  int64_t n = 0;
  for (int64_t j = 0; j < k; ++j) {
    live[n] = idx[j];
    a_live[n] = a[j];
    n += to_f32(a[j]) != 0.f;
  }
  dot_impl(wu, x, live.data(), hv.data(), n, h);  // h = u, rounded as rows_dot rounds it
  int64_t active = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float u = to_f32(hv[j]);
    store(&hv[j], to_f32(a_live[j]) * (relu_up ? std::max(u, 0.f) : u));
    active += to_f32(hv[j]) != 0.f;
  }
  axpy_impl(wd_t, hv.data(), live.data(), y, n, h);
  return {n, active};
}

// The exact step in one pass: threads split the neurons; each reads its gate rows in blocks of
// kBlock and, right after each block, the up rows of the block's gate-active neurons and the
// down rows of those with h != 0 (summed into the thread's fp32 partial y), so that the
// scattered reads run while the gate stream is still going. Returns (computed, active).
template <typename T>
std::pair<int64_t, int64_t> exact_impl(const T* wg, const T* wu, const T* wd_t, const T* x, int64_t n,
                                       int64_t h, bool relu_up, T* y) {
  constexpr int64_t kBlock = 64;
  const int threads = threads_for(n * h);
  std::vector<float> partial(static_cast<size_t>(threads) * h, 0.f);
  int64_t computed = 0, active = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(+ : computed, active)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t r0 = n * t / nt / 4 * 4, r1 = t + 1 == nt ? n : n * (t + 1) / nt / 4 * 4;
    float* acc = partial.data() + static_cast<size_t>(t) * h;
    int64_t live[kBlock];
    float a_live[kBlock], h_live[kBlock];
    const T *r[4], *next[4];
    float out[4];
    for (int64_t b = r0; b < r1; b += kBlock) {
      const int64_t be = std::min(b + kBlock, r1);
      int64_t m = 0;  // the block's neurons with g > 0, compacted without branches
      for (int64_t j = b; j < be; j += 4) {
        group(wg, static_cast<const int64_t*>(nullptr), j, std::min(be + kBlock, r1), h, r, next);
        dot4(r, next, x, h, out);
        for (int u = 0; u < 4 && j + u < be; ++u) {
          const float g = rounded<T>(out[u]);
          live[m] = j + u;
          a_live[m] = g;
          m += g > 0.f;
        }
      }
      computed += m;
      for (int64_t j = 0; j < m; j += 4) {
        group(wu, live, j, m, h, r, next);
        dot4(r, next, x, h, out);
        for (int u = 0; u < 4 && j + u < m; ++u) {
          const float v = rounded<T>(out[u]);
          h_live[j + u] = rounded<T>(a_live[j + u] * (relu_up ? std::max(v, 0.f) : v));
        }
      }
      int64_t k = 0;  // the neurons with h != 0
      for (int64_t j = 0; j < m; ++j) {
        live[k] = live[j];
        h_live[k] = h_live[j];
        k += h_live[j] != 0.f;
      }
      active += k;
      for (int64_t j = 0; j < k; j += 4) {
        float w[4];
        group(wd_t, live, j, k, h, r, next);
        for (int u = 0; u < 4; ++u) w[u] = j + u < k ? h_live[j + u] : 0.f;
        axpy4(acc, w, r, next, h);
      }
    }
  }
  for (int64_t c = 0; c < h; ++c) {
    float s = 0.f;
    for (int t = 0; t < threads; ++t) s += partial[static_cast<size_t>(t) * h + c];
    store(y + c, s);
  }
  return {computed, active};
}

// Calls fn with a null T* of the tensor's dtype (float or bf16_bits) to select the instantiation.
template <typename Fn>
void by_dtype(const torch::Tensor& t, Fn fn) {
  if (t.scalar_type() == at::kFloat)
    fn(static_cast<float*>(nullptr));
  else
    fn(static_cast<bf16_bits*>(nullptr));
}

}  // namespace

std::tuple<torch::Tensor, int64_t> ffn_dense(const torch::Tensor& wg, const torch::Tensor& wu,
                                             const torch::Tensor& wd_t, const torch::Tensor& x,
                                             const std::string& act_name, bool act_up) {
  check_ffn(wg, wu, wd_t, x, "ffn_dense");
  const Act act = act_of(act_name);
  const int64_t n = wu.size(0), h = wu.size(1);
  auto y = torch::empty({h}, x.options());
  int64_t active = 0;
  by_dtype(x, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    std::vector<T> g(n), hv(n);
    dot_impl(ptr_of<T>(wg), ptr_of<T>(x), nullptr, g.data(), n, h);
    dot_impl(ptr_of<T>(wu), ptr_of<T>(x), nullptr, hv.data(), n, h);
    for (int64_t i = 0; i < n; ++i) {
      const float u = to_f32(hv[i]);
      const float up = act_up ? rounded<T>(apply(act, u)) : u;
      store(&hv[i], rounded<T>(apply(act, to_f32(g[i]))) * up);
      active += to_f32(hv[i]) != 0.f;
    }
    axpy_impl(ptr_of<T>(wd_t), hv.data(), nullptr, ptr_of<T>(y), n, h);  // every row: dense
  });
  return {y, active};
}

std::tuple<torch::Tensor, int64_t, int64_t> ffn_exact(const torch::Tensor& wg, const torch::Tensor& wu,
                                                      const torch::Tensor& wd_t, const torch::Tensor& x,
                                                      bool relu_up) {
  check_ffn(wg, wu, wd_t, x, "ffn_exact");
  const int64_t n = wu.size(0), h = wu.size(1);
  auto y = torch::empty({h}, x.options());
  std::pair<int64_t, int64_t> counts;
  by_dtype(x, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    counts = exact_impl(ptr_of<T>(wg), ptr_of<T>(wu), ptr_of<T>(wd_t), ptr_of<T>(x), n, h, relu_up,
                        ptr_of<T>(y));
  });
  return {y, counts.first, counts.second};
}

std::tuple<torch::Tensor, int64_t, int64_t> up_down(const torch::Tensor& wu, const torch::Tensor& wd_t,
                                                    const torch::Tensor& x, const torch::Tensor& idx,
                                                    const std::optional<torch::Tensor>& a_given,
                                                    bool relu_up, const std::optional<torch::Tensor>& wg) {
  TORCH_CHECK(a_given || wg, "up_down: give a, or Wg to compute a = relu(Wg[idx] x)");
  check_ffn(wg ? *wg : wu, wu, wd_t, x, "up_down");
  check_idx(idx, wu.size(0), "up_down");
  const int64_t k = idx.size(0);
  if (a_given) check_vector(*a_given, "a", k, wu.scalar_type(), "up_down");
  auto a = a_given ? *a_given : torch::empty({k}, wu.options());
  auto y = torch::empty({wu.size(1)}, wu.options());
  std::pair<int64_t, int64_t> rows_active;
  by_dtype(x, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    rows_active = up_down_impl(ptr_of<T>(wu), ptr_of<T>(wd_t), ptr_of<T>(x), idx.data_ptr<int64_t>(), k,
                               wu.size(1), a_given ? static_cast<const T*>(nullptr) : ptr_of<T>(*wg),
                               ptr_of<T>(a), ptr_of<T>(y), relu_up);
  });
  return {y, rows_active.first, rows_active.second};
}

void register_ffn_ops(pybind11::module& m) {
  m.def("ffn_dense", &ffn_dense, "(y, active): the dense FFN of one token", py::arg("wg"), py::arg("wu"),
        py::arg("wd_t"), py::arg("x"), py::arg("act"), py::arg("act_up"));
  m.def("ffn_exact", &ffn_exact, "(y, computed, active): the dReLU/ReGLU FFN on the gate-active neurons",
        py::arg("wg"), py::arg("wu"), py::arg("wd_t"), py::arg("x"), py::arg("relu_up"));
  m.def("up_down", &up_down, "(y, up_rows, active): h = a * act(Wu[idx] x), y = sum_j h_j Wd_t[idx_j]",
        py::arg("wu"), py::arg("wd_t"), py::arg("x"), py::arg("idx"), py::arg("a"), py::arg("relu_up"),
        py::arg("wg") = py::none());
}
