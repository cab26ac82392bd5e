"""The code's habits, checked by the test command: ruff (lint and format), mypy on the runtime,
an import of the package that stays free of torch and registers nothing, and the layout: one
folder per layer, each importing only from its own layer and those below it, no import cycle,
and modules named after one concern each, not prefix namespaces that want a folder."""

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO

# The layers, lowest first (docs/architecture.md). An entry names a folder (with its sub-folders)
# or a module; a module may import from its own layer and the ones before it.
LAYERS = [
    ("turbo_demo.errors", "turbo_demo.choices", "turbo_demo.paths", "turbo_demo.paper_figures"),
    ("turbo_demo.models",),
    ("turbo_demo.runtime",),  # with kernels/, whose kernels take the records of runtime/weights.py
    ("turbo_demo.checkpoints",),
    ("turbo_demo.offline",),
    ("turbo_demo.app.engine",),
    # views compose plots' figures, and the inspector's plot lays out views' grid of codes
    ("turbo_demo.app.views", "turbo_demo.app.plots"),
    ("turbo_demo.app.ui",),
    ("turbo_demo.commands",),
    ("turbo_demo.bench",),
    ("turbo_demo.cli", "turbo_demo.arguments", "turbo_demo.__main__", "app"),
]
# The package and app/ only hold folders and modules: their __init__ modules sit in no layer, so
# they import nothing.
NAMESPACES = {"turbo_demo", "turbo_demo.app"}
# A sanity bound, not a style: a module past it surely holds more than one concern.
MAX_MODULE_LINES = 500


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


def test_importing_the_model_classes_registers_nothing_until_asked():
    code = (
        "import sys, turbo_demo.models; print('transformers' in sys.modules)\n"
        "import turbo_demo.models.bamboo, turbo_demo.models.mixtral, turbo_demo.models.hooks\n"
        "from transformers import CONFIG_MAPPING\n"
        "print([t in CONFIG_MAPPING for t in ('bamboo', 'turbosparsemixtral')])\n"
        "turbo_demo.models.register_auto_classes(); turbo_demo.models.register_auto_classes()\n"
        "print([t in CONFIG_MAPPING for t in ('bamboo', 'turbosparsemixtral')])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.split("\n")[:3] == ["False", "[False, False]", "[True, True]"], result.stderr


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package under root (and root's app.py), by dotted name."""
    found = {"app": root / "app.py"} if (root / "app.py").is_file() else {}
    for path in (root / "turbo_demo").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(root: Path) -> dict[str, set[str]]:
    """Per module, the package's modules it imports, function-local imports included; `from
    a import b` imports the module a.b where there is one, else a."""
    known = modules(root)
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1 folders
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def layer_of(name: str) -> int | None:
    for rank, entries in enumerate(LAYERS):
        if any(name == e or name.startswith(e + ".") for e in entries):
            return rank
    return None


def layering_errors(root: Path) -> list[str]:
    """Modules in no layer, and imports from a higher layer than the importer's (or by a module
    in none)."""
    graph = imports(root)
    errors = [f"{name} sits in no layer" for name in graph if name not in NAMESPACES and layer_of(name) is None]
    errors += [f"{name} imports {target}, from no layer" for name in NAMESPACES & set(graph) for target in graph[name]]
    for name, targets in graph.items():
        for target in targets:
            rank, theirs = layer_of(name), layer_of(target)
            if rank is not None and theirs is not None and theirs > rank:
                errors.append(f"{name} imports {target}, a higher layer")
    return sorted(errors)


def cycles(root: Path) -> list[list[str]]:
    """The import cycles among the package's modules: strongly connected components (Tarjan)."""
    graph = imports(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def namespaces(root: Path) -> list[str]:
    """Name prefixes (up to the first "_") that three modules of one folder share, or that a
    module shares with a folder beside it (plots_moe.py beside plots/): a namespace of modules,
    which is a folder's job."""
    found = []
    for folder in [root / "turbo_demo", *(p for p in (root / "turbo_demo").rglob("*") if p.is_dir())]:
        stems = [p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "__main__")]
        prefixes = Counter(stem.split("_")[0] for stem in stems)
        found += [f"{folder.name}/{prefix}_*" for prefix, n in prefixes.items() if n >= 3]
        subfolders = {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
        found += [
            f"{folder.name}/{stem}.py beside {stem.split('_')[0]}/"
            for stem in stems
            if stem.split("_")[0] in subfolders
        ]
    return sorted(found)


def test_each_folder_imports_only_from_its_layer_and_below():
    assert layering_errors(REPO) == []


def test_no_import_cycle():
    assert cycles(REPO) == []


def test_modules_are_named_after_one_concern_not_a_namespace():
    assert namespaces(REPO) == []


def test_no_module_past_the_sanity_bound():
    sizes = {path.relative_to(REPO): len(path.read_text().splitlines()) for path in modules(REPO).values()}
    assert {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_the_layout_checks_fail_on_a_broken_layout(tmp_path):
    files = {
        "turbo_demo/__init__.py": "from turbo_demo.models import hooks\n",
        "turbo_demo/models/__init__.py": "",
        "turbo_demo/models/hooks.py": "def f():\n    from turbo_demo.runtime import decoder\n",
        "turbo_demo/runtime/__init__.py": "",
        "turbo_demo/runtime/decoder.py": "from . import stats\n",
        "turbo_demo/runtime/stats.py": "import turbo_demo.runtime.decoder\n",
        "turbo_demo/gadgets/__init__.py": "",
        "turbo_demo/app/__init__.py": "",
        "turbo_demo/app/ui/__init__.py": "",
        "turbo_demo/app/ui/page.py": "",
        "turbo_demo/app/ui/page_talk.py": "",
        "turbo_demo/app/ui/page_api.py": "",
        "turbo_demo/app/plots/__init__.py": "",
        "turbo_demo/app/plots_moe.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert layering_errors(tmp_path) == [
        "turbo_demo imports turbo_demo.models.hooks, from no layer",
        "turbo_demo.app.plots_moe sits in no layer",
        "turbo_demo.gadgets sits in no layer",
        "turbo_demo.models.hooks imports turbo_demo.runtime.decoder, a higher layer",
    ]
    assert cycles(tmp_path) == [["turbo_demo.runtime.decoder", "turbo_demo.runtime.stats"]]
    assert namespaces(tmp_path) == ["app/plots_moe.py beside plots/", "ui/page_*"]
