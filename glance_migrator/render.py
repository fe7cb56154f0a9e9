"""How results look: the status table, the JSON document, and the exit code they imply. One place."""

from __future__ import annotations

import csv
import json
import sys
import threading
from collections.abc import Iterable, Iterator
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from glance_migrator.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, UsageError
from glance_migrator.models import ImageRow
from glance_migrator.reports import STATUS_COLUMNS, RunReport, status_head, status_records
from glance_migrator.state import PATHS, TERMINAL, State, Strategy
from glance_migrator.statedb import Lease, Totals

if TYPE_CHECKING:  # only annotations: status and report start without the cloud libraries these import
    from glance_migrator.checks import Finding
    from glance_migrator.commands import Plan


def exit_code(rep: RunReport) -> int:
    """0 once nothing is left that a run could move (every image done, or skipped by design); 1 while failed or
    blocked images wait for the operator. `run --resume` of a finished run moves nothing: 0, so that a loop of
    resumes ends (the run that failed those images said 1; `status` lists them)."""
    if not rep.complete:
        return EXIT_INTERRUPTED if rep.unfinished else EXIT_OK
    return EXIT_PARTIAL if rep.need_attention and not rep.already_complete else EXIT_OK


def print_plan(the_plan: Plan) -> None:
    """One line per image: what a run would do with it and why; then the totals. Plain text, never cut."""
    print(f"strategy {the_plan.strategy} ({the_plan.why})")
    actions = {State.PENDING: "migrate", State.DONE: "done already", State.SKIPPED: "skip"}
    counts: dict[str, int] = {}
    to_move = 0
    for row, reason in the_plan.rows:  # printed as discovery lists them
        action = actions.get(State(row.state), row.state)
        counts[action] = counts.get(action, 0) + 1
        to_move += (row.size or 0) if row.state == State.PENDING else 0
        why = f": {reason}" if reason else ""
        print(f"{action:<13} {row.image_id} {row.name or 'unnamed'} ({row.size or 0} bytes){why}")
    summary = ", ".join(f"{n} {action}" for action, n in counts.items()) or "no image"
    print(f"{summary}; {to_move} bytes to move. Nothing was changed (dry run).")


class _Only(ProgressColumn):
    """A column drawn only on the lines of one kind ("images", "bytes"); blank elsewhere (workers)."""

    def __init__(self, column: ProgressColumn, *kinds: str) -> None:
        super().__init__()
        self.column = column
        self.kinds = kinds

    def render(self, task: Task) -> RenderableType:
        return self.column.render(task) if task.fields.get("kind") in self.kinds else ""


