"""What the read-only commands show (`status`, `report`): read from the state DB only, never from Glance, so they
start without the cloud libraries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from glance_migrator.models import ImageRow, Run
from glance_migrator.state import PATHS, RETRYABLE, TERMINAL, State, Strategy
from glance_migrator.statedb import Lease, StateDB


@dataclass
class RunReport:
    """A run as the state DB has it: counts per state and the images that did not move, held in memory (both stay
    small); every image only as a stream (`rows()`), read from the DB when asked."""

    run: Run
    counts: dict[str, int]
    problems: list[ImageRow]  # every image that did not move, with its reason: failed, blocked and skipped ones
    rows: Callable[[], Iterator[ImageRow]]  # every image of the run in run order, streamed
    already_complete: bool = False  # `run --resume` found the run finished: nothing a resume could move
    leases: list[Lease] = field(default_factory=list)  # who works on which image now (one per worker) and stale ones

    @property
    def complete(self) -> bool:
        return self.run.finished_at is not None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def unfinished(self) -> int:
        """Images still on their way (neither done nor failed, blocked or skipped)."""
        return sum(n for state, n in self.counts.items() if state not in TERMINAL)

    @property
    def need_attention(self) -> list[ImageRow]:
        """Failed and blocked images: the operator deals with the cause, then `retry`. (Skipped ones are not
        moved by design: not active, not in the source store...)"""
        return [row for row in self.problems if row.state in RETRYABLE]


def report(db: StateDB, run_id: int | None = None) -> RunReport:
    run = db.get_run(run_id)
    problems = list(db.iter_images(run.id, [*sorted(RETRYABLE), State.SKIPPED]))
    return RunReport(run, db.counts(run.id), problems, lambda: db.iter_images(run.id), leases=db.leases(run.id))


def status_head(rep: RunReport) -> dict[str, Any]:
    """`status --json` without its images: the run, the counts per state and the total."""
    run = rep.run
    return {
        "run": {
            "id": run.id,
            "from_store": run.from_store,
            "to_store": run.to_store,
            "strategy": run.strategy,
            "cloud": run.cloud,
            "created_at": _iso(run.created_at),
            "finished_at": _iso(run.finished_at),
            "complete": rep.complete,
        },
        "counts": {
            **{
                str(state): rep.counts.get(str(state), 0)
                for state in (*PATHS[Strategy(run.strategy)], State.FAILED, State.BLOCKED, State.SKIPPED)
            },
            **rep.counts,  # and the states of images moved by the other strategy (0-byte images: copy-image)
        },
        "total": rep.total,
        "leases": [
            {
                "image_id": lease.image_id,
                "state": lease.state,
                "host": lease.holder.host if lease.holder else None,
                "pid": lease.holder.pid if lease.holder else None,
                "worker": lease.holder.worker if lease.holder else None,
                "holder": lease.raw_owner,
                "since": _iso(lease.since),
                "expires": _iso(lease.expires),
                "stale": lease.stale,
            }
            for lease in rep.leases
        ],
    }


# `status --json`'s image records and `status -f ... -c COLUMN`'s columns: name -> how it is read off the row
STATUS_COLUMNS: dict[str, Callable[[ImageRow], Any]] = {
    "id": lambda row: row.image_id,
    "name": lambda row: row.name,
    "state": lambda row: row.state,
    "strategy": lambda row: row.strategy,
    "failed_at": lambda row: row.failed_at,
    "error": lambda row: row.error,
    "error_kind": lambda row: row.error_kind,
    "attempts": lambda row: row.attempts,
    "size": lambda row: row.size,
    "stores_before": lambda row: row.stores,
    "stores_after": lambda row: row.after_stores,
    "copy_image_id": lambda row: row.copy_image_id,
    "updated_at": lambda row: _iso(row.updated_at),
}


def status_records(rep: RunReport) -> Iterator[dict[str, Any]]:
    """`status --json`'s images, one record each, streamed from the state DB."""
    for row in rep.rows():
        yield {column: read(row) for column, read in STATUS_COLUMNS.items()}


def audit(db: StateDB, run_id: int | None = None, batch: int = 1000) -> Iterator[dict[str, Any]]:
    """`report`: every image of the run with what it was, what it is, how long it took and what happened; streamed,
    a batch of images at a time with their events. A run that does not exist is refused here, before any output."""
    run = db.get_run(run_id)
    return _audit_stream(db, run, batch)


def _audit_stream(db: StateDB, run: Run, batch: int) -> Iterator[dict[str, Any]]:
    pending: list[ImageRow] = []
    for row in db.iter_images(run.id, batch=batch):
        pending.append(row)
        if len(pending) == batch:
            yield from _audit_records(db, run, pending)
            pending = []
    yield from _audit_records(db, run, pending)


def _audit_records(db: StateDB, run: Run, rows: list[ImageRow]) -> Iterator[dict[str, Any]]:
    events: dict[str, list[dict[str, Any]]] = {}
    for event in db.events_of(run.id, [row.image_id for row in rows]) if rows else ():
        events.setdefault(event.image_id, []).append(
            {"at": _iso(event.at), "from": event.from_state, "to": event.to_state, "message": event.message}
        )
    for row in rows:
        seconds = (row.finished_at - row.started_at).total_seconds() if row.finished_at and row.started_at else None
        yield {
            "run": run.id,
            "strategy": row.strategy,
            "from_store": run.from_store,
            "to_store": run.to_store,
            "id": row.image_id,
            "name": row.name,
            "owner": row.owner,
            "visibility": row.visibility,
            "state": row.state,
            "size_before": row.size,
            "checksum_before": row.checksum,
            "os_hash_algo": row.os_hash_algo,
            "os_hash_value_before": row.os_hash_value,
            "stores_before": row.stores,
            "size_after": row.after_size,
            "checksum_after": row.after_checksum,
            "os_hash_algo_after": row.after_hash_algo,
            "os_hash_value_after": row.after_hash_value,
            "stores_after": row.after_stores,
            "copy_image_id": row.copy_image_id,
            "attempts": row.attempts,
            "failed_at": row.failed_at,
            "error": row.error,
            "error_kind": row.error_kind,
            "started_at": _iso(row.started_at),
            "finished_at": _iso(row.finished_at),
            "seconds": seconds,
            "events": events.get(row.image_id, []),
        }


def _iso(value: Any) -> str | None:
    return value.isoformat() + "Z" if value is not None else None
