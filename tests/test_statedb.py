"""Opening the state DB: created and upgraded automatically; anything odd is refused and left untouched."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from glance_migrator.errors import StateDBConnectionLost, StateDBError, UsageError
from glance_migrator.models import Base
from glance_migrator.statedb import StateDB
from tests.lab.postgres import Postgres


def test_new_db_is_created_with_the_current_schema_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    db = StateDB.open(str(path))
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == [], "models.py and migrations/ disagree: write a migration"
    db.close()
    StateDB.open(str(path)).close()  # opening again is a no-op upgrade


def test_the_schema_head_the_tool_checks_without_alembic_is_alembics_head(tmp_path: Path) -> None:
    """Opening an up-to-date DB compares its recorded revision with SCHEMA_HEAD and skips Alembic; a migration
    added without moving SCHEMA_HEAD would leave every existing DB unupgraded."""
    from alembic.script import ScriptDirectory  # noqa: PLC0415

    from glance_migrator.statedb import SCHEMA_HEAD, _alembic_config  # noqa: PLC0415

    assert ScriptDirectory.from_config(_alembic_config()).get_current_head() == SCHEMA_HEAD
    db = StateDB.open(str(tmp_path / "state.db"))
    with db.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_heads() == (SCHEMA_HEAD,)
    db.close()


def test_sqlalchemy_url_is_accepted(tmp_path: Path) -> None:
    StateDB.open(f"sqlite:///{tmp_path / 'u.db'}").close()
    assert (tmp_path / "u.db").exists()


def test_file_that_is_not_sqlite_is_refused_and_not_modified(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database\n" * 100)
    before = path.read_bytes()
    with pytest.raises(StateDBError, match="not a SQLite database"):
        StateDB.open(str(path))
    assert path.read_bytes() == before


def test_truncated_sqlite_file_is_refused_and_not_modified(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    StateDB.open(str(path)).close()
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * 200)  # a valid header, garbage after it
    before = path.read_bytes()
    with pytest.raises(StateDBError):
        StateDB.open(str(path))
    assert path.read_bytes() == before


def test_db_from_a_newer_glance_migrator_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    StateDB.open(str(path)).close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    with pytest.raises(StateDBError, match="newer glance-migrator"):
        StateDB.open(str(path))
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("9999_from_the_future",)


def test_sqlite_db_of_another_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(StateDBError, match="something else"):
        StateDB.open(str(path))
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"customers"}


def test_directory_as_db_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StateDBError, match="directory"):
        StateDB.open(str(tmp_path))


def test_status_reads_a_db_on_read_only_media_and_a_run_refuses_it_clearly(tmp_path: Path) -> None:
    """SQLite in WAL mode writes -wal/-shm files beside the DB: on a read-only mount, status still works."""
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    StateDB.open(str(rw / "state.db")).close()
    mounted = subprocess.run(["mount", "--bind", str(rw), str(ro)], capture_output=True)
    assert mounted.returncode == 0, f"this test needs root to bind-mount: {mounted.stderr!r}"
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        db = StateDB.open(str(ro / "state.db"), readonly=True)
        assert db.counts(1) == {}
        db.close()
        with pytest.raises(StateDBError, match="is the directory read-only"):
            StateDB.open(str(ro / "state.db"))
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_db_of_the_previous_schema_is_upgraded_with_its_rows(state_url: str) -> None:
    """A state DB an older glance-migrator left mid-run (schema 0004) opens upgraded, on SQLite and on PostgreSQL:
    its rows intact, the claim and status indexes in place, and sizes 64-bit, so that an image of 2 GiB or more
    fits (PostgreSQL refused one in 0004's 32-bit INTEGER: "integer out of range")."""
    from alembic import command  # noqa: PLC0415 - only this test drives Alembic by hand

    from glance_migrator.statedb import _alembic_config, db_url  # noqa: PLC0415

    engine = sa.create_engine(db_url(state_url))
    config = _alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0004")
        conn.exec_driver_sql("INSERT INTO runs (id, created_at, from_store, to_store, strategy) "
                             "VALUES (1, '2026-01-01', 'old', 'new', 'copy-image')")  # fmt: skip
        conn.exec_driver_sql(
            "INSERT INTO images (run_id, image_id, status, size, os_hidden, strategy, state, position, attempts, "
            "created_at, updated_at) VALUES (1, 'a', 'active', 2000000000, false, 'copy-image', 'pending', 0, 0, "
            "'2026-01-01', '2026-01-01')"
        )
    engine.dispose()
    db = StateDB.open(state_url)
    (row,) = db.images(1)
    assert (row.image_id, row.size, row.state) == ("a", 2000000000, "pending")
    with db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE images SET size = 3000000000, after_size = 3000000000")
    (row,) = db.images(1)
    assert (row.size, row.after_size) == (3000000000, 3000000000)
    with db.engine.connect() as conn:
        indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes("images")}
        assert {"ix_images_claim", "ix_images_lease_owner", "ix_images_run_state"} <= indexes
        assert "ix_images_state" not in indexes  # 0007: (run_id, state) serves status in its place
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    db.close()


