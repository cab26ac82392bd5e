"""The decode kernels as a value: `load_kernels(choice)` returns a `Kernels` object, chosen once
(at app start, per CLI command, per bench run) and handed to the runtime.

    Kernels      the PyTorch reference (reference.py), whose docstrings define every kernel
    CppKernels   the C++ kernels (cpp.py, csrc/), equal to the reference up to summation order

Each is the set for weights held as tensors; `kernels.for_weights(*matrices)` gives the same
backend's set for the matrices a layer holds (its `blocks` set for block-quantized ones).
"""

import functools
from collections.abc import Callable

from turbo_demo.choices import BACKEND_CHOICES
from turbo_demo.errors import UserError
from turbo_demo.runtime.kernels import cpp
from turbo_demo.runtime.kernels.cpp import CppKernels
from turbo_demo.runtime.kernels.reference import Kernels

__all__ = ["CppKernels", "Kernels", "load_kernels"]


@functools.cache
def _cpp_build() -> tuple[object, UserError | None]:
    """The C++ module or the reason it cannot be built: tried once per process."""
    try:
        return cpp.build(), None
    except UserError as exc:
        return None, exc


def load_kernels(
    choice: str = "auto",
    on_build: Callable[[], None] | None = None,
    device: str = "cpu",
    prefill_threads: int | None = None,
) -> Kernels:
    """The kernels for `choice`: "torch", "cpp" (UserError where they cannot be built) or "auto"
    (cpp where it builds and runs on `device`'s type, else torch). on_build(), when given, is
    called before a build that is not yet on disk, so that the caller can say why it waits.
    prefill_threads: the threads a prompt's forward runs on (None: the caller's torch threads)."""
    kernels = _load(choice, on_build, device)
    kernels.prefill_threads = prefill_threads
    return kernels


def _load(choice: str, on_build: Callable[[], None] | None, device: str) -> Kernels:
    if choice not in BACKEND_CHOICES:
        raise UserError(f"unknown kernel backend {choice!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if choice == "torch" or (choice == "auto" and device not in CppKernels.devices):
        return Kernels()
    if on_build is not None and not cpp.built() and _cpp_build.cache_info().currsize == 0:
        on_build()
    module, error = _cpp_build()
    if error is None:
        return CppKernels(module)
    if choice == "cpp":
        raise error
    return Kernels()
