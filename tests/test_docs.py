"""The README's state diagrams are the transition table's, not drawings that can drift from it.

GLANCE_MIGRATOR_UPDATE_DOCS=1 ./dev test tests/test_docs.py   rewrites them from the table.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from glance_migrator import errors
from glance_migrator.state import PATHS, mermaid
from tests.lab import GLANCE_RELEASES, LATEST

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_state_diagrams_match_the_transition_table() -> None:
    text = README.read_text()
    blocks = re.findall(r"```mermaid\n.*?```", text, flags=re.DOTALL)
    assert len(blocks) == len(PATHS), "one diagram per strategy, in the order of state.PATHS"
    if os.environ.get("GLANCE_MIGRATOR_UPDATE_DOCS"):
        for strategy, old in zip(PATHS, blocks, strict=True):
            text = text.replace(old, mermaid(strategy))
        README.write_text(text)
        blocks = [mermaid(strategy) for strategy in PATHS]
    for strategy, block in zip(PATHS, blocks, strict=True):
        assert block == mermaid(strategy), f"README's {strategy} diagram drifted; see this file's docstring"


def test_readme_documents_every_exit_code() -> None:
    codes = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    for code in codes:
        assert f"\n| {code} |" in README.read_text(), f"exit code {code} is missing from README's table"


def test_readme_release_table_names_each_release_the_suite_runs() -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith("| ") and " | 2." in line]
    tested = {row.split(" | ")[1]: row.split(" | ")[3] for row in rows}  # Glance major -> "Tested" column
    for major, release in GLANCE_RELEASES.items():
        assert tested.get(major) in ("whole suite", "core scenarios"), f"README: Glance {major} ({release.series})"
    assert tested.get(LATEST) == "whole suite"
