"""Shared fixtures: one real Keystone + Glance lab per test session (see tests/lab/__init__.py).

The lab's logs live under pytest's basetemp; their path is attached to each failure report. When a
test failed or GLANCE_MIGRATOR_LAB_KEEP_LOGS is set, they are copied to $TMPDIR/glance-migrator-lab-logs-*
at the end of the session and that path is printed (with -v, the path and start times always are).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.lab import Lab

_LAB = pytest.StashKey[Lab]()


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config):
    """A running lab: Keystone + Glance on free loopback ports, stores 'old' (default) and 'new'."""
    _sigterm_as_keyboard_interrupt()
    the_lab = Lab(tmp_path_factory.mktemp("glance-lab"))
    pytestconfig.stash[_LAB] = the_lab
    the_lab.start()
    try:
        yield the_lab
    finally:
        the_lab.stop()


def _sigterm_as_keyboard_interrupt() -> None:
    """The services run in their own sessions, so they outlive a pytest killed by SIGTERM (e.g. by
    `timeout`). Turn SIGTERM into KeyboardInterrupt: pytest then tears the session down (lab.stop())."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def admin_conn(lab: Lab):
    """openstack.connection.Connection as lab-admin (user admin, project admin, role admin)."""
    conn = lab.connect("lab-admin")
    try:
        yield conn
    finally:
        conn.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    the_lab = item.config.stash.get(_LAB, None)
    if report.failed and the_lab is not None:
        report.sections.append(("glance lab", f"logs: {the_lab.logs_dir}"))
    return report


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """After a failure (or with GLANCE_MIGRATOR_LAB_KEEP_LOGS set): copy the lab's logs out of pytest's
    basetemp (which keeps only the last 3 runs, whoever made them) and print where they are."""
    the_lab = config.stash.get(_LAB, None)
    if the_lab is None:
        return
    failed = terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")
    keep = failed or os.environ.get("GLANCE_MIGRATOR_LAB_KEEP_LOGS")
    if not (keep or config.option.verbose > 0):
        return
    terminalreporter.write_sep("-", "glance lab")
    logs = the_lab.logs_dir
    if keep and logs.is_dir():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = Path(tempfile.gettempdir()) / f"glance-migrator-lab-logs-{stamp}-{os.getpid()}"
        shutil.copytree(logs, kept)
        logs = kept
    timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in the_lab.timings.items())
    terminalreporter.write_line(f"logs: {logs}")
    terminalreporter.write_line(f"start times: {timings or 'not started'}")
