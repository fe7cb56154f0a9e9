"""The command line: parse options, call one function of commands.py or reports.py, render, exit. Nothing else."""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import sqlalchemy as sa
import typer

import glance_migrator
from glance_migrator import render, reports
from glance_migrator.bandwidth import Bandwidth
from glance_migrator.errors import EXIT_OK, Aborted, MigratorError, UsageError
from glance_migrator.filters import Filters, Order
from glance_migrator.redaction import RedactingFilter
from glance_migrator.spool import default_spool_dir
from glance_migrator.state import Strategy
from glance_migrator.statedb import LEASE_TTL, StateDB, default_db_path
from glance_migrator.timeouts import READ_TIMEOUT, STUCK_AFTER

if TYPE_CHECKING:
    from glance_migrator.commands import GlanceFactory

LEASE_SECONDS = LEASE_TTL.total_seconds()

app = typer.Typer(
    name="glance-migrator",
    help="Move every Glance image's data to a new store, resumably, verifying each copy before the old one goes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,
)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar="GLANCE_MIGRATOR_DB",
        help="State DB: a SQLite file's path, or a SQLAlchemy URL: postgresql+psycopg://USER@HOST/DB for one "
        "migration shared by several hosts. @FILE reads it from that file, so a password stays off the command "
        f"line (or leave it out: PGPASSWORD and ~/.pgpass work). Default: {default_db_path()}",
    ),
]
LeaseTtlOption = Annotated[
    float,
    typer.Option(
        "--lease-ttl",
        min=5,
        help="Seconds a runner may go silent (a frozen host, a cut network) before other runners of the same "
        "state DB take over the images it holds. Each runner renews its leases every quarter of it.",
    ),
]
CloudOption = Annotated[
    str | None,
    typer.Option("--os-cloud", help="Cloud name in clouds.yaml (default: OS_CLOUD, or the OS_* variables)."),
]
ServiceCloudOption = Annotated[
    str | None,
    typer.Option(
        "--service-cloud",
        envvar="GLANCE_MIGRATOR_SERVICE_CLOUD",
        help="A cloud in clouds.yaml whose user has the service role (e.g. Glance's own). Glance 30.1-31 show an "
        "image's locations, when show_multiple_locations = False, only to a service token: this one goes with "
        "GET /v2/images/ID/locations, so the sharing check can see them. Glance 32 and later show them to admin.",
    ),
]
BwlimitOption = Annotated[
    str | None,
    typer.Option(
        "--bwlimit",
        envvar="GLANCE_MIGRATOR_BWLIMIT",
        help="location-swap: at most this many bytes per second (K, M, G: powers of 1024, e.g. 100M) read from "
        "Glance and as many written to it, shared by every worker. copy-image's bytes move inside Glance: "
        "there --workers bounds how many copies Glance stages at once.",
    ),
]
TimeoutOption = Annotated[
    float,
    typer.Option(
        "--timeout",
        min=1,
        envvar="GLANCE_MIGRATOR_TIMEOUT",
        help="Seconds to wait for an answer (or the next bytes of one) from Glance before the request is retried.",
    ),
]
StuckAfterOption = Annotated[
    float,
    typer.Option(
        "--stuck-after",
        min=10,
        help="copy-image: fail an image whose Glance copy task shows no progress for this many seconds. "
        "Glance updates a running copy about once a minute (a dead worker's task never again): "
        "below 120, copies that are only slow may be failed.",
    ),
]
WorkersOption = Annotated[int, typer.Option("--workers", min=1, max=64, help="Images migrated at the same time.")]
AcceptUnseenSharingOption = Annotated[
    bool,
    typer.Option(
        "--accept-unseen-sharing",
        help="Delete old data even where Glance lets no one see whether another image shares it (locations "
        "hidden, GET /v2/images/ID/locations refused): that image would lose its data. Without it such a run "
        "stops before its first delete.",
    ),
]
RunIdOption = Annotated[int | None, typer.Option("--run", help="Run id (default: the latest run).")]


class StrategyChoice(StrEnum):
    AUTO = "auto"
    COPY_IMAGE = Strategy.COPY_IMAGE.value
    LOCATION_SWAP = Strategy.LOCATION_SWAP.value


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bandwidth(bwlimit: str | None) -> Bandwidth | None:
    rate = parse_size(bwlimit, "--bwlimit")
    if rate is None:
        return None
    if rate <= 0:
        raise UsageError(f"--bwlimit {bwlimit!r}: give a positive number of bytes per second, e.g. 100M")
    return Bandwidth(rate)


