"""How results look: the status table, the JSON document, and the exit code they imply. One place."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from glance_migrator.checks import Finding
from glance_migrator.commands import Plan, RunReport, status_document
from glance_migrator.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL
from glance_migrator.state import PATHS, TERMINAL, State, Strategy


def exit_code(rep: RunReport) -> int:
    if not rep.complete:
        return EXIT_INTERRUPTED if any(r.state not in TERMINAL for r in rep.images) else EXIT_OK
    return EXIT_PARTIAL if rep.problems else EXIT_OK


def print_plan(the_plan: Plan) -> None:
    """One line per image: what a run would do with it and why; then the totals. Plain text, never cut."""
    print(f"strategy {the_plan.strategy} ({the_plan.why})")
    actions = {State.PENDING: "migrate", State.DONE: "done already", State.SKIPPED: "skip"}
    counts: dict[str, int] = {}
    for row, reason in the_plan.rows:
        action = actions.get(State(row.state), row.state)
        counts[action] = counts.get(action, 0) + 1
        why = f": {reason}" if reason else ""
        print(f"{action:<13} {row.image_id} {row.name or 'unnamed'} ({row.size or 0} bytes){why}")
    summary = ", ".join(f"{n} {action}" for action, n in counts.items()) or "no image"
    print(f"{summary}; {the_plan.bytes_to_move()} bytes to move. Nothing was changed (dry run).")


def print_findings(findings: list[Finding]) -> None:
    for f in findings:
        print(f"{'ok ' if f.ok else 'NO '} {f.topic}: {f.detail}")


def findings_exit_code(findings: list[Finding]) -> int:
    return next((f.error.exit_code for f in findings if not f.ok), EXIT_OK)


def print_json(rep: RunReport) -> None:
    json.dump(status_document(rep), sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_status(rep: RunReport) -> None:
    console = Console(highlight=False, soft_wrap=True)
    run = rep.run
    state = "complete" if rep.complete else "in progress (continue with `glance-migrator run --resume`)"
    console.print(
        f"run {run.id}: {run.from_store} -> {run.to_store} ({run.strategy}), {len(rep.images)} image(s), {state}"
    )
    table = Table("state", "images", box=None, pad_edge=False)
    path = PATHS[Strategy(run.strategy)]
    for st in (*path, State.FAILED, State.BLOCKED, State.SKIPPED):
        table.add_row(str(st), str(rep.counts.get(str(st), 0)))
    console.print(table)
    if rep.problems:  # plain lines, never wrapped or cut: operators grep and copy these ids
        console.print()
        for row in rep.problems:
            where = f" at {row.failed_at}" if row.failed_at else ""
            console.print(f"{row.state}{where}: {row.image_id} ({row.name or 'unnamed'}): {row.error or ''}")
