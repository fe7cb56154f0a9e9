"""location-swap against real backends: file -> S3 and file -> Ceph RBD, through the CLI."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from openstack.connection import Connection

from glance_migrator.errors import EXIT_CLOUD, EXIT_OK, EXIT_PARTIAL
from tests.glancetools import (
    Seeded,
    assert_migrated,
    assert_swapped,
    cli,
    cli_popen,
    copies_of,
    count_in_db,
    download_sha512,
    noise,
    raw_image,
    seed_image,
    stable,
    status_json,
    stores_of,
    wait_for,
)
from tests.invariants import Invariants
from tests.lab import PASSWORD, S3_ACCESS_KEY, S3_SECRET_KEY

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
    return [seed_image(conn, f"{prefix}-{i}", noise(sizes[i % 12]), **kinds[i % 12]) for i in range(count)]


def _select(images: list[Seeded]) -> list[str]:
    return [arg for s in images for arg in ("--image", s.id)]


@pytest.mark.core
@pytest.mark.parametrize(("target", "spooled"), [("s3", True), ("ceph", True), ("ceph", False)])
def test_location_swap_moves_a_dozen_images(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path, target: str, spooled: bool
) -> None:
    images = _varied(conn, f"swap-{target}-{spooled}")
    spool = tmp_path / "spool"
    mode = ["--spool-dir", str(spool)] if spooled else ["--no-spool"]
    proc = cli("run", "--from-store", "old", "--to-store", target, "--strategy", "location-swap", *_select(images),
               *mode, "--db", str(tmp_path / "state.db"), "--workers", "2", "--bwlimit", "64M", env=env)  # fmt: skip
    assert proc.returncode == EXIT_OK, proc.stderr
    for seeded in images:
        assert_swapped(conn, full_lab, seeded, "old", target)
    if spooled:
        assert list(spool.iterdir()) == []  # no spool file left behind
        assert oct(spool.stat().st_mode & 0o777) == "0o700"
    else:
        assert not spool.exists() and "no spool (--no-spool)" in proc.stderr


def _reached(db: Path, state: str) -> int:
    """How many images have reached `state` so far, read from the event log."""
    return count_in_db(db, "SELECT count(*) FROM events WHERE to_state = ?", state)


@pytest.mark.core
@pytest.mark.parametrize("target", TARGETS)
def test_location_swap_survives_kill_9_at_every_step_boundary_and_mid_transfer(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path, target: str, invariants: Invariants
) -> None:
    """location-swap: kill -9 mid-download, mid-upload and right after each step, then resume"""
    bigs = [seed_image(conn, f"kill-{target}-big-{i}", noise(60 * MiB)) for i in range(2)]
    images = bigs + _varied(conn, f"kill-{target}", count=6)  # the run takes them in this order
    db, log, spool = tmp_path / "state.db", tmp_path / "runner.log", tmp_path / "spool"
    common = ["--db", str(db), "--spool-dir", str(spool)]
    start = ["--from-store", "old", "--to-store", target, "--strategy", "location-swap", *_select(images)]
    killed_at = []

    def run_and_kill(when: str, condition: Any) -> None:
        proc = cli_popen("run", *(start if not killed_at else ["--resume"]), *common, env=env, log=log)
        assert wait_for(lambda: condition() or proc.poll() is not None, timeout=180), f"never reached {when}"
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at.append(when)

    # Mid-download: a 60 MiB image is being written to its spool file.
    run_and_kill("mid-download", lambda: any(p.suffix == ".part" and p.stat().st_size > 0 for p in spool.glob("*")))
    # Mid-upload: a copy B is receiving its data.
    run_and_kill("mid-upload", lambda: any(c["status"] == "saving" for i in bigs for c in copies_of(conn, i.id)))
    # Right after each step of the path is recorded, the first time and again later in the run.
    for state in ("downloaded", "created", "location-set", "location-deleted", "protected", "cleaned", "done"):
        before = _reached(db, state)
        run_and_kill(f"after {state}", lambda s=state, n=before: _reached(db, s) > n)
    assert killed_at[:2] == ["mid-download", "mid-upload"] and len(killed_at) >= 7, f"killed at {killed_at}; {log}"
    done = cli("run", "--resume", *common, env=env)
    assert done.returncode == EXIT_OK, done.stderr + log.read_text()
    invariants.check(full_lab, conn, db, env, images, faults={"SIGKILL": len(killed_at)})
    assert list(spool.iterdir()) == []


def test_corrupt_source_fails_with_integrity_error_and_keeps_its_location(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """location-swap of an image whose file in the source store was changed on disk"""
    seeded = seed_image(conn, "corrupt", noise(2 * MiB))
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
    invariants.check(
        full_lab, conn, db, env, [seeded], faults={"source file corrupted": 1},
        expect={seeded.id: "failed"}, corrupted={seeded.id},
    )  # fmt: skip


@pytest.mark.core
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


def _only_in_ceph(conn: Connection, seeded: Seeded) -> None:
    """Move a fresh image from old to ceph (as an earlier migration would have), to migrate off Ceph next."""
    resp = conn.image.post(f"/images/{seeded.id}/import", json={"method": {"name": "copy-image"}, "stores": ["ceph"]})
    assert resp.status_code == 202, resp.text

    def copied() -> bool:
        image = raw_image(conn, seeded.id) or {}
        return "ceph" in stores_of(conn, seeded.id) and not image.get("os_glance_import_task")

    assert wait_for(copied, timeout=120, interval=0.2)
    assert conn.image.delete(f"/stores/old/{seeded.id}").status_code == 204


@pytest.mark.parametrize("strategy", ["copy-image", "location-swap"])
def test_rbd_clone_child_blocks_the_image_until_it_is_gone_then_retry_finishes(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path, strategy: str, invariants: Invariants
) -> None:
    """Moving off Ceph an image whose RBD snapshot has a clone child (as Nova and Cinder make)"""
    seeded = seed_image(conn, f"cloned-{strategy}", noise(3 * MiB))
    _only_in_ceph(conn, seeded)
    child = f"child-{seeded.id[:8]}"
    full_lab.rbd("clone", f"images/{seeded.id}@snap", f"images/{child}")  # as Nova and Cinder do
    db = tmp_path / "state.db"
    args = ["--db", str(db), "--spool-dir", str(tmp_path / "spool")]
    proc = cli(
        "run", "--from-store", "ceph", "--to-store", "s3", "--strategy", strategy, "--image", seeded.id, *args, env=env
    )
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    (row,) = status_json(db, env)["images"]
    assert row["state"] == "blocked" and "clone" in row["error"], row
    assert row["failed_at"] == ("copied" if strategy == "copy-image" else "location-set")
    image = raw_image(conn, seeded.id)
    assert image is not None and stores_of(conn, seeded.id) == {"ceph", "s3"}  # both copies, nothing lost
    assert download_sha512(conn, seeded.id) == seeded.sha512
    if strategy == "location-swap":
        (copy,) = copies_of(conn, seeded.id)
        assert copy["protected"] is True and len(image["locations"]) == 2
    # Not looped on: a resume has nothing to do (exit 0, so a retry loop ends, saying the image waits for
    # `retry`), and the image stays blocked with one blocked event.
    resumed = cli("run", "--resume", *args, env=env)
    assert resumed.returncode == EXIT_OK and "1 failed or blocked image(s) wait for" in resumed.stderr
    with contextlib.closing(sqlite3.connect(db)) as c, c:
        assert c.execute("SELECT count(*) FROM events WHERE to_state = 'blocked'").fetchone()[0] == 1
    clone = {"RBD clone child": 1}
    invariants.check(full_lab, conn, db, env, [seeded], faults=clone, expect={seeded.id: "blocked"}, label="blocked")

    full_lab.rbd("rm", f"images/{child}")
    proc = cli("retry", seeded.id, "--db", str(db), env=env)  # the spool dir is recorded on the run
    assert proc.returncode == EXIT_OK, proc.stderr
    invariants.check(full_lab, conn, db, env, [seeded], faults=clone, label="child removed, retried")
    assert seeded.id not in full_lab.rbd("ls", "images").split()  # the Ceph copy is really gone


@pytest.mark.core
def test_legacy_single_store_glance_file_to_rbd(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    """Glance without enabled_backends, as the original script assumed: uploads went to default_store=file."""
    try:
        full_lab.reconfigure_legacy("file")
        images = [seed_image(conn, f"legacy-{i}", noise(n)) for i, n in enumerate((1, 5 * MiB, 700 * 1024))]
        db = tmp_path / "state.db"
        args = ["--db", str(db), "--spool-dir", str(tmp_path / "spool")]
        # default_store is still file: the copy would land in the source backend; refused, nothing changed.
        proc = cli("run", "--from-store", "file", "--to-store", "rbd", *_select(images), *args, env=env)
        assert proc.returncode == EXIT_CLOUD and "default_store" in proc.stderr, proc.stderr
        assert "strategy auto: location-swap" in proc.stderr
        for seeded in images:
            image = raw_image(conn, seeded.id) or {}
            assert [loc["url"].split("://")[0] for loc in image["locations"]] == ["file"]
            assert copies_of(conn, seeded.id) == []

        full_lab.reconfigure_legacy("rbd")  # what the operator does, then resumes
        proc = cli("run", "--resume", *args, env=env)
        assert proc.returncode == EXIT_OK, proc.stderr
        for seeded in images:
            image = raw_image(conn, seeded.id) or {}
            assert image["status"] == "active" and image["protected"] is True
            assert [loc["url"].split("://")[0] for loc in image["locations"]] == ["rbd"]
            assert {k: v for k, v in stable(image).items() if k != "protected"} == {
                k: v for k, v in seeded.before.items() if k != "protected"
            }
            assert download_sha512(conn, seeded.id) == seeded.sha512
            assert not (full_lab.store_dir("old") / seeded.id).exists()
            (copy,) = copies_of(conn, seeded.id)
            assert copy["protected"] is True and copy["os_hidden"] is True
    finally:
        full_lab.reconfigure_legacy(None)


def test_an_image_that_cannot_fit_in_the_spool_fails_with_the_reason_and_changes_nothing(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """An image bigger than the free space of the spool (a 4 MiB tmpfs)"""
    spool = tmp_path / "small-spool"
    spool.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(spool)], capture_output=True)
    assert mounted.returncode == 0, f"this test needs root to mount a 4 MiB tmpfs: {mounted.stderr!r}"
    try:
        seeded = seed_image(conn, "too-big-for-spool", noise(8 * MiB))
        db = tmp_path / "state.db"
        proc = cli("run", "--from-store", "old", "--to-store", "s3", "--strategy", "location-swap",
                   "--image", seeded.id, "--spool-dir", str(spool), "--db", str(db), env=env)  # fmt: skip
        assert proc.returncode == EXIT_PARTIAL, proc.stderr
        (row,) = status_json(db, env)["images"]
        assert row["state"] == "failed" and row["error_kind"] == "resources" and "bytes free" in row["error"]
        assert stores_of(conn, seeded.id) == {"old"} and copies_of(conn, seeded.id) == []
        assert list(spool.iterdir()) == []
        expect = {seeded.id: "failed"}
        invariants.check(full_lab, conn, db, env, [seeded], faults={"spool full": 1}, expect=expect)
    finally:
        subprocess.run(["umount", str(spool)], check=True)


def test_glance_restarted_in_the_middle_of_a_run(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path, invariants: Invariants
) -> None:
    """glance-api restarted in the middle of a location-swap run

    A server fault: glance-api goes away mid-transfer and comes back; the run rides it out or stops
    resumably (exit 3), and resuming ends with every image swapped and nothing extra left."""
    images = [seed_image(conn, f"restart-{i}", noise((40 if i < 2 else 1) * MiB)) for i in range(5)]
    db, log, spool = tmp_path / "state.db", tmp_path / "runner.log", tmp_path / "spool"
    common = ["--db", str(db), "--spool-dir", str(spool)]
    proc = cli_popen("run", "--from-store", "old", "--to-store", "s3", "--strategy", "location-swap",
                     *_select(images), *common, env=env, log=log)  # fmt: skip
    assert wait_for(lambda: _reached(db, "downloaded") >= 1 or proc.poll() is not None, timeout=120)
    assert proc.poll() is None, log.read_text()
    full_lab.restart_glance()
    rc = proc.wait(timeout=300)
    assert rc in (EXIT_OK, EXIT_CLOUD), log.read_text()
    assert "Traceback" not in log.read_text()
    if rc == EXIT_CLOUD:
        assert "progress is saved" in log.read_text()
        done = cli("run", "--resume", *common, env=env)
        assert done.returncode == EXIT_OK, done.stderr
    invariants.check(full_lab, conn, db, env, images, faults={"glance-api restart": 1})


@pytest.mark.parametrize("verbose", [False, True])
def test_no_credential_reaches_logs_status_or_the_state_db(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path, verbose: bool
) -> None:
    """With show_multiple_locations on, Glance hands out location URLs (an older glance_store puts the S3
    keys into s3:// URLs): none of them, nor the store keys, a password or a token (Keystone's fernet
    tokens start with gAAAAA), may land anywhere the tool writes, even at -v."""
    s3 = [seed_image(conn, f"secret-s3-{i}", noise(MiB)) for i in range(2)]
    ceph = [seed_image(conn, f"secret-ceph-{i}", noise(MiB)) for i in range(2)]
    log = tmp_path / "tool.log"
    written: list[str] = []
    for target, images in (("s3", s3), ("ceph", ceph)):
        run_db = tmp_path / f"{target}.db"
        proc = cli(*(["-v"] if verbose else []), "--log-file", str(log), "run", "--from-store", "old",
                   "--to-store", target, "--strategy", "location-swap", *_select(images), "--db", str(run_db),
                   "--spool-dir", str(tmp_path / "spool"), env=env)  # fmt: skip
        assert proc.returncode == EXIT_OK, proc.stderr
        written += [proc.stdout, proc.stderr]
        for fmt in ("table", "json", "yaml", "csv", "value"):
            written.append(cli("status", "-f", fmt, "--db", str(run_db), env=env, check_rc=EXIT_OK).stdout)
        audit = tmp_path / f"{target}-audit.json"
        cli("report", str(audit), "--db", str(run_db), env=env, check_rc=EXIT_OK)
        written.append(audit.read_text())
        written += [p.read_bytes().decode("latin-1") for p in tmp_path.glob(f"{target}.db*")]  # DB, WAL, SHM
    written.append(log.read_text())
    urls = [loc["url"] for s in s3 + ceph for loc in (raw_image(conn, s.id) or {})["locations"]]
    assert len(urls) == 4 and all(url.startswith(("s3", "rbd://")) for url in urls), urls
    forbidden = [*urls, S3_ACCESS_KEY, S3_SECRET_KEY, "gAAAAA", f"password: {PASSWORD}"]
    for text in written:
        for secret in forbidden:
            assert secret not in text, f"{secret!r} leaked: ...{text[max(0, text.find(secret) - 200) :][:400]}..."
        location = re.search(r"\b(rbd|s3(\+https?)?)://(?!\*\*\*)", text)  # only ever shown redacted
        assert location is None, f"a location leaked: ...{text[max(0, location.start() - 200) :][:400]}..."


@pytest.mark.parametrize("strategy", ["copy-image", "location-swap"])
def test_an_image_also_in_a_third_store_keeps_that_copy(
    full_lab: Any, conn: Connection, env: dict[str, str], tmp_path: Path, strategy: str
) -> None:
    """An image in old and, by an earlier Glance copy, in s3 too, moved old -> ceph: done means nothing left in
    old; its s3 location stays (not the tool's to remove), and the image serves its bytes."""
    seeded = seed_image(conn, f"third-store-{strategy}", noise(300_000))
    resp = conn.image.post(f"/images/{seeded.id}/import", json={"method": {"name": "copy-image"}, "stores": ["s3"]})
    assert resp.status_code == 202, resp.text

    def copied() -> bool:
        locked = (raw_image(conn, seeded.id) or {}).get("os_glance_import_task")
        return "s3" in stores_of(conn, seeded.id) and not locked

    assert wait_for(copied, timeout=120)
    db = tmp_path / "state.db"
    cli("run", "--from-store", "old", "--to-store", "ceph", "--strategy", strategy, "--image", seeded.id,
        "--db", str(db), env=env, check_rc=EXIT_OK)  # fmt: skip
    assert stores_of(conn, seeded.id) == {"s3", "ceph"}
    assert download_sha512(conn, seeded.id) == seeded.sha512
    (row,) = status_json(db, env)["images"]
    assert row["state"] == "done" and set(row["stores_after"].split(",")) == {"s3", "ceph"}, row