def parse_size(text: str | None, option: str) -> int | None:
    """Bytes, or a number with K, M, G or T (powers of 1024), as operators write image sizes."""
    if text is None:
        return None
    value, unit = text.strip().upper().removesuffix("IB").removesuffix("B"), ""
    if value and value[-1] in SIZE_UNITS:
        value, unit = value[:-1], value[-1]
    try:
        return int(float(value) * SIZE_UNITS[unit])
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected a size such as 1048576, 512M or 2G") from None


def _connector(
    os_cloud: str | None, timeout: float, service_cloud: str | None, bandwidth: Bandwidth | None = None
) -> GlanceFactory:
    """How run, check and retry reach Glance, when they first need it."""
    # glance.py here and commands.py in run, check and retry are imported when those run: status, report, --help and
    # --version start without the cloud libraries they load (requests, keystoneauth1...), a quarter of a second sooner.
    from glance_migrator.glance import Glance  # noqa: PLC0415

    return lambda: Glance.connect(os_cloud, timeout, service_cloud, bandwidth)


def _open_db(db: str | None, readonly: bool = False) -> StateDB:
    """The state DB; a password typed into --db is used, with a warning: `ps` shows it to every user of the host."""
    state_db = StateDB.open(db, readonly=readonly)  # a URL it cannot read is a usage error, raised here
    if db and "://" in db and any(db in arg for arg in sys.argv[1:]) and sa.make_url(db).password:
        logging.getLogger(__name__).warning(
            "the state DB's password is on the command line, where `ps` shows it to every user of this host: "
            "use --db @FILE, GLANCE_MIGRATOR_DB, PGPASSWORD or ~/.pgpass instead"
        )
    return state_db


_CONSOLE_LOG = logging.StreamHandler(sys.stderr)
_REDACT = RedactingFilter()


@contextmanager
def _live_progress() -> Iterator[render.LiveProgress | None]:
    """On an interactive terminal, a live display replaces the per-step log lines (warnings still show)."""
    if not sys.stderr.isatty() or _CONSOLE_LOG.level > logging.INFO:
        yield None
        return
    level = _CONSOLE_LOG.level
    _CONSOLE_LOG.setLevel(logging.WARNING)
    try:
        with render.LiveProgress() as live:
            yield live
    finally:
        _CONSOLE_LOG.setLevel(level)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"glance-migrator {glance_migrator.__version__}")
        raise typer.Exit


