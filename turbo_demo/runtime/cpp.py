"""The C++ decode kernels (csrc/*.cpp, csrc/*.h), built on first use.

    load()       the compiled module (the functions of kernels.NAMES), built once per process and cached on
                 disk under cache_dir()/torch_extensions; raises UserError if it cannot be built
    available()  whether load() works; never raises
    built()      whether a build of the current source is already on disk (load() is then quick)
    announce_build()  prints BUILD_NOTICE on stderr: what a command line shows before the build

Importing this module never compiles anything.
"""

import os
import shutil
import sys
from pathlib import Path

from turbo_demo.errors import UserError

NAME = "turbo_demo_gather_gemv"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / name for name in ("gather_gemv.cpp", "decode_ops.cpp", "ffn_ops.cpp")]
HEADERS = [CSRC / name for name in ("bf16.h", "gemv.h")]

BUILD_NOTICE = "Building the C++ sparse kernels (first time only, about a minute)..."

_module = None
_error: UserError | None = None


def _first_error_line(exc: BaseException) -> str:
    """The compiler's first `error:` line in a failed build's output, else the exception's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "error:" in line or "fatal error" in line:
            return line
    return lines[0] if lines else type(exc).__name__


def build_dir() -> Path:
    from turbo_demo.data import cache_dir

    return cache_dir() / "torch_extensions"


def built() -> bool:
    library = build_dir() / f"{NAME}.so"
    return library.is_file() and all(library.stat().st_mtime >= s.stat().st_mtime for s in SOURCES + HEADERS)


def load(verbose: bool = False):
    """The compiled extension module; builds it on the first call (takes about a minute)."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise _error
    compiler = os.environ.get("CXX", "c++")
    try:
        if shutil.which(compiler) is None:
            raise UserError(f"cannot build the C++ kernels: no C++ compiler ({compiler!r} is not on "
                            "PATH); install g++ or use the torch backend")
        from torch.utils import cpp_extension

        build = build_dir()
        build.mkdir(parents=True, exist_ok=True)
        try:
            _module = cpp_extension.load(
                name=NAME, sources=[str(s) for s in SOURCES],
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                build_directory=str(build), verbose=verbose)
        except Exception as exc:  # compiler / ninja / linker failures
            raise UserError(f"cannot build the C++ kernels with {compiler!r}: "
                            f"{_first_error_line(exc)}; use the torch backend") from exc
    except UserError as exc:
        _error = exc
        raise
    return _module


def announce_build() -> None:
    """Say on stderr why the next call waits (select_backend's before_build for the CLI)."""
    print(BUILD_NOTICE, file=sys.stderr)


def available() -> bool:
    """Whether the C++ kernels can be used here (compiler present and the build succeeds)."""
    try:
        load()
    except Exception:
        return False
    return True
