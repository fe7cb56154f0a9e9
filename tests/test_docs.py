"""The README's state diagram is the transition table's, not a drawing that can drift from it."""

from __future__ import annotations

from pathlib import Path

from glance_migrator.state import PATHS, mermaid

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_state_diagram_matches_the_transition_table() -> None:
    for strategy in PATHS:
        assert mermaid(strategy) in README, f"regenerate the README diagram: print(mermaid({strategy!r}))"


def test_readme_documents_every_exit_code() -> None:
    from glance_migrator import errors  # noqa: PLC0415

    codes = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    for code in codes:
        assert f"\n| {code} |" in README, f"exit code {code} is missing from README's table"
