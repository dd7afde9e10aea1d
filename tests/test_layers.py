"""Imports run downward only (README "Layout"): common <- tasks <- training <- attacks <- benchmarks; defences see
the task protocol (``tasks.base``) and the floor, nothing else. Imports at call time count too; only
``if TYPE_CHECKING:`` imports (annotations) are exempt."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ("common", "tasks", "training", "attacks", "defenses", "benchmarks")
ALLOWED = {
    "common": {"common"},
    "tasks": {"common", "tasks"},
    "training": {"common", "tasks", "training"},
    "attacks": {"common", "tasks", "training", "attacks"},
    "defenses": {"common", "tasks.base", "defenses"},
    "benchmarks": set(SUITE),
}


def suite_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a suite package in ``path``, outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    exempt = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
              for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                                                     if node.module in SUITE]
    return [(line, m) for line, m in found if m.split(".")[0] in SUITE]


def allowed(package: str, module: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in ALLOWED[package])


@pytest.mark.parametrize("package", SUITE)
def test_imports_run_downward(package):
    wrong = [f"{p.relative_to(ROOT)}:{line}: {m}" for p in sorted((ROOT / package).glob("*.py"))
             for line, m in suite_imports(p) if not allowed(package, m)]
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_the_check_sees_call_time_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from attacks.base import Attack\n"
                 "def g():\n    from benchmarks.records import der\n")
    assert suite_imports(f) == [(5, "benchmarks.records")]
