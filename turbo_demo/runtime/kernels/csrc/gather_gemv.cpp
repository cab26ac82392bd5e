// Gather-GEMV for a sparse FFN, rows_dot and rows_axpy over a selection idx of neurons, and
// their dense forms over every row, matvec and vecmat (the dense FFN and the attention
// projections of decoding). What each computes is the docstring of the same method of Kernels
// in ../reference.py. Here every one reads the selected rows of a neuron-major weight straight
// from the weight (no gathered copy), each a contiguous run of H values; rows_axpy also skips
// the rows whose h_j is zero. Sums are accumulated in fp32 (a bf16 value b converts exactly as
// float(bits(b) << 16)), and bf16 results are rounded to nearest-even once at the end. The loops
// live in gemv.h; this file registers the module.

#include "gemv.h"

namespace {

// y (k,) = dot_impl over the rows idx of w (null: every row), in w's dtype.
torch::Tensor dot(const torch::Tensor& w, const torch::Tensor& x, const int64_t* idx, int64_t k) {
  auto y = torch::empty({k}, w.options());
  by_dtype(w, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    dot_impl(ptr_of<T>(w), ptr_of<T>(x), idx, ptr_of<T>(y), k, w.size(1));
  });
  return y;
}

// y (H,) = axpy_impl over the rows idx of wt (null: every row), in wt's dtype.
torch::Tensor axpy(const torch::Tensor& wt, const torch::Tensor& hv, const int64_t* idx, int64_t k) {
  auto y = torch::empty({wt.size(1)}, wt.options());
  by_dtype(wt, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    axpy_impl(ptr_of<T>(wt), ptr_of<T>(hv), idx, ptr_of<T>(y), k, wt.size(1));
  });
  return y;
}

}  // namespace

torch::Tensor rows_dot(const torch::Tensor& w, const torch::Tensor& x, const torch::Tensor& idx) {
  check_weight(w, "rows_dot");
  check_vector(x, "x", w.size(1), w.scalar_type(), "rows_dot");
  check_idx(idx, w.size(0), "rows_dot");
  return dot(w, x, idx.data_ptr<int64_t>(), idx.size(0));
}

torch::Tensor rows_axpy(const torch::Tensor& wt, const torch::Tensor& hv, const torch::Tensor& idx) {
  check_weight(wt, "rows_axpy");
  check_idx(idx, wt.size(0), "rows_axpy");
  check_vector(hv, "h", idx.size(0), wt.scalar_type(), "rows_axpy");
  return axpy(wt, hv, idx.data_ptr<int64_t>(), idx.size(0));
}

torch::Tensor matvec(const torch::Tensor& w, const torch::Tensor& x) {
  check_weight(w, "matvec");
  check_vector(x, "x", w.size(1), w.scalar_type(), "matvec");
  return dot(w, x, nullptr, w.size(0));
}

torch::Tensor vecmat(const torch::Tensor& hv, const torch::Tensor& wt) {
  check_weight(wt, "vecmat");
  check_vector(hv, "h", wt.size(0), wt.scalar_type(), "vecmat");
  return axpy(wt, hv, nullptr, wt.size(0));
}

void register_decode_ops(pybind11::module& m);  // decode_ops.cpp: norms, attention, selection
void register_ffn_ops(pybind11::module& m);     // ffn_ops.cpp: whole FFN steps
void register_quant_ops(pybind11::module& m);   // quant_ops.cpp: the same on block-quantized weights
void register_prefill_linear(pybind11::module& m);  // prefill_linear.cpp: a prompt's x W^T on blocks
void register_prefill_times(pybind11::module& m);   // prefill_times.cpp: a prompt's h Wt on blocks
void register_prefill_wide(pybind11::module& m);    // prefill_wide.cpp: a prompt's x W^T, bf16 widened

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU decode kernels: gather-GEMV for sparse FFNs, their dense forms, fused decode ops";
  m.def("rows_dot", &rows_dot, "see Kernels.rows_dot (reference.py)",
        py::arg("w"), py::arg("x"), py::arg("idx"));
  m.def("rows_axpy", &rows_axpy, "see Kernels.rows_axpy (reference.py)",
        py::arg("wt"), py::arg("h"), py::arg("idx"));
  m.def("matvec", &matvec, "see Kernels.matvec (reference.py)", py::arg("w"), py::arg("x"));
  m.def("vecmat", &vecmat, "see Kernels.vecmat (reference.py)", py::arg("h"), py::arg("wt"));
  register_decode_ops(m);
  register_ffn_ops(m);
  register_quant_ops(m);
  register_prefill_linear(m);
  register_prefill_times(m);
  register_prefill_wide(m);
}
