// Whole FFN steps of one token, one call each: ffn_dense, ffn_exact, up_down and
// ffn_predicted (predict, in decode_ops.cpp, then up_down). What each computes, with the
// optional add_to (the layer's residual add, fused) and counts (the neuron firing counts), is
// the docstring of the same method of Kernels in ../reference.py; at batch 1 the fixed cost of
// the five to ten tensor operations a step takes otherwise outweighs a small layer's arithmetic.
//
// Each step is one pass in one parallel region (dense_impl, sparse_impl), so that threads start
// once per step and partial sums are added once.
//
// Weights are neuron-major (N, H): Wg, Wu as stored by HF, Wd_t the transposed down projection.
// Every intermediate value is rounded to the dtype where the separate operations would store
// it, so the results match the PyTorch reference up to summation order.

#include "act.h"
#include "gemv.h"

#include <cmath>
#include <optional>
#include <utility>
#include <string>

namespace {

void check_ffn(const torch::Tensor& wg, const torch::Tensor& wu, const torch::Tensor& wd_t,
               const torch::Tensor& x, const char* fn) {
  for (const torch::Tensor* w : {&wg, &wu, &wd_t}) {
    check_weight(*w, fn);
    TORCH_CHECK(w->sizes() == wu.sizes() && w->scalar_type() == wu.scalar_type(), fn,
                ": the weights must have one shape and dtype");
  }
  check_vector(x, "x", wu.size(1), wu.scalar_type(), fn);
}

void check_add_to(const std::optional<torch::Tensor>& add_to, const torch::Tensor& x, const char* fn) {
  if (add_to) check_vector(*add_to, "add_to", x.size(0), x.scalar_type(), fn);
}

template <typename T>
const T* add_ptr(const std::optional<torch::Tensor>& add_to) {
  return add_to ? ptr_of<T>(*add_to) : nullptr;
}

// counts (N,) int32, one per neuron of the weights; its storage, or null without counts.
int32_t* counts_ptr(const std::optional<torch::Tensor>& counts, int64_t n, const char* fn) {
  if (!counts) return nullptr;
  TORCH_CHECK(counts->device().is_cpu() && counts->is_contiguous() && counts->dim() == 1 &&
                  counts->size(0) == n && counts->scalar_type() == at::kInt,
              fn, ": counts must be a contiguous CPU int32 tensor of shape (", n, ",)");
  return counts->data_ptr<int32_t>();
}

// A sparse FFN step in one pass over the candidate neurons (idx (k,), or every neuron when
// idx is null): a_j = relu(Wg[n_j] x), or a_given[j] when given; h_j = a_j * act(Wu[n_j] x)
// for the a_j != 0 (the others' up rows are not read); y = sum of h_j Wd_t[n_j] over h_j != 0.
// One parallel region for the whole step: threads split the candidates, and each takes its
// share in blocks of kBlock (so that its buffers fit on the stack): the block's gate rows, then
// the up rows of its live neurons, then the down rows of its active ones, summed into the
// thread's fp32 partial y. Returns (up rows read, active), and counts the active neurons in
// counts (when given; atomically, since idx may repeat a neuron in another thread's share).
// Values are rounded to T where separate tensor operations would store them.
template <typename T>
std::pair<int64_t, int64_t> sparse_impl(const T* wg, const T* a_given, const T* wu, const T* wd_t,
                                        const T* x, const int64_t* idx, int64_t k, int64_t h,
                                        bool relu_up, T* y, const T* add_to, int32_t* counts) {
  constexpr int64_t kBlock = 1024;
  const int threads = threads_for<T>(k * h);
  std::vector<float> partial(static_cast<size_t>(threads) * h, 0.f);
  int64_t up_rows = 0, active = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(+ : up_rows, active)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const auto [r0, r1] = share(k, t, nt, 4);
    float* acc = partial.data() + static_cast<size_t>(t) * h;
    int64_t live[kBlock];
    float a_live[kBlock], h_live[kBlock];
    const T *r[4], *next[4];
    float out[4];
    for (int64_t b = r0; b < r1; b += kBlock) {
      const int64_t be = std::min(b + kBlock, r1);
      int64_t m = 0;  // the block's neurons with a != 0, compacted without branches
      for (int64_t j = b; j < be; j += 4) {
        if (a_given == nullptr) {
          group(wg, idx, j, std::min(be + kBlock, r1), h, r, next);
          dot4(r, next, x, h, out);
        }
        for (int u = 0; u < 4 && j + u < be; ++u) {
          const float a = a_given ? to_f32(a_given[j + u]) : std::max(rounded<T>(out[u]), 0.f);
          live[m] = idx ? idx[j + u] : j + u;
          a_live[m] = a;
          m += a != 0.f;
        }
      }
      up_rows += m;
      for (int64_t j = 0; j < m; j += 4) {
        group(wu, live, j, m, h, r, next);
        dot4(r, next, x, h, out);
        for (int u = 0; u < 4 && j + u < m; ++u) {
          const float v = rounded<T>(out[u]);
          h_live[j + u] = rounded<T>(a_live[j + u] * (relu_up ? std::max(v, 0.f) : v));
        }
      }
      int64_t n = 0;  // the neurons with h != 0
      for (int64_t j = 0; j < m; ++j) {
        live[n] = live[j];
        h_live[n] = h_live[j];
        n += h_live[j] != 0.f;
      }
      active += n;
      if (counts)
        for (int64_t j = 0; j < n; ++j) {
#pragma omp atomic
          ++counts[live[j]];
        }
      for (int64_t j = 0; j < n; j += 4) {
        float w[4];
        group(wd_t, live, j, n, h, r, next);
        for (int u = 0; u < 4; ++u) w[u] = j + u < n ? h_live[j + u] : 0.f;
        axpy4(acc, w, r, next, h);
      }
    }
  }
  store_sum(partial, threads, h, y, add_to);
  return {up_rows, active};
}

