"""Shape of the package: an acyclic import graph, no cross-module private helpers in the
lowering/quantization core, and a wheel that installs only `fhe_backend`."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Set

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fhe_backend"


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_roots() -> Dict[str, Path]:
    """Installed package name -> source folder (`passes/` installs as `fhe_backend.passes`)."""
    mapped = _setuptools_config().get("package-dir", {})
    return {PACKAGE: ROOT / PACKAGE, **{name: ROOT / folder for name, folder in mapped.items()}}


def _modules() -> Dict[str, Path]:
    """Dotted module name (as installed) -> file, for every module of the package."""
    modules = {}
    for package, folder in _package_roots().items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if name.startswith(PACKAGE) and name not in modules:
                modules[name] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST):
    """Every import statement anywhere in the file (functions included), except those under
    `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking_block(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the package modules it imports (at module level or inside functions)."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules.keys()
            if submodules:
                edges.update(submodules)
            elif source in modules:
                edges.add(source)
        graph[name] = edges - {name}
    return graph


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "fhe_backend.lowering.context" in graph
    # the graph sees module-level and function-level imports alike
    assert "fhe_backend.lowering.context" in graph["fhe_backend.quantization.program"]
    assert "fhe_backend.lowering.registry" in graph["fhe_backend.partition"]
    assert import_cycles(graph) == []


def test_cycle_detection_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_lowering_core_shares_no_private_names():
    """Lowerings and the integer program import only public names from each other."""
    offenders = []
    for name, path in _modules().items():
        if not name.startswith(("fhe_backend.lowering", "fhe_backend.quantization")):
            continue
        for node in _imports(ast.parse(path.read_text(), str(path))):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    offenders.append(f"{name}: {alias.name}")
    assert offenders == []


def test_lowering_context_has_no_attributes_set_on_the_fly():
    """Lowerings keep per-node state in LoweringContext fields, never new attributes."""
    offenders = []
    for name, path in _modules().items():
        if not name.startswith("fhe_backend.lowering"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if (
                        isinstance(target, ast.Attribute)
                        and isinstance(target.value, ast.Name)
                        and target.value.id == "ctx"
                    ):
                        offenders.append(f"{name}:{node.lineno} ctx.{target.attr}")
    assert offenders == []


def test_integer_program_imports_first():
    """Importing the integer program first, in a fresh interpreter, works and registers every
    lowering (the import of `fhe_backend.lowering` loads them eagerly)."""
    for first in ("fhe_backend.quantization.program",):
        code = (
            f"import {first}\n"
            "import torch\n"
            "from fhe_backend.lowering.registry import LOWERINGS\n"
            "aten = torch.ops.aten\n"
            "assert {aten._prelu_kernel.default, aten.addmm.default, aten.avg_pool2d.default,"
            " aten.native_layer_norm.default} <= set(LOWERINGS), sorted(map(str, LOWERINGS))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"import {first} first:\n{result.stderr[-3000:]}"


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject lists packages explicitly (for the mapping): a new folder must be added there."""
    listed = set(_setuptools_config()["packages"])
    found = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert found == listed, f"add {sorted(found - listed)} / drop {sorted(listed - found)} in pyproject.toml"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The project built as a wheel and installed (without dependencies) into a fresh venv that
    borrows the dependencies of the running interpreter's environment."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in {PACKAGE, *_setuptools_config().get("package-dir", {}).values()}:
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(work / "dist"),
            str(source),
        ],
        check=True,
        timeout=600,
    )
    (wheel,) = (work / "dist").glob("fhe_backend-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    dependencies = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (site / "_dependencies.pth").write_text(dependencies + "\n")  # a path only: its .pth stay off
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        timeout=600,
    )
    return wheel, python, site


def test_wheel_holds_only_fhe_backend(installed_wheel):
    wheel, _, site = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        PACKAGE,
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    assert "fhe_backend/passes/__init__.py" in names and "fhe_backend/benchmarks/runner.py" in names
    top_level = {path.name for path in site.iterdir()} - {"_dependencies.pth"}
    assert not {"passes", "benchmarks", "passes.py", "benchmarks.py"} & top_level, top_level
    assert {PACKAGE} <= top_level


def test_installed_wheel_imports_passes_under_the_package(installed_wheel, tmp_path):
    _, python, site = installed_wheel
    code = (
        "import importlib.util, fhe_backend, fhe_backend.passes, fhe_backend.benchmarks.runner\n"
        f"assert fhe_backend.__file__.startswith({str(site)!r}), fhe_backend.__file__\n"
        "assert fhe_backend.passes.PassManager and fhe_backend.passes.DEFAULT_PASSES\n"
        "assert importlib.util.find_spec('passes') is None\n"
        "assert importlib.util.find_spec('benchmarks') is None\n"
    )
    result = subprocess.run(
        [str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: pip install -e '.[lint]'")
    return path


def test_ruff_check_is_clean():
    """The lint configuration of pyproject.toml holds on the whole tree (as in .ci/run)."""
    result = subprocess.run(
        [_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_mypy_is_clean():
    """The type check configured in pyproject.toml passes (as in .ci/run)."""
    result = subprocess.run(
        [_tool("mypy"), "--no-incremental"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
