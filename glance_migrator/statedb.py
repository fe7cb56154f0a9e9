"""Opening the state DB, upgrading its schema, and every read and write of migration state.

Nothing else in the package talks SQL. Every transaction on SQLite starts with BEGIN IMMEDIATE, so
writers queue on the DB lock (busy_timeout) instead of failing half-way with "database is locked",
and a lease claim (select a free image, then mark it ours) is atomic between processes.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import socket
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import platformdirs
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from glance_migrator.errors import BusyError, StateDBConnectionLost, StateDBError, UsageError
from glance_migrator.models import UNFINISHED, Event, ImageRow, Run, utcnow
from glance_migrator.state import RETRYABLE, TERMINAL, State, Strategy, check_transition, retry_state

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

SCHEMA_HEAD: Final = "0007"  # the newest script in migrations/versions (a test holds it to Alembic's own head)
SQLITE_HEADER: Final = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS: Final = 30_000
LEASE_TTL: Final = timedelta(seconds=60)  # a runner renews its leases every LEASE_TTL / 4
POOL_SIZE: Final = 64 + 4  # connections: one per worker (--workers 64 at most), the heartbeat, the main thread
POOL_TIMEOUT: Final = 60.0  # seconds to wait for a free one before the run stops (StateDBError, resumable)
READ_ONLY: Final = "glance_migrator_read_only"  # execution option: this transaction only reads
IDLE_IN_WRITE: Final = 10  # seconds a write transaction may sit idle on PostgreSQL (ours take milliseconds)
IDLE_IN_LISTING: Final = 900  # seconds create_run's transaction may wait for Glance's next page (retries included)
NEW_RUN_LOCK: Final = 0x676D5F6E72  # PostgreSQL advisory lock key ("gm_nr"): one new run recorded at a time
UPGRADE_LOCK: Final = 0x676D5F7570  # PostgreSQL advisory lock key ("gm_up"): hosts starting at once upgrade in turn
INSERT_BATCH: Final = 1000  # rows per INSERT statement when a run is recorded


def default_db_path() -> Path:
    return platformdirs.user_data_path("glance-migrator") / "state.db"


def redact(url: str) -> str:
    """The URL as logs, status and errors show it: any password replaced by ***, even in a URL SQLAlchemy cannot
    read (a port that is not a number)."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except (sa_exc.ArgumentError, ValueError):
        return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


def db_url(db: str | None) -> str:
    """`--db` takes a path or a SQLAlchemy URL, or @FILE holding one; nothing means the file in the user's data
    dir."""
    if db and db.startswith("@"):
        db = _read_url_file(Path(db[1:]).expanduser())
    if db and "://" in db:
        scheme, rest = db.split("://", 1)
        if scheme in ("postgresql", "postgres"):  # libpq's own spelling: the driver glance-migrator[postgresql] has
            return f"postgresql+psycopg://{rest}"
        return db
    path = Path(db).expanduser() if db else default_db_path()
    return f"sqlite:///{path}"


