"""Things someone else does during a run, through the CLI against the real lab.

(a) An image deleted by someone else in the middle of its migration, with either strategy: the runner is
killed (-9) right after a given step of that image is recorded in the state DB, the image is deleted through
the admin API (unprotected first where the tool protected it), and `run --resume` continues. Expected: no
crash; that image is recorded as failed, kind "gone", with a one-line reason saying it no longer exists; the
other images are migrated; the run ends with EXIT_PARTIAL; and the tool leaves nothing of its own behind:
location-swap's hidden copy B (protected once it shares its data with the image, and useless once the image
and with it that data are gone), B's object in the target store, the spool file.

(b) The spool vanishing under a location-swap run: the image's spool file, or the whole spool directory,
removed after `downloaded` was recorded. Resume downloads the image again (verified) and finishes, making
the directory again, private (0700). A spool path that cannot be made a directory stops the run with a
clear error (exit 2, no traceback) that changed nothing; once fixed, resume finishes.

(An unknown or malformed image UUID given to a run is tested in test_cli.py.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openstack.connection import Connection

from glance_migrator.errors import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
from tests.glancetools import (
    Seeded,
    backend_objects,
    cli,
    cli_popen,
    copies_of,
    count_in_db,
    noise,
    patch,
    raw_image,
    realtime,
    seed_image,
    stable,
    status_json,
    stores_of,
    wait_for,
)
from tests.invariants import Invariants

MiB = 1 << 20
GONE = {"SIGKILL": 1, "image deleted by someone else": 1}
RUN_TIMEOUT = 180.0  # one CLI run of a few images, on a busy 2-CPU machine
VICTIM_SIZE = 20 * MiB  # big enough that its steps take a moment: the kill lands right after the one awaited


@pytest.fixture
def conn(lab: Any) -> Iterator[Connection]:
    connection = lab.connect()
    yield connection
    connection.close()


@pytest.fixture
def full_conn(full_lab: Any) -> Iterator[Connection]:
    connection = full_lab.connect()
    yield connection
    connection.close()


def _images(conn: Connection, prefix: str) -> tuple[Seeded, list[Seeded]]:
    """The image that will be interfered with (first in the run), and two others that must not suffer."""
    victim = seed_image(conn, f"{prefix}-victim", noise(VICTIM_SIZE))
    others = [
        seed_image(conn, f"{prefix}-other-0", noise(3 * MiB + 1), visibility="community"),
        seed_image(conn, f"{prefix}-other-1", noise(64 * 1024), hidden=True),
    ]
    return victim, others


def _select(images: list[Seeded]) -> list[str]:
    return [arg for s in images for arg in ("--image", s.id)]


def _kill_when_recorded(proc: subprocess.Popen[bytes], db: Path, image_id: str, state: str, log: Path) -> None:
    """Kill the runner right after it records `state` for the image, exactly: each look at the state DB is made
    with the runner stopped (SIGSTOP), so it cannot record a further step between the look and the kill; between
    looks it runs 2 ms, too short to record a step, act (even on local files only) and record the next."""
    deadline = time.monotonic() + RUN_TIMEOUT
    query = "SELECT count(*) FROM events WHERE image_id = ? AND to_state = ?"
    with realtime():  # else, on a loaded machine, "2 ms" can be a scheduler slice: long enough for a local step
        _step_until(proc, db, query, (image_id, state), deadline, log, state)


def _step_until(
    proc: subprocess.Popen[bytes], db: Path, query: str, params: tuple[str, str], deadline: float, log: Path, state: str
) -> None:
    while True:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {state}\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{params[0]} did not reach {state} within {RUN_TIMEOUT} s"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            if count_in_db(db, query, *params):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
                return
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.002)


def _row(db: Path, image_id: str) -> dict[str, Any]:
    """The image's row in the state DB, read as an outsider would."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c, c:
        c.row_factory = sqlite3.Row
        found = c.execute("SELECT * FROM images WHERE image_id = ?", (image_id,)).fetchone()
    assert found is not None, f"{image_id} is not in the state DB"
    return dict(found)


