"""copy-image migrations through the CLI, against the real Keystone + Glance of the lab."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import random
import selectors
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, cast

import pytest
from openstack.connection import Connection

from glance_migrator.errors import EXIT_CLOUD, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_STATE_DB, Aborted
from glance_migrator.runner import Runner, graceful_interrupts
from tests.glancetools import (
    CLI,
    Seeded,
    assert_migrated,
    cli,
    cli_popen,
    count_in_db,
    delete_all_images,
    event_count,
    noise,
    raw_image,
    seed_image,
    status_json,
    stores_of,
    wait_for,
)
from tests.invariants import Invariants

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
        seed_image(conn, f"{prefix}-{i}", noise(sizes[i % len(sizes)]), **kinds[i % len(kinds)]) for i in range(count)
    ]


@pytest.mark.core
def test_full_run_moves_every_image_hidden_and_community_included(
    lab: Any, clean: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    demo = clean.identity.find_project("demo").id
    images = _mixed_images(clean, demo, "full")
    queued = seed_image(clean, "full-queued", None)
    deactivated = seed_image(clean, "full-deactivated", noise(1000))
    assert clean.image.post(f"/images/{deactivated.id}/actions/deactivate").status_code == 204
    db = tmp_path / "state.db"

    proc = cli("run", "--from-store", "old", "--to-store", "new", "--db", str(db), "--workers", "3", env=env)

    assert proc.returncode == EXIT_OK, proc.stderr  # finished; skipped images are not moved by design
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


@pytest.mark.core
def test_kill_9_mid_run_then_resume_ends_with_every_image_migrated(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """copy-image: kill -9 after 3, 9, 17, 26 and 38 transitions, then resume"""
    demo = admin_conn.identity.find_project("demo").id
    images = _mixed_images(admin_conn, demo, "kill", count=12)
    images += [seed_image(admin_conn, f"kill-big-{i}", noise(40 * MiB)) for i in range(2)]
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
    invariants.check(lab, admin_conn, db, env, images, faults={"SIGKILL": kills})


def test_failed_copy_is_recorded_and_retry_finishes_it(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """Glance's own copy task fails (a file in the way in the target store), then retry"""
    good = seed_image(admin_conn, "retry-good", noise(MiB))
    bad = seed_image(admin_conn, "retry-bad", noise(2 * MiB))
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
    fault = {"Glance copy task fails": 1}
    invariants.check(lab, admin_conn, db, env, [good, bad], faults=fault, expect={bad.id: "failed"}, label="failed")
    row = {img["id"]: img for img in status_json(db, env)["images"]}[bad.id]
    assert row["state"] == "failed" and "os_glance_failed_import" in row["error"]
    assert stores_of(admin_conn, bad.id) == {"old"}  # nothing lost: the old copy is untouched
    text = cli("status", "--db", str(db), env=env, check_rc=0).stdout
    assert bad.id in text and "failed" in text

    blocker.unlink()
    proc = cli("retry", bad.id, "--db", str(db), env=env)
    assert proc.returncode == EXIT_OK, proc.stderr
    invariants.check(lab, admin_conn, db, env, [good, bad], faults=fault, label="retried")


