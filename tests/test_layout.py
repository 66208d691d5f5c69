"""The package's layout: no import cycles among kdbench's modules, light modules stay light, one bench.toml."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdbench"


def _modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, at module level or inside functions and classes alike.

    ``from a.b import c`` counts as importing ``a.b``, and ``a.b.c`` as well when that is a module; an import of a
    submodule does not count as importing its parent package (that is how every package's __init__ works).
    """
    mods = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub.c import x\n")  # a function-level import counts
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")  # a package importing its own modules is fine
    (pkg / "sub" / "c.py").write_text("import pkg.a\nfrom ..d import y\n")
    (pkg / "d.py").write_text("import os\n")
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a", "pkg.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    (pkg / "b.py").write_text("import os\n")
    assert cycles(import_graph(pkg)) == []


def test_no_import_cycles_among_kdbench_modules():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and "kdbench.data.loader" in graph  # it did read the package
    found = cycles(graph)
    assert not found, "import cycles (counting function-level imports): " + "; ".join(" <-> ".join(c) for c in found)


def test_data_does_not_import_the_plugin_api_and_the_registry_no_family():
    graph = import_graph(PACKAGE)
    for name, deps in graph.items():
        if name == "kdbench.data" or name.startswith("kdbench.data."):
            assert not {"kdbench.method", "kdbench.train", "kdbench.models"} & deps, name
    assert not {d for d in graph["kdbench.models.base"] if d.startswith("kdbench.models")}


def test_building_a_table_imports_no_training_code(tmp_path):
    code = (
        "import sys\n"
        "from kdbench.render import render\n"
        "from kdbench.results import ResultStore\n"
        "from kdbench.tables import build_tables, collect\n"
        f"col = collect(ResultStore({str(tmp_path)!r}))\n"
        "render(build_tables(col))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[:2] in (['kdbench', 'train'], ['kdbench', 'sweep'], "
        "['kdbench', 'method'], ['kdbench', 'models'], ['kdbench', 'data'], ['kdbench', 'methods']))\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["kdbench.catalog", "kdbench.errors"])
def test_light_modules_import_nothing_heavy(module):
    code = f"import sys, {module}\nprint(sorted(m for m in ('torch', 'pandas', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- bench.toml


def test_bench_toml_exists_once():
    from kdbench.config import PACKAGED_CONFIG

    packaged = PACKAGED_CONFIG
    assert packaged == PACKAGE / "bench.toml"
    assert packaged.is_file() and not packaged.is_symlink()  # the file itself, package data of kdbench
    top = ROOT / "bench.toml"
    assert top.is_symlink() and top.resolve() == packaged.resolve()  # the checkout's copy is a link to it


def test_relative_data_roots_are_relative_to_the_checkout(tmp_path):
    from kdbench.config import load_bench

    bench = load_bench(ROOT / "bench.toml")
    expected = (ROOT / "../shared/data/tiny-imagenet-100").resolve()
    assert bench.pair_sets["tinyimagenet100"].data.data_root == str(expected)
    # a link elsewhere: its relative paths are relative to the link's folder, not the target's
    link = tmp_path / "here" / "bench.toml"
    link.parent.mkdir()
    link.symlink_to(PACKAGE / "bench.toml")
    expected = (link.parent / "../shared/data/tiny-imagenet-100").resolve()
    assert load_bench(link).pair_sets["tinyimagenet100"].data.data_root == str(expected)


def test_packaged_config_is_readable_through_importlib_resources():
    from importlib.resources import files

    assert (files("kdbench") / "bench.toml").read_bytes() == (PACKAGE / "bench.toml").read_bytes()


@pytest.mark.slow
def test_the_wheel_carries_the_one_bench_toml(tmp_path):
    """Build a wheel from a copy of the project (no network: the build backend is the installed setuptools)."""
    import shutil
    import zipfile

    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "kdbench", src / "kdbench", ignore=ignore)
    shutil.copytree(ROOT / "methods", src / "methods", ignore=ignore)
    (src / "bench.toml").symlink_to("kdbench/bench.toml")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("kdbench-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("kdbench/bench.toml") == (PACKAGE / "bench.toml").read_bytes()
    assert [n for n in names if n.endswith("bench.toml")] == ["kdbench/bench.toml"]
    for module in (
        "kdbench/data/__init__.py",
        "kdbench/data/loader.py",
        "kdbench/methods/kd.py",
        "kdbench/tables.py",
        "kdbench/reference/cifar100_top1.csv",
    ):
        assert module in names
