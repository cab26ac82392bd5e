"""A start cannot hang on the kernels' build: the build's lock dies with the process that held it,
a build killed at any point is cleared and done again, a waiting process says what it waits for,
and a finished build is imported without ninja (a checkout at another path does not rebuild it).
On a one-function extension (a real compile and link, about 20 s each), each start in its own
process with a time limit, so that a hang fails the test instead of blocking it."""

import signal
import subprocess
import sys
import time

import pytest

from turbo_demo.runtime.kernels import cpp

SOURCE = """#include <torch/extension.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""
NAME = "turbo_demo_build_probe"


def start(tmp_path, directory) -> subprocess.Popen:
    code = (
        "from pathlib import Path; from turbo_demo.runtime.kernels import cpp; "
        f"m = cpp.compile_module({NAME!r}, [Path({str(tmp_path / 'probe.cpp')!r})], Path({str(directory)!r})); "
        "print(m.answer())"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, limit: float = 240) -> tuple[str, str]:
    out, err = process.communicate(timeout=limit)  # a hang is a TimeoutExpired: a failure
    assert process.returncode == 0, err[-2000:]
    return out, err


@pytest.fixture
def probe(tmp_path):
    if not cpp.shutil.which("c++"):
        pytest.skip("no C++ compiler")
    (tmp_path / "probe.cpp").write_text(SOURCE)
    return tmp_path, tmp_path / "build"


def test_a_build_killed_midway_or_leaving_torchs_lock_is_redone(probe):
    tmp_path, directory = probe
    first = start(tmp_path, directory)
    deadline = time.monotonic() + 60
    while not (directory / "build.ninja").is_file() and time.monotonic() < deadline:  # compiling now
        time.sleep(0.2)
    time.sleep(2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    # what a killed build may leave: torch's lock file (every later load waited on it forever) and
    # a half-written module
    (directory / "lock").write_text("")
    (directory / f"{NAME}.so").write_bytes(b"\\x7fELF cut short")
    out, _ = finish(start(tmp_path, directory))
    assert out.strip() == "42"
    # finished: the next start imports it without ninja, even with ninja's file gone
    (directory / "build.ninja").unlink()
    built = (directory / f"{NAME}.so").stat().st_mtime_ns
    out, _ = finish(start(tmp_path, directory), limit=60)
    assert out.strip() == "42" and (directory / f"{NAME}.so").stat().st_mtime_ns == built


def test_a_start_waits_for_a_live_build_and_says_so(probe):
    tmp_path, directory = probe
    directory.mkdir()
    with cpp.build_lock(directory):  # this process is building
        waiting = start(tmp_path, directory)
        time.sleep(5)
        assert waiting.poll() is None  # it waits for the lock
    out, err = finish(waiting)
    assert "Waiting for another process's build" in err and out.strip() == "42"
