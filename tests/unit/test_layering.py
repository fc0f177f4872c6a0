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


def test_pipelines_do_not_pull_in_prefect():
    modules = sorted(p.stem for p in (ROOT / "pipelines").glob("*.py") if p.stem not in ("__init__", "__main__"))
    names = loaded_after("\n".join(f"import pipelines.{m}" for m in modules))
    assert {f"pipelines.{m}" for m in modules} <= set(names)  # sanity: every module really was imported
    assert not top_level(names) & {"prefect", "flows"}


def test_pipelines_import_mlflow_and_deepspeed_where_used():
    # STYLE.md principle 6: heavy imports happen where they are used, so `lmforge --help` stays fast;
    # the runner imports every stage module, as the CLI does
    loaded = top_level(loaded_after("import pipelines.runner"))
    assert "pipelines" in loaded
    assert not loaded & {"mlflow", "deepspeed", "prefect"}