// The dense step in one pass, like sparse_impl but over every neuron: per group of four, the
// gate and up rows, then the down rows (all of them: dense reads every row), summed into the
// thread's fp32 partial y. Returns the number of non-zero h_i, and counts them in counts when
// given (each thread its own rows).
template <typename T>
int64_t dense_impl(const T* wg, const T* wu, const T* wd_t, const T* x, int64_t n, int64_t h, Act act,
                   bool act_up, T* y, const T* add_to, int32_t* counts) {
  const int threads = threads_for<T>(n * h);
  std::vector<float> partial(static_cast<size_t>(threads) * h, 0.f);
  int64_t active = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(+ : active)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const auto [r0, r1] = share(n, t, nt, 4);
    float* acc = partial.data() + static_cast<size_t>(t) * h;
    const T *r[4], *next[4];
    float g[4], u[4], w[4];
    for (int64_t j = r0; j < r1; j += 4) {
      group(wg, static_cast<const int64_t*>(nullptr), j, r1, h, r, next);
      dot4(r, next, x, h, g);
      group(wu, static_cast<const int64_t*>(nullptr), j, r1, h, r, next);
      dot4(r, next, x, h, u);
      for (int q = 0; q < 4; ++q) {
        w[q] = j + q < r1 ? dense_h<T>(act, act_up, rounded<T>(g[q]), rounded<T>(u[q])) : 0.f;
        active += w[q] != 0.f;
        if (counts && w[q] != 0.f) ++counts[j + q];
      }
      group(wd_t, static_cast<const int64_t*>(nullptr), j, r1, h, r, next);
      axpy4(acc, w, r, next, h);
    }
  }
  store_sum(partial, threads, h, y, add_to);
  return active;
}

}  // namespace

std::tuple<torch::Tensor, int64_t, int64_t> ffn_exact(const torch::Tensor& wg, const torch::Tensor& wu,
                                                      const torch::Tensor& wd_t, const torch::Tensor& x,
                                                      bool relu_up, const std::optional<torch::Tensor>& add_to,
                                                      const std::optional<torch::Tensor>& counts) {
  check_ffn(wg, wu, wd_t, x, "ffn_exact");
  check_add_to(add_to, x, "ffn_exact");
  const int64_t n = wu.size(0), h = wu.size(1);
  int32_t* count = counts_ptr(counts, n, "ffn_exact");
  auto y = torch::empty({h}, x.options());
  std::pair<int64_t, int64_t> rows_active;
  by_dtype(x, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    rows_active = sparse_impl(ptr_of<T>(wg), static_cast<const T*>(nullptr), ptr_of<T>(wu),
                              ptr_of<T>(wd_t), ptr_of<T>(x), static_cast<const int64_t*>(nullptr), n, h,
                              relu_up, ptr_of<T>(y), add_ptr<T>(add_to), count);
  });
  return {y, rows_active.first, rows_active.second};
}