class LiveProgress:
    """The live display on an interactive terminal: images and bytes with rate and ETA, a line per worker."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            _Only(BarColumn(), "images", "bytes"),
            _Only(MofNCompleteColumn(), "images"),
            _Only(DownloadColumn(binary_units=True), "bytes"),
            _Only(TransferSpeedColumn(), "bytes"),
            _Only(TimeElapsedColumn(), "images"),
            _Only(TimeRemainingColumn(), "bytes"),
            console=Console(stderr=True),
        )
        self._images = self.progress.add_task("images", total=None, kind="images")
        self._bytes = self.progress.add_task("bytes ", total=None, kind="bytes")
        self._workers: dict[str, TaskID] = {}
        self._finished: set[str] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.progress.stop()

    def listed(self, count: int) -> None:
        self.progress.update(self._images, description="listing images", completed=count)

    def start(self, totals: Totals) -> None:
        # Failed and blocked images count as finished, and a run may move them again: once each, not twice.
        self._finished = set(totals.retryable)
        self.progress.update(self._images, description="images", total=totals.images, completed=totals.finished)
        self.progress.update(self._bytes, total=totals.bytes, completed=totals.finished_bytes)

    def update(self, worker: str, row: ImageRow | None) -> None:
        with self._lock:
            if worker not in self._workers:
                self._workers[worker] = self.progress.add_task(worker, total=None, start=False, kind="worker")
            text = f"{worker}: idle" if row is None else f"{worker}: {row.name or row.image_id} -> {row.state}"
            self.progress.update(self._workers[worker], description=text)
            if row is not None and row.state in TERMINAL and row.image_id not in self._finished:
                self._finished.add(row.image_id)
                self.progress.advance(self._images)
                self.progress.advance(self._bytes, row.size or 0)


def print_findings(findings: list[Finding]) -> None:
    for f in findings:
        mark = "ok " if f.ok else "NO " if f.blocking else "?? "
        print(f"{mark} {f.topic}: {f.detail}")


def findings_exit_code(findings: list[Finding]) -> int:
    """The exit code of the first blocking problem (a doubt, ??, does not fail `check`)."""
    return next((f.error.exit_code for f in findings if not f.ok and f.blocking), EXIT_OK)


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"
    CSV = "csv"
    VALUE = "value"


def print_images(rep: RunReport, fmt: Format, columns: list[str]) -> None:
    """Every image of the run, like `openstack ... -f FORMAT -c COLUMN`: json is the whole document. json, csv
    and value stream the images from the state DB (memory stays flat at any size); table and yaml hold them."""
    if fmt == Format.JSON and not columns:
        print_json(rep)
        return
    known = list(STATUS_COLUMNS)
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise UsageError(f"unknown column(s) {', '.join(unknown)}; columns: {', '.join(known)}")
    cols = columns or known
    rows = ({c: image[c] for c in cols} for image in status_records(rep))
    if fmt == Format.JSON:
        _json_list(rows, indent="")
        sys.stdout.write("\n")
    elif fmt == Format.YAML:
        import yaml  # noqa: PLC0415 - a few hundredths of a second of start-up that only -f yaml needs

        print(yaml.safe_dump(list(rows), sort_keys=False), end="")
    elif fmt == Format.CSV:
        writer = csv.DictWriter(sys.stdout, fieldnames=cols, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elif fmt == Format.VALUE:
        for row in rows:
            print(" ".join("" if v is None else str(v) for v in row.values()))
    else:
        table = Table(*cols, box=None, pad_edge=False)
        for row in rows:
            table.add_row(*("" if v is None else str(v) for v in row.values()))
        # On a terminal, fit the screen; into a pipe or file, never cut a value (ids get copied from there).
        Console(highlight=False, width=None if sys.stdout.isatty() else 100_000).print(table)


def _json_list(items: Iterable[Any], indent: str, out: TextIO | None = None) -> None:
    """Write a JSON list item by item, as json.dump(list, indent=2) would lay it out at nesting `indent`."""
    out = out or sys.stdout
    pad = indent + "  "
    first = True
    for item in items:  # json.dumps never writes an empty line, nor a raw newline inside a value
        out.write(("[\n" if first else ",\n") + pad + json.dumps(item, indent=2).replace("\n", "\n" + pad))
        first = False
    out.write("[]" if first else f"\n{indent}]")


def write_audit(records: Iterable[dict[str, Any]], path: Path) -> int:
    """JSON (with each image's events) or, for a .csv path, one CSV row per image (events left out); streamed.
    Returns how many images were written."""
    count = 0

    def counted() -> Iterator[dict[str, Any]]:
        nonlocal count
        for record in records:
            count += 1
            yield record

    with path.open("w", newline="") as f:
        if path.suffix.lower() == ".csv":
            writer: csv.DictWriter[str] | None = None
            for record in counted():
                if writer is None:
                    fields = [k for k in record if k != "events"]
                    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
                    writer.writeheader()
                writer.writerow(record)
        else:
            _json_list(counted(), indent="", out=f)
            f.write("\n")
    return count


def print_json(rep: RunReport) -> None:
    """The status document, as json.dump(indent=2) lays it out, its images streamed."""
    head = json.dumps(status_head(rep), indent=2)
    sys.stdout.write(head[: head.rindex("\n}")] + ',\n  "images": ')
    _json_list(status_records(rep), indent="  ")
    sys.stdout.write("\n}\n")


def print_status(rep: RunReport) -> None:
    console = Console(highlight=False, soft_wrap=True)
    run = rep.run
    state = "complete" if rep.complete else "in progress (continue with `glance-migrator run --resume`)"
    console.print(f"run {run.id}: {run.from_store} -> {run.to_store} ({run.strategy}), {rep.total} image(s), {state}")
    table = Table("state", "images", box=None, pad_edge=False)
    states = [str(st) for st in (*PATHS[Strategy(run.strategy)], State.FAILED, State.BLOCKED, State.SKIPPED)]
    states += [st for st in rep.counts if st not in states]  # images moved by the other strategy (0-byte ones)
    for st in states:
        table.add_row(st, str(rep.counts.get(st, 0)))
    console.print(table)
    if rep.leases:
        console.print()
        for lease in rep.leases:
            console.print(_lease_line(lease))
    if rep.problems:  # plain lines, never wrapped or cut: operators grep and copy these ids
        console.print()
        for row in rep.problems:
            where = f" at {row.failed_at}" if row.failed_at else ""
            console.print(f"{row.state}{where}: {row.image_id} ({row.name or 'unnamed'}): {row.error or ''}")


def _lease_line(lease: Lease) -> str:
    """`working: IMAGE (NAME) at STATE: host H pid P worker-N for 2m05s`, and what a stale lease means."""
    who = f"host {lease.holder.host} pid {lease.holder.pid} {lease.holder.worker}" if lease.holder else lease.raw_owner
    held = f" for {_age(lease.now - lease.since)}" if lease.since else ""
    line = f"{lease.image_id} ({lease.name or 'unnamed'}) at {lease.state}: {who}{held}"
    if not lease.stale:
        return f"working: {line}"
    if lease.expires is not None and lease.expires < lease.now:
        why = f"lapsed {_age(lease.now - lease.expires)} ago (its runner stopped renewing it)"
    else:
        why = "its process is gone"
    return f"stale: {line}: {why}; the next runner to claim it continues from its last recorded step"


def _age(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
