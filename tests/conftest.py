"""Shared fixtures: real Keystone + Glance labs, one of each kind per test session (see tests/lab/__init__.py).

- `lab`: stores old (default) and new, both file stores; ~5 s to start.
- `glance`: the Glance release the labs run (tests/lab GLANCE_RELEASES; $GLANCE_MIGRATOR_LAB_GLANCE, else the
  latest). A test marked `core` runs on every release: [glance33] and [glance30], each on its own labs.
- `full_lab`: a second lab with stores old, new, s3 (SeaweedFS) and ceph (rbd on a single-node Ceph);
  started only when a test asks for it (~7 s). Without the Ceph packages it FAILS, naming the apt-get
  command: CI must not silently skip these tests.
- `postgres`: a real PostgreSQL server (Debian's packages, tests/lab/postgres.py) on a free loopback port, one per
  session, started when a test asks for it; `state_url`: a fresh state DB, once on SQLite and once on PostgreSQL
  ([sqlite], [postgresql]) for the tests that take it.

A lab's logs live under pytest's basetemp; their path is attached to each failure report. When a test
failed or GLANCE_MIGRATOR_LAB_KEEP_LOGS is set, they are copied to $TMPDIR/glance-migrator-lab-logs-*
at the end of the session and that path is printed (with -v, the path and start times always are).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openstack.connection import Connection

from tests.invariants import Invariants
from tests.lab import (
    CEPH_APT_COMMAND,
    DEFAULT_STORES,
    FULL_STORES,
    GLANCE_RELEASES,
    LATEST,
    Lab,
    glance_release,
    missing_ceph_packages,
)
from tests.lab.postgres import Postgres

_LABS = pytest.StashKey[dict[str, Lab]]()  # "lab" / "full_lab" (+ " glance30" ...) -> its lab, for failure reports


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked `core` runs once per Glance release of GLANCE_RELEASES (ids [glance33], [glance30]): its
    lab, full_lab and their connections are those of that release. Every other test runs on one release."""
    if metafunc.definition.get_closest_marker("core") and "glance" in metafunc.fixturenames:
        metafunc.parametrize("glance", list(GLANCE_RELEASES), indirect=True, ids=lambda r: f"glance{r}")


@pytest.fixture
def glance(request: pytest.FixtureRequest) -> str:
    """The Glance release (a key of GLANCE_RELEASES) this test's labs run: $GLANCE_MIGRATOR_LAB_GLANCE or the
    latest, or each release in turn for a test marked `core`."""
    return str(getattr(request, "param", None) or glance_release().major)


class _Labs:
    """The session's labs, one per (kind, release), started on first use and stopped at the end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, config: pytest.Config) -> None:
        self._tmp, self._config = tmp_path_factory, config
        self._labs: dict[tuple[str, str], Lab] = {}
        self._conns: dict[tuple[str, str], Connection] = {}

    def get(self, kind: str, release: str) -> Lab:
        key = (kind, release)
        if key not in self._labs:
            suffix = "" if release == LATEST else f"-glance{release}"
            stores = FULL_STORES if kind == "full_lab" else DEFAULT_STORES
            the_lab = Lab(self._tmp.mktemp(f"{kind.replace('_', '-')}{suffix}"), stores=stores, glance=release)
            self._labs[key] = the_lab
            self._config.stash.setdefault(_LABS, {})[f"{kind}{suffix}"] = the_lab
            the_lab.start()
        return self._labs[key]

    def connection(self, kind: str, release: str) -> Connection:
        key = (kind, release)
        if key not in self._conns:
            self._conns[key] = self.get(kind, release).connect("lab-admin")
        return self._conns[key]

    def stop(self) -> None:
        for conn in self._conns.values():
            conn.close()
        for the_lab in self._labs.values():
            the_lab.stop()


@pytest.fixture(scope="session")
def _labs(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[_Labs]:
    _sigterm_as_keyboard_interrupt()
    labs = _Labs(tmp_path_factory, pytestconfig)
    try:
        yield labs
    finally:
        labs.stop()


@pytest.fixture
def lab(_labs: _Labs, glance: str) -> Lab:
    """A running lab: Keystone + Glance on free loopback ports, stores 'old' (default) and 'new'."""
    return _labs.get("lab", glance)


@pytest.fixture
def full_lab(_labs: _Labs, glance: str) -> Lab:
    """A running lab with four stores: 'old' (file, default), 'new' (file), 's3' (a real S3 object store,
    SeaweedFS) and 'ceph' (rbd on a real single-node Ceph); lab.rbd(...), lab.s3_objects() etc. reach them."""
    missing = missing_ceph_packages()
    if missing:  # fail, never skip: a CI without Ceph must not pass these tests silently
        pytest.fail(
            f"full_lab needs the Debian packages {', '.join(missing)} for its Ceph store; install them as root:\n"
            f"    apt-get update && {CEPH_APT_COMMAND}\n(`./dev test` does this as root)",
            pytrace=False,
        )
    return _labs.get("full_lab", glance)


OPEN_FILES_BOUND = 256  # in the suite's process: 13-71 after each test now; select() takes no descriptor past 1,023


@pytest.fixture(autouse=True)
def _no_open_files_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that leaves files open in the suite's process fails here, naming them: left to pile up (sqlite3
    connections that only a full garbage collection closes), they pushed later tests' file descriptors past 1,023,
    where a select() in a helper thread failed and a distant test with it."""
    yield
    targets = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the listing's own descriptor, gone by now
            targets.append(str(fd.readlink()))
    if len(targets) > OPEN_FILES_BOUND:
        common = collections.Counter(targets).most_common(5)
        pytest.fail(f"{request.node.nodeid} left {len(targets)} files open in the test process: {common}")


