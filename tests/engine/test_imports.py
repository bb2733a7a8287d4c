"""The package's import structure: the estimators need neither the cells nor the engine, and the
engine names no estimator class (an estimator says which kernel rule it is, ``kernel_mode``)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "hmrnn_lightning"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (inside functions too), as dotted names;
    ``from x import y`` yields ``x`` and ``x.y``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imported_names(path: Path) -> set[str]:
    """The names ``from ... import`` brings into ``path``."""
    return {alias.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
            for alias in node.names}


@pytest.mark.parametrize("path", sorted((PACKAGE / "estimators").glob("*.py")), ids=lambda p: p.name)
def test_estimators_import_neither_cells_nor_engine(path):
    bad = {m for m in imported_modules(path)
           if m.startswith(("hmrnn_lightning.cells", "hmrnn_lightning.engine")) or m in ("hmrnn_lightning",)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "engine").glob("*.py")), ids=lambda p: p.name)
def test_the_engine_imports_no_estimator_class(path):
    bad = {m for m in imported_modules(path) if m.startswith("hmrnn_lightning.estimators")}
    bad |= {n for n in imported_names(path) if n.endswith("Estimator")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    """The checks above walk the whole tree, so a lazy import cannot hide."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from hmrnn_lightning.estimators import StepEstimator\n")
    assert "hmrnn_lightning.estimators" in imported_modules(module)
    assert "StepEstimator" in imported_names(module)
