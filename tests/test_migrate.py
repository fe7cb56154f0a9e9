"""copy-image migrations through the CLI, against the real Keystone + Glance of the lab."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from openstack.connection import Connection

from glance_migrator.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_STATE_DB, Aborted
from glance_migrator.runner import Runner, graceful_interrupts
from tests.glancetools import (
    Seeded,
    assert_migrated,
    cli,
    cli_popen,
    count_in_db,
    delete_all_images,
    event_count,
    raw_image,
    seed_image,
    status_json,
    stores_of,
    wait_for,
)

MiB = 1 << 20


@pytest.fixture
def env(lab: Any) -> dict[str, str]:
    return dict(lab.env())


@pytest.fixture
def clean(admin_conn: Connection) -> Connection:
    """An empty Glance, for tests that let the tool discover every image."""
    delete_all_images(admin_conn)
    return admin_conn


def _mixed_images(conn: Connection, demo_project: str, prefix: str, count: int = 12) -> list[Seeded]:
    """A dozen images of mixed sizes, visibilities and properties, some hidden, some with members."""
    sizes = [
        1,
        1000,
        64 * 1024,
        MiB,
        3 * MiB + 17,
        9 * MiB,
        20 * MiB,
        2 * MiB,
        12345,
        5 * MiB,
        700 * 1024,
        33,
    ]
    kinds: list[dict[str, Any]] = [
        {},
        {"hidden": True},
        {"visibility": "community"},
        {"visibility": "public"},
        {"visibility": "shared", "members": [demo_project]},
        {"tags": ["gold", "linux"], "os_distro": "cirros"},
        {"visibility": "community", "hidden": True},
        {"protected": True},
        {"hw_disk_bus": "scsi", "tags": ["x"]},
        {"visibility": "shared"},
        {"owner_specified.openstack.md5": "n/a"},
        {"hidden": True, "tags": ["h"]},
    ]
    return [
        seed_image(conn, f"{prefix}-{i}", os.urandom(sizes[i % len(sizes)]), **kinds[i % len(kinds)])
        for i in range(count)
    ]


def test_full_run_moves_every_image_hidden_and_community_included(
    lab: Any, clean: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    demo = clean.identity.find_project("demo").id
    images = _mixed_images(clean, demo, "full")
    queued = seed_image(clean, "full-queued", None)
    deactivated = seed_image(clean, "full-deactivated", os.urandom(1000))
    assert clean.image.post(f"/images/{deactivated.id}/actions/deactivate").status_code == 204
    db = tmp_path / "state.db"

    proc = cli("run", "--from-store", "old", "--to-store", "new", "--db", str(db), "--workers", "3", env=env)

    assert proc.returncode == EXIT_PARTIAL, proc.stderr  # finished, with skipped images
    for seeded in images:
        assert_migrated(clean, lab, seeded, "old", "new")
    doc = status_json(db, env)
    by_id = {img["id"]: img for img in doc["images"]}
    assert doc["counts"]["done"] == len(images) and doc["counts"]["skipped"] == 2 and doc["run"]["complete"]
    assert by_id[queued.id]["state"] == "skipped" and "queued" in by_id[queued.id]["error"]
    assert by_id[deactivated.id]["state"] == "skipped" and "deactivated" in by_id[deactivated.id]["error"]
    assert stores_of(clean, deactivated.id) == {"old"}  # skipped images are left exactly as they were
    assert (raw_image(clean, deactivated.id) or {})["status"] == "deactivated"
    # The log has one timestamped line per step of each image.
    for seeded in images:
        lines = [line for line in proc.stderr.splitlines() if seeded.id in line]
        assert [line.split(": ")[1] for line in lines] == [
            "copy-requested",
            "copied",
            "old-removed",
            "done",
        ], lines
        assert all(line[:4].isdigit() and line[4] == "-" for line in lines)
    # A second run over the same images finds nothing left to do.
    proc = cli("run", "--from-store", "old", "--to-store", "new", "--db", str(db), env=env)
    doc = status_json(db, env)
    assert doc["run"]["id"] == 2 and doc["counts"]["done"] == len(images), proc.stderr
    assert doc["counts"]["pending"] == 0


def test_kill_9_mid_run_then_resume_ends_with_every_image_migrated(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    demo = admin_conn.identity.find_project("demo").id
    images = _mixed_images(admin_conn, demo, "kill", count=12)
    images += [seed_image(admin_conn, f"kill-big-{i}", os.urandom(40 * MiB)) for i in range(2)]
    db = tmp_path / "state.db"
    args = ["--db", str(db), "--workers", "2"]
    selection = [a for s in images for a in ("--image", s.id)]
    log = tmp_path / "runner.log"
    # Kill the runner at several points of the run, each time once it has recorded more transitions.
    kills = 0
    for threshold in (3, 9, 17, 26, 38):
        first = kills == 0
        proc = cli_popen(
            "run",
            *(["--from-store", "old", "--to-store", "new", *selection] if first else ["--resume"]),
            *args,
            env=env,
            log=log,
        )
        reached = wait_for(lambda t=threshold, p=proc: event_count(db) >= t or p.poll() is not None, timeout=120)
        assert reached
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 3, f"the run finished before it could be killed 3 times ({kills}); see {log}"
    proc_done = cli("run", "--resume", *args, env=env)
    assert proc_done.returncode == EXIT_OK, proc_done.stderr + log.read_text()
    for seeded in images:
        assert_migrated(admin_conn, lab, seeded, "old", "new")
    doc = status_json(db, env)
    assert doc["counts"]["done"] == len(images) and doc["run"]["complete"]
    assert all(img["state"] == "done" for img in doc["images"])


def test_failed_copy_is_recorded_and_retry_finishes_it(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    good = seed_image(admin_conn, "retry-good", os.urandom(MiB))
    bad = seed_image(admin_conn, "retry-bad", os.urandom(2 * MiB))
    blocker = lab.store_dir("new") / bad.id  # a stray file where the copy must go makes Glance's copy fail
    blocker.write_bytes(b"in the way")
    db = tmp_path / "state.db"
    proc = cli(
        "run",
        "--from-store",
        "old",
        "--to-store",
        "new",
        "--image",
        good.id,
        "--image",
        bad.id,
        "--db",
        str(db),
        env=env,
    )
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    assert_migrated(admin_conn, lab, good, "old", "new")
    row = {img["id"]: img for img in status_json(db, env)["images"]}[bad.id]
    assert row["state"] == "failed" and "os_glance_failed_import" in row["error"]
    assert stores_of(admin_conn, bad.id) == {"old"}  # nothing lost: the old copy is untouched
    text = cli("status", "--db", str(db), env=env, check_rc=0).stdout
    assert bad.id in text and "failed" in text

    blocker.unlink()
    proc = cli("retry", bad.id, "--db", str(db), env=env)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert_migrated(admin_conn, lab, bad, "old", "new")
    doc = status_json(db, env)
    assert doc["counts"]["done"] == 2 and doc["counts"]["failed"] == 0


def test_image_already_in_target_only_is_done_without_work(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    seeded = seed_image(admin_conn, "already", os.urandom(1000))
    db = tmp_path / "state.db"
    cli(
        "run",
        "--from-store",
        "old",
        "--to-store",
        "new",
        "--image",
        seeded.id,
        "--db",
        str(db),
        env=env,
        check_rc=EXIT_OK,
    )
    db2 = tmp_path / "again.db"
    proc = cli(
        "run",
        "--from-store",
        "old",
        "--to-store",
        "new",
        "--image",
        seeded.id,
        "--db",
        str(db2),
        env=env,
        check_rc=EXIT_OK,
    )
    assert "copy-requested" not in proc.stderr
    events = json.loads(cli("status", "--json", "--db", str(db2), env=env).stdout)
    assert events["counts"]["done"] == 1 and events["images"][0]["attempts"] == 0


def test_ctrl_c_finishes_the_step_in_flight_then_resume_completes(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    images = [seed_image(admin_conn, f"sigint-{i}", os.urandom((30 if i < 2 else 1) * MiB)) for i in range(6)]
    db = tmp_path / "state.db"
    log = tmp_path / "runner.log"
    proc = cli_popen(
        "run",
        "--from-store",
        "old",
        "--to-store",
        "new",
        *[a for s in images for a in ("--image", s.id)],
        "--db",
        str(db),
        env=env,
        log=log,
    )
    assert wait_for(lambda: event_count(db) >= 2, timeout=60)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == EXIT_INTERRUPTED, log.read_text()
    text = log.read_text()
    assert "finishing the steps in flight" in text and "Traceback" not in text
    doc = status_json(db, env)
    assert not doc["run"]["complete"] and doc["counts"]["done"] < len(images)
    with sqlite3.connect(db) as conn:  # leases were released on the way out
        assert conn.execute("SELECT count(*) FROM images WHERE lease_owner IS NOT NULL").fetchone()[0] == 0
    # A second Ctrl-C aborts at once, with the same exit code and nothing half-recorded.
    proc = cli_popen("run", "--resume", "--db", str(db), env=env, log=log)
    assert wait_for(lambda: "resuming run" in log.read_text(), timeout=60)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    # Whichever handler each press meets (startup's abort, the run's graceful stop, or the exit path),
    # the outcome is the documented code and a message, never a death by SIGINT or a traceback.
    assert proc.wait(timeout=60) == EXIT_INTERRUPTED, log.read_text()
    assert "Traceback" not in log.read_text()
    cli("run", "--resume", "--db", str(db), env=env, check_rc=EXIT_OK)
    for seeded in images:
        assert_migrated(admin_conn, lab, seeded, "old", "new")


def test_first_interrupt_stops_gracefully_and_the_second_aborts() -> None:
    """The handler logic itself, deterministically: the end-to-end test above cannot choose which
    handler each of two quick presses meets."""
    runner = SimpleNamespace(stop=threading.Event())
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Aborted, match="second Ctrl-C"), graceful_interrupts(cast(Runner, runner)):
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(runner.stop.is_set, timeout=5)  # SIGTERM: a graceful stop, never an abort
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises in this thread long before this ends
    assert signal.getsignal(signal.SIGINT) is before  # and the previous handlers are back


def test_two_runners_on_one_db_never_work_on_the_same_image(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    images = [seed_image(admin_conn, f"pair-{i}", os.urandom((8 if i % 3 == 0 else 1) * MiB)) for i in range(8)]
    db = tmp_path / "state.db"
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = cli_popen(
        "run",
        "--from-store",
        "old",
        "--to-store",
        "new",
        *[x for s in images for x in ("--image", s.id)],
        "--db",
        str(db),
        env=env,
        log=log_a,
    )
    assert wait_for(lambda: event_count(db) >= 1, timeout=60)
    b = cli_popen("run", "--resume", "--db", str(db), env=env, log=log_b)
    assert a.wait(timeout=300) in (EXIT_OK, EXIT_INTERRUPTED) and b.wait(timeout=300) in (EXIT_OK, EXIT_INTERRUPTED)
    with sqlite3.connect(db) as conn:
        steps = conn.execute(
            "SELECT image_id, to_state, count(*) FROM events WHERE from_state IS NOT NULL GROUP BY image_id, to_state"
        ).fetchall()
    assert steps and all(n == 1 for _, _, n in steps), steps  # every step of every image happened once
    assert "copy-requested" in log_a.read_text() and "copy-requested" in log_b.read_text()  # both worked
    for seeded in images:
        assert_migrated(admin_conn, lab, seeded, "old", "new")


def test_a_copy_someone_else_started_is_adopted_not_repeated(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    seeded = seed_image(admin_conn, "adopted", os.urandom(60 * MiB))
    resp = admin_conn.image.post(
        f"/images/{seeded.id}/import", json={"method": {"name": "copy-image"}, "stores": ["new"]}
    )
    assert resp.status_code == 202
    proc = cli(
        "run",
        "--from-store",
        "old",
        "--to-store",
        "new",
        "--image",
        seeded.id,
        "--db",
        str(tmp_path / "state.db"),
        env=env,
        check_rc=EXIT_OK,
    )
    assert "already" in proc.stderr
    tasks = admin_conn.image.get(f"/images/{seeded.id}/tasks").json()["tasks"]
    assert len(tasks) == 1, tasks  # one copy, the one someone else asked for
    assert_migrated(admin_conn, lab, seeded, "old", "new")


def test_dry_run_says_what_would_happen_and_changes_nothing(
    admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    todo = seed_image(admin_conn, "dry-todo", os.urandom(4321))
    queued = seed_image(admin_conn, "dry-queued", None)
    db = tmp_path / "state.db"
    proc = cli("run", "--from-store", "old", "--to-store", "new", "--dry-run", "--image", todo.id,
               "--image", queued.id, "--db", str(db), env=env, check_rc=EXIT_OK)  # fmt: skip
    lines = proc.stdout.splitlines()
    assert f"migrate       {todo.id} dry-todo (4321 bytes)" in lines
    assert any(line.startswith(f"skip          {queued.id}") and "queued" in line for line in lines)
    assert lines[-1] == "1 migrate, 1 skip; 4321 bytes to move. Nothing was changed (dry run)."
    assert not db.exists() and stores_of(admin_conn, todo.id) == {"old"}


def test_filters_choose_and_order_the_images_of_a_run(
    admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    tag = os.urandom(4).hex()
    sizes = {"a": 3000, "b": 1000, "c": 2000, "d": 5000, "e": 10}
    seeded = {k: seed_image(admin_conn, f"flt-{tag}-{k}", os.urandom(n)) for k, n in sizes.items()}
    proc = cli("run", "--from-store", "old", "--to-store", "new", "--dry-run", "--name", f"flt-{tag}-*",
               "--exclude", f"flt-{tag}-c", "--exclude", seeded["d"].id, "--min-size", "100",
               "--order", "smallest", "--limit", "2", env=env, check_rc=EXIT_OK)  # fmt: skip
    chosen = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("migrate")]
    assert chosen == [seeded["b"].id, seeded["a"].id]  # e too small, c and d excluded, smallest first, 2 only
    db = tmp_path / "state.db"
    cli("run", "--from-store", "old", "--to-store", "new", "--name", f"flt-{tag}-*", "--order", "largest",
        "--max-size", "2.5K", "--db", str(db), env=env, check_rc=EXIT_OK)  # fmt: skip
    assert [img["id"] for img in status_json(db, env)["images"]] == [seeded[k].id for k in ("c", "b", "e")]


def test_copy_image_of_a_corrupted_source_is_an_integrity_failure_and_removes_nothing(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    seeded = seed_image(admin_conn, "corrupt-copy", os.urandom(MiB))
    path = lab.store_dir("old") / seeded.id
    data = bytearray(path.read_bytes())
    data[4096] ^= 0x01  # same size, different bytes: only a hash can tell
    path.write_bytes(bytes(data))
    db = tmp_path / "state.db"
    proc = cli("run", "--from-store", "old", "--to-store", "new", "--image", seeded.id, "--db", str(db), env=env)
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    (row,) = status_json(db, env)["images"]
    assert row["state"] == "failed" and row["error_kind"] == "integrity", row
    assert stores_of(admin_conn, seeded.id) == {"old"} and path.read_bytes() == bytes(data)


def test_state_db_disk_full_stops_cleanly_and_changes_nothing(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    seeded = seed_image(admin_conn, "disk-full", os.urandom(MiB))
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True)
    assert mounted.returncode == 0, f"this test needs root to mount a tmpfs: {mounted.stderr!r}"
    try:
        db = small / "state.db"
        cli("status", "--db", str(db), env=env)  # creates the (empty, current) DB
        filler = small / "filler"
        with filler.open("wb") as f:  # fill the disk to the last block
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        proc = cli("run", "--from-store", "old", "--to-store", "new", "--image", seeded.id, "--db", str(db), env=env)
        assert proc.returncode == EXIT_STATE_DB, proc.stderr
        assert "full" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert stores_of(admin_conn, seeded.id) == {"old"}  # nothing happened in Glance
        filler.unlink()
        cli("run", "--from-store", "old", "--to-store", "new", "--image", seeded.id, "--db", str(db), env=env,
            check_rc=EXIT_OK)  # fmt: skip
        assert_migrated(admin_conn, lab, seeded, "old", "new")
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _has_run(db: Path) -> bool:
    return count_in_db(db, "SELECT count(*) FROM runs") > 0


def test_crash_loop_random_kills_until_done(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    """~30 images of mixed sizes; the runner is SIGKILLed at random moments, dozens of times, each time
    followed by `run --resume`, until the run completes: every image must end migrated, nothing lost."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    demo = admin_conn.identity.find_project("demo").id
    images = [seed_image(admin_conn, f"loop-big-{i}", os.urandom(40 * MiB)) for i in range(4)]
    images += _mixed_images(admin_conn, demo, "loop", count=26)
    db, log = tmp_path / "state.db", tmp_path / "runner.log"
    start = ["--from-store", "old", "--to-store", "new", *[a for s in images for a in ("--image", s.id)]]
    kills, rc = 0, None
    for _ in range(40):
        started = event_count(db) > 0 or _has_run(db)  # a kill during discovery leaves no run: start again
        proc = cli_popen("run", *(["--resume"] if started else start), "--db", str(db), "--workers", "3",
                         env=env, log=log)  # fmt: skip
        try:
            rc = proc.wait(timeout=rng.uniform(0.4, 1.6))  # start-up alone takes ~0.7 s
            break  # finished before this kill
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
    assert kills >= 10, f"seed {seed}: only {kills} kills"
    final = cli("run", "--resume", "--db", str(db), env=env)  # finishes the run, or finds it complete
    assert final.returncode == EXIT_OK, f"seed {seed}, {kills} kills, last rc {rc}; see {log}\n{final.stderr}"
    for seeded in images:
        assert_migrated(admin_conn, lab, seeded, "old", "new")
    doc = status_json(db, env)
    assert doc["run"]["complete"] and doc["counts"]["done"] == len(images), f"seed {seed}"
