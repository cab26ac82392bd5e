"""Gather-GEMV kernels: the two operations a sparse FFN needs, on a subset `idx` of neurons.

    rows_dot(W, x, idx)   y_j = W[idx_j] . x           W (N, H) neuron-major, x (H,), y (k,)
    rows_axpy(Wt, h, idx) y   = sum_j h_j * Wt[idx_j]  Wt (N, H) neuron-major, h (k,), y (H,)

Both read only the k selected rows, each a contiguous run of H values: that is what makes a
sparse FFN cheaper when decoding is bound by memory bandwidth. The PyTorch versions here always
work; `turbo_demo.runtime.cpp` provides fused versions (no gather buffer) when a C++ compiler
is present, selected with `use_backend("cpp")`. Callers look the functions up at call time
(`kernels.rows_dot(...)`), so switching backends takes effect at once. Importing never compiles.
"""

import torch
import torch.nn.functional as F

from turbo_demo.errors import UserError

BACKENDS = ("torch", "cpp")


def torch_rows_dot(w: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.mv(w.index_select(0, idx), x)


def torch_rows_axpy(wt: torch.Tensor, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # embedding_bag sums the selected rows weighted by h without materialising them; it
    # rejects an empty bag, which is a zero sum.
    if idx.numel() == 0:
        return wt.new_zeros(wt.size(1))
    return F.embedding_bag(idx.unsqueeze(0), wt, per_sample_weights=h.unsqueeze(0), mode="sum")[0]


rows_dot = torch_rows_dot
rows_axpy = torch_rows_axpy
_backend = "torch"


def use_backend(name: str) -> None:
    """Rebind rows_dot / rows_axpy: "torch" (always works) or "cpp" (builds on first use)."""
    global rows_dot, rows_axpy, _backend
    if name == "torch":
        rows_dot, rows_axpy = torch_rows_dot, torch_rows_axpy
    elif name == "cpp":
        from turbo_demo.runtime import cpp

        module = cpp.load()
        rows_dot, rows_axpy = module.rows_dot, module.rows_axpy
    else:
        raise UserError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def backend() -> str:
    """The name of the backend in use: "torch" or "cpp"."""
    return _backend
