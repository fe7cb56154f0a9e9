"""location-swap against real backends: file -> S3 and file -> Ceph RBD, through the CLI."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from openstack.connection import Connection

from glance_migrator.errors import EXIT_OK, EXIT_PARTIAL
from tests.glancetools import (
    Seeded,
    assert_migrated,
    assert_swapped,
    cli,
    cli_popen,
    event_count,
    raw_image,
    seed_image,
    status_json,
    stores_of,
    wait_for,
)

MiB = 1 << 20
TARGETS = ["s3", "ceph"]


@pytest.fixture
def env(full_lab: Any) -> dict[str, str]:
    return dict(full_lab.env())


@pytest.fixture
def conn(full_lab: Any) -> Connection:
    return full_lab.connect()


def _varied(conn: Connection, prefix: str, count: int = 12) -> list[Seeded]:
    demo = conn.identity.find_project("demo").id
    sizes = [1, 4096, MiB, 3 * MiB + 1, 9 * MiB, 20 * MiB, 12345, 700 * 1024, 2 * MiB, 33, 5 * MiB, 64 * 1024]
    kinds: list[dict[str, Any]] = [
        {}, {"hidden": True}, {"visibility": "community"}, {"visibility": "public"},
        {"visibility": "shared", "members": [demo]}, {"tags": ["gold"], "os_distro": "cirros"},
        {"visibility": "community", "hidden": True}, {"protected": True}, {"hw_disk_bus": "scsi"},
        {"visibility": "shared"}, {"tags": ["a", "b"]}, {"hidden": True},
    ]  # fmt: skip
    return [seed_image(conn, f"{prefix}-{i}", os.urandom(sizes[i % 12]), **kinds[i % 12]) for i in range(count)]


def _select(images: list[Seeded]) -> list[str]:
    return [arg for s in images for arg in ("--image", s.id)]


@pytest.mark.parametrize("target", TARGETS)
def test_location_swap_moves_a_dozen_images(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path, target: str
) -> None:
    images = _varied(conn, f"swap-{target}")
    spool = tmp_path / "spool"
    proc = cli(
        "run",
        "--from-store",
        "old",
        "--to-store",
        target,
        "--strategy",
        "location-swap",
        *_select(images),
        "--spool-dir",
        str(spool),
        "--db",
        str(tmp_path / "state.db"),
        "--workers",
        "2",
        env=env,
    )
    assert proc.returncode == EXIT_OK, proc.stderr
    for seeded in images:
        assert_swapped(conn, full_lab, seeded, "old", target)
    assert list(spool.iterdir()) == []  # no spool file left behind
    assert oct(spool.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("target", TARGETS)
def test_location_swap_survives_kill_9_at_any_moment(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path, target: str
) -> None:
    images = _varied(conn, f"kill-{target}", count=6)
    images += [seed_image(conn, f"kill-{target}-big-{i}", os.urandom(60 * MiB)) for i in range(2)]
    db, log = tmp_path / "state.db", tmp_path / "runner.log"
    common = ["--db", str(db), "--spool-dir", str(tmp_path / "spool")]
    kills = 0
    for threshold in (1, 4, 8, 13, 19, 26, 34, 43):
        start = ["--from-store", "old", "--to-store", target, "--strategy", "location-swap", *_select(images)]
        proc = cli_popen("run", *(start if kills == 0 else ["--resume"]), *common, env=env, log=log)
        assert wait_for(lambda t=threshold, p=proc: event_count(db) >= t or p.poll() is not None, timeout=180)
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 5, f"only {kills} kills before the run finished; see {log}"
    done = cli("run", "--resume", *common, env=env)
    assert done.returncode == EXIT_OK, done.stderr + log.read_text()
    for seeded in images:
        assert_swapped(conn, full_lab, seeded, "old", target)


def test_corrupt_source_fails_with_integrity_error_and_keeps_its_location(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    seeded = seed_image(conn, "corrupt", os.urandom(2 * MiB))
    path = full_lab.store_dir("old") / seeded.id
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF  # one flipped bit-pattern, same size: only a hash can tell
    path.write_bytes(bytes(data))
    db = tmp_path / "state.db"
    proc = cli(
        "run",
        "--from-store",
        "old",
        "--to-store",
        "s3",
        "--strategy",
        "location-swap",
        "--image",
        seeded.id,
        "--spool-dir",
        str(tmp_path / "spool"),
        "--db",
        str(db),
        env=env,
    )
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    (row,) = status_json(db, env)["images"]
    assert row["state"] == "failed" and row["error_kind"] == "integrity" and row["failed_at"] == "pending"
    image = raw_image(conn, seeded.id)
    assert image is not None and stores_of(conn, seeded.id) == {"old"} and len(image["locations"]) == 1
    assert path.read_bytes() == bytes(data)  # the (corrupt) original is all there is: never removed
    assert list((tmp_path / "spool").iterdir()) == []


@pytest.mark.parametrize("target", TARGETS)
def test_copy_image_to_real_backends(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path, target: str
) -> None:
    images = _varied(conn, f"copy-{target}", count=4)
    cli(
        "run",
        "--from-store",
        "old",
        "--to-store",
        target,
        *_select(images),
        "--db",
        str(tmp_path / "s.db"),
        env=env,
        check_rc=EXIT_OK,
    )
    for seeded in images:
        assert_migrated(conn, full_lab, seeded, "old", target)
