"""A real PostgreSQL server from Debian's packages on 127.0.0.1, for the state DB tests on PostgreSQL.

    pg = Postgres(Path("/tmp/x"))   # its own data dir below it
    pg.start()                      # initdb (first time), postgres on a free loopback port, trust auth
    url = pg.create_database()      # a fresh database: postgresql+psycopg://glance_migrator@127.0.0.1:PORT/db_N
    ...
    pg.stop()

The server runs as the `postgres` system user when started by root (PostgreSQL refuses to run as root; the Debian
package creates that user), so its data dir is made outside pytest's root-only temp tree. Only TCP on loopback is
opened (no Unix socket), with trust authentication for that address alone: the tests' URLs carry no password,
except the ones that check a password is never shown (the server ignores it under trust).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.lab import HOST, LabError, _free_ports

PACKAGES = ("postgresql",)  # Debian's: the server of its supported major release and its client
APT_COMMAND = "apt-get install -y --no-install-recommends " + " ".join(PACKAGES)
USER = "glance_migrator"  # the role the tests connect as (a superuser of this throwaway cluster)
_SERVICE_USER = "postgres"  # who runs the server when we are root


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL server's bin dir (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name), reverse=True
    )
    return found[0].parent if found else None


def missing_packages() -> list[str]:
    return [] if bin_dir() is not None else list(PACKAGES)


class Postgres:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._data: Path | None = None
        self._names = itertools.count(1)

    @property
    def url_base(self) -> str:
        return f"postgresql+psycopg://{USER}@{HOST}:{self.port}"

    def start(self) -> None:
        bindir = bin_dir()
        if bindir is None:
            raise LabError(f"PostgreSQL's server is not installed: {APT_COMMAND} (as root)")
        as_user = _demote() if os.geteuid() == 0 else None
        # pytest's temp tree is root-only (0700): the server's files live in a dir its user can reach
        self._data = Path(tempfile.mkdtemp(prefix="glance-migrator-pg-")) / "data"
        self._data.parent.chmod(0o755)
        log = self.root / "postgres.log"
        self.root.mkdir(parents=True, exist_ok=True)
        if as_user is not None:
            os.chown(self._data.parent, as_user.pw_uid, as_user.pw_gid)
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(self._data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            user=as_user.pw_uid if as_user else None,
            group=as_user.pw_gid if as_user else None,
        )
        (self.port,) = _free_ports(1)
        settings = {
            "listen_addresses": f"'{HOST}'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "max_connections": "300",  # several runners with their workers, each a connection
            "fsync": "off",  # a throwaway cluster: crash safety of the server is not what is tested
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "64MB",
        }
        with (self._data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        (self._data / "pg_hba.conf").write_text(f"host all all {HOST}/32 trust\n")
        with log.open("ab") as out:
            self._proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(self._data)],
                stdout=out,
                stderr=subprocess.STDOUT,
                user=as_user.pw_uid if as_user else None,
                group=as_user.pw_gid if as_user else None,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not self._ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                self.stop()
                raise LabError(f"PostgreSQL did not start:\n{tail}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        return self.psql("SELECT 1", check=False).returncode == 0

    def psql(self, sql: str, database: str = "postgres", check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", str(self.port), "-U", USER, "-d",
             database, "-At", "-c", sql],
            capture_output=True,
            text=True,
            check=check,
        )  # fmt: skip

    def create_database(self) -> str:
        """A new, empty database on this server: its SQLAlchemy URL."""
        name = f"db_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name}")
        return f"{self.url_base}/{name}"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # fast shutdown: disconnects whoever is still connected
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._data is not None:
            shutil.rmtree(self._data.parent, ignore_errors=True)
            self._data = None


def _demote() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(_SERVICE_USER)
    except KeyError:
        message = f"running as root, PostgreSQL needs the {_SERVICE_USER!r} user (Debian's package makes it)"
        raise LabError(message) from None
