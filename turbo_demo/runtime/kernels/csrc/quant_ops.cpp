// Block-quantized weights (runtime/quant.py: Q8_0 "int8" and Q4_0 "int4" blocks of 32, one row
// per neuron): q_dot (rows_dot and matvec), q_matvecs (several matvecs on one x), q_axpy
// (rows_axpy and vecmat), q_ffn (the dense and sparse FFN steps) and q_predict. What each
// computes is the docstring of the same method of Kernels in ../reference.py on a QWeight: the
// input of a dot product is quantized per block to Q8_0 first (fp32 scale d = amax / 127,
// q = round-half-even(x * (1 / d)), as quant.py's quantize_activation, bit for bit), so that
// each block's dot product is an exact integer sum (AVX-512 VNNI's vpdpbusd where the CPU has
// it, else AVX2's vpmaddubsw + vpmaddwd), scaled in
// fp32: int8 d_w d_x sum(q_w q_x), int4 d_w d_x (sum(q_w q_x) - 8 sum(q_x)). A weighted sum
// of rows (a sparse step's down projection) reads h in fp32 and dequantizes each row on the fly;
// a dense step given W_down as stored (wd) quantizes h and takes dot products instead. Results
// match the reference up to fp32 summation order; values are rounded to the activations' dtype T
// (fp32 or bf16) where the reference's tensor operations store them.

#include "quant_blocks.h"

#include <optional>
#include <string>

namespace {

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

// y (h,) = sum_j coef_j Wt[rows_j] over the k given rows, the threads split as gemv.h's
// split_rows says (and as its axpy_impl splits bf16 rows): over the rows, each thread summing into
// its own fp32 partial sums added up at the end; or, for few rows of many columns (the predictor's
// fc2 over its live hidden units), over the columns at multiples of kColumnAlign values, each
// thread reading its part of every row and storing its part of y.
constexpr int64_t kColumnAlign = 16 * kQBlock;

template <typename T>
void axpy_rows(const QW& wt, const std::vector<float>& coef, const std::vector<int64_t>& rows, T* y) {
  const int64_t k = static_cast<int64_t>(rows.size());
  const int threads = threads_for<uint8_t>(k * wt.row_bytes);
  if (threads > 1 && !split_rows(threads, k, wt.cols)) {
#pragma omp parallel num_threads(threads)
    {
      const auto [c0, c1] = share(wt.cols, omp_get_thread_num(), omp_get_num_threads(), kColumnAlign);
      const int64_t skip = c0 / kQBlock * block_bytes(wt.fmt);  // c0 is a multiple of kQBlock
      const QW part{wt.data + skip, wt.rows, wt.row_bytes, c1 - c0, wt.fmt};
      std::vector<const uint8_t*> mine;
      for (int64_t j = 0; j < k; ++j) mine.push_back(part.row(rows[j]));
      std::vector<float> acc((c1 - c0 + kQBlock - 1) / kQBlock * kQBlock, 0.f);
      qaxpy_list(part, mine, coef, acc.data());
      for (int64_t c = c0; c < c1; ++c) store(y + c, acc[c - c0]);
    }
    return;
  }
  const int64_t hp = (wt.cols + kQBlock - 1) / kQBlock * kQBlock;
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
    if (a_given)
      for (int64_t j = j0; j < j1; ++j) gate[j - j0] = to_f32(a_given[j]);
    else
      qdot_range(wg, j0, j1, [&](int64_t j) { return wg.row(pick(idx, j)); }, x, [&](int64_t j, float v) {
        const float g = rounded<T>(v);
        gate[j - j0] = dense ? g : std::max(g, 0.f);
      });
    std::vector<int64_t> up;  // the candidates whose up row is read
    for (int64_t j = j0; j < j1; ++j)
      if (dense || gate[j - j0] != 0.f) up.push_back(j);
    std::vector<const uint8_t*> down;
    std::vector<float> hs;
    const int64_t m = static_cast<int64_t>(up.size());
    qdot_range(wu, 0, m, [&](int64_t i) { return wu.row(pick(idx, up[i])); }, x, [&](int64_t i, float uv) {
      const int64_t j = up[i], n = pick(idx, j);
      const float u = rounded<T>(uv);
      float hv;
      if (dense) {
        hv = dense_h<T>(act, act_up, gate[j - j0], u);
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
    });
    up_rows += m;
    qaxpy_list(wd, down, hs, partial.data() + static_cast<size_t>(t) * hp);
  }
  reduce(partial, threads, hp, wd.cols, y, add_to);
  return {up_rows, active};
}

// The dense step with W_down as HF stores it (wd: H rows of I values, llama.cpp's layout): each
// thread computes h for its share of the neurons from their gate and up rows; h (rounded to T)
// is quantized per block as a GEMV's input (quantize_act, once, by one thread); then each
// thread computes its share of the H outputs as dot products of wd's rows with Q8(h). The down
// projection then runs at the speed of the gate's and up's integer dot products, where the
// neuron-major axpy converts every weight to fp32 (half the bytes per second at int4).
// Returns the number of non-zero h_i, counted in counts when given (each thread its own rows).
template <typename T>
int64_t qffn_dense_rows(const QW& wg, const QW& wu, const QW& wd, const QAct& x, Act act, bool act_up, T* y,
                        const T* add_to, int32_t* counts) {
  const int64_t n = wu.rows;
  std::vector<T> hs(n);
  QAct hq;
  const int threads = threads_for<uint8_t>(3 * n * wu.row_bytes);
  int64_t active = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(+ : active)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const auto [j0, j1] = share(n, t, nt, 4);
    std::vector<float> gate(j1 - j0);
    qdot_range(wg, j0, j1, [&](int64_t j) { return wg.row(j); }, x,
               [&](int64_t j, float v) { gate[j - j0] = rounded<T>(v); });
    qdot_range(wu, j0, j1, [&](int64_t j) { return wu.row(j); }, x, [&](int64_t j, float uv) {
      const float hv = dense_h<T>(act, act_up, gate[j - j0], rounded<T>(uv));
      store(hs.data() + j, hv);
      if (hv != 0.f) {
        ++active;
        if (counts) ++counts[j];
      }
    });
#pragma omp barrier
#pragma omp single
    hq = quantize_act(hs.data(), n, wd.fmt);
    const auto [c0, c1] = share(wd.rows, t, nt, 4);
    qdot_range(wd, c0, c1, [&](int64_t c) { return wd.row(c); }, hq, [&](int64_t c, float v) {
      store(y + c, add_to ? to_f32(add_to[c]) + rounded<T>(v) : v);
    });
  }
  return active;
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
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      const auto [j0, j1] = share(k, omp_get_thread_num(), omp_get_num_threads(), 4);
      qdot_range(qw, j0, j1, [&](int64_t j) { return qw.row(pick(ip, j)); }, xa,
                 [&](int64_t j, float v) { store(yp + j, v); });
    }
  });
  return y;
}