@dataclass(frozen=True)
class LeaseOwner:
    """Who holds a lease: one worker (thread) of one runner process on one host. Host and pid let a runner on the
    same host take over at once from a dead one; the worker keeps two threads of one process off one image."""

    host: str
    pid: int
    token: str  # one per runner process: a new process with a recycled pid is someone else
    worker: str = "main"

    @classmethod
    def me(cls) -> LeaseOwner:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8])

    def of_worker(self, worker: str) -> LeaseOwner:
        return dataclasses.replace(self, worker=worker)

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.worker}:{self.token}"

    @classmethod
    def parse(cls, text: str) -> LeaseOwner | None:
        parts = text.rsplit(":", 3)
        if len(parts) == 3:  # written before leases were per worker: host:pid:token
            parts.insert(2, "main")
        try:
            host, pid, worker, token = parts
            return cls(host, int(pid), token, worker)
        except ValueError:
            return None

    def is_dead(self) -> bool:
        """True only when we can tell for sure: same host and no such process."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


@dataclass(frozen=True)
class Lease:
    """A lease as `status` shows it: who holds which image, since when, until when (DB clock)."""

    image_id: str
    name: str | None
    state: str
    holder: LeaseOwner | None
    raw_owner: str
    since: datetime | None
    expires: datetime | None
    now: datetime
    stale: bool  # lapsed (its runner stopped renewing it) or held by a process of this host that is gone


@dataclass(frozen=True)
class Totals:
    """A run's size and how much of it is finished (the live display's start), summed by the DB."""

    images: int
    finished: int  # images in a terminal state
    bytes: int
    finished_bytes: int
    retryable: frozenset[str]  # ids of the failed and blocked images (finished, yet this run may move them again)


class LeaseLost(Exception):
    """Our lease on an image was taken over (we stalled past its expiry); stop working on it."""


class StateDB:
    def __init__(self, url: str, readonly: bool = False) -> None:
        self.url = redact(url)  # what messages show: never a password
        self.engine = _make_engine(url, readonly)
        self.lease_ttl = LEASE_TTL  # what this process's claims promise (run --lease-ttl)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: a deferred BEGIN, no write lock; PostgreSQL: a read-only transaction
        read_only = {"postgresql_readonly": True} if self.engine.dialect.name == "postgresql" else {}
        self._read_engine = self.engine.execution_options(**{READ_ONLY: True}, **read_only)
        self._reads = sessionmaker(self._read_engine, expire_on_commit=False)

    @classmethod
    def open(cls, db: str | None, readonly: bool = False) -> StateDB:
        """Open (creating if needed) and upgrade the state DB; refuse a corrupt or newer one.

        `readonly` (status, report): a DB on read-only media, which SQLite cannot open in WAL mode
        (it writes its -wal and -shm files beside it), is read as an immutable file instead.
        """
        url = db_url(db)
        path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
        if path is not None:
            _check_sqlite_file(path)
        try:
            sa.make_url(url)
        except ValueError as e:  # a port that is not a number
            raise UsageError(_unusable_url(url, e)) from None
        try:
            self = cls(url)
            self._upgrade()
        except (sa_exc.ArgumentError, ImportError) as e:  # sa_exc.NoSuchModuleError is an ArgumentError
            raise UsageError(_unusable_url(url, e)) from None
        except StateDBError as e:
            if not (readonly and path is not None and path.exists() and "unable to open" in str(e)):
                if path is not None and "unable to open" in str(e):
                    raise StateDBError(f"{e} (glance-migrator writes beside it: is the directory read-only?)") from e
                raise
            wal = path.with_name(path.name + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                log.warning(
                    "reading %s without its -wal journal (read-only directory): the latest steps may be missing", path
                )
            self = cls(f"sqlite:///file:{path}?mode=ro&immutable=1&uri=true", readonly=True)
            self._check_current()
        return self

    def _check_current(self) -> None:
        """For a DB that cannot be upgraded (read-only): its schema must already be this tool's."""
        with _db_errors(self.url), self.engine.connect() as conn:
            current = _schema_of(conn)
        if current != (SCHEMA_HEAD,):
            raise StateDBError(f"state DB {self.url} is read-only and at schema {current}, not {SCHEMA_HEAD}")

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ------------------------------------------------------------------------------------

    def _upgrade(self) -> None:
        with _db_errors(self.url), self._read_engine.connect() as conn:  # the usual case, up to date: no lock
            if _schema_of(conn) == (SCHEMA_HEAD,):
                return  # without importing Alembic and parsing its scripts: a tenth of a second of every command
        from alembic import command  # noqa: PLC0415 - only to create or upgrade a schema
        from alembic.runtime.migration import MigrationContext  # noqa: PLC0415
        from alembic.script import ScriptDirectory  # noqa: PLC0415

        config = _alembic_config()
        with _db_errors(self.url):
            scripts = ScriptDirectory.from_config(config)
            with self.engine.begin() as conn:  # BEGIN IMMEDIATE (SQLite), an advisory lock: one upgrader at a time
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(UPGRADE_LOCK)))
                current = MigrationContext.configure(conn).get_current_heads()
                known = {rev.revision for rev in scripts.walk_revisions()}
                newer = [rev for rev in current if rev not in known]
                if newer:
                    raise StateDBError(
                        f"state DB {self.url} has schema revision {newer[0]}, made by a newer "
                        f"glance-migrator; upgrade glance-migrator (it knows up to {scripts.get_current_head()})"
                    )
                if current and not _looks_like_ours(conn):
                    raise StateDBError(f"{self.url} is not a glance-migrator state DB")
                if not current and _has_foreign_tables(conn):
                    raise StateDBError(f"{self.url} is a SQLite DB of something else; refusing to write into it")
                config.attributes["connection"] = conn
                command.upgrade(config, "head")

    # -- sessions ----------------------------------------------------------------------------------

    @contextmanager
    def session(self, idle: int | None = None) -> Iterator[Session]:
        """A transaction that commits on success; DB-level failures become StateDBError. `idle`: seconds it may
        wait between statements on PostgreSQL (IDLE_IN_WRITE unless said)."""
        with _db_errors(self.url), self._sessions.begin() as session:
            if self.engine.dialect.name == "postgresql":
                # A runner frozen mid-transaction (a paused VM) would hold its row locks, and claims skip locked
                # rows: the server ends such a transaction instead, and the others can take the image over.
                idle = IDLE_IN_WRITE if idle is None else idle
                session.execute(sa.text(f"SET LOCAL idle_in_transaction_session_timeout = '{idle}s'"))
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction: a consistent snapshot that takes no write lock (SQLite: deferred BEGIN)."""
        with _db_errors(self.url), self._reads.begin() as session:
            yield session

    # -- runs --------------------------------------------------------------------------------------

    def create_run(
        self,
        from_store: str,
        to_store: str,
        strategy: Strategy,
        cloud: str | None,
        images: Iterable[tuple[ImageRow, str | None]],
        spool_dir: str | None = None,
    ) -> Run:
        """Record a run and all its images in one transaction: a crash leaves all of it or none. `images` may be
        discovery's listing as it goes: the rows go in INSERT_BATCH at a time as they come (one statement each,
        images then their events), as plain values, none kept, so memory does not grow with the catalogue. The
        transaction stays open while Glance lists them (tens of seconds at 50,000 images): SQLite's single writer
        waits meanwhile (status reads on); on PostgreSQL a lock makes a second runner starting at once wait, then
        find this run."""
        with self.session(idle=IDLE_IN_LISTING) as s:
            if s.get_bind().dialect.name == "postgresql":
                s.execute(sa.select(sa.func.pg_advisory_xact_lock(NEW_RUN_LOCK)))
            unfinished = s.scalars(sa.select(Run).where(Run.finished_at.is_(None))).first()
            if unfinished is not None:
                raise UsageError(
                    f"run {unfinished.id} ({unfinished.from_store} -> {unfinished.to_store}) is not finished; "
                    "continue it with `glance-migrator run --resume`"
                )
            run = Run(
                from_store=from_store, to_store=to_store, strategy=str(strategy), cloud=cloud, spool_dir=spool_dir
            )
            s.add(run)
            s.flush()
            # every column but those left to their default (created_at...): one key set, one statement per batch
            columns = [c for c in sa.inspect(ImageRow).columns if c.key not in ("run_id", "position")]
            defaulted = {c.key for c in columns if c.default is not None or c.server_default is not None}
            rows = iter(images)
            position = 0
            while batch := list(itertools.islice(rows, INSERT_BATCH)):
                values = []
                for row, _reason in batch:
                    value = {"run_id": run.id, "position": position}
                    position += 1
                    for column in columns:
                        if (got := getattr(row, column.key)) is not None or column.key not in defaulted:
                            value[column.key] = got
                    values.append(value)
                s.execute(sa.insert(ImageRow), values)
                s.execute(
                    sa.insert(Event),
                    [
                        {"run_id": run.id, "image_id": row.image_id, "to_state": row.state, "message": reason}
                        for row, reason in batch
                    ],
                )
            return run

    def get_run(self, run_id: int | None = None) -> Run:
        """The given run, or else the latest one."""
        with self.reading() as s:
            query = sa.select(Run).order_by(Run.id.desc())
            if run_id is not None:
                query = query.where(Run.id == run_id)
            run = s.scalars(query).first()
        if run is None:
            raise UsageError(f"no run {run_id} in the state DB" if run_id else "the state DB holds no run yet")
        return run

    def has_runs(self) -> bool:
        with self.reading() as s:
            return s.scalars(sa.select(Run.id).limit(1)).first() is not None

    def unfinished_run(self) -> Run | None:
        with self.reading() as s:
            return s.scalars(sa.select(Run).where(Run.finished_at.is_(None)).order_by(Run.id.desc())).first()

    def finish_run_if_complete(self, run_id: int) -> bool:
        with self.session() as s:
            open_rows = s.scalar(
                sa.select(sa.func.count())
                .select_from(ImageRow)
                .where(ImageRow.run_id == run_id, ImageRow.state.not_in([str(t) for t in TERMINAL]))
            )
            if open_rows:
                return False
            run = s.get_one(Run, run_id)
            if run.finished_at is None:
                run.finished_at = utcnow()
            return True

    # -- images ------------------------------------------------------------------------------------

    def images(self, run_id: int, states: Sequence[State] | None = None) -> list[ImageRow]:
        return list(self.iter_images(run_id, states))

    def iter_images(self, run_id: int, states: Sequence[State] | None = None, batch: int = 1000) -> Iterator[ImageRow]:
        """The run's images in run order, read in batches from one snapshot: memory stays flat at any size."""
        with self.reading() as s:
            query = sa.select(ImageRow).where(ImageRow.run_id == run_id).order_by(ImageRow.position, ImageRow.image_id)
            if states is not None:
                query = query.where(ImageRow.state.in_([str(st) for st in states]))
            # the session's identity map holds rows weakly: a row the caller dropped is freed
            yield from s.scalars(query.execution_options(yield_per=batch))

    def events_of(self, run_id: int, image_ids: Sequence[str]) -> list[Event]:
        """The events of these images (a batch of them), in order; read through their own index."""
        with self.reading() as s:
            query = sa.select(Event).where(Event.run_id == run_id, Event.image_id.in_(image_ids)).order_by(Event.id)
            return list(s.scalars(query))

    def image(self, run_id: int, image_id: str) -> ImageRow | None:
        with self.reading() as s:
            return s.get(ImageRow, (run_id, image_id))

    def counts(self, run_id: int) -> dict[str, int]:
        with self.reading() as s:
            rows = s.execute(
                sa.select(ImageRow.state, sa.func.count()).where(ImageRow.run_id == run_id).group_by(ImageRow.state)
            )
            return {state: n for state, n in rows}

    def totals(self, run_id: int) -> Totals:
        """How many images and bytes the run has, and how many of them are finished: one pass in the DB."""
        finished = ImageRow.state.in_([str(st) for st in TERMINAL])
        size = sa.func.coalesce(ImageRow.size, 0)
        with self.reading() as s:
            images, done, size_all, size_done = s.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.sum(sa.case((finished, 1), else_=0)),
                    sa.func.sum(size),
                    sa.func.sum(sa.case((finished, size), else_=0)),
                ).where(ImageRow.run_id == run_id)
            ).one()
            retryable = s.scalars(
                sa.select(ImageRow.image_id).where(
                    ImageRow.run_id == run_id, ImageRow.state.in_([str(st) for st in RETRYABLE])
                )
            )
            return Totals(images, int(done or 0), int(size_all or 0), int(size_done or 0), frozenset(retryable))

    def events(self, run_id: int, image_id: str | None = None) -> list[Event]:
        with self.reading() as s:
            query = sa.select(Event).where(Event.run_id == run_id).order_by(Event.id)
            if image_id:
                query = query.where(Event.image_id == image_id)
            return list(s.scalars(query))

    # -- leases ----------------------------------------------------------------------------------
    #
    # A lease is one worker's claim on one image until lease_expires, renewed by its runner's heartbeat. Times are
    # the DB's clock where it has one (PostgreSQL: hosts whose clocks disagree still agree on who holds what).
    # Every claim and every write under a lease locks the image's row: on PostgreSQL with SELECT ... FOR UPDATE (a
    # claim skips rows other claimers have locked: SKIP LOCKED), on SQLite by BEGIN IMMEDIATE (one writer).

    def _now(self, s: Session) -> datetime:
        if self.engine.dialect.name == "postgresql":
            return s.scalar(sa.select(sa.func.timezone("UTC", sa.func.now()))) or utcnow()
        return utcnow()

    def claim_next(self, run_id: int, owner: LeaseOwner, exclude: set[str]) -> ImageRow | None:
        """Take the lease on the next unfinished image nobody live holds; None when none is free.

        Two reads that do not grow with the run: the first free row of the claim index (it skips only the rows
        other workers hold, or lock), and the rows leased now (one per worker), for a holder on this host that died.
        """
        with self.session() as s:
            now = self._now(s)
            lapsed = sa.or_(
                ImageRow.lease_owner.is_(None), ImageRow.lease_expires.is_(None), ImageRow.lease_expires < now
            )
            free = s.scalars(
                self._unfinished(run_id, exclude)
                .where(lapsed)
                .order_by(ImageRow.position, ImageRow.image_id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            orphans = sorted(
                (
                    row
                    for row in s.scalars(
                        self._unfinished(run_id, exclude).where(
                            ImageRow.lease_owner.is_not(None), ImageRow.lease_expires >= now
                        )
                    )
                    if _lease_free(row, now)  # held by a process of this host that is gone
                ),
                key=_run_order,
            )
            row: ImageRow | None = free
            if orphans and (free is None or _run_order(orphans[0]) < _run_order(free)):
                held = orphans[0].lease_owner
                locked = s.get(ImageRow, (run_id, orphans[0].image_id), with_for_update={"skip_locked": True})
                if locked is not None and locked.lease_owner == held:  # nobody took it meanwhile
                    row = locked
            if row is None:
                return None
            row.lease_owner = str(owner)
            row.lease_since = now
            row.lease_expires = now + self.lease_ttl
            row.started_at = row.started_at or now
            return row

    @staticmethod
    def _unfinished(run_id: int, exclude: set[str]) -> sa.Select[Any]:
        query = sa.select(ImageRow).where(ImageRow.run_id == run_id, UNFINISHED)
        return query.where(ImageRow.image_id.not_in(exclude)) if exclude else query

    def leased_by_others(self, run_id: int, working: Collection[LeaseOwner]) -> list[ImageRow]:
        """Unfinished images that none of `working` (this runner's workers busy on an image now) holds: what a
        runner with nothing to claim waits for. Held by another runner, or about to be claimed (a lease that
        lapsed, a row another claimer has locked, a lease of ours that no worker of ours could release). Read
        when a claim found nothing, so only those few rows; at most 100 of them."""
        with self.reading() as s:
            query = self._unfinished(run_id, set())
            if working:
                query = query.where(
                    sa.or_(ImageRow.lease_owner.is_(None), ImageRow.lease_owner.not_in([str(w) for w in working]))
                )
            return list(s.scalars(query.order_by(ImageRow.position, ImageRow.image_id).limit(100)))

    def leases(self, run_id: int) -> list[Lease]:
        """Every lease on an unfinished image of the run (a few: one per worker, plus stale ones), in run order."""
        with self.reading() as s:
            now = self._now(s)
            rows = s.scalars(
                self._unfinished(run_id, set())
                .where(ImageRow.lease_owner.is_not(None))
                .order_by(ImageRow.position, ImageRow.image_id)
            )
            return [
                Lease(
                    row.image_id,
                    row.name,
                    row.state,
                    LeaseOwner.parse(row.lease_owner or ""),
                    row.lease_owner or "",
                    row.lease_since,
                    row.lease_expires,
                    now,
                    _lease_free(row, now),
                )
                for row in rows
            ]

    def hold(self, run_id: int, image_id: str, owner: LeaseOwner) -> None:
        """Renew our lease on an image, or raise LeaseLost when another worker holds it now (we stalled past
        its expiry and it was taken over). A lapsed lease nobody took is ours again: nobody else worked on it."""
        with self.session() as s:
            row = s.get(ImageRow, (run_id, image_id), with_for_update=True)
            if row is None:
                raise LeaseLost(f"lease on {image_id} now held by nobody")
            self._renew(s, row, owner)

    def _renew(self, s: Session, row: ImageRow, owner: LeaseOwner) -> None:
        """On a row locked in `s`: still ours (else LeaseLost), and now for another lease_ttl."""
        if row.lease_owner != str(owner):
            raise LeaseLost(f"lease on {row.image_id} now held by {row.lease_owner or 'nobody (released)'}")
        row.lease_expires = self._now(s) + self.lease_ttl

    def release(self, run_id: int, image_id: str, owner: LeaseOwner) -> None:
        with self.session() as s:
            s.execute(
                sa.update(ImageRow)
                .where(
                    ImageRow.run_id == run_id,
                    ImageRow.image_id == image_id,
                    ImageRow.lease_owner == str(owner),
                )
                .values(lease_owner=None, lease_expires=None, lease_since=None)
            )

    # -- transitions -------------------------------------------------------------------------------

    def transition(
        self,
        run_id: int,
        image_id: str,
        target: State,
        message: str | None = None,
        owner: LeaseOwner | None = None,
        **fields: Any,
    ) -> ImageRow:
        """Move one image to `target` if the table allows it, with an event; refuse otherwise.

        With `owner`, the write happens only while we still hold the image's lease.
        """
        with self.session() as s:
            row = s.get(ImageRow, (run_id, image_id), with_for_update=True)  # no claim can slip in between
            if row is None:
                raise UsageError(f"image {image_id} is not part of run {run_id}")
            if owner is not None:
                self._renew(s, row, owner)
            current = State(row.state)
            failed_at = State(row.failed_at) if row.failed_at else None
            check_transition(Strategy(row.strategy), current, target, failed_at)
            for key, value in fields.items():
                setattr(row, key, value)
            row.state = str(target)
            if target in RETRYABLE:
                row.failed_at = str(current)
            elif current in RETRYABLE:
                row.failed_at = row.error = row.error_kind = None
            if target in TERMINAL:  # finished: its lease goes in the same commit, so a kill right after leaves none
                row.finished_at = utcnow()
                row.lease_owner = row.lease_expires = row.lease_since = None
            s.add(
                Event(
                    run_id=run_id,
                    image_id=image_id,
                    from_state=str(current),
                    to_state=str(target),
                    message=message,
                )
            )
            return row

    def requeue_failed(self, run_id: int, image_id: str, why: str = "retry requested") -> ImageRow:
        """`retry`: put a failed image back at the state it failed at, and reopen its run."""
        row = self.image(run_id, image_id)
        if row is None:
            raise UsageError(f"image {image_id} is not part of run {run_id}")
        if row.state not in RETRYABLE:
            raise UsageError(f"image {image_id} is {row.state}; only failed or blocked images can be retried")
        failed_at = State(row.failed_at or State.PENDING)
        target = retry_state(Strategy(row.strategy), failed_at)
        row = self.transition(run_id, image_id, target, message=f"{why} (failed at {failed_at})")
        with self.session() as s:
            s.get_one(Run, run_id).finished_at = None
        return row

    def requeue_blocked(self, run_id: int, kind: str) -> list[ImageRow]:
        """Put the run's images blocked with error_kind `kind` back at the step that blocked them."""
        return [
            self.requeue_failed(run_id, row.image_id, why="one more try at the end of the run")
            for row in self.images(run_id, [State.BLOCKED])
            if row.error_kind == kind
        ]

    def bump_attempts(self, run_id: int, image_id: str) -> None:
        with self.session() as s:
            s.execute(
                sa.update(ImageRow)
                .where(ImageRow.run_id == run_id, ImageRow.image_id == image_id)
                .values(attempts=ImageRow.attempts + 1)
            )


def _unusable_url(url: str, error: Exception) -> str:
    shown = redact(url)
    if isinstance(error, ImportError) and url.startswith("postgresql"):
        return (
            f"--db {shown}: the PostgreSQL driver is not installed ({error}): install glance-migrator with it, "
            "e.g. `pipx install 'glance-migrator[postgresql]'` (or `pip install 'psycopg[binary]'` in its venv)"
        )
    return (
        f"--db {shown}: not a state DB glance-migrator can use ({error}); give a SQLite file's path or "
        "postgresql+psycopg://USER@HOST[:PORT]/DATABASE"
    )


def _read_url_file(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise UsageError(f"--db @{path}: cannot read it: {e.strerror}") from e
    except UnicodeDecodeError:
        raise UsageError(f"--db @{path}: not a text file holding a state DB URL or path") from None
    if len(lines) != 1:
        raise UsageError(f"--db @{path}: expected one line, the state DB's URL or path, found {len(lines)}")
    return lines[0]


def _schema_of(conn: sa.Connection) -> tuple[str, ...] | None:
    """The schema revisions the DB records (what Alembic's MigrationContext.get_current_heads reads); None when
    it records none (a new DB, or not ours)."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return tuple(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())


def _alembic_config() -> Config:
    """Alembic's config for the migration scripts: glance_migrator/migrations in an installed wheel
    (pyproject.toml puts them there), the top-level migrations/ in a source tree."""
    from alembic.config import Config  # noqa: PLC0415

    package = Path(__file__).resolve().parent
    installed = package / "migrations"
    config = Config()
    config.set_main_option("script_location", str(installed if installed.is_dir() else package.parent / "migrations"))
    return config


def _run_order(row: ImageRow) -> tuple[int, str]:
    return (row.position if row.position is not None else -1, row.image_id)


def _lease_free(row: ImageRow, now: datetime) -> bool:
    if row.lease_owner is None or row.lease_expires is None or row.lease_expires < now:
        return True
    holder = LeaseOwner.parse(row.lease_owner)
    return holder is not None and holder.is_dead()


def _make_engine(url: str, readonly: bool = False) -> Engine:
    pool = {"pool_size": POOL_SIZE, "max_overflow": 0, "pool_timeout": POOL_TIMEOUT}
    if not url.startswith("sqlite"):  # a server: a connection it dropped (restart, failover) is replaced, not used
        return sa.create_engine(url, pool_pre_ping=True, **pool)
    if readonly:  # an immutable file: no WAL, no locks, no writes
        return sa.create_engine(url, connect_args={"check_same_thread": False}, **pool)
    engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}, **pool)

    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below), pysqlite must not
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        mode = cur.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode and mode[0] not in ("wal", "memory"):  # e.g. a read-only file cannot switch
            cur.execute("PRAGMA query_only = ON")
        cur.execute("PRAGMA synchronous = NORMAL")  # with WAL: durable across crashes of the process
        cur.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # a write transaction takes the write lock at once (no deadlock on upgrade); a read one takes none, so
        # status, report and --watch never hold up the runners
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    return engine


def _check_sqlite_file(path: Path) -> None:
    """Refuse a file that is not SQLite before SQLAlchemy touches it; create the parent dir if needed."""
    if path.is_dir():
        raise StateDBError(f"state DB {path} is a directory")
    if path.exists() and path.stat().st_size > 0:
        try:
            with path.open("rb") as f:
                header = f.read(len(SQLITE_HEADER))
        except OSError as e:
            raise StateDBError(f"cannot read state DB {path}: {e.strerror}") from e
        if header != SQLITE_HEADER:
            raise StateDBError(f"state DB {path} is not a SQLite database (corrupt?); refusing to touch it")
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StateDBError(f"cannot create the directory of state DB {path}: {e.strerror}") from e


def _looks_like_ours(conn: sa.Connection) -> bool:
    return {"runs", "images", "events"} <= set(sa.inspect(conn).get_table_names())


def _has_foreign_tables(conn: sa.Connection) -> bool:
    return bool(set(sa.inspect(conn).get_table_names()) - {"alembic_version"})


@contextmanager
def _db_errors(url: str) -> Iterator[None]:
    try:
        yield
    except sa_exc.DBAPIError as e:
        reason = str(e.orig) if e.orig else str(e)
        if e.connection_invalidated:  # the pool drops that connection; the next transaction gets a new one
            raise StateDBConnectionLost(f"state DB {url}: the connection was lost ({reason.strip()})") from e
        if isinstance(e, sa_exc.OperationalError):
            if "locked" in reason:
                raise BusyError(f"state DB {url} stayed locked by another process: {reason}") from e
            raise StateDBError(f"state DB {url}: {reason}") from e
        raise StateDBError(f"state DB {url} is unusable ({reason}); it was not modified") from e
    except sa_exc.TimeoutError as e:  # every pooled connection busy for POOL_TIMEOUT s
        raise StateDBError(
            f"state DB {url}: no free connection for {POOL_TIMEOUT:.0f} s ({POOL_SIZE} in use): the DB is too slow "
            "for this many workers; run again with fewer --workers"
        ) from e
