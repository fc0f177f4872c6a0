"""Imports go one way: flows -> pipelines -> lm_core, and heavy packages load only where they are used.

Every import anywhere in a file counts (inside functions too), as does importlib.import_module or
__import__ with a literal name.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "lm_core": {"prefect", "mlflow", "duckdb", "pipelines", "flows"},
    "pipelines": {"prefect", "flows"},
}


def imported_modules(source: str, package: str) -> set[str]:
    """Top-level names of every module the source imports; relative imports resolve to `package`."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(package if node.level else node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return {n.split(".")[0] for n in names if n}


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_modules(path.read_text(encoding="utf-8"), package) & FORBIDDEN[package]
        found += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(bad)]
    return found


def test_checker_sees_every_kind_of_import():
    source = (
        "import os\n"
        "from . import sibling\n"
        "def f():\n    import prefect.flows\n"
        "class C:\n    def g(self):\n        from mlflow import MlflowClient\n"
        "x = importlib.import_module('duckdb')\n"
        "y = __import__('flows.cli')\n"
    )
    assert imported_modules(source, "lm_core") == {"os", "lm_core", "prefect", "mlflow", "duckdb", "flows"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    files = list((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    assert violations(package) == []


def loaded_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(m for m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def top_level(modules: list[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_import_lm_core_is_light():
    loaded = top_level(loaded_after("import lm_core"))
    assert not loaded & {"deepspeed", "prefect", "mlflow", "duckdb", "pipelines", "flows"}


def test_lm_core_modules_do_not_pull_in_services():
    modules = sorted(p.stem for p in (ROOT / "lm_core").glob("*.py") if p.stem != "__init__")
    loaded = top_level(loaded_after("\n".join(f"import lm_core.{m}" for m in modules)))
    assert "torch" in loaded  # sanity: the modules really were imported
    assert not loaded & {"deepspeed", "prefect", "mlflow", "duckdb", "pipelines", "flows"}


def pipelines_modules() -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "pipelines").rglob("*.py")
                  if p.stem not in ("__init__", "__main__"))


def test_pipelines_do_not_pull_in_prefect():
    modules = pipelines_modules()
    names = loaded_after("\n".join(f"import {m}" for m in modules))
    assert set(modules) <= set(names)  # sanity: every module really was imported
    assert not top_level(names) & {"prefect", "flows"}


# --- the rooms of pipelines/ -------------------------------------------------------------------------

ROOMS = ("data", "stages", "apps")  # imports go apps -> stages -> data; the foundation imports no room


def pipelines_imports() -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    """module -> {(imported pipelines module, names imported from it)}, every import in the file."""
    found: dict[str, set] = {}
    for path in (ROOT / "pipelines").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipelines"):
                for alias in node.names:  # `from pipelines.stages import register` imports a module
                    sub = f"{node.module}.{alias.name}"
                    is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file()
                    edges.add((sub, ()) if is_module else (node.module, (alias.name,)))
            elif isinstance(node, ast.Import):
                edges.update((a.name, ()) for a in node.names if a.name.startswith("pipelines"))
        found[module] = edges
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ROOMS else "foundation"


def test_rooms_import_downward_only():
    """apps -> stages -> data; the foundation (config, workspace, mlflow_store, environment) imports no room,
    except that the pipeline config composes the small configs the data library owns (e.g. NearDupConfig)."""
    rank = {"foundation": 0, "data": 1, "stages": 2, "apps": 3}
    allowed = {("pipelines.config", "data")}
    bad = [f"{m} ({room(m)}) imports {target} ({room(target)})" for m, edges in pipelines_imports().items()
           for target, _ in edges if room(target) != "foundation" and rank[room(target)] > rank[room(m)]
           and not m.endswith("__main__") and (m, room(target)) not in allowed]
    assert bad == []


def test_no_module_imports_another_modules_private_name():
    bad = [f"{m} imports {name} from {target}" for m, edges in pipelines_imports().items()
           for target, names in edges for name in names if name.startswith("_") and target != m]
    assert bad == []


def test_pipelines_imports_have_no_circle():
    imports = pipelines_imports()  # parsed once (not once per edge)
    graph = {m: {t for t, _ in edges if t in imports} for m, edges in imports.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            assert (cycle := visit(start, [])) is None, " -> ".join(cycle)


def test_pipelines_import_mlflow_and_deepspeed_where_used():
    # STYLE.md principle 6: heavy imports happen where they are used, so `lmforge --help` stays fast;
    # the runner imports every stage module, as the CLI does
    loaded = top_level(loaded_after("import pipelines.stages.runner"))
    assert "pipelines" in loaded
    assert not loaded & {"mlflow", "deepspeed", "prefect"}
