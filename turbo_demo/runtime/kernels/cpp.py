"""The C++ kernels (csrc/): `CppKernels`, and their build.

    build()      the compiled extension module, built once and cached on disk; raises
                 UserError when it cannot be built (no compiler, a failed build)
    built()      whether a build for this machine and these sources is on disk (build() is then quick)
    announce_build()  says on stderr that a build is starting (about a minute)

The build is compiled with -march=native, so the cache is keyed by the CPU's flags and the
sources' hash (and torch's version): a cache carried to another CPU, or left by older sources,
is never loaded. A finished build is imported without ninja, and one process builds at a time
under a lock that dies with it (compile_module). Importing this module never compiles anything.
"""

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from turbo_demo.errors import UserError
from turbo_demo.paths import cache_dir
from turbo_demo.runtime.kernels.reference import BlockKernels, Kernels

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [
    CSRC / name
    for name in (
        "gather_gemv.cpp",
        "decode_ops.cpp",
        "ffn_ops.cpp",
        "quant_ops.cpp",
        "prefill_linear.cpp",
        "prefill_times.cpp",
        "prefill_wide.cpp",
    )
]
HEADERS = [CSRC / name for name in ("act.h", "bf16.h", "gemv.h", "quant_blocks.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp"]
LOCK_FILE = "build.lock"  # flock'd by the process that builds (torch's own lock file is "lock")
BUILD_NOTICE = "Building the C++ sparse kernels (first time only, about a minute)..."


def cpu_flags() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("flags", "Features", "model name"))]
    return "\n".join(dict.fromkeys(lines))  # one processor's lines; every core repeats them


def build_key() -> str:
    """A hash of everything that makes a build valid here: sources, flags, CPU, torch."""
    key = hashlib.sha256()
    for path in SOURCES + HEADERS:
        key.update(path.name.encode() + path.read_bytes())
    key.update(" ".join(FLAGS).encode() + cpu_flags().encode() + torch.__version__.encode())
    return key.hexdigest()[:16]


def module_name() -> str:
    return f"turbo_demo_kernels_{build_key()}"


def build_dir(name: str) -> Path:
    """Where the build of the module `name` (module_name()) lives."""
    return cache_dir() / "torch_extensions" / name


def built() -> bool:
    name = module_name()
    return (build_dir(name) / f"{name}.so").is_file()


def announce_build() -> None:
    """Say on stderr why the next step waits: load_kernels' on_build for the app, CLI and bench."""
    print(BUILD_NOTICE, file=sys.stderr, flush=True)


def first_error_line(exc: BaseException) -> str:
    """The compiler's first `error:` line in a failed build's output, else the exception's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "error:" in line or "fatal error" in line:
            return line
    return lines[0] if lines else type(exc).__name__


@contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on `directory`'s build that dies with its holder: flock, which the OS
    drops when the process ends (SIGTERM and SIGKILL included), where torch's own lock file
    stays behind and makes every later start wait forever. A process that has to wait says so."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one process at a time is the user's to keep
        yield
        return
    with open(directory / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"Waiting for another process's build of the C++ kernels ({directory})...", file=sys.stderr, flush=True
            )
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def import_built(name: str, so: Path):
    """The extension module `name` at `so`, imported as torch imports the builds it makes."""
    spec = importlib.util.spec_from_file_location(name, so)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {so}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_module(name: str, sources: list[Path], directory: Path, verbose: bool = False):
    """The extension `name` built from `sources` in `directory` and imported. A finished build is
    imported without ninja: its name is the hash of its sources (build_key), so a checkout at
    another path does not rebuild it. Anything else in the directory is what a killed or failed
    build left (objects cut short, torch's lock file), cleared before building afresh."""
    # imported here: torch.utils.cpp_extension pulls in setuptools, which only a build needs
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    so = directory / f"{name}.so"
    with build_lock(directory):
        if so.is_file():
            try:
                return import_built(name, so)
            except ImportError:  # a link cut short (a killed build, a full disk): build again
                pass
        for path in directory.iterdir():
            if path.name != LOCK_FILE:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=verbose,
        )