@app.callback()
def main_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every HTTP retry and debug detail.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings and errors.")] = False,
    log_file: Annotated[
        Path | None, typer.Option("--log-file", help="Also append every log line (at -v detail) to this file.")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    console = _CONSOLE_LOG
    console.setLevel(level)
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        try:
            handlers.append(logging.FileHandler(log_file))
        except OSError as e:
            raise UsageError(f"--log-file {log_file}: {e.strerror}") from e
    for handler in handlers:
        handler.addFilter(_REDACT)
    logging.basicConfig(
        level=logging.DEBUG if log_file else level,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=handlers,
    )
    if not verbose:  # openstacksdk and keystoneauth warn about things we report better ourselves
        for name in ("openstack", "keystoneauth", "stevedore", "alembic"):
            logging.getLogger(name).setLevel(logging.ERROR)


@app.command()
def run(
    from_store: Annotated[str | None, typer.Option("--from-store", help="Glance store the data leaves.")] = None,
    to_store: Annotated[str | None, typer.Option("--to-store", help="Glance store the data moves to.")] = None,
    image: Annotated[
        list[str] | None,
        typer.Option("--image", help="Only this image UUID (repeatable). Default: every image."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in the state DB.")] = False,
    strategy: Annotated[
        StrategyChoice,
        typer.Option(
            "--strategy",
            help="copy-image (Glance multi-store import), location-swap (the original method), or auto: "
            "copy-image where Glance offers it for the source store, else location-swap.",
        ),
    ] = StrategyChoice.AUTO,
    spool_dir: Annotated[
        Path | None,
        typer.Option("--spool-dir", help=f"location-swap: private dir for downloads. Default: {default_spool_dir()}"),
    ] = None,
    no_spool: Annotated[
        bool,
        typer.Option("--no-spool", help="location-swap: stream each image into its copy, without a spool file."),
    ] = False,
    owner: Annotated[
        list[str] | None, typer.Option("--owner", "--project", help="Only images of this project id (repeatable).")
    ] = None,
    visibility: Annotated[
        list[str] | None, typer.Option("--visibility", help="Only public/private/shared/community (repeatable).")
    ] = None,
    name: Annotated[
        list[str] | None, typer.Option("--name", help="Only names matching this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Leave out this UUID or name glob (repeatable).")
    ] = None,
    min_size: Annotated[str | None, typer.Option("--min-size", help="Only images at least this big (e.g. 1G).")] = None,
    max_size: Annotated[
        str | None, typer.Option("--max-size", help="Only images at most this big (e.g. 500M).")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many images.")] = None,
    order: Annotated[Order | None, typer.Option("--order", help="Migrate in this order (default: as listed).")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say what would happen to each image; change nothing.")
    ] = False,
    inspect_formats: Annotated[
        bool,
        typer.Option(
            "--inspect-formats",
            help="With --dry-run: read the first MiB of each image to migrate and name those whose data Glance's "
            "format check (Glance 30 and later) would refuse.",
        ),
    ] = False,
    workers: WorkersOption = 1,
    stuck_after: StuckAfterOption = STUCK_AFTER,
    accept_unseen_sharing: AcceptUnseenSharingOption = False,
    db: DbOption = None,
    os_cloud: CloudOption = None,
    service_cloud: ServiceCloudOption = None,
    bwlimit: BwlimitOption = None,
    timeout: TimeoutOption = READ_TIMEOUT,
    lease_ttl: LeaseTtlOption = LEASE_SECONDS,
) -> None:
    """Discover images and migrate them; --resume continues after a crash or Ctrl-C, or joins a run that
    runners on other hosts are working on (a shared PostgreSQL state DB).

    Example: glance-migrator run --from-store file --to-store ceph --workers 4
    """
    from glance_migrator import commands  # noqa: PLC0415 - with the cloud libraries: see _connector

    bandwidth = _bandwidth(bwlimit)
    chosen = None if strategy == StrategyChoice.AUTO else Strategy(strategy.value)
    filters = Filters(
        owners=tuple(owner or ()),
        visibilities=tuple(visibility or ()),
        names=tuple(name or ()),
        exclude=tuple(exclude or ()),
        min_size=parse_size(min_size, "--min-size"),
        max_size=parse_size(max_size, "--max-size"),
        limit=limit,
        order=order,
    )
    if inspect_formats and not dry_run:
        raise UsageError("--inspect-formats goes with --dry-run (a run learns Glance's answer from Glance)")
    if dry_run:
        if resume:
            raise UsageError("--dry-run plans a new run; it cannot be combined with --resume")
        the_plan = commands.plan(
            _connector(os_cloud, timeout, service_cloud, bandwidth),
            from_store=from_store,
            to_store=to_store,
            image_ids=image or [],
            strategy=chosen,
            filters=filters,
            accept_unseen_sharing=accept_unseen_sharing,
            inspect_formats=inspect_formats,
        )
        render.print_plan(the_plan)
        return
    state = _open_db(db)
    state.lease_ttl = timedelta(seconds=lease_ttl)
    with _live_progress() as live:
        rep = commands.run_migration(
            state,
            _connector(os_cloud, timeout, service_cloud, bandwidth),
            from_store=from_store,
            to_store=to_store,
            image_ids=image or [],
            resume=resume,
            workers=workers,
            stuck_after=stuck_after,
            strategy=chosen,
            spool_dir=spool_dir,
            no_spool=no_spool,
            filters=filters,
            progress=live,
            accept_unseen_sharing=accept_unseen_sharing,
        )
    render.print_status(rep)
    raise typer.Exit(render.exit_code(rep))


@app.command()
def check(
    from_store: Annotated[str | None, typer.Option("--from-store", help="Glance store the data would leave.")] = None,
    to_store: Annotated[str | None, typer.Option("--to-store", help="Glance store the data would move to.")] = None,
    spool_dir: Annotated[Path | None, typer.Option("--spool-dir", help="Where location-swap would spool.")] = None,
    os_cloud: CloudOption = None,
    service_cloud: ServiceCloudOption = None,
    timeout: TimeoutOption = READ_TIMEOUT,
) -> None:
    """Ask the cloud what it can do, and say which strategy `run` would use; changes nothing.

    Exits non-zero when a run between the two stores would be refused.

    Example: glance-migrator check --from-store file --to-store ceph
    """
    from glance_migrator import commands  # noqa: PLC0415 - with the cloud libraries: see _connector

    findings = commands.check_cloud(_connector(os_cloud, timeout, service_cloud), from_store, to_store, spool_dir)
    render.print_findings(findings)
    raise typer.Exit(render.findings_exit_code(findings))


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON document (same as -f json).")] = False,
    fmt: Annotated[
        render.Format | None,
        typer.Option("--format", "-f", help="List every image in this format instead of the summary."),
    ] = None,
    columns: Annotated[
        list[str] | None, typer.Option("--column", "-c", help="With -f: only this column (repeatable).")
    ] = None,
    watch: Annotated[
        float | None, typer.Option("--watch", min=0.5, help="Redraw every SECONDS until the run is complete.")
    ] = None,
    run_id: RunIdOption = None,
    db: DbOption = None,
) -> None:
    """Show counts per state, and the images that failed, were blocked or skipped, with the reason.

    Example: glance-migrator status --json | jq '.images[] | select(.state=="failed")'
    Example: glance-migrator status -f csv -c id -c state -c error
    """
    state_db = _open_db(db, readonly=True)
    fmt = render.Format.JSON if as_json else fmt
    while True:
        rep = reports.report(state_db, run_id)
        if watch is not None and sys.stdout.isatty():
            print("\033[2J\033[H", end="")  # clear the screen between redraws, as `watch` does
        if fmt is None:
            render.print_status(rep)
        else:
            render.print_images(rep, fmt, columns or [])
        if watch is None or rep.complete:
            return
        time.sleep(watch)


@app.command()
def report(
    output: Annotated[Path, typer.Argument(help="Audit file to write: .json (with every event) or .csv.")],
    run_id: RunIdOption = None,
    db: DbOption = None,
) -> None:
    """Write an audit file of every image: stores, sizes and hashes before and after, timings, attempts, errors.

    Example: glance-migrator report migration-audit.csv
    """
    records = reports.audit(_open_db(db, readonly=True), run_id)
    try:
        written = render.write_audit(records, output)
    except OSError as e:
        raise UsageError(f"cannot write {output}: {e.strerror}") from e
    print(f"wrote {written} image(s) to {output}")


@app.command()
def retry(
    image: Annotated[list[str] | None, typer.Argument(help="UUID(s) of failed images.", show_default=False)] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="Retry every failed image of the run.")] = False,
    queue_only: Annotated[
        bool, typer.Option("--queue-only", help="Only re-queue; a later `run --resume` migrates them.")
    ] = False,
    run_id: RunIdOption = None,
    workers: WorkersOption = 1,
    stuck_after: StuckAfterOption = STUCK_AFTER,
    accept_unseen_sharing: AcceptUnseenSharingOption = False,
    db: DbOption = None,
    os_cloud: CloudOption = None,
    service_cloud: ServiceCloudOption = None,
    bwlimit: BwlimitOption = None,
    timeout: TimeoutOption = READ_TIMEOUT,
) -> None:
    """Re-queue failed images from the step where they failed, then migrate them.

    Example: glance-migrator retry 3f1c0e2a-8a7b-4c55-9d40-0d3c1f7b2a11
    """
    from glance_migrator import commands  # noqa: PLC0415 - with the cloud libraries: see _connector

    bandwidth = _bandwidth(bwlimit)
    rep = commands.retry(
        _open_db(db),
        _connector(os_cloud, timeout, service_cloud, bandwidth),
        image or [],
        all_failed=all_failed,
        run_id=run_id,
        queue_only=queue_only,
        workers=workers,
        stuck_after=stuck_after,
        accept_unseen_sharing=accept_unseen_sharing,
    )
    render.print_status(rep)
    if queue_only:  # re-queued, nothing run: the run is unfinished on purpose, not interrupted
        raise typer.Exit(EXIT_OK)
    raise typer.Exit(render.exit_code(rep))


def _abort(_signum: int, _frame: FrameType | None) -> None:
    raise Aborted("aborted by Ctrl-C; every recorded step is kept, `run --resume` continues")


def main() -> None:
    """Console entry point: the one place where errors become messages and exit codes."""
    signal.signal(signal.SIGINT, _abort)  # a run installs its own graceful handler on top of this one
    try:
        app()  # typer itself handles --help and usage errors (exit 2)
    except MigratorError as e:
        typer.echo(f"glance-migrator: error: {e}", err=True)
        sys.exit(e.exit_code)
    finally:
        # The outcome is recorded and the exit code chosen: a late Ctrl-C (a double press) must not turn
        # it into a death by SIGINT, which Python's shutdown would allow once it resets the handlers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
