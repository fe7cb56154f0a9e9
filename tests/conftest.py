"""Shared fixtures: one real Keystone + Glance lab per test session (see tests/lab/__init__.py).

The lab's logs live under pytest's basetemp (pytest keeps the last 3 runs). Their path is printed at
the end of the session when a test failed or GLANCE_MIGRATOR_LAB_KEEP_LOGS is set, and is attached
to each failure report.
"""

from __future__ import annotations

import os

import pytest

from tests.lab import Lab

_LAB = pytest.StashKey[Lab]()


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config):
    """A running lab: Keystone + Glance on free loopback ports, stores 'old' (default) and 'new'."""
    the_lab = Lab(tmp_path_factory.mktemp("glance-lab"))
    pytestconfig.stash[_LAB] = the_lab
    the_lab.start()
    try:
        yield the_lab
    finally:
        the_lab.stop()


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
    the_lab = config.stash.get(_LAB, None)
    if the_lab is None:
        return
    failed = terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")
    if failed or os.environ.get("GLANCE_MIGRATOR_LAB_KEEP_LOGS") or config.option.verbose > 0:
        timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in the_lab.timings.items())
        terminalreporter.write_sep("-", "glance lab")
        terminalreporter.write_line(f"logs: {the_lab.logs_dir}")
        terminalreporter.write_line(f"start times: {timings or 'not started'}")