def build(verbose: bool = False):
    """The compiled extension module (about a minute the first time on a machine, then cached)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise UserError(
            f"cannot build the C++ kernels: no C++ compiler ({compiler!r} is not on PATH); "
            "install g++ or use the torch backend"
        )
    name = module_name()  # hashes the sources: once per build
    try:
        return compile_module(name, SOURCES, build_dir(name), verbose)
    except Exception as exc:  # compiler, ninja and linker failures
        raise UserError(
            f"cannot build the C++ kernels with {compiler!r}: {first_error_line(exc)}; use the torch backend"
        ) from exc


def bf16_in_hardware() -> bool:
    """Whether the CPU has bf16 dot products (AVX512-BF16 or AMX-BF16), which oneDNN's bf16 GEMMs
    run on. Without them, a bf16 GEMM runs several times slower than an fp32 one."""
    flags = cpu_flags().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


WIDEN_ROWS = 2048  # rows of a matrix widened to fp32 at a time by fp32_times
# Up to this many tokens, wide_times (prefill_wide.cpp) beats fp32_times; past it, torch's fp32
# GEMM does (14336 x 4096 bf16, 2 threads, Zen 3: 32 tokens 67-80 ms against 218-320, 128 tokens
# 208-232 against 372-393, 256 tokens 411-476 against 480-560, 512 tokens 969-1003 against 721-751)
WIDE_TIMES_TOKENS = 256


def fp32_times(h: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """h @ wt as fp32 GEMMs on wt's rows widened to fp32 WIDEN_ROWS at a time (partial sums in
    fp32), rounded to h's dtype: a bf16 GEMM's products and fp32 sums, for a CPU without bf16 in
    hardware."""
    h2 = h.reshape(-1, h.size(-1))
    acc = torch.zeros(h2.size(0), wt.size(1))
    for r in range(0, wt.size(0), WIDEN_ROWS):
        acc.addmm_(h2[:, r : r + WIDEN_ROWS].float(), wt[r : r + WIDEN_ROWS].float())
    return acc.to(h.dtype).reshape(*h.shape[:-1], wt.size(1))


class CppKernels(Kernels):
    """The C++ kernels on weights held as tensors: the reference's contracts, computed without
    gathered copies, in fp32 sums, one call per fused step. Their tensors must be on the CPU."""

    name = "cpp"
    devices = ("cpu",)

    def __init__(self, ops):
        super().__init__()
        self.ops = ops  # the compiled module
        # a prompt's GEMMs on weights held as tensors: torch's, or through fp32 where the CPU has
        # no bf16 dot products (chosen once, for the CPU this process runs on)
        self._linear: Callable[..., torch.Tensor]
        self._times: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        self._linear, self._times = (
            (F.linear, torch.matmul) if bf16_in_hardware() else (self.widened_linear, self.widened_times)
        )

    @functools.cached_property
    def blocks(self) -> Kernels:
        return CppBlockKernels(self)

    def rows_dot(self, w, x, idx):
        return self.ops.rows_dot(w, x, idx)

    def rows_axpy(self, wt, h, idx):
        return self.ops.rows_axpy(wt, h, idx)

    def matvec(self, w, x):
        return self.ops.matvec(w, x)

    def vecmat(self, h, wt):
        return self.ops.vecmat(h, wt)

    def up_down(self, w, x, idx, a, add_to=None, counts=None):
        return self.ops.up_down(w.wu, w.wd_t, x, idx, a, w.drelu, w.wg, add_to, counts)

    def ffn_dense(self, w, x, add_to=None, counts=None):
        return self.ops.ffn_dense(w.wg, w.wu, w.wd_t, x, w.act, w.drelu, add_to, counts)

    def ffn_exact(self, w, x, add_to=None, counts=None):
        return self.ops.ffn_exact(w.wg, w.wu, w.wd_t, x, w.drelu, add_to, counts)

    def predict(self, w, r, threshold, budget):
        return self.ops.predict(w.fc1, w.fc2_t, r, threshold, budget)

    def ffn_predicted(self, w, r, x, threshold, budget, add_to=None, counts=None):
        return self.ops.ffn_predicted(
            w.fc1, w.fc2_t, r, threshold, budget, w.wg, w.wu, w.wd_t, x, w.drelu, add_to, counts
        )

    def linear(self, x, w, b=None):
        return self._linear(x, w, b)

    def widened_linear(self, x, w, b=None):
        """F.linear(x, w, b) where the CPU has no bf16 dot products: wide_linear (prefill_wide.cpp)
        widens w's values to fp32 in registers (a bf16 GEMM's products, fp32 sums); the bias is
        added in fp32 and the result rounded to x's dtype once, as torch's bf16 GEMM rounds."""
        y = self.ops.wide_linear(x.float().contiguous(), w.contiguous())
        return (y if b is None else y + b.float()).to(x.dtype)

    def times(self, h, wt):
        return self._times(h, wt)

    def widened_times(self, h, wt):
        """h @ wt where the CPU has no bf16 dot products: wide_times (prefill_wide.cpp) for a
        prompt of up to WIDE_TIMES_TOKENS tokens, fp32_times past it; both multiply wt's values
        widened to fp32, sum in fp32 and round to h's dtype once."""
        if h.numel() > WIDE_TIMES_TOKENS * h.size(-1):
            return fp32_times(h, wt)
        return self.ops.wide_times(h.float().contiguous(), wt.contiguous()).to(h.dtype)

    def rms_norm(self, x, w, eps):
        return self.ops.rms_norm(x, w, eps)

    def attention_step(self, x, w, eps, cache, pos, first):
        # the optional parts as decode_ops.cpp takes them: bq, bk, bv, bo, q_norm, k_norm
        return self.ops.attention_step(
            x, w.norm, eps, w.wq, w.wk, w.wv, w.wo, cache.k, cache.v, cache.cos, cache.sin_signed, pos, first, *w.extras
        )

    def indices_over(self, v, t):
        return self.ops.indices_over(v, t)

    def argmax(self, v):
        return self.ops.argmax(v)

    def sample_top_p(self, v, temperature, top_p, u):
        return self.ops.sample_top_p(v, temperature, top_p, u)


