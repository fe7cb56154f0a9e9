"""Workers that take images one at a time (under a lease) and walk them along their strategy's path.

Each step's effect is recorded in its own transaction right after the step returns, so a kill at any
instant loses at most the step in flight, which is idempotent and simply runs again on resume.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Final, Protocol

from glance_migrator.deletion import drop_copies_of_gone_image
from glance_migrator.errors import (
    Aborted,
    CloudError,
    ImageBlocked,
    ImageFailure,
    ImageSkipped,
    InternalError,
    MigratorError,
    StateDBConnectionLost,
)
from glance_migrator.glance import Glance, GlanceHTTPError, GlanceUnavailable
from glance_migrator.models import ImageRow, Run
from glance_migrator.sharing import SHARED, LocationIndex, SharedData
from glance_migrator.spool import Spool
from glance_migrator.state import TERMINAL, State, Strategy, next_state
from glance_migrator.statedb import LeaseLost, LeaseOwner, StateDB, Totals
from glance_migrator.strategies import Interrupted, StepContext, steps_for
from glance_migrator.timeouts import STUCK_AFTER

log = logging.getLogger(__name__)

WAIT_FOR_OTHERS: Final = 2.0  # seconds between looks when another runner holds the remaining images
DB_RECONNECTS: Final = 3  # state DB connections lost in a row before a worker stops the run (the DB is down)
QUOTA_HINT: Final = (
    "The image quota (Keystone unified limits) is exhausted: location-swap's copies and copy-image's staging "
    "count against the migrating project's limits (`glance-migrator check` shows them); raise them for the "
    "migration, then `glance-migrator retry`"
)
IMAGE_ATTEMPTS: Final = 2  # times a step that Glance keeps failing (for this image only) is tried before it fails


class ProgressSink(Protocol):
    """Who wants to see the run move (the live display of an interactive terminal)."""

    def listed(self, count: int) -> None: ...  # discovery has listed this many images so far

    def start(self, totals: Totals) -> None: ...

    def update(self, worker: str, row: ImageRow | None) -> None: ...  # None: the worker is idle


class WorkerLease:
    """One worker's lease on the image it works on. The run's heartbeat renews it; the worker checks it before
    each step and while it waits on Glance, so a worker whose process was paused past the lease (Ctrl-Z, a frozen
    VM) finds out from the DB that another worker took the image over, and lets go before doing anything more."""

    def __init__(self, db: StateDB, row: ImageRow, owner: LeaseOwner) -> None:
        self.db, self.run_id, self.image_id, self.owner = db, row.run_id, row.image_id, owner
        self.renewed = time.monotonic()  # when the DB last confirmed it ours (the claim, a heartbeat, a check)
        self.lost: str | None = None  # why, once the DB said it is someone else's

    def renew(self) -> None:
        """Renew it in the DB (LeaseLost when it is someone else's now)."""
        if self.lost:
            raise LeaseLost(self.lost)
        try:
            self.db.hold(self.run_id, self.image_id, self.owner)
        except LeaseLost as e:
            self.lost = str(e)
            raise
        self.renewed = time.monotonic()

    def check(self) -> None:
        """Cheap while the heartbeat keeps it fresh; asks the DB once a renewal is overdue (we were paused)."""
        if self.lost:
            raise LeaseLost(self.lost)
        if time.monotonic() - self.renewed > self.db.lease_ttl.total_seconds() / 2:
            self.renew()


class Runner:
    def __init__(
        self,
        db: StateDB,
        glance: Glance,
        run: Run,
        workers: int = 1,
        progress: ProgressSink | None = None,
        stuck_after: float = STUCK_AFTER,
        accept_unseen_sharing: bool = False,
        connect: Callable[[], Glance] | None = None,
        spool_root: Path | None = None,
        index: LocationIndex | None = None,
    ) -> None:
        self.db = db
        self.glance = glance  # the run's own: discovery, the sharing index, "does Glance answer at all?"
        self.connect = connect  # each worker's connection (its own HTTP pool), when there are several
        self.spool_root = spool_root  # location-swap: where this runner keeps downloads (None: --no-spool)
        self.run_row = run
        self.workers = max(1, workers)
        self.stuck_after = stuck_after
        self.owner = LeaseOwner.me()
        self.stop = threading.Event()  # set on Ctrl-C or on a fatal error: take no new step
        self.fatal: MigratorError | None = None
        self._waiting_logged = False
        self._lock = threading.Lock()
        self._leases: dict[str, WorkerLease] = {}  # worker name -> the lease it holds now
        self.progress = progress
        self.legacy = glance.stores() is None
        # who lists which data URL: from discovery's listing when this process made one (`index`)
        self.shared = SharedData(glance, run.from_store, self.legacy, accept_unseen_sharing, index)

    def run(self) -> None:
        """Work until every image of the run is finished, the operator stops us, or a fatal error.

        Images blocked because their old data was another image's only data get one more pass at the end:
        when those images were in the run too, they hold a copy of their own by then (sharing.py).
        """
        if self.progress is not None:
            self.progress.start(self.db.totals(self.run_row.id))
        heartbeat_done = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(heartbeat_done,), daemon=True)
        heartbeat.start()
        try:
            self._work()
            again = [] if self.stop.is_set() else self.db.requeue_blocked(self.run_row.id, SHARED)
            if again:
                log.info("%d image(s) blocked by data shared with other images: trying them once more", len(again))
                self._work()
        finally:
            heartbeat_done.set()

    def _work(self) -> None:
        """Let the workers take images until none is left (or a stop); raise the fatal error that stopped them."""
        threads = [
            threading.Thread(target=self._worker, name=f"worker-{i + 1}", daemon=True) for i in range(self.workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)  # short joins keep the main thread responsive to a second Ctrl-C
        if self.fatal is not None:
            raise self.fatal

    def _heartbeat(self, done: threading.Event) -> None:
        while not done.wait(self.db.lease_ttl.total_seconds() / 4):
            with self._lock:
                leases = list(self._leases.values())
            for lease in leases:
                try:
                    lease.renew()
                except LeaseLost as e:
                    with self._lock:
                        working = lease in self._leases.values()
                    if working:  # (else its worker was done with it and released it meanwhile)
                        log.warning("%s: %s; its worker lets go", lease.image_id, e)
                except MigratorError as e:
                    log.warning("could not renew the lease on %s: %s", lease.image_id, e)

    def _worker(self) -> None:
        name = threading.current_thread().name
        owner = self.owner.of_worker(name)
        try:
            glance = self.connect() if self.connect is not None and self.workers > 1 else self.glance
        except MigratorError as e:
            self._fail_run(e)
            return
        lost = 0  # state DB connections lost in a row
        while not self.stop.is_set():
            try:
                row = self.db.claim_next(self.run_row.id, owner, exclude=set())
                if row is None:
                    if not self._wait_for_others():
                        return
                    continue
                lease = WorkerLease(self.db, row, owner)
                with self._lock:
                    self._leases[name] = lease
                try:
                    self._show(row)
                    self._process(row, glance, lease)
                except (LeaseLost, StateDBConnectionLost) as e:
                    # Someone else's now, or the step's record may not have been written (e.g. we were frozen
                    # mid-transaction and PostgreSQL ended it): the image goes on from its last recorded step.
                    how = (
                        "leaving it to that worker"
                        if isinstance(e, LeaseLost)
                        else "it continues from its last recorded step"
                    )
                    log.warning("%s: %s; %s", row.image_id, e, how)
                    if self.spool_root is not None:  # that worker downloads what it needs; ours would stay forever
                        Spool(self.spool_root).remove(row.image_id)
                finally:
                    with self._lock:
                        self._leases.pop(name, None)
                    self.db.release(row.run_id, row.image_id, owner)
                    self._show(None)
                lost = 0
            except StateDBConnectionLost as e:
                lost += 1
                if lost >= DB_RECONNECTS:
                    self._fail_run(e)
                else:
                    log.warning("%s; trying again with a new connection", e)
                    self.stop.wait(lost)
            except MigratorError as e:
                self._fail_run(e)
            except Exception as e:  # a bug must stop the run loudly, not end one thread quietly
                log.exception("internal error")
                self._fail_run(InternalError(f"internal error: {type(e).__name__}: {e}"))

    def _wait_for_others(self) -> bool:
        """True while another live runner holds unfinished images of this run (we wait for them)."""
        with self._lock:
            working = [lease.owner for lease in self._leases.values()]
        others = self.db.leased_by_others(self.run_row.id, working)
        if not others:
            return False
        with self._lock:
            if not self._waiting_logged:
                holders = sorted({row.lease_owner or "not claimed yet" for row in others})
                log.info(
                    "%d image(s) are being migrated by another runner (%s); waiting",
                    len(others),
                    ", ".join(holders),
                )
                self._waiting_logged = True
        return not self.stop.wait(WAIT_FOR_OTHERS)

    def _fail_run(self, error: MigratorError) -> None:
        with self._lock:
            if self.fatal is None:
                self.fatal = error
                log.error("stopping the run: %s", error)
        self.stop.set()

    def _process(self, row: ImageRow, glance: Glance, lease: WorkerLease) -> None:
        strategy = Strategy(row.strategy)
        steps = steps_for(strategy)
        spool = Spool(self.spool_root) if self.spool_root is not None else None
        ctx = StepContext(
            glance,
            self.run_row.from_store,
            self.run_row.to_store,
            self.stop,
            self.shared,
            spool=spool,
            legacy=self.legacy,
            stuck_after=self.stuck_after,
            lease=lease.check,
            first_try=row.attempts == 0,  # as claimed, before this attempt is counted
        )
        self.db.bump_attempts(row.run_id, row.image_id)
        label = f"{row.image_id} ({row.name or 'unnamed'})"
        unavailable = 0  # steps of this image that Glance kept failing while it answered other requests
        seen = None  # the image as the step just recorded saw it last: the next step starts from it
        while State(row.state) not in TERMINAL:
            target = next_state(strategy, State(row.state))
            if target is None:  # a state outside this strategy's path: a bug or a hand-edited DB
                raise MigratorError(f"image {row.image_id}: state {row.state} has no next step for {strategy}")
            lease.check()  # still ours (asks the DB when the heartbeat has not confirmed it lately) before a step acts
            ctx.seen, seen = seen, None
            try:
                result = steps[target](ctx, row)
            except Interrupted:
                log.info("%s: stopped while at %s; resume continues from there", label, row.state)
                return
            except GlanceUnavailable as e:
                if self.stop.is_set() or not self.glance.answers():
                    raise  # down for everyone: the run stops, resumable
                unavailable += 1
                if unavailable < IMAGE_ATTEMPTS:
                    log.warning("%s: %s; Glance answers other requests: trying this step again", label, _cause(e))
                    continue
                error = (
                    f"Glance kept failing on this image ({_cause(e)}) while it answered other requests; the "
                    "step is safe to repeat: see glance-api's log for the cause, then `glance-migrator retry`"
                )
                self._record(row, lease, State.FAILED, error, error=error, error_kind="glance")
                log.error("%s: failed at %s: %s", label, row.state, error)
                return
            except ImageSkipped as e:
                self._record(row, lease, State.SKIPPED, str(e), error=str(e), error_kind="skipped")
                log.warning("%s: skipped: %s", label, e)
                return
            except (ImageFailure, GlanceHTTPError) as e:  # this image cannot go on; the others can
                kind = e.kind if isinstance(e, ImageFailure) else "glance"
                outcome = State.BLOCKED if isinstance(e, ImageBlocked) else State.FAILED
                error = str(e)
                http = e if isinstance(e, GlanceHTTPError) else e.__cause__
                if isinstance(http, GlanceHTTPError) and http.policy_refusal:  # the same for every image
                    raise CloudError(
                        f"Glance's policy refuses these credentials what the run needs ({http}); use credentials "
                        "with the rights `glance-migrator check` lists (admin by Glance's default policy), then "
                        "`glance-migrator run --resume`"
                    ) from e
                if isinstance(http, GlanceHTTPError) and http.status == 413:
                    kind, error = "quota", f"{error}. {QUOTA_HINT}"
                if kind == "gone":  # before recording: a crash in between tidies again
                    error = "; ".join(filter(None, [error, _tidy(ctx, row)]))
                self._record(row, lease, outcome, error, error=error, error_kind=kind)
                log.error("%s: %s at %s: %s", label, outcome, row.state, error)
                return
            row = self._record(row, lease, target, result.message, **result.fields)
            seen = result.seen
            log.info("%s: %s: %s", label, target, result.message)
            if self.stop.is_set():
                return

    def _record(self, row: ImageRow, lease: WorkerLease, target: State, message: str, **fields: object) -> ImageRow:
        row = self.db.transition(row.run_id, row.image_id, target, message, owner=lease.owner, **fields)
        lease.renewed = time.monotonic()  # the transition renewed it, under its row lock
        self._show(row)
        return row

    def _show(self, row: ImageRow | None) -> None:
        if self.progress is not None:
            self.progress.update(threading.current_thread().name, row)


def _cause(error: GlanceUnavailable) -> str:
    """The last answer Glance gave, without the advice to resume (which is for a Glance down for everyone)."""
    return str(error.__cause__ or error).split("; progress is saved")[0]


def _tidy(ctx: StepContext, row: ImageRow) -> str:
    """The image was deleted by someone else (Glance confirms it): remove what the run made for it, its copies
    (deletion.py) and its spool file, which nothing else uses; says what it did."""
    try:
        copies = drop_copies_of_gone_image(ctx, row)
        if copies is None:
            return ""  # a step failed as "gone" because its copy vanished: the image itself is still there
        notes = [copies]
    except (ImageFailure, GlanceHTTPError) as e:  # (Glance unavailable stops the run: resume tidies again)
        return f"could not remove what the run made for it: {e}"
    if ctx.spool is not None and ctx.spool.remove(row.image_id):
        notes.append("removed its spool file")
    return "; ".join(filter(None, notes))


@contextmanager
def graceful_interrupts(runner: Runner) -> Iterator[None]:
    """First Ctrl-C (or SIGTERM): finish the steps in flight, record them, stop. Second Ctrl-C: abort now."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if runner.stop.is_set() and signum == signal.SIGINT:
            raise Aborted("aborted by a second Ctrl-C; every recorded step is kept, `run --resume` continues")
        log.warning(
            "%s: finishing the steps in flight, then stopping (Ctrl-C again to abort at once)",
            signal.Signals(signum).name,
        )
        runner.stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
