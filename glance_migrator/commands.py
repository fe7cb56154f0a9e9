"""What the commands that talk to Glance do (run, check, retry), without any CLI: the core API that cli.py parses
options for. What status and report show is reports.py's."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from glance_migrator.checks import CloudProfile, Finding, choose_strategy, preflight
from glance_migrator.checks import report as cloud_report
from glance_migrator.discovery import discover, parse_image_ids
from glance_migrator.errors import UsageError
from glance_migrator.filters import NO_FILTERS, Filters
from glance_migrator.formats import refusal_of
from glance_migrator.glance import Glance
from glance_migrator.models import ImageRow
from glance_migrator.reports import RunReport, report
from glance_migrator.runner import ProgressSink, Runner, graceful_interrupts
from glance_migrator.sharing import LocationIndex
from glance_migrator.spool import Spool, default_spool_dir
from glance_migrator.state import RETRYABLE, State, Strategy
from glance_migrator.statedb import StateDB
from glance_migrator.timeouts import STUCK_AFTER

log = logging.getLogger(__name__)

GlanceFactory = Callable[[], Glance]


def run_migration(
    db: StateDB,
    connect: GlanceFactory,
    *,
    from_store: str | None,
    to_store: str | None,
    image_ids: Sequence[str] = (),
    resume: bool = False,
    workers: int = 1,
    strategy: Strategy | None = Strategy.COPY_IMAGE,
    spool_dir: Path | None = None,
    no_spool: bool = False,
    filters: Filters = NO_FILTERS,
    progress: ProgressSink | None = None,
    stuck_after: float = STUCK_AFTER,
    accept_unseen_sharing: bool = False,
) -> RunReport:
    """Start a run (discover, then migrate), or with `resume` continue the unfinished one.

    `strategy=None` lets the cloud decide (`--strategy auto`); the choice is recorded on the run.
    """
    ids = parse_image_ids(image_ids)
    unfinished = db.unfinished_run()
    if unfinished is not None and resume:
        for option, given, recorded in (
            ("--from-store", from_store, unfinished.from_store),
            ("--to-store", to_store, unfinished.to_store),
        ):
            if given is not None and given != recorded:
                raise UsageError(f"{option} {given!r} differs from the unfinished run {unfinished.id}'s {recorded!r}")
        if ids or filters != NO_FILTERS:
            raise UsageError("--resume takes no --image or filter: the run's images were chosen when it started")
        run = unfinished
        spool_root = Path(run.spool_dir) if run.spool_dir else None
        if run.strategy == Strategy.LOCATION_SWAP and (no_spool or spool_dir is not None):
            # this runner's own downloads (a host joining the run has its own disk); a download kept in the
            # recorded dir for a failed image is simply not reused by this runner
            spool_root = None if no_spool else _ensured(spool_dir or default_spool_dir())
            log.info("this runner keeps its downloads in %s", spool_root or "no spool (--no-spool)")
        glance = connect()
        index: LocationIndex | None = None  # nothing listed here: the sharing index reads every image at first use
        log.info("resuming run %d: %s -> %s", run.id, run.from_store, run.to_store)
    elif unfinished is not None:
        raise UsageError(
            f"run {unfinished.id} ({unfinished.from_store} -> {unfinished.to_store}) is not finished; "
            "continue it with `glance-migrator run --resume`"
        )
    else:
        if resume and not from_store and not to_store and db.has_runs():
            latest = db.get_run()  # a resume after the run ended (a kill just after it finished, say)
            rep = report(db, latest.id)
            rep.already_complete = True
            waiting = len(rep.need_attention)
            log.log(
                logging.WARNING if waiting else logging.INFO,
                "run %d is already complete; nothing to resume%s",
                latest.id,
                f" ({waiting} failed or blocked image(s) wait for `glance-migrator retry`)" if waiting else "",
            )
            return rep
        if not from_store or not to_store:
            raise UsageError(
                "nothing to resume; start a run with --from-store OLD --to-store NEW"
                if resume
                else "--from-store and --to-store are required to start a run"
            )
        glance = connect()
        index = LocationIndex()  # filled from discovery's listing of every image (not with --image)
        listed = progress.listed if progress is not None else None
        the_plan = _plan(glance, from_store, to_store, ids, strategy, filters, accept_unseen_sharing, index, listed)
        strategy = the_plan.strategy
        spool_root = None
        if strategy == Strategy.LOCATION_SWAP and not no_spool:
            spool_root = _ensured(spool_dir or default_spool_dir())
        found = _Tally(the_plan.rows)  # recorded as discovery lists them, none held: see discover
        spool = str(spool_root) if spool_root else None
        run = db.create_run(from_store, to_store, strategy, glance.cloud, found, spool)
        log.info(
            "run %d: %d image(s) found, %d to migrate %s -> %s",
            run.id,
            found.images,
            found.states.get(State.PENDING, 0),
            from_store,
            to_store,
        )
    runner = Runner(
        db,
        glance,
        run,
        workers,
        progress=progress,
        stuck_after=stuck_after,
        accept_unseen_sharing=accept_unseen_sharing,
        connect=connect,
        spool_root=spool_root,
        index=index,
    )
    with graceful_interrupts(runner):
        runner.run()
    db.finish_run_if_complete(run.id)
    return report(db, run.id)


def _ensured(spool_dir: Path) -> Path:
    """The spool directory, made private (refused when it cannot be)."""
    Spool(spool_dir).ensure()
    return spool_dir


@dataclass
class Plan:
    """What a run would do (`run --dry-run`): its strategy and each image's row, nothing recorded. The rows come
    as discovery lists them (they can be gone through once)."""

    strategy: Strategy
    why: str
    rows: Iterable[tuple[ImageRow, str | None]]


class _Tally:
    """Rows passed through, counted on the way: how many images, how many in each state."""

    def __init__(self, rows: Iterable[tuple[ImageRow, str | None]]) -> None:
        self._rows = rows
        self.images = 0
        self.states: dict[str, int] = {}

    def __iter__(self) -> Iterator[tuple[ImageRow, str | None]]:
        for row, reason in self._rows:
            self.images += 1
            self.states[row.state] = self.states.get(row.state, 0) + 1
            yield row, reason


def plan(
    connect: GlanceFactory,
    *,
    from_store: str | None,
    to_store: str | None,
    image_ids: Sequence[str] = (),
    strategy: Strategy | None = None,
    filters: Filters = NO_FILTERS,
    accept_unseen_sharing: bool = False,
    inspect_formats: bool = False,
) -> Plan:
    """`run --dry-run`: discover and classify exactly as a run would; change nothing, in Glance or the DB.
    `inspect_formats`: read the first MiB of each image to migrate and say which ones Glance's format check
    (Glance 30 and later) would refuse (formats.py)."""
    if not from_store or not to_store:
        raise UsageError("--from-store and --to-store are required to plan a run")
    ids = parse_image_ids(image_ids)
    glance = connect()
    the_plan = _plan(glance, from_store, to_store, ids, strategy, filters, accept_unseen_sharing)
    if inspect_formats:
        the_plan.rows = (
            (row, _format_doubt(glance, row) or reason) if row.state == State.PENDING else (row, reason)
            for row, reason in the_plan.rows
        )
    return the_plan


def _format_doubt(glance: Glance, row: ImageRow) -> str | None:
    image = glance.get_image(row.image_id)
    found = refusal_of(glance, image) if image is not None else None
    return f"Glance 30 and later would refuse its data: {found}" if found else None


def _plan(
    glance: Glance,
    from_store: str,
    to_store: str,
    ids: Sequence[str],
    strategy: Strategy | None,
    filters: Filters,
    accept_unseen_sharing: bool,
    index: LocationIndex | None = None,
    listed: Callable[[int], None] | None = None,
) -> Plan:
    profile = CloudProfile.read(glance)
    why = "chosen with --strategy"
    if strategy is None:
        strategy, why = choose_strategy(profile, from_store)
        log.info("strategy auto: %s, because %s", strategy, why)
    preflight(profile, from_store, to_store, strategy, accept_unseen_sharing)
    # Glance refuses to add a location whose data is empty, so location-swap moves 0-byte images by copy-image
    # where Glance offers it (and skips them, saying why, where not).
    empty = strategy if strategy == Strategy.COPY_IMAGE else choose_strategy(profile, from_store)[0]
    rows = discover(
        glance,
        ids,
        from_store,
        to_store,
        strategy,
        legacy=profile.stores is None,
        filters=filters,
        empty_strategy=empty if empty == Strategy.COPY_IMAGE else None,
        index=index,
        listed=listed,
    )
    return Plan(strategy, why, rows)


def check_cloud(
    connect: GlanceFactory, from_store: str | None, to_store: str | None, spool_dir: Path | None
) -> list[Finding]:
    """`check`: what the cloud offers and what a run between the two stores would do; changes nothing."""
    glance = connect()
    return cloud_report(
        CloudProfile.read(glance),
        from_store,
        to_store,
        spool_dir or default_spool_dir(),
        glance.usage(),
        service=glance.service is not None,
    )


def retry(
    db: StateDB,
    connect: GlanceFactory,
    image_ids: Sequence[str],
    *,
    all_failed: bool = False,
    run_id: int | None = None,
    queue_only: bool = False,
    workers: int = 1,
    stuck_after: float = STUCK_AFTER,
    accept_unseen_sharing: bool = False,
) -> RunReport:
    """Put failed images back at the step they failed at, then (unless queue_only) migrate them now."""
    if not image_ids and not all_failed:
        raise UsageError("name the image(s) to retry, or use --all-failed")
    ids = parse_image_ids(image_ids)
    run = db.get_run(run_id)
    if all_failed:
        ids = [row.image_id for row in db.images(run.id, sorted(RETRYABLE))]
        if not ids:
            raise UsageError(f"run {run.id} has no failed or blocked image")
    for image_id in ids:  # check all before changing any
        row = db.image(run.id, image_id)
        if row is None:
            raise UsageError(f"image {image_id} is not part of run {run.id}")
        if row.state not in RETRYABLE:
            raise UsageError(f"image {image_id} is {row.state}; only failed or blocked images can be retried")
    for image_id in ids:
        row = db.requeue_failed(run.id, image_id)
        log.info("%s (%s): re-queued at %s", image_id, row.name or "unnamed", row.state)
    if queue_only:
        return report(db, run.id)
    return run_migration(
        db,
        connect,
        from_store=None,
        to_store=None,
        image_ids=(),
        resume=True,
        workers=workers,
        strategy=Strategy(run.strategy),
        stuck_after=stuck_after,
        accept_unseen_sharing=accept_unseen_sharing,
    )