def test_running_out_of_connections_is_a_state_db_error_not_an_internal_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from glance_migrator import statedb  # noqa: PLC0415

    monkeypatch.setattr(statedb, "POOL_SIZE", 2)
    monkeypatch.setattr(statedb, "POOL_TIMEOUT", 0.2)
    db = StateDB.open(str(tmp_path / "state.db"))
    held = [db.engine.connect() for _ in range(2)]  # every connection busy, as with too many workers
    try:
        with pytest.raises(StateDBError, match=r"no free connection for 0 s \(2 in use\).*fewer --workers"):
            db.has_runs()
    finally:
        for conn in held:
            conn.close()
        db.close()


def test_postgresql_db_is_built_by_the_same_migrations_and_refuses_what_sqlite_refuses(postgres: Postgres) -> None:
    """The Alembic scripts build the schema on PostgreSQL (models and migrations agree there too); a DB of a newer
    glance-migrator, or of another program, is refused and left as it was."""
    url = postgres.create_database()
    db = StateDB.open(url)
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        claim = conn.exec_driver_sql("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_images_claim'").scalar()
        assert claim and "WHERE" in claim, claim  # partial: unfinished rows only
    db.close()
    StateDB.open(url).close()  # up to date: a no-op
    postgres.psql("UPDATE alembic_version SET version_num = '9999_from_the_future'", database=url.rsplit("/", 1)[1])
    with pytest.raises(StateDBError, match="newer glance-migrator"):
        StateDB.open(url)
    other = postgres.create_database()
    postgres.psql("CREATE TABLE customers (id INTEGER)", database=other.rsplit("/", 1)[1])
    with pytest.raises(StateDBError, match="something else"):
        StateDB.open(other)
    tables = postgres.psql(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'", database=other.rsplit("/", 1)[1]
    )
    assert tables.stdout.split() == ["customers"]


def test_a_write_transaction_left_idle_is_ended_by_postgresql_and_reported_as_a_lost_connection(
    postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runner frozen mid-transaction (a paused VM) must not keep its row locks: PostgreSQL ends the transaction.
    The runner learns it as a lost connection (its worker lets go of the image; runner.py), and the next
    transaction gets a new connection."""
    from glance_migrator import statedb  # noqa: PLC0415

    monkeypatch.setattr(statedb, "IDLE_IN_WRITE", 1)
    db = StateDB.open(postgres.create_database())
    try:
        lost = pytest.raises(StateDBConnectionLost, match=r"connection was lost.*idle-in-transaction")
        with lost, db.session() as s:
            s.execute(sa.text("SELECT 1"))
            time.sleep(2.5)  # frozen, holding the transaction open
            s.execute(sa.text("SELECT 1"))
        assert db.has_runs() is False  # reads work again
        with db.session() as s:  # and so do writes
            assert s.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        db.close()


def test_several_hosts_opening_a_new_postgresql_db_at_once_build_it_once(postgres: Postgres) -> None:
    url = postgres.create_database()
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            StateDB.open(url).close()
        except BaseException as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_password_in_the_db_url_is_never_shown(postgres: Postgres, tmp_path: Path) -> None:
    """In errors and in the URL the tool shows; `--db @FILE` reads the URL from a file (off the command line)."""
    url = postgres.create_database().replace("glance_migrator@", "glance_migrator:s3cr3t-pw@")
    db = StateDB.open(url)  # trust auth: the server ignores the password
    assert "s3cr3t-pw" not in db.url and "***" in db.url
    db.close()
    unreachable = url.replace(f":{postgres.port}/", f":{_closed_port()}/")
    with pytest.raises(StateDBError) as failed:
        StateDB.open(unreachable)
    assert "s3cr3t-pw" not in str(failed.value) and "***" in str(failed.value)
    url_file = tmp_path / "db-url"
    url_file.write_text(url + "\n")
    assert StateDB.open(f"@{url_file}").url == db.url
    with pytest.raises(UsageError, match="cannot read it"):
        StateDB.open(f"@{tmp_path / 'missing'}")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
