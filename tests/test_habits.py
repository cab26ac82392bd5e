"""The code's habits, checked by the test command: ruff (lint and format), mypy on the runtime,
an import of the package that stays free of torch, and modules small enough to read at once."""

import subprocess
import sys

import pytest

from conftest import REPO

MAX_MODULE_LINES = 300


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("command", [("ruff", "check", "."), ("ruff", "format", "--check", ".")])
def test_ruff(command):
    result = run(*command)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_on_the_runtime():
    result = run("mypy", "turbo_demo/runtime")
    assert result.returncode == 0, result.stdout + result.stderr


def test_importing_the_package_and_its_cli_imports_no_torch():
    code = "import sys, turbo_demo, turbo_demo.cli, turbo_demo.choices; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
    result = run("turbo_demo", "--help")
    assert result.returncode == 0 and "generate" in result.stdout


def test_no_module_over_the_size_a_reader_takes_in_at_once():
    sizes = {
        path.relative_to(REPO): len(path.read_text().splitlines())
        for path in [*(REPO / "turbo_demo").rglob("*.py"), REPO / "app.py"]
    }
    assert {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}
