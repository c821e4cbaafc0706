"""The layout is a specification too: one ``swapmoe`` namespace over the repository's folders,
no import cycles (function-level imports included), a gRPC-free core, and each process
importing only what its own extra installs."""

import ast
import graphlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def first_party_modules() -> dict[str, Path]:
    """Module name -> file, through pyproject's package-dir mapping (generated stubs left out)."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            if "_pb2" not in path.name:
                modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


MODULES = first_party_modules()


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (so a function-level import counts)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def first_party_imports(module: str) -> set[str]:
    found = set()
    for name in imports_of(MODULES[module]):
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module and not module.startswith(name + "."):
            found.add(name)
    return found


def test_every_package_maps_to_a_folder_of_the_repository():
    for package, folder in PACKAGE_DIRS.items():
        assert package.startswith("swapmoe."), package
        assert (ROOT / folder / "__init__.py").is_file(), folder


def test_the_first_party_import_graph_has_no_cycle():
    graph = {module: first_party_imports(module) for module in MODULES}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_code_imports_its_own_packages_only_through_the_swapmoe_namespace():
    top_level = {folder.split("/")[0] for folder in PACKAGE_DIRS.values()} | {"executor", "models"}
    for module, path in MODULES.items():
        stray = {n for n in imports_of(path) if n.split(".")[0] in top_level - {"swapmoe"}}
        assert not stray, f"{module} imports {stray}: use swapmoe.<package>"


@pytest.mark.parametrize("package, forbidden", [
    ("swapmoe.core", ("grpc", "google", "torch", "transformers", "ray", "sklearn", "swapmoe.v1", "swapmoe.rpc",
                      "swapmoe.executor", "swapmoe.planner_service")),
    ("swapmoe.rpc", ("torch", "transformers", "ray", "sklearn", "swapmoe.executor", "swapmoe.planner_service")),
    ("swapmoe.planner_service", ("torch", "transformers", "swapmoe.executor")),
])
def test_a_layer_imports_nothing_above_it(package, forbidden):
    for module in [m for m in MODULES if m == package or m.startswith(package + ".")]:
        bad = {n for n in imports_of(MODULES[module]) if n.startswith(forbidden)}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_every_module_opens_with_a_docstring_saying_what_it_owns():
    missing = [m for m, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing


@pytest.mark.slow
@pytest.mark.parametrize("module", ["swapmoe.planner_service.server", "swapmoe.orchestration.fleet",
                                    "swapmoe.cli.main", "swapmoe.cli.client"])
def test_planner_and_control_node_processes_load_no_torch(module):
    """A workstation running the planner or the fleet needs neither torch nor the executor extra."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_executor_process_loads_no_planner_libraries():
    """An edge device runs the executor without Ray or scikit-learn installed."""
    code = ("import sys, swapmoe.executor.server, swapmoe.executor.planner_link, swapmoe.executor.prometheus; "
            "print(sorted(m for m in ('ray', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_the_executor_extra_and_the_planner_extra_do_not_overlap_in_heavy_libraries():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]

    def names(requirements):
        return {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in requirements}

    assert not names(base) & {"torch", "transformers", "ray", "scikit-learn"}
    assert not names(extras["executor"]) & {"ray", "scikit-learn"}
    assert not names(extras["planner"]) & {"torch", "transformers"}
