"""Several runners, as on several hosts, share one migration through a PostgreSQL state DB (issue: scale out).

Each runner is its own `glance-migrator` process (the installed CLI) with its own workers; the first starts the run,
the others join it with `run --resume`. While they work, one is killed (SIGKILL: a host that died) and another is
frozen past its lease (SIGSTOP: a host that hung) and then let go on (SIGCONT). Its images are taken over from their
last recorded step; when it wakes it learns from the DB that they are someone else's, and lets go.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from openstack.connection import Connection

from glance_migrator.errors import EXIT_OK, EXIT_USAGE
from tests.glancetools import cli, cli_popen, copies_of, noise, seed_image, status_json, wait_for
from tests.invariants import Invariants
from tests.lab import Lab
from tests.lab.postgres import Postgres

KIB, MIB = 1 << 10, 1 << 20
LEASE_TTL = 6  # seconds: --lease-ttl of every runner here, so that a frozen one is taken over within the test
SIZES = [0, 1, 1 * KIB, 7 * KIB, 64 * KIB, 300 * KIB, 1 * MIB, 3 * MIB, 6 * MIB] * 3  # 27 images, 0 B to 6 MiB


def _holding(engine: sa.Engine, pid: int) -> list[tuple[str, str]]:
    """The (image, state) rows a runner process holds a lease on now (none while the schema is not there yet)."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT image_id, state FROM images WHERE lease_owner LIKE :who"), {"who": f"%:{pid}:%"}
            )
            return [(r[0], r[1]) for r in rows]
    except sa.exc.ProgrammingError:
        return []


def _copy_tasks(conn: Connection, image_id: str) -> list[dict[str, Any]]:
    tasks = conn.image.get(f"/images/{image_id}/tasks").json()["tasks"]
    return [t for t in tasks if ((t.get("input") or {}).get("import_req") or {}).get("method", {}).get("name")
            == "copy-image"]  # fmt: skip


@pytest.mark.parametrize(("strategy", "target"), [("copy-image", "new"), ("location-swap", "ceph")])
def test_runners_on_one_postgresql_db_share_a_run_through_a_kill_and_a_freeze(
    request: pytest.FixtureRequest, postgres: Postgres, tmp_path: Path, invariants: Invariants, strategy: str,
    target: str,
) -> None:  # fmt: skip
    """Four runner processes, two workers each, on one PostgreSQL state DB migrate 27 images: one is SIGKILLed
    while it holds an image, another SIGSTOPped past its lease while it holds one, then continued. Every image is
    done, none copied twice, none lost."""
    swap = strategy == "location-swap"
    lab: Lab = request.getfixturevalue("full_lab" if swap else "lab")
    admin_conn: Connection = request.getfixturevalue("full_admin_conn" if swap else "admin_conn")
    url = postgres.create_database()
    env = dict(lab.env())
    images = [seed_image(admin_conn, f"multihost-{i}-{size}", noise(size)) for i, size in enumerate(SIZES)]
    if swap:
        images = [seeded for seeded in images if seeded.data]  # Glance refuses an empty location: see test_corpus
    common = ["--db", url, "--workers", "2", "--lease-ttl", str(LEASE_TTL)]
    chosen = [arg for seeded in images for arg in ("--image", seeded.id)]
    spools = {f"host-{n}": tmp_path / f"spool-{n}" for n in range(1, 5)}  # each host its own disk

    def spool(name: str) -> list[str]:
        return ["--spool-dir", str(spools[name])] if swap else []

    engine = sa.create_engine(url)
    runners: dict[str, subprocess.Popen[bytes]] = {}
    try:
        runners["host-1"] = cli_popen(
            "run", "--from-store", "old", "--to-store", target, "--strategy", strategy, *chosen, *common,
            *spool("host-1"), env=env, log=tmp_path / "host-1.log",
        )  # fmt: skip
        assert wait_for(lambda: _count(engine, "SELECT count(*) FROM images") == len(images), timeout=60)
        for name in ("host-2", "host-3", "host-4"):
            runners[name] = cli_popen("run", "--resume", *common, *spool(name), env=env, log=tmp_path / f"{name}.log")

        # host-2 dies while it holds an image: its leases are free at once (same host, no such process)
        assert wait_for(lambda: _holding(engine, runners["host-2"].pid), timeout=60, interval=0.01), _logs(tmp_path)
        killed_holding = _holding(engine, runners["host-2"].pid)
        runners["host-2"].send_signal(signal.SIGKILL)
        # host-3 freezes while it holds an image, for longer than its lease: the others take its images over
        assert wait_for(lambda: _holding(engine, runners["host-3"].pid), timeout=60, interval=0.01), _logs(tmp_path)
        runners["host-3"].send_signal(signal.SIGSTOP)
        frozen_holding = _holding(engine, runners["host-3"].pid)
        taken_over = wait_for(
            lambda: not any(image in dict(_holding(engine, runners["host-3"].pid)) for image, _ in frozen_holding),
            timeout=LEASE_TTL * 3 + 30,
        )
        runners["host-3"].send_signal(signal.SIGCONT)
        assert taken_over, f"host-3's images {frozen_holding} were not taken over while it was frozen"

        for proc in runners.values():
            proc.wait(timeout=300)
        codes = {name: proc.returncode for name, proc in runners.items()}
    finally:
        for proc in runners.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
        engine.dispose()
    # The frozen runner learns, when it wakes, that its images went to others, and lets go. Frozen in the middle
    # of a write transaction (its row locks would keep the image from the others), PostgreSQL ended that
    # transaction meanwhile: the runner finds its connection lost, lets go of that image the same way, and goes on.
    frozen_log = (tmp_path / "host-3.log").read_text()
    assert "leaving it to that worker" in frozen_log or "continues from its last recorded step" in frozen_log, (
        frozen_log
    )
    assert codes == {"host-1": EXIT_OK, "host-2": -signal.SIGKILL, "host-3": EXIT_OK, "host-4": EXIT_OK}, (
        codes,
        _logs(tmp_path),
    )

    doc = status_json(url, env)
    assert doc["run"]["complete"] and Counter(row["state"] for row in doc["images"]) == {"done": len(images)}, doc
    assert doc["leases"] == [], doc["leases"]
    for seeded in images:  # no image copied twice: Glance's own record of the copies it made, or the tool's copies
        if swap:
            assert len(copies_of(admin_conn, seeded.id)) == 1, seeded.id
        else:
            tasks = _copy_tasks(admin_conn, seeded.id)
            assert [t["status"] for t in tasks] == ["success"], (seeded.id, tasks)
    # (host-2's spool may keep the partial download it was killed in: a spool is that host's own cache)
    assert all(not any(spools[name].glob("*")) for name in ("host-1", "host-3", "host-4")), list(tmp_path.rglob("*"))
    invariants.check(lab, admin_conn, url, env, images, faults={"SIGKILL": 1, "SIGSTOP past the lease": 1})
    print(f"host-2 held {killed_holding} when killed; host-3 held {frozen_holding} when frozen")