class CppBlockKernels(CppKernels, BlockKernels):
    """The C++ kernels on block-quantized matrices (QWeight): the q_* kernels of quant_ops.cpp,
    a prompt's products in prefill_linear.cpp and prefill_times.cpp. The attention step is the
    reference's composition of these kernels, q, k and v in one call where no optional part
    is there."""

    blocks = BlockKernels.blocks  # itself, not CppKernels' sibling

    def __init__(self, tensors: CppKernels):
        BlockKernels.__init__(self, tensors)
        self.ops = tensors.ops

    def rows_dot(self, w, x, idx):
        return self.ops.q_dot(w.data, w.code, w.cols, x, idx)

    def rows_axpy(self, wt, h, idx):
        return self.ops.q_axpy(wt.data, wt.code, wt.cols, h, idx)

    def matvec(self, w, x):
        return self.ops.q_dot(w.data, w.code, w.cols, x)

    def matvecs(self, ws, x):
        """[matvec(w, x) for w in ws]; those of one format in one call (x quantized once)."""
        if len({(w.code, w.cols) for w in ws}) == 1:
            return self.ops.q_matvecs([w.data for w in ws], ws[0].code, ws[0].cols, x)
        return [self.matvec(w, x) for w in ws]

    def vecmat(self, h, wt):
        return self.ops.q_axpy(wt.data, wt.code, wt.cols, h)

    def q_ffn(self, w, x, **given):
        """quant_ops.cpp's q_ffn on w's three matrices (one format) -> (y, up_rows, active); a
        dense step given wd reads W_down's (H, I) blocks (dense_down)."""
        return self.ops.q_ffn(w.wg.data, w.wu.data, w.wd_t.data, w.wu.code, w.wu.cols, x, **given)

    def up_down(self, w, x, idx, a, add_to=None, counts=None):
        return self.q_ffn(w, x, idx=idx, a=a, act_up=w.drelu, add_to=add_to, counts=counts)

    def ffn_dense(self, w, x, add_to=None, counts=None):
        wd = None if w.wd is None else w.wd.data
        y, _, active = self.q_ffn(w, x, act=w.act, act_up=w.drelu, dense=True, add_to=add_to, counts=counts, wd=wd)
        return y, active

    def ffn_exact(self, w, x, add_to=None, counts=None):
        return self.q_ffn(w, x, act_up=w.drelu, add_to=add_to, counts=counts)

    def predict(self, w, r, threshold, budget):
        fc1, fc2_t = w.fc1, w.fc2_t
        return self.ops.q_predict(fc1.data, fc1.code, fc2_t.data, fc2_t.code, fc2_t.cols, r, threshold, budget)

    def ffn_predicted(self, w, r, x, threshold, budget, add_to=None, counts=None):
        idx, rows = self.predict(w, r, threshold, budget)
        y, up_rows, active = self.up_down(w, x, idx, None, add_to, counts)
        return y, idx, rows, up_rows, active

    def linear(self, x, w, b=None):
        y = self.ops.q_linear(x.contiguous(), w.data, w.code, w.cols)
        return y if b is None else y + b

    def times(self, h, wt):
        return self.ops.q_times(h.contiguous(), wt.data, wt.code, wt.cols)

    def attention_step(self, x, w, eps, cache, pos, first):
        if not w.plain:  # biases, head norms: the reference's composition
            return Kernels.attention_step(self, x, w, eps, cache, pos, first)
        h = self.ops.rms_norm(x, w.norm, eps)
        q, k, v = self.matvecs((w.wq, w.wk, w.wv), h)
        out = self.ops.attend(q, k, v, cache.k, cache.v, cache.cos, cache.sin_signed, pos, first)
        return x + self.matvec(w.wo, out)