def _events(db: Path, image_id: str) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c, c:
        query = "SELECT to_state, message FROM events WHERE image_id = ? ORDER BY id"
        return [(str(state), str(message)) for state, message in c.execute(query, (image_id,))]


def _run_until(args: list[str], env: dict[str, str], log: Path, db: Path, image_id: str, state: str) -> str:
    """Start the CLI; kill it (-9) as soon as `state` is recorded for `image_id`. The image's state then."""
    proc = cli_popen(*args, env=env, log=log)
    try:
        _kill_when_recorded(proc, db, image_id, state, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    at = str(_row(db, image_id)["state"])
    assert at == state, f"killed at {at}, not {state}: {image_id}\n{log.read_text()}"
    return at


def _delete_behind_its_back(conn: Connection, image_id: str) -> None:
    """What another admin does: unprotect the image if it is protected, delete it."""
    image = raw_image(conn, image_id)
    assert image is not None
    if image["protected"]:
        patch(conn, image_id, [{"op": "replace", "path": "/protected", "value": False}])
    resp = conn.image.delete(f"/images/{image_id}")
    assert resp.status_code == 204, resp.text
    assert raw_image(conn, image_id) is None


def _resume(env: dict[str, str], db: Path, log: Path) -> str:
    resumed = cli("run", "--resume", "--db", str(db), env=env, timeout=RUN_TIMEOUT)
    output = log.read_text() + "\n--- resume ---\n" + resumed.stderr
    assert resumed.returncode == EXIT_PARTIAL, f"rc {resumed.returncode}\n{output}"
    assert "Traceback" not in output and "internal error" not in output, output
    return resumed.stderr


def _recorded_gone(env: dict[str, str], db: Path, victim: Seeded, others: list[Seeded], output: str) -> dict[str, Any]:
    """The run is complete: the victim failed as gone, with a one-line reason, and every other image is done."""
    doc = status_json(db, env)
    rows = {row["id"]: row for row in doc["images"]}
    row = rows[victim.id]
    assert row["state"] == "failed" and row["error_kind"] == "gone", row
    assert f"{victim.id} no longer exists in Glance" in row["error"] and "\n" not in row["error"], row
    assert all(rows[s.id]["state"] == "done" for s in others), rows
    assert doc["run"]["complete"] and doc["counts"]["failed"] == 1, doc["counts"]
    assert doc["counts"]["done"] == len(others), doc["counts"]
    assert f"{victim.id}" in output and "no longer exists" in output, output  # the operator is told, too
    print(f"recorded: {row['error']}")
    return dict(row)


# --------------------------------------------------------------------------------------------------
# (a) an image deleted by someone else in the middle of its migration
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("after", ["copy-requested", "copied"])
def test_image_deleted_during_copy_image(
    lab: Any, conn: Connection, tmp_path: Path, after: str, invariants: Invariants
) -> None:
    """copy-image: the image is deleted once its copy was requested (Glance may still be copying), or copied."""
    env = lab.env()
    victim, others = _images(conn, f"gone-copy-{after}")
    db, log = tmp_path / "state.db", tmp_path / "run.log"
    start = ["run", "--from-store", "old", "--to-store", "new", *_select([victim, *others]), "--db", str(db)]
    at = _run_until(start, env, log, db, victim.id, after)
    print(f"killed with {victim.id} at {at}")
    _delete_behind_its_back(conn, victim.id)

    output = _resume(env, db, log)
    _recorded_gone(env, db, victim, others, output)
    invariants.check(lab, conn, db, env, [victim, *others], faults=GONE, expect={victim.id: "failed"}, gone={victim.id})
    # Nothing of the deleted image is left in either store. (A copy-image task that was still running when the
    # image was deleted is Glance's: it finds the image gone and removes what it wrote.)
    leftovers = [p for p in (lab.store_dir("old") / victim.id, lab.store_dir("new") / victim.id) if p.exists()]
    assert wait_for(lambda: not any(p.exists() for p in leftovers), timeout=60), f"left behind: {leftovers} ({at})"


@pytest.mark.parametrize(
    ("target", "after", "spooled"),
    [
        ("s3", "downloaded", True),  # a spool file, and B uploaded beside the download, not yet recorded
        ("ceph", "created", True),  # B exists, unprotected, its data its own
        ("s3", "location-set", False),  # B protected, its data shared with the image (which has two locations)
        ("ceph", "protected", True),  # both protected by the tool; the other admin unprotects the image first
    ],
    ids=lambda value: str(value).replace("True", "spool").replace("False", "no-spool"),
)
def test_image_deleted_during_location_swap(
    full_lab: Any, full_conn: Connection, tmp_path: Path, target: str, after: str, spooled: bool, invariants: Invariants
) -> None:
    """location-swap: the image is deleted at a step boundary; its copy B and spool file must not outlive it."""
    conn, env = full_conn, full_lab.env()
    victim, others = _images(conn, f"gone-swap-{target}-{after}")
    objects_before = backend_objects(full_lab, target)
    db, log, spool = tmp_path / "state.db", tmp_path / "run.log", tmp_path / "spool"
    mode = ["--spool-dir", str(spool)] if spooled else ["--no-spool"]
    start = ["run", "--from-store", "old", "--to-store", target, "--strategy", "location-swap",
             *_select([victim, *others]), *mode, "--db", str(db)]  # fmt: skip
    at = _run_until(start, env, log, db, victim.id, after)
    copy_id = _row(db, victim.id)["copy_image_id"]
    if after != "downloaded":
        assert copy_id and len(copies_of(conn, victim.id)) == 1, f"no copy B yet at {at}"
    if spooled and after != "protected":  # (protected is recorded with the spool file already removed)
        assert (spool / f"{victim.id}.img").exists(), f"no spool file at {at}"
    print(f"killed with {victim.id} at {at}")
    _delete_behind_its_back(conn, victim.id)

    output = _resume(env, db, log)
    row = _recorded_gone(env, db, victim, others, output)
    expect, gone = {victim.id: "failed"}, {victim.id}
    invariants.check(full_lab, conn, db, env, [victim, *others], faults=GONE, expect=expect, gone=gone)
    # Nothing of the tool's own is left for the deleted image: no copy B, no spool file, no object in the store.
    assert copies_of(conn, victim.id) == [], f"copy B left behind (killed at {at}): {copies_of(conn, victim.id)}"
    if copy_id:
        assert raw_image(conn, copy_id) is None
        assert f"removed its copy {copy_id}" in row["error"], row["error"]
    if spooled:
        assert list(spool.iterdir()) == [], f"spool files left behind: {list(spool.iterdir())}"
    doc = status_json(db, env)
    copies = {img["copy_image_id"] for img in doc["images"] if img["state"] == "done"}
    new_objects = backend_objects(full_lab, target) - objects_before
    assert new_objects == copies, f"objects in {target} left behind (killed at {at}): {new_objects - copies}"
    assert not (full_lab.store_dir("old") / victim.id).exists()


# --------------------------------------------------------------------------------------------------
# (b) the spool vanishing between runs
# --------------------------------------------------------------------------------------------------


def _killed_after_download(
    lab: Any, conn: Connection, tmp_path: Path, prefix: str, keep_copy: bool = False
) -> tuple[Seeded, list[Seeded], dict[str, str], Path, Path, Path]:
    """A location-swap run to s3, spooled, killed once the first image's download is recorded. The copy B that the
    download uploaded beside it is deleted, as when that upload fails, so that the copy must come from the spool
    file (`keep_copy`: left for the resumed run to adopt)."""
    env = lab.env()
    victim, others = _images(conn, prefix)
    db, log, spool = tmp_path / "state.db", tmp_path / "run.log", tmp_path / "spool"
    start = ["run", "--from-store", "old", "--to-store", "s3", "--strategy", "location-swap",
             *_select([victim, *others]), "--spool-dir", str(spool), "--db", str(db)]  # fmt: skip
    at = _run_until(start, env, log, db, victim.id, "downloaded")
    assert at == "downloaded", f"killed at {at}, after the spool file was used"
    assert (spool / f"{victim.id}.img").stat().st_size == VICTIM_SIZE
    (copy,) = copies_of(conn, victim.id)
    assert copy["status"] == "active" and copy["size"] == VICTIM_SIZE, copy
    if not keep_copy:
        assert conn.image.delete(f"/images/{copy['id']}").status_code == 204
    return victim, others, env, db, log, spool


def _finishes(
    lab: Any, conn: Connection, env: dict[str, str], db: Path, images: list[Seeded], check: Invariants, fault: str
) -> str:
    resumed = cli("run", "--resume", "--db", str(db), env=env, timeout=RUN_TIMEOUT)
    assert resumed.returncode == EXIT_OK, f"rc {resumed.returncode}\n{resumed.stderr}"
    assert "Traceback" not in resumed.stderr, resumed.stderr
    check.check(lab, conn, db, env, images, faults={"SIGKILL": 1, fault: 1})
    return resumed.stderr


def _downloaded_again(db: Path, victim: Seeded) -> None:
    """The victim's copy was made from a second download, verified against Glance's record."""
    created = [message for state, message in _events(db, victim.id) if state == "created"]
    assert len(created) == 1 and "spool file was missing: downloaded" in created[0], created
    assert f"downloaded {VICTIM_SIZE} bytes" in created[0] and "match Glance's record" in created[0], created


def test_spool_file_removed_after_download_is_downloaded_again(
    full_lab: Any, full_conn: Connection, tmp_path: Path, invariants: Invariants
) -> None:
    """The spool file of a downloaded image is removed between runs: resume downloads it again and finishes."""
    victim, others, env, db, _, spool = _killed_after_download(full_lab, full_conn, tmp_path, "spool-file")
    (spool / f"{victim.id}.img").unlink()
    output = _finishes(full_lab, full_conn, env, db, [victim, *others], invariants, "spool file removed")
    assert "is missing; downloading the image again" in output, output
    _downloaded_again(db, victim)
    assert list(spool.iterdir()) == []


def test_copy_uploaded_beside_the_download_is_adopted_without_its_spool_file(
    full_lab: Any, full_conn: Connection, tmp_path: Path, invariants: Invariants
) -> None:
    """Killed after the download, whose copy B was uploaded beside it; the spool file is removed between runs: the
    resumed run verifies B against Glance's record and adopts it, without downloading the image again."""
    victim, others, env, db, _, spool = _killed_after_download(full_lab, full_conn, tmp_path, "beside", True)
    (copy,) = copies_of(full_conn, victim.id)
    (spool / f"{victim.id}.img").unlink()
    output = _finishes(full_lab, full_conn, env, db, [victim, *others], invariants, "spool file removed")
    assert "downloading the image again" not in output, output
    downloaded = [message for state, message in _events(db, victim.id) if state == "downloaded"]
    assert len(downloaded) == 1 and f"copy {copy['id']} uploaded beside it" in downloaded[0], downloaded
    created = [message for state, message in _events(db, victim.id) if state == "created"]
    assert created == [f"copy {copy['id']} in s3: status, size and hashes verified"], created
    assert _row(db, victim.id)["copy_image_id"] == copy["id"]
    assert list(spool.iterdir()) == []


def test_spool_dir_removed_between_runs_is_made_again_private(
    full_lab: Any, full_conn: Connection, tmp_path: Path, invariants: Invariants
) -> None:
    """The whole spool directory is removed between runs: resume makes it again, 0700, and finishes."""
    victim, others, env, db, _, spool = _killed_after_download(full_lab, full_conn, tmp_path, "spool-dir")
    shutil.rmtree(spool)
    _finishes(full_lab, full_conn, env, db, [victim, *others], invariants, "spool directory removed")
    _downloaded_again(db, victim)
    assert spool.is_dir() and oct(spool.stat().st_mode & 0o777) == "0o700"
    assert list(spool.iterdir()) == []


def test_spool_dir_that_cannot_be_made_stops_the_run_and_changes_nothing(
    full_lab: Any, full_conn: Connection, tmp_path: Path, invariants: Invariants
) -> None:
    """The spool directory is replaced by a file: resume stops with a clear error, changing nothing; fixed, it ends."""
    conn = full_conn
    victim, others, env, db, _, spool = _killed_after_download(full_lab, conn, tmp_path, "spool-blocked")
    shutil.rmtree(spool)
    spool.write_text("not a directory\n")
    states = {s.id: _row(db, s.id)["state"] for s in (victim, *others)}

    stopped = cli("run", "--resume", "--db", str(db), env=env, timeout=RUN_TIMEOUT)
    assert stopped.returncode == EXIT_USAGE, f"rc {stopped.returncode}\n{stopped.stderr}"
    assert "Traceback" not in stopped.stderr and "internal error" not in stopped.stderr, stopped.stderr
    error = [line for line in stopped.stderr.splitlines() if line.startswith("glance-migrator: error:")]
    assert len(error) == 1 and f"spool directory {spool}: exists and is not a directory" in error[0], stopped.stderr
    print(stopped.stderr)
    # Nothing changed: not the state DB, not Glance (no copy made, every image still only in old, as it was).
    assert {s.id: _row(db, s.id)["state"] for s in (victim, *others)} == states
    assert spool.read_text() == "not a directory\n"
    for seeded in (victim, *others):
        assert copies_of(conn, seeded.id) == []
        image = raw_image(conn, seeded.id)
        assert image is not None and stable(image) == seeded.before and stores_of(conn, seeded.id) == {"old"}

    spool.unlink()
    _finishes(full_lab, conn, env, db, [victim, *others], invariants, "spool path is a file")
    _downloaded_again(db, victim)
    assert oct(spool.stat().st_mode & 0o777) == "0o700" and list(spool.iterdir()) == []


def test_spool_file_changed_after_download_fails_the_copy_and_retry_downloads_again(
    full_lab: Any, full_conn: Connection, tmp_path: Path, invariants: Invariants
) -> None:
    """The spool file of a downloaded image is altered on disk: the copy fails its hash check and is deleted,
    the spool file is dropped, and `retry` downloads the image again and finishes."""
    conn = full_conn
    victim, others, env, db, _, spool = _killed_after_download(full_lab, conn, tmp_path, "spool-changed")
    path = spool / f"{victim.id}.img"
    data = bytearray(path.read_bytes())
    data[12345] ^= 0xFF  # same size: only a hash can tell
    path.write_bytes(bytes(data))
    resumed = cli("run", "--resume", "--db", str(db), env=env, timeout=RUN_TIMEOUT)
    assert resumed.returncode == EXIT_PARTIAL, f"rc {resumed.returncode}\n{resumed.stderr}"
    row = _row(db, victim.id)
    assert row["state"] == "failed" and row["error_kind"] == "integrity", row
    assert "spool file removed" in row["error"] and not path.exists(), row["error"]
    invariants.check(full_lab, conn, db, env, [victim, *others], faults={"SIGKILL": 1, "spool file altered": 1},
                     expect={victim.id: "failed"}, label="copy refused")  # fmt: skip
    retried = cli("retry", victim.id, "--db", str(db), env=env, timeout=RUN_TIMEOUT)
    assert retried.returncode == EXIT_OK, retried.stderr
    invariants.check(full_lab, conn, db, env, [victim, *others], faults={"SIGKILL": 1, "spool file altered": 1},
                     label="retried")  # fmt: skip