def _sigterm_as_keyboard_interrupt() -> None:
    """The services run in their own sessions, so they outlive a pytest killed by SIGTERM (e.g. by
    `timeout`). Turn SIGTERM into KeyboardInterrupt: pytest then tears the session down (lab.stop())."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture
def admin_conn(_labs: _Labs, lab: Lab, glance: str) -> Connection:
    """openstack.connection.Connection as lab-admin (user admin, project admin, role admin)."""
    return _labs.connection("lab", glance)


@pytest.fixture
def full_admin_conn(_labs: _Labs, full_lab: Lab, glance: str) -> Connection:
    """openstack.connection.Connection to full_lab as lab-admin."""
    return _labs.connection("full_lab", glance)


@pytest.fixture
def full_env(full_lab: Lab) -> dict[str, str]:
    """The environment that points the CLI at full_lab's clouds.yaml (OS_CLOUD lab-admin)."""
    return dict(full_lab.env())


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A running PostgreSQL server; `postgres.create_database()` gives a fresh database's URL."""
    server = Postgres(tmp_path_factory.mktemp("postgres"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A state DB that does not exist yet (SQLite) or is empty (PostgreSQL): what `--db` is given."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    server: Postgres = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    labs = item.config.stash.get(_LABS, {})
    if report.failed and labs:
        lines = [f"{name}: logs {the_lab.logs_dir}" for name, the_lab in labs.items()]
        report.sections.append(("glance lab", "\n".join(lines)))
    return report


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """After a failure (or with GLANCE_MIGRATOR_LAB_KEEP_LOGS set): copy the lab's logs out of pytest's
    basetemp (which keeps only the last 3 runs, whoever made them) and print where they are."""
    labs = config.stash.get(_LABS, {})
    if not labs:
        return
    failed = terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")
    keep = failed or os.environ.get("GLANCE_MIGRATOR_LAB_KEEP_LOGS")
    if not (keep or config.option.verbose > 0):
        return
    terminalreporter.write_sep("-", "glance lab")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name, the_lab in labs.items():
        logs = the_lab.logs_dir
        if keep and logs.is_dir():
            kept = Path(tempfile.gettempdir()) / f"glance-migrator-lab-logs-{stamp}-{os.getpid()}-{name}"
            shutil.copytree(logs, kept)
            logs = kept
        timings = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in the_lab.timings.items())
        prefix = f"{name}: " if len(labs) > 1 else ""
        terminalreporter.write_line(f"{prefix}logs: {logs}")
        terminalreporter.write_line(f"{prefix}start times: {timings or 'not started'}")


@pytest.fixture
def invariants(request: pytest.FixtureRequest) -> Invariants:
    """The shared end-of-scenario checker (tests/invariants.py), named after the test for the record."""
    paragraph = (request.function.__doc__ or "").strip().split("\n\n")[0]
    described = " ".join(paragraph.split()) or request.function.__name__.removeprefix("test_").replace("_", " ")
    return Invariants(request.node.nodeid, described)