// q_dot of several weights on one x (attention's q, k and v): x quantized once, the rows of all
// the weights in one parallel region (one wake-up of the threads instead of one per weight).
std::vector<torch::Tensor> q_matvecs(const std::vector<torch::Tensor>& ws, int64_t fmt, int64_t cols,
                                     const torch::Tensor& x) {
  check_act(x, cols, "x", "q_matvecs");
  std::vector<QW> qws;  // one format and width (qw_of checks each), so qws[0] describes every row
  std::vector<torch::Tensor> ys;
  for (const auto& w : ws) {
    qws.push_back(qw_of(w, fmt, cols, "q_matvecs"));
    ys.push_back(torch::empty({qws.back().rows}, x.options()));
  }
  if (qws.empty()) return ys;
  by_dtype(x, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    std::vector<const uint8_t*> rows;  // every row of every weight, in order, and where its result goes
    std::vector<T*> outs;
    for (size_t m = 0; m < qws.size(); ++m)
      for (int64_t i = 0; i < qws[m].rows; ++i) {
        rows.push_back(qws[m].row(i));
        outs.push_back(ptr_of<T>(ys[m]) + i);
      }
    const QAct xa = quantize_act(ptr_of<T>(x), cols, qws[0].fmt);
    const int64_t k = static_cast<int64_t>(rows.size());
    const int threads = threads_for<uint8_t>(k * qws[0].row_bytes);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      const auto [j0, j1] = share(k, omp_get_thread_num(), omp_get_num_threads(), 4);
      qdot_range(qws[0], j0, j1, [&](int64_t j) { return rows[j]; }, xa, [&](int64_t j, float v) { store(outs[j], v); });
    }
  });
  return ys;
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
                                                  const std::optional<torch::Tensor>& counts,
                                                  const std::optional<torch::Tensor>& wd) {
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
  TORCH_CHECK(!wd || dense, fn, ": W_down's rows (wd) are read by a dense step only");
  const std::optional<QW> rows = wd ? std::optional<QW>(qw_of(*wd, fmt, u.rows, fn)) : std::nullopt;
  TORCH_CHECK(!rows || rows->rows == cols, fn, ": wd must be (", cols, ", ", u.rows, "), W_down as HF stores it");
  const Act act = act_of(act_name);
  auto y = torch::empty({cols}, x.options());
  std::pair<int64_t, int64_t> rows_active;
  by_dtype(x, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    const QAct xa = quantize_act(ptr_of<T>(x), cols, g.fmt);
    if (rows) {
      const int64_t active = qffn_dense_rows(g, u, *rows, xa, act, act_up, ptr_of<T>(y),
                                             add_to ? ptr_of<T>(*add_to) : static_cast<const T*>(nullptr), cp);
      rows_active = {u.rows, active};
      return;
    }
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
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      const auto [j0, j1] = share(w1.rows, omp_get_thread_num(), omp_get_num_threads(), 4);
      qdot_range(w1, j0, j1, [&](int64_t j) { return w1.row(j); }, ra,
                 [&](int64_t j, float v) { all[j] = std::max(rounded<T>(v), 0.f); });
    }
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
  m.def("q_matvecs", &q_matvecs, "q_dot (matvec) of each of several QWeights on one x", py::arg("ws"),
        py::arg("fmt"), py::arg("cols"), py::arg("x"));
  m.def("q_axpy", &q_axpy, "see Kernels.rows_axpy / vecmat on a QWeight (reference.py)", py::arg("wt"),
        py::arg("fmt"), py::arg("cols"), py::arg("h"), py::arg("idx") = py::none());
  m.def("q_ffn", &q_ffn, "see Kernels.ffn_dense / ffn_exact / up_down on QWeights (reference.py)", py::arg("wg"),
        py::arg("wu"), py::arg("wd_t"), py::arg("fmt"), py::arg("cols"), py::arg("x"), py::arg("idx") = py::none(),
        py::arg("a") = py::none(), py::arg("act") = "relu", py::arg("act_up") = false, py::arg("dense") = false,
        py::arg("add_to") = py::none(), py::arg("counts") = py::none(), py::arg("wd") = py::none());
  m.def("q_predict", &q_predict, "see Kernels.predict on QWeights (reference.py)", py::arg("fc1"), py::arg("fmt1"),
        py::arg("fc2_t"), py::arg("fmt2"), py::arg("n"), py::arg("r"), py::arg("threshold"), py::arg("budget"));
}
