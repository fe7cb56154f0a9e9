"""The project's own checks run with the suite, so CI enforces them: ruff (lint + format) and mypy --strict."""

from __future__ import annotations

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
