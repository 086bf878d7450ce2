"""The layout shows the data flow: a core every stage imports and that imports no stage; each stage imports only
the core and earlier stages; the CLI parses options and calls one library function per command."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fmask"
# The data flow, earliest first. predict applies a trained model (export shows its guesses beside a query); run
# chains the stages; cli wraps them all.
STAGES = ("pool", "train", "predict", "fisher", "query", "label", "plot", "run", "cli")
# What a CLI module may import besides fmask and the standard library: option parsing and presentation only.
CLI_THIRD_PARTY = {"typer", "rich", "click", "pandas"}
# The only modules of the CLI that may define helpers that are not commands: the app and the presentation layer.
CLI_HELPER_MODULES = {"__init__", "ui"}


def _modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules.append((name, path))
    return modules


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement names, at any depth (lazy imports in functions count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "fmask":  # `from fmask import core, paths`: the names may be submodules
                found += [(node.lineno, f"fmask.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def _layer(module: str) -> str | None:
    """'core', a stage name, or None for the package root (whose lazy exports may name any stage)."""
    parts = module.split(".")
    if parts[0] != "fmask" or len(parts) == 1 or parts[1] in ("__main__",):
        return None
    return parts[1]


def test_every_module_sits_in_the_core_or_a_stage():
    misplaced = [name for name, _ in _modules() if _layer(name) not in (None, "core", *STAGES)]
    assert misplaced == [], f"modules outside fmask/core and the stage packages {STAGES}: {misplaced}"


def _layer_violations(modules: list[tuple[str, Path]]) -> list[str]:
    violations = []
    for name, path in modules:
        layer = _layer(name)
        if layer is None:
            continue
        for line, target in _imports(path):
            target_layer = _layer(target)
            if target_layer not in STAGES or target_layer == layer:  # the core, the package root, itself
                continue
            if layer == "core" or layer not in STAGES or STAGES.index(target_layer) > STAGES.index(layer):
                violations.append(f"{path.name}:{line} ({layer}) imports {target}")
    return violations


def test_the_core_imports_no_stage_and_no_stage_imports_a_later_one():
    violations = _layer_violations(_modules())
    assert violations == [], "imports against the data flow:\n" + "\n".join(violations)


def test_the_layering_check_catches_backward_imports(tmp_path):
    core_module = tmp_path / "core_bad.py"
    core_module.write_text("def f():\n    from fmask.pool.pool import load_pool\n")  # lazy, still an import
    pool_module = tmp_path / "pool_bad.py"
    pool_module.write_text("from fmask import query\n")
    train_module = tmp_path / "train_ok.py"
    train_module.write_text("from fmask.pool.pool import load_pool\nfrom fmask.core import paths\n")
    found = _layer_violations([("fmask.core.bad", core_module), ("fmask.pool.bad", pool_module),
                               ("fmask.train.ok", train_module)])
    assert found == ["core_bad.py:2 (core) imports fmask.pool.pool", "pool_bad.py:1 (pool) imports fmask.query"]


# Libraries that compute: a CLI module that imports one does work that belongs in the library.
COMPUTING_LIBRARIES = {"torch", "torchvision", "numpy", "scipy", "sklearn", "PIL", "safetensors", "timm", "matplotlib"}
# What a CLI loop may do: show the results the library returned, a line or row at a time (or register commands).
OUTPUT_CALLS = {"done", "echo", "add_row", "add_column", "show", "print", "print_table",
                "import_module"}  # the app registers each command module


def _is_output_statement(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.If):
        return all(_is_output_statement(s) for s in statement.body + statement.orelse)
    if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)):
        return False
    func = statement.value.func
    return (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) in OUTPUT_CALLS


@pytest.mark.parametrize("name,path", [(n, p) for n, p in _modules() if n.startswith("fmask.cli")],
                         ids=lambda value: value if isinstance(value, str) else "")
def test_cli_modules_hold_no_math_and_no_logic(name, path):
    computing = sorted({target.split(".")[0] for _, target in _imports(path)} & COMPUTING_LIBRARIES)
    assert computing == [], f"{name} imports {computing}: computing belongs in the library, the CLI calls it"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.For, ast.While)):
            assert all(_is_output_statement(s) for s in node.body), (
                f"{name} line {node.lineno} loops over data; move the work to the library and show its result")