std::tuple<torch::Tensor, int64_t, int64_t> up_down(const torch::Tensor& wu, const torch::Tensor& wd_t,
                                                    const torch::Tensor& x, const torch::Tensor& idx,
                                                    const std::optional<torch::Tensor>& a_given,
                                                    bool relu_up, const std::optional<torch::Tensor>& wg,
                                                    const std::optional<torch::Tensor>& add_to,
                                                    const std::optional<torch::Tensor>& counts) {
  TORCH_CHECK(a_given || wg, "up_down: give a, or Wg to compute a = relu(Wg[idx] x)");
  check_ffn(wg ? *wg : wu, wu, wd_t, x, "up_down");
  check_idx(idx, wu.size(0), "up_down");
  const int64_t k = idx.size(0);
  if (a_given) check_vector(*a_given, "a", k, wu.scalar_type(), "up_down");
  check_add_to(add_to, x, "up_down");
  int32_t* count = counts_ptr(counts, wu.size(0), "up_down");
  auto y = torch::empty({wu.size(1)}, wu.options());
  std::pair<int64_t, int64_t> rows_active;
  by_dtype(x, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    rows_active = sparse_impl(wg ? ptr_of<T>(*wg) : static_cast<const T*>(nullptr),
                              a_given ? ptr_of<T>(*a_given) : static_cast<const T*>(nullptr), ptr_of<T>(wu),
                              ptr_of<T>(wd_t), ptr_of<T>(x), idx.data_ptr<int64_t>(), k, wu.size(1), relu_up,
                              ptr_of<T>(y), add_ptr<T>(add_to), count);
  });
  return {y, rows_active.first, rows_active.second};
}

std::tuple<torch::Tensor, int64_t> ffn_dense(const torch::Tensor& wg, const torch::Tensor& wu,
                                             const torch::Tensor& wd_t, const torch::Tensor& x,
                                             const std::string& act_name, bool act_up,
                                             const std::optional<torch::Tensor>& add_to,
                                             const std::optional<torch::Tensor>& counts) {
  check_ffn(wg, wu, wd_t, x, "ffn_dense");
  check_add_to(add_to, x, "ffn_dense");
  const Act act = act_of(act_name);
  const int64_t n = wu.size(0), h = wu.size(1);
  int32_t* count = counts_ptr(counts, n, "ffn_dense");
  auto y = torch::empty({h}, x.options());
  int64_t active = 0;
  by_dtype(x, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    active = dense_impl(ptr_of<T>(wg), ptr_of<T>(wu), ptr_of<T>(wd_t), ptr_of<T>(x), n, h, act, act_up,
                        ptr_of<T>(y), add_ptr<T>(add_to), count);
  });
  return {y, active};
}

std::tuple<torch::Tensor, int64_t> predict(const torch::Tensor& fc1, const torch::Tensor& fc2_t,
                                           const torch::Tensor& r, double threshold, int64_t budget);

std::tuple<torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t> ffn_predicted(
    const torch::Tensor& fc1, const torch::Tensor& fc2_t, const torch::Tensor& r, double threshold,
    int64_t budget, const torch::Tensor& wg, const torch::Tensor& wu, const torch::Tensor& wd_t,
    const torch::Tensor& x, bool relu_up, const std::optional<torch::Tensor>& add_to,
    const std::optional<torch::Tensor>& counts) {
  auto [idx, rows] = predict(fc1, fc2_t, r, threshold, budget);
  auto [y, up_rows, active] = up_down(wu, wd_t, x, idx, std::nullopt, relu_up, wg, add_to, counts);
  return {y, idx, rows, up_rows, active};
}

void register_ffn_ops(pybind11::module& m) {
  m.def("ffn_dense", &ffn_dense, "see Kernels.ffn_dense (reference.py)", py::arg("wg"), py::arg("wu"),
        py::arg("wd_t"), py::arg("x"), py::arg("act"), py::arg("act_up"), py::arg("add_to") = py::none(),
        py::arg("counts") = py::none());
  m.def("ffn_exact", &ffn_exact, "see Kernels.ffn_exact (reference.py)",
        py::arg("wg"), py::arg("wu"), py::arg("wd_t"), py::arg("x"), py::arg("relu_up"),
        py::arg("add_to") = py::none(), py::arg("counts") = py::none());
  m.def("up_down", &up_down, "see Kernels.up_down (reference.py)",
        py::arg("wu"), py::arg("wd_t"), py::arg("x"), py::arg("idx"), py::arg("a"), py::arg("relu_up"),
        py::arg("wg") = py::none(), py::arg("add_to") = py::none(), py::arg("counts") = py::none());
  m.def("ffn_predicted", &ffn_predicted,
        "see Kernels.ffn_predicted (reference.py)",
        py::arg("fc1"), py::arg("fc2_t"), py::arg("r"), py::arg("threshold"), py::arg("budget"), py::arg("wg"),
        py::arg("wu"), py::arg("wd_t"), py::arg("x"), py::arg("relu_up"), py::arg("add_to") = py::none(),
        py::arg("counts") = py::none());
}