def test_status_shows_who_holds_what_while_runners_work(
    lab: Lab, admin_conn: Connection, postgres: Postgres, tmp_path: Path
) -> None:
    """`status` names each lease's host, pid, worker and age; a frozen runner's leases are shown stale once they
    lapse, with what happens next."""
    url = postgres.create_database()
    env = dict(lab.env())
    images = [seed_image(admin_conn, f"leases-{i}", noise(2 * MIB)) for i in range(4)]
    chosen = [arg for seeded in images for arg in ("--image", seeded.id)]
    engine = sa.create_engine(url)
    proc = cli_popen(
        "run", "--from-store", "old", "--to-store", "new", "--strategy", "copy-image", *chosen, "--db", url,
        "--workers", "2", "--lease-ttl", str(LEASE_TTL), env=env, log=tmp_path / "run.log",
    )  # fmt: skip
    try:
        assert wait_for(lambda: _holding(engine, proc.pid), timeout=60, interval=0.01), _logs(tmp_path)
        proc.send_signal(signal.SIGSTOP)
        held = _holding(engine, proc.pid)
        live = cli("status", "--db", url, env=env, check_rc=None)
        time.sleep(LEASE_TTL + 1)
        stale = cli("status", "--db", url, env=env, check_rc=None)
        doc = status_json(url, env)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=300)
        engine.dispose()
    host = os.uname().nodename
    for image_id, _state in held:
        assert f"working: {image_id}" in live.stdout and f"host {host} pid {proc.pid} worker-" in live.stdout, live
        assert f"stale: {image_id}" in stale.stdout and "lapsed" in stale.stdout, stale.stdout
    assert {lease["image_id"] for lease in doc["leases"]} == {image for image, _ in held}
    assert all(lease["stale"] and lease["pid"] == proc.pid for lease in doc["leases"]), doc["leases"]
    assert proc.returncode == EXIT_OK, _logs(tmp_path)  # continued, it finished its own images
    # every command works on PostgreSQL: report, retry, run --resume of a finished run
    audit = tmp_path / "audit.csv"
    cli("report", str(audit), "--db", url, env=env, check_rc=EXIT_OK)
    assert len(audit.read_text().splitlines()) == 1 + len(images)
    refused = cli("retry", "--all-failed", "--db", url, env=env, check_rc=EXIT_USAGE)
    assert "has no failed or blocked image" in refused.stderr
    cli("run", "--resume", "--db", url, env=env, check_rc=EXIT_OK)


def _count(engine: sa.Engine, sql: str) -> int:
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql(sql).scalar() or 0)
    except sa.exc.ProgrammingError:  # the schema is not there yet
        return 0


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(tmp_path.glob("*.log")))
