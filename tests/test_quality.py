"""The project's own checks run with the suite, so CI enforces them: ruff (lint + format) and mypy --strict."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_lint() -> None:
    _run(str(BIN / "ruff"), "check", "glance_migrator", "migrations", "tests", "benchmarks")


def test_ruff_format() -> None:
    _run(str(BIN / "ruff"), "format", "--check", "glance_migrator", "migrations", "tests", "benchmarks")


def test_mypy_strict() -> None:
    _run(str(BIN / "mypy"))


DELETING_CALLS = {"delete_image", "delete_from_store"}  # Glance methods that destroy images or data


def _deletes(node: ast.AST) -> bool:
    """A call of a deleting Glance method, or a JSON patch that removes a location (Glance deletes its data)."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return False
    if node.func.attr in DELETING_CALLS:
        return True
    return node.func.attr == "patch" and any(
        isinstance(key, ast.Constant)
        and key.value == "op"
        and isinstance(value, ast.Constant)
        and value.value == "remove"
        for arg in ast.walk(node)
        if isinstance(arg, ast.Dict)
        for key, value in zip(arg.keys, arg.values, strict=True)
    )


def test_only_deletion_py_deletes() -> None:
    """One module decides what may be deleted and does it (glance_migrator/deletion.py); glance.py only defines
    the calls. Any other module that deletes an image, a store's copy or a location fails this."""
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "glance_migrator").rglob("*.py"))
        if path.name not in ("deletion.py", "glance.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if _deletes(node)
    ]
    assert not offenders, f"deletes outside glance_migrator/deletion.py: {offenders}"
    deleting = [node for node in ast.walk(ast.parse((ROOT / "glance_migrator/deletion.py").read_text()))]
    assert any(_deletes(node) for node in deleting)  # the check sees the deletions where they are