def test_image_already_in_target_only_is_done_without_work(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    seeded = seed_image(admin_conn, "already", noise(1000))
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
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """copy-image: Ctrl-C (graceful), then a double Ctrl-C (abort), then resume"""
    images = [seed_image(admin_conn, f"sigint-{i}", noise((30 if i < 2 else 1) * MiB)) for i in range(6)]
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
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:  # leases were released on the way out
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
    invariants.check(lab, admin_conn, db, env, images, faults={"SIGINT": 3})


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
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """Two runners on one state DB at once"""
    images = [seed_image(admin_conn, f"pair-{i}", noise((8 if i % 3 == 0 else 1) * MiB)) for i in range(8)]
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
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        steps = conn.execute(
            "SELECT image_id, to_state, count(*) FROM events WHERE from_state IS NOT NULL GROUP BY image_id, to_state"
        ).fetchall()
    assert steps and all(n == 1 for _, _, n in steps), steps  # every step of every image happened once
    assert "copy-requested" in log_a.read_text() and "copy-requested" in log_b.read_text()  # both worked
    invariants.check(lab, admin_conn, db, env, images, faults={"second runner": 1})


def test_a_copy_someone_else_finished_before_the_run_is_made_again(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    """Old data goes only once a Glance copy that this run saw finish wrote the new copy: one made before the run
    (by someone, or long ago, its bytes may have rotted since) is deleted while the image is whole in the old
    store and Glance copies again. A copy still running when the run looks is adopted instead."""
    seeded = seed_image(admin_conn, "made-before", noise(6 * MiB))
    resp = admin_conn.image.post(
        f"/images/{seeded.id}/import", json={"method": {"name": "copy-image"}, "stores": ["new"]}
    )
    assert resp.status_code == 202
    assert wait_for(lambda: stores_of(admin_conn, seeded.id) == {"old", "new"}, timeout=60)
    assert wait_for(lambda: not (raw_image(admin_conn, seeded.id) or {}).get("os_glance_import_task"), timeout=60)
    db = str(tmp_path / "state.db")
    proc = cli("run", "--from-store", "old", "--to-store", "new", "--image", seeded.id, "--db", db, env=env)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "no Glance copy of this run wrote it" in proc.stderr, proc.stderr
    tasks = admin_conn.image.get(f"/images/{seeded.id}/tasks").json()["tasks"]
    assert [t["status"] for t in tasks] == ["success", "success"], tasks  # someone's, then the run's own
    assert_migrated(admin_conn, lab, seeded, "old", "new")


def test_dry_run_says_what_would_happen_and_changes_nothing(
    admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    todo = seed_image(admin_conn, "dry-todo", noise(4321))
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
    tag = noise(4).hex()
    sizes = {"a": 3000, "b": 1000, "c": 2000, "d": 5000, "e": 10}
    seeded = {k: seed_image(admin_conn, f"flt-{tag}-{k}", noise(n)) for k, n in sizes.items()}
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
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """copy-image of an image whose file in the source store was changed on disk"""
    seeded = seed_image(admin_conn, "corrupt-copy", noise(MiB))
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
    invariants.check(
        lab, admin_conn, db, env, [seeded], faults={"source file corrupted": 1},
        expect={seeded.id: "failed"}, corrupted={seeded.id},
    )  # fmt: skip


def test_state_db_disk_full_stops_cleanly_and_changes_nothing(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """The state DB's disk is full (a 2 MiB tmpfs), then freed"""
    seeded = seed_image(admin_conn, "disk-full", noise(MiB))
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
        invariants.check(lab, admin_conn, db, env, [seeded], faults={"state DB disk full": 1})
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _has_run(db: Path) -> bool:
    return count_in_db(db, "SELECT count(*) FROM runs") > 0


def test_crash_loop_random_kills_until_done(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """Crash loop: kill -9 at random moments, dozens of times, each followed by resume

    ~30 images of mixed sizes; the runner is SIGKILLed at random moments, dozens of times, each time
    followed by `run --resume`, until the run completes: every image must end migrated, nothing lost."""
    seed = int.from_bytes(noise(4), "big")
    rng = random.Random(seed)
    demo = admin_conn.identity.find_project("demo").id
    images = [seed_image(admin_conn, f"loop-big-{i}", noise(40 * MiB)) for i in range(4)]
    images += _mixed_images(admin_conn, demo, "loop", count=26)
    db, log = tmp_path / "state.db", tmp_path / "runner.log"
    start = ["--from-store", "old", "--to-store", "new", *[a for s in images for a in ("--image", s.id)]]
    kills, rc = 0, None
    for _ in range(80):
        started = _has_run(db)  # a kill during discovery leaves no run: start again
        before = event_count(db)
        proc = cli_popen("run", *(["--resume"] if started else start), "--db", str(db), "--workers", "3",
                         env=env, log=log)  # fmt: skip
        # The kill lands a random moment after a random amount of progress (1-6 recorded steps; on the first
        # start, once the run exists): tied to progress, not to the clock, so a slow machine gets as many kills
        # as a fast one, and each resume gets somewhere before it is killed again.
        target = before + rng.randint(1, 6)

        def progressed(p: subprocess.Popen[bytes] = proc, resumed: bool = started, target: int = target) -> bool:
            return p.poll() is not None or (event_count(db) >= target if resumed else _has_run(db))

        progressed_in_time = wait_for(progressed, timeout=300, interval=0.02)
        time.sleep(rng.uniform(0, 0.4))  # mid-transfer, mid-request, or right after the step was recorded
        if proc.poll() is not None:
            rc = proc.returncode
            break  # finished before this kill
        assert progressed_in_time, f"seed {seed}: no progress in 300 s after {kills} kills; see {log}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 10, f"seed {seed}: only {kills} kills"
    final = cli("run", "--resume", "--db", str(db), env=env)  # finishes the run, or finds it complete
    assert final.returncode == EXIT_OK, f"seed {seed}, {kills} kills, last rc {rc}; see {log}\n{final.stderr}"
    invariants.check(lab, admin_conn, db, env, images, faults={"SIGKILL": kills})


# -- kill -9 at every state boundary of copy-image, and in the middle of Glance's copy -------------------------

COPY_PATH = ("pending", "copy-requested", "copied", "old-removed", "done")
_BETWEEN = COPY_PATH[1:-1]


@contextlib.contextmanager
def _db_writes_held(db: Path) -> Iterator[sqlite3.Connection]:
    """Hold the state DB's write lock, as another runner's transaction would: the runner goes on talking to
    Glance but records nothing until this ends, so what the test reads cannot change before the kill."""
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def _peek(db: Path, find: Callable[[sqlite3.Connection], str | None]) -> str | None:
    """`find` on a read-only look at the state DB (None while it or its schema does not exist yet)."""
    if not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            return find(conn)
    except sqlite3.OperationalError:
        return None


def _recorded_into(state: str) -> Callable[[sqlite3.Connection], str | None]:
    """The image whose step into `state` (copy-requested, copied or old-removed) is recorded, its next step not
    yet (one worker walks one image at a time: there is at most one)."""

    def find(conn: sqlite3.Connection) -> str | None:
        row = conn.execute("SELECT image_id FROM images WHERE state = ?", (state,)).fetchone()
        return None if row is None else str(row[0])

    return find


def _nothing_done_yet(conn: sqlite3.Connection) -> str | None:
    """The run is recorded, every image pending, no step recorded: the first image is next."""
    states = [s for (s,) in conn.execute("SELECT state FROM images ORDER BY position")]
    first = conn.execute("SELECT image_id FROM images ORDER BY position").fetchone()
    return None if first is None or set(states) != {"pending"} else str(first[0])


def _between_images(conn: sqlite3.Connection) -> str | None:
    """The image last done and released while the next one is still pending (no step of it recorded)."""
    rows = conn.execute("SELECT image_id, state, lease_owner FROM images ORDER BY position").fetchall()
    states = {s for _, s, _ in rows}
    done = [(image, lease) for image, s, lease in rows if s == "done"]
    if states & set(_BETWEEN) or "pending" not in states or not done or any(lease for _, lease in done):
        return None
    return str(done[-1][0])


def _taken_up(conn: sqlite3.Connection) -> str | None:
    """The pending image the runner has taken (leased, attempt counted): asking for its copy comes next."""
    row = conn.execute(
        "SELECT image_id FROM images WHERE state = 'pending' AND attempts > 0 AND lease_owner IS NOT NULL"
    ).fetchone()
    return None if row is None else str(row[0])


def _in_glance(conn: Connection, image_id: str) -> tuple[set[str], set[str], bool]:
    """The image's stores, the stores Glance is copying it to, and whether an import holds its lock."""
    image = raw_image(conn, image_id) or {}
    stores, importing = (
        {s for s in str(image.get(key) or "").split(",") if s} for key in ("stores", "os_glance_importing_to_stores")
    )
    return stores, importing, bool(image.get("os_glance_import_task"))


def _copying(conn: Connection, image_id: str) -> bool:
    _, importing, locked = _in_glance(conn, image_id)
    return "new" in importing and locked


def _copy_accepted(conn: Connection, image_id: str) -> bool:
    stores, importing, _ = _in_glance(conn, image_id)
    return "new" in stores | importing


def _copy_finished(conn: Connection, image_id: str) -> bool:
    stores, _, locked = _in_glance(conn, image_id)
    return "new" in stores and not locked


def _old_deleted(conn: Connection, image_id: str) -> bool:
    return _in_glance(conn, image_id)[0] == {"new"}


@dataclass(frozen=True)
class _KillPoint:
    state: str  # the image's recorded state when the runner dies; `status --json` must show it
    # Which image to kill at, read under the DB's write lock; None: exactly after the record (see _kill_exactly).
    find: Callable[[sqlite3.Connection], str | None] | None = None
    glance: Callable[[Connection, str], bool] | None = None  # what Glance must show first (waited for, locked)
    retry_if_gone: bool = False  # the Glance condition no longer holds after the kill: missed, try a later image
    settle: bool = False  # before resuming, let Glance's copy finish with nobody watching it


_KILL_POINTS = {
    # Exactly after the step into the state is recorded: the runner did nothing since (not even log it).
    "pending": _KillPoint("pending"),  # the run and its images are recorded, nothing else
    "copy-requested": _KillPoint("copy-requested", settle=True),  # resumed once Glance's copy has finished
    "copied": _KillPoint("copied"),
    "old-removed": _KillPoint("old-removed"),
    "done": _KillPoint("done"),  # (its lease went in the same commit)
    "between-images": _KillPoint("done", _between_images),  # done and released, the next image not begun
    # Mid-copy: Glance's task is copying (importing_to_stores lists new, the lock is held); resumed at once.
    "mid-copy": _KillPoint("copy-requested", _recorded_into("copy-requested"), _copying, retry_if_gone=True),
    # Glance did the next step but the runner had not recorded it (the test's DB lock held the record back).
    "pending+copy-accepted": _KillPoint("pending", _taken_up, _copy_accepted),
    "copy-requested+copy-finished": _KillPoint("copy-requested", _recorded_into("copy-requested"), _copy_finished),
    "copied+old-deleted": _KillPoint("copied", _recorded_into("copied"), _old_deleted),
}


class _Left(NamedTuple):
    """An image's row as the killed runner left it."""

    state: str
    attempts: int
    lease_owner: str | None


def _rows(db: Path) -> dict[str, _Left]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        rows = conn.execute("SELECT image_id, state, attempts, lease_owner FROM images").fetchall()
    return {row[0]: _Left(*row[1:]) for row in rows}


def _state_of(image: str) -> Callable[[sqlite3.Connection], str | None]:
    def find(conn: sqlite3.Connection) -> str | None:
        row = conn.execute("SELECT state FROM images WHERE image_id = ?", (image,)).fetchone()
        return None if row is None else str(row[0])

    return find


class _LogGate:
    """The runners' output, read through a pipe into `log`, with a gate the test can shut: it stops reading and
    fills the pipe, so a runner blocks on its next log line. The runner logs each step right after recording it
    (at `done`, before it releases the image's lease): shut in time, the gate stops it exactly after a record."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.text = ""  # all the runners wrote, as read so far
        self.procs: list[subprocess.Popen[bytes]] = []
        self._read_end, self._write_end = os.pipe()
        # A second open file description of the pipe, non-blocking, to fill it; the runners' end stays blocking.
        self._filler = os.open(f"/proc/self/fd/{self._write_end}", os.O_WRONLY | os.O_NONBLOCK)
        self._shut, self._idle = threading.Event(), threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __enter__(self) -> _LogGate:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:  # a runner a failed assertion left running (ours only, by its pid)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        self._shut.clear()
        os.close(self._filler)
        os.close(self._write_end)
        self._reader.join(timeout=30)  # to the end of the pipe: all the runners wrote is in `text` and `log`
        os.close(self._read_end)

    def popen(self, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        out, environ = self._write_end, {**os.environ, **env}
        proc = subprocess.Popen([*CLI, *args], env=environ, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def logged(self, image: str, state: str) -> bool:
        """Has a runner logged `image`'s step into `state` ("<id> (<name>): <state>: <message>")?"""
        return any(image in line and f"): {state}: " in line for line in self.text.splitlines())

    def shut(self) -> None:
        """Stop reading and fill the pipe: a runner's next write blocks until `open`."""
        self._idle.clear()
        self._shut.set()
        assert self._idle.wait(timeout=10)
        for size in (4096, 1):  # whole pages, then byte by byte: no room left for any line
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(self._filler, b"\0" * size)

    def open(self) -> None:
        self._shut.clear()

    def _read(self) -> None:
        # epoll, not select(): select() takes no file descriptor past 1,023, and a long suite's process may be there
        with self.log.open("ab") as out, selectors.DefaultSelector() as readable:
            readable.register(self._read_end, selectors.EVENT_READ)
            while True:
                if self._shut.is_set():
                    self._idle.set()
                    time.sleep(0.01)
                    continue
                if not readable.select(0.05):
                    continue
                data = os.read(self._read_end, 1 << 16)
                if not data:
                    return  # every write end is closed
                data = data.replace(b"\0", b"")  # the filler
                out.write(data)
                out.flush()
                self.text += data.decode(errors="replace")


def _kill_exactly(proc: subprocess.Popen[bytes], db: Path, gate: _LogGate, state: str) -> str:
    """SIGKILL the runner exactly after it recorded an image's step into `state`, before its next statement.
    The DB's write lock holds that record back until the runner's log line before it is out and the gate is
    shut; released, the runner records the step and blocks writing the line that logs it. Returns the image."""
    if state == "pending":  # the gate was shut before the runner started: it blocks on its first line
        recorded = wait_for(lambda: _peek(db, _nothing_done_yet) is not None, timeout=60)
        assert recorded, "no run recorded: did the runner write something before its 'run N: ... found' line?"
        image = _peek(db, _nothing_done_yet)
    else:
        image = _held_after(proc, db, gate, state)
    assert image is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    gate.open()
    return image


def _kill_at(
    proc: subprocess.Popen[bytes], db: Path, point: _KillPoint, conn: Connection
) -> tuple[str, dict[str, _Left]] | None:
    """SIGKILL the runner at `point` (one with `find`), verified on the DB under its write lock. Returns the
    image and every image's row as the runner left it; None if the run ended first."""
    assert point.find is not None
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if _peek(db, point.find) is not None:
            with _db_writes_held(db) as locked:
                image = point.find(locked)
                if image is not None:
                    if point.glance is not None:  # the runner records nothing meanwhile; its busy timeout is 30 s
                        shown = functools.partial(point.glance, conn, image)
                        assert wait_for(shown, timeout=20, interval=0.02), (image, point)
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    rows = locked.execute("SELECT image_id, state, attempts, lease_owner FROM images").fetchall()
                    return image, {row[0]: _Left(*row[1:]) for row in rows}
        time.sleep(0.005)
    return None


def _kill_runner(
    gate: _LogGate, db: Path, point: _KillPoint, start: list[str], conn: Connection, env: dict[str, str], chances: int
) -> tuple[str, dict[str, _Left], int, int]:
    """Start the run and kill its runner at `point`. Returns the image, every image's row as the runner left it,
    how many runners were killed and the last one's pid."""
    if point.find is None:
        if point.state == "pending":
            gate.shut()
        proc = gate.popen(*start, env=env)
        image = _kill_exactly(proc, db, gate, point.state)
        assert proc.returncode == -signal.SIGKILL
        return image, _rows(db), 1, proc.pid
    for attempt in range(chances):
        proc = gate.popen(*(start if attempt == 0 else ["run", "--resume", "--db", str(db)]), env=env)
        caught = _kill_at(proc, db, point, conn)
        assert caught is not None, f"the run ended (rc {proc.returncode}) before {point}:\n{gate.text}"
        assert proc.returncode == -signal.SIGKILL
        if not point.retry_if_gone or (point.glance is not None and point.glance(conn, caught[0])):
            return *caught, attempt + 1, proc.pid
        # Glance finished the copy between the look and the kill: resume, and catch a later image
    raise AssertionError(f"never killed at {point}: Glance finished every copy first")


@pytest.mark.parametrize("where", list(_KILL_POINTS))
def test_copy_image_survives_kill_9_at_every_state_boundary_and_mid_copy(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants, where: str
) -> None:
    """copy-image: kill -9 at one state boundary (or mid-copy), verified on the state DB, then resume"""
    point = _KILL_POINTS[where]
    demo = cast(Any, admin_conn).identity.find_project("demo").id
    tag = f"k9-{where}"
    images = [
        seed_image(admin_conn, f"{tag}-big-0", noise(64 * MiB)),
        seed_image(admin_conn, f"{tag}-1", noise(MiB + 17), hidden=True, tags=["k9"]),
        seed_image(admin_conn, f"{tag}-big-2", noise(32 * MiB), visibility="shared", members=[demo]),
        seed_image(admin_conn, f"{tag}-3", noise(12345), visibility="community", os_distro="cirros"),
    ]  # one worker takes them in this order; between-images and mid-copy may be caught on a later image
    db, log = tmp_path / "state.db", tmp_path / "runner.log"
    ids = [a for s in images for a in ("--image", s.id)]
    start = ["run", "--from-store", "old", "--to-store", "new", "--strategy", "copy-image", *ids, "--db", str(db)]
    with _LogGate(log) as gate:
        killed, at_kill, kills, pid = _kill_runner(gate, db, point, start, admin_conn, env, chances=len(images))
    assert at_kill[killed].state == point.state, (where, at_kill)
    if point.find is None:  # exactly after the record: the runner died before it could even log the step
        said = [line for line in gate.text.splitlines() if "image(s) found" in line]
        assert not (said if point.state == "pending" else gate.logged(killed, point.state)), gate.text
    if point.state in _BETWEEN:  # the dead runner's lease: the resume must take it over
        assert f":{pid}:" in (at_kill[killed].lease_owner or ""), at_kill
    if where == "done":  # recording a finished state released the lease in the same commit: none is left
        assert at_kill[killed].lease_owner is None, at_kill
    if point.glance is not None:  # what Glance had done when the runner died is still there
        assert point.glance(admin_conn, killed), (where, _in_glance(admin_conn, killed))

    # Before the resume, `status --json` shows the run unfinished and each image where the runner left it.
    doc = status_json(db, env)
    assert not doc["run"]["complete"]
    assert {img["id"]: img["state"] for img in doc["images"]} == {i: row.state for i, row in at_kill.items()}
    if point.settle:
        assert wait_for(lambda: _copy_finished(admin_conn, killed), timeout=120, interval=0.2)

    done = cli("run", "--resume", "--db", str(db), env=env)
    text = log.read_text() + done.stderr
    assert done.returncode == EXIT_OK, text
    assert "Traceback" not in text
    with contextlib.closing(sqlite3.connect(db)) as conn:
        steps = conn.execute(
            "SELECT image_id, from_state, to_state FROM events WHERE from_state IS NOT NULL ORDER BY id"
        ).fetchall()
        attempts = dict(conn.execute("SELECT image_id, attempts FROM images").fetchall())
    for seeded in images:  # each state entered once per image, in the order of the path: no step recorded twice
        assert [(a, b) for i, a, b in steps if i == seeded.id] == list(itertools.pairwise(COPY_PATH)), steps
        tasks = admin_conn.image.get(f"/images/{seeded.id}/tasks").json()["tasks"]
        assert [t["status"] for t in tasks] == ["success"], tasks  # Glance copied each image once: never re-asked
    # The resume took each unfinished image up once more, and no finished one.
    assert attempts == {i: row.attempts + (row.state != "done") for i, row in at_kill.items()}, (at_kill, attempts)
    # Every image done, in new only, same bytes, UUID, metadata and members; no lease left, not even the dead
    # runner's; status agrees with Glance.
    invariants.check(lab, admin_conn, db, env, images, faults={"SIGKILL": kills})


# -- glance-api restarted in the middle of a copy-image run ----------------------------------------------------

STUCK_AFTER_S = 20  # --stuck-after of these tests (the tool's default is 600): a dead copy is failed in 20 s
BIG = 256 * MiB  # Glance copies this in ~3.5 s here (old -> staging, then staging -> new): long enough to catch


def _copy_task(conn: Connection, image_id: str) -> str | None:
    """The Glance task copying the image to store new right now (it holds the import lock), else None."""
    image = raw_image(conn, image_id) or {}
    importing = str(image.get("os_glance_importing_to_stores") or "").split(",")
    task = image.get("os_glance_import_task")
    return str(task) if task and "new" in importing else None


def _glance_task(conn: Connection, task_id: str) -> dict[str, Any]:
    resp = conn.image.get(f"/tasks/{task_id}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _start_copy_run(images: list[Seeded], log: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    ids = [a for s in images for a in ("--image", s.id)]
    return cli_popen("run", "--from-store", "old", "--to-store", "new", "--strategy", "copy-image", *ids, *args,
                     env=env, log=log)  # fmt: skip


def _wait_copying(conn: Connection, seeded: Seeded, proc: subprocess.Popen[bytes], log: Path) -> str:
    """Wait (polling Glance directly) until Glance's copy task for `seeded` runs; returns the task's id."""
    seen: list[str] = []

    def copying() -> bool:
        task = _copy_task(conn, seeded.id)
        if task is not None:
            seen.append(task)
        return task is not None or proc.poll() is not None

    assert wait_for(copying, timeout=120, interval=0.02), f"no copy of {seeded.id} seen:\n{log.read_text()}"
    assert seen and proc.poll() is None, f"the run ended before the copy was seen:\n{log.read_text()}"
    return seen[0]


def _ride_out(rc: int, text: str, resume: list[str], env: dict[str, str]) -> int:
    """`rc`, the exit code of the run that saw Glance restart (`text`, its output); if it stopped resumably (exit 3:
    Glance was unreachable for longer than its retries last), that of `run --resume`."""
    assert "Traceback" not in text, text
    if rc != EXIT_CLOUD:
        return rc
    assert "progress is saved" in text, text
    resumed = cli("run", "--resume", *resume, env=env)
    assert "Traceback" not in resumed.stderr, resumed.stderr
    return resumed.returncode


def _kill_glance(lab: Any) -> None:
    """SIGKILL glance-api's process group (uWSGI master, worker, the copy's thread) and wait until each of them has
    exited: a dying process no longer shows its command line (the lab's stop skips it) but may still hold the port."""
    pgid = int((lab.run_dir / "glance.pid").read_text())
    os.killpg(pgid, signal.SIGKILL)

    def gone() -> bool:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp ...
                if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                    return False
        return True

    assert wait_for(gone, timeout=30), f"glance-api's processes (group {pgid}) outlived SIGKILL"

    def bindable() -> bool:  # as uWSGI binds (SO_REUSEADDR): TIME_WAIT is fine, a FIN_WAIT of a killed answer not
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", lab.glance_port))
            except OSError:
                return False
            return True

    assert wait_for(bindable, timeout=90, interval=0.2), f"port {lab.glance_port} still held after the kill"


def _stop_runner(proc: subprocess.Popen[bytes]) -> None:
    """A runner a failed assertion left running (ours, by its pid)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@dataclass(frozen=True)
class _MidCopy:
    """A copy-image run during which glance-api went down while copying its first image, `big`."""

    big: Seeded
    images: list[Seeded]
    db: Path
    text: str  # the runners' output
    task: dict[str, Any]  # Glance's copy task of `big`, as glance-api showed it once it was back
    locked: bool  # that task still held the image's import lock then
    partial: int  # the size of the target file then (whole if the copy finished)
    rc: int  # the run's exit code (that of `run --resume` if it had stopped with exit 3)


def _glance_down_mid_copy(lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path, how: str) -> _MidCopy:
    """Run copy-image (--stuck-after 20) on a BIG image, taken first, and three small ones. While Glance writes the
    big one into store new, take glance-api down `how` and start it again, then wait for the run to end (resumed if it
    stopped with exit 3). how: "restart" (lab.restart_glance()), "restart-busy" (the same while glance-api streams
    that image to a client that reads nothing) or "kill" (SIGKILL to glance-api, then started again)."""
    big = seed_image(conn, f"{how}-copy-big", noise(BIG))
    images = [big, *(seed_image(conn, f"{how}-copy-{i}", noise(MiB + i)) for i in range(3))]
    db, log = tmp_path / "state.db", tmp_path / "runner.log"
    target = lab.store_dir("new") / big.id
    common = ["--db", str(db), "--stuck-after", str(STUCK_AFTER_S)]
    proc = _start_copy_run(images, log, env, "--order", "largest", *common)  # the big image first
    try:
        task_id = _wait_copying(conn, big, proc, log)
        # Glance copies old -> staging, then staging -> new: go down while it writes the target file.
        assert wait_for(target.exists, timeout=60, interval=0.01), _glance_task(conn, task_id)
        with contextlib.ExitStack() as busy:
            if how == "kill":
                _kill_glance(lab)
            elif how == "restart-busy":  # a download in progress: the uWSGI worker is busy when told to stop
                busy.enter_context(contextlib.closing(conn.image.get(f"/images/{big.id}/file", stream=True)))
            lab.restart_glance()  # after a kill, it only starts glance-api again
        task = _glance_task(conn, task_id)
        locked, partial = _copy_task(conn, big.id) == task_id, target.stat().st_size
        rc = _ride_out(proc.wait(timeout=300), log.read_text(), common, env)
    finally:
        _stop_runner(proc)
    return _MidCopy(big, images, db, log.read_text(), task, locked, partial, rc)


def _check_dead_copy(lab: Any, conn: Connection, env: dict[str, str], run: _MidCopy, invariants: Invariants,
                     fault: str, label: str = "", free: bool = True) -> None:  # fmt: skip
    """The copy of run.big died with glance-api: the run failed that image only, for no progress, losing nothing."""
    target, staged = lab.store_dir("new") / run.big.id, lab.root / "data" / "staging" / run.big.id
    task_id = run.task["id"]
    assert run.task["status"] == "processing" and run.locked, run.task  # nobody will finish it; it keeps the lock
    assert run.partial < BIG and staged.stat().st_size == BIG, (run.partial, staged.stat().st_size)
    assert run.rc == EXIT_PARTIAL, run.text
    row = {img["id"]: img for img in status_json(run.db, env)["images"]}[run.big.id]
    assert row["failed_at"] == "copy-requested", row
    assert "no progress" in row["error"] and task_id in row["error"] and "lock" in row["error"], row
    expect = {run.big.id: "failed"}
    invariants.check(lab, conn, run.db, env, run.images, faults={fault: 1}, expect=expect, label=label)
    # Glance's leftovers, unchanged: the dead task holding the lock, its staging copy, and the partial file where the
    # copy was going (no location names it: it serves nothing, but it is in the way of the next copy to store new).
    assert _glance_task(conn, task_id)["status"] == "processing" and _copy_task(conn, run.big.id) == task_id
    assert stores_of(conn, run.big.id) == {"old"}
    assert staged.stat().st_size == BIG and target.stat().st_size == run.partial
    if free:  # the disk, for the rest of the session (deleting the image removes its staging copy, not the target)
        assert conn.image.delete(f"/images/{run.big.id}").status_code == 204
        target.unlink()


def test_glance_restarted_mid_copy_lets_the_copy_finish_and_the_run_rides_it_out(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """copy-image: glance-api restarted (SIGTERM) mid-copy, serving nothing else; Glance finishes the copy first

    Glance 33 under uWSGI drains its task pool at exit (glance.common.wsgi_app.drain_workers, a uWSGI atexit hook):
    the copy completes, its task ends in success and drops the lock before glance-api exits; the run rides the
    restart out (or resumes after exit 3) and every image is done, each copied once. uWSGI skips atexit hooks in a
    worker busy with a request (here, rarely, the runner's own poll): then the copy dies as in the next test, and
    the image must end failed just the same."""
    run = _glance_down_mid_copy(lab, admin_conn, env, tmp_path, "restart")
    if run.task["status"] != "success":  # the worker was serving a request when it was stopped: no drain
        _check_dead_copy(lab, admin_conn, env, run, invariants, "glance-api restart mid-copy", label="copy died")
        return
    assert not run.locked and run.partial == BIG and run.rc == EXIT_OK, run.text
    assert not (lab.root / "data" / "staging" / run.big.id).exists()  # Glance removed its staging copy
    for seeded in run.images:  # the tool never asked for a copy twice
        tasks = admin_conn.image.get(f"/images/{seeded.id}/tasks").json()["tasks"]
        assert [t["status"] for t in tasks] == ["success"], tasks
    fault = {"glance-api restart mid-copy": 1}
    invariants.check(lab, admin_conn, run.db, env, run.images, faults=fault, label="drained")


def test_glance_restarted_mid_copy_while_serving_a_download_fails_that_image_only(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """copy-image: glance-api restarted mid-copy while serving a download; --stuck-after fails the dead copy only

    uWSGI runs no atexit hook (so no drain_workers) in a worker busy with a request: the thread copying dies with
    glance-api. Its task stays 'processing' and keeps the image's import lock (Glance breaks it only for an import
    asked for 60 min or more after the task's last update), and Glance leaves its staging copy and a partial file in
    store new. The run fails that image after --stuck-after seconds without progress, intact in store old, migrates
    the others and exits 1."""
    run = _glance_down_mid_copy(lab, admin_conn, env, tmp_path, "restart-busy")
    _check_dead_copy(lab, admin_conn, env, run, invariants, "glance-api restart mid-copy")


def test_glance_killed_mid_copy_fails_that_image_only(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """copy-image: glance-api killed (SIGKILL) mid-copy, then started again; --stuck-after fails the dead copy only

    A crash, the OOM killer or a stop that outlasts its timeout: as in the test above, the copy's task stays
    'processing' with the lock, the staging copy and a partial target file remain, and only that image fails."""
    run = _glance_down_mid_copy(lab, admin_conn, env, tmp_path, "kill")
    _check_dead_copy(lab, admin_conn, env, run, invariants, "glance-api SIGKILL mid-copy", free=False)
    # An hour later, as the error says: the lock has expired, the partial file is removed, `retry` finishes it.
    # (The hour passes in Glance's own database: its task's last update is moved back 61 minutes.)
    with contextlib.closing(sqlite3.connect(lab.root / "glance.sqlite", timeout=30)) as glance_db, glance_db:
        moved = glance_db.execute(
            "UPDATE tasks SET updated_at = datetime(updated_at, '-61 minutes') WHERE id = ?", (run.task["id"],)
        ).rowcount
    assert moved == 1
    (lab.store_dir("new") / run.big.id).unlink()
    retried = cli("retry", run.big.id, "--db", str(run.db), env=env, timeout=300)
    assert retried.returncode == EXIT_OK, retried.stderr
    assert "lock of dead copy task" in retried.stderr, retried.stderr
    invariants.check(lab, admin_conn, run.db, env, run.images, faults={"glance-api SIGKILL mid-copy": 1},
                     label="lock expired, retried")  # fmt: skip


def _held_after(proc: subprocess.Popen[bytes], db: Path, gate: _LogGate, state: str) -> str:
    """Hold the runner exactly after it recorded an image's step into `state` (copy-requested or later): the DB's
    write lock holds that record back until the runner's log line before it is out and the gate is shut; released,
    the runner records the step and blocks writing the line that logs it, making no request, until gate.open().
    Returns the image. A step that can take no time (copy-image's final check starts from the read after the
    delete: no request) leaves no window to catch the image before it: it is reached from the step before, held."""
    before = COPY_PATH[COPY_PATH.index(state) - 1]
    if state == "done":
        image = _held_after(proc, db, gate, before)  # blocked on the line that logs `before`
        with _db_writes_held(db):  # let go, it writes that line, takes the step and waits here to record it
            gate.open()
            assert wait_for(functools.partial(gate.logged, image, before), timeout=20), gate.text
            gate.shut()
        assert wait_for(lambda: _peek(db, _state_of(image)) == state, timeout=30), (image, state)
        return image
    find = _taken_up if before == "pending" else _recorded_into(before)  # taken up: its earlier lines are out
    image = None
    deadline = time.monotonic() + 180
    while image is None:
        assert proc.poll() is None and time.monotonic() < deadline, f"never reached {state}:\n{gate.text}"
        if _peek(db, find) is None:
            time.sleep(0.005)
            continue
        with _db_writes_held(db) as locked:
            image = find(locked)
            if image is not None:
                if before != "pending":  # its line for `before` is out; the next one logs `state`
                    assert wait_for(functools.partial(gate.logged, image, before), timeout=20), gate.text
                gate.shut()
    assert wait_for(lambda: _peek(db, _state_of(str(image))) == state, timeout=30), (image, state)
    return str(image)


@pytest.mark.parametrize("after", ["copy-requested", "copied", "old-removed"])
def test_glance_restarted_between_steps_the_copy_image_run_rides_it_out_or_resumes(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants, after: str
) -> None:
    """copy-image: glance-api restarted right after an image's step is recorded; every image done

    The runner is held right after recording the step (no request in flight; at copy-requested Glance's copy is let
    finish: a copy in flight is the tests above), glance-api is stopped, the runner goes on and meets it stopped
    (connection refused, retried), then it starts again: the run rides it out, or stops resumably (exit 3) and
    `run --resume` finishes it. No step recorded twice, no copy asked for twice."""
    images = [seed_image(admin_conn, f"restart-{after}-{i}", noise(MiB + 7 * i)) for i in range(5)]
    db, log = tmp_path / "state.db", tmp_path / "runner.log"
    ids = [a for s in images for a in ("--image", s.id)]
    args = ["--db", str(db), "--stuck-after", str(STUCK_AFTER_S)]  # a copy that died would fail in 20 s, not 600
    with _LogGate(log) as gate:
        proc = gate.popen("run", "--from-store", "old", "--to-store", "new", "--strategy", "copy-image", *ids, *args,
                          env=env)  # fmt: skip
        image = _held_after(proc, db, gate, after)
        pending = count_in_db(db, "SELECT count(*) FROM images WHERE state = 'pending'")
        if after == "copy-requested":
            assert wait_for(lambda: _copy_finished(admin_conn, image), timeout=60, interval=0.1)
        lab.stop_glance()
        gate.open()
        met = wait_for(lambda: "Retrying" in gate.text, timeout=30)  # its next request met the stopped glance-api
        lab.start_glance()
        assert met, gate.text
        first = proc.wait(timeout=300)
    rc = _ride_out(first, log.read_text(), args, env)
    assert rc == EXIT_OK, log.read_text()
    assert pending == len(images) - 1, f"{pending} images pending when Glance went away"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        steps = conn.execute(
            "SELECT image_id, from_state, to_state FROM events WHERE from_state IS NOT NULL ORDER BY id"
        ).fetchall()
    for seeded in images:  # each state entered once per image, in the order of the path
        assert [(a, b) for i, a, b in steps if i == seeded.id] == list(itertools.pairwise(COPY_PATH)), steps
        tasks = admin_conn.image.get(f"/images/{seeded.id}/tasks").json()["tasks"]
        assert [t["status"] for t in tasks] == ["success"], tasks
    invariants.check(lab, admin_conn, db, env, images, faults={"glance-api restart": 1})
