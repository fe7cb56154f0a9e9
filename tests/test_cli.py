"""The CLI's contract: help on every command, exit codes, the JSON shape, and bad input refused cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from openstack.connection import Connection

from glance_migrator.errors import EXIT_CLOUD, EXIT_OK, EXIT_STATE_DB, EXIT_USAGE
from glance_migrator.models import ImageRow
from glance_migrator.state import State, Strategy
from glance_migrator.statedb import LeaseOwner, StateDB
from tests.glancetools import CLI, cli, noise, seed_image, stores_of
from tests.lab.postgres import Postgres

COMMANDS = ["run", "status", "retry", "check", "report"]


def _runs(db: Path) -> int:
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        return int(conn.execute("SELECT count(*) FROM runs").fetchone()[0])


def _error_line(stderr: str) -> str:
    """The one line the operator needs: `glance-migrator: error: ...`, and no traceback around it."""
    errors = [line for line in stderr.splitlines() if line.startswith("glance-migrator: error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.fixture
def env(lab: Any) -> dict[str, str]:
    return dict(lab.env())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    proc = cli(command, "--help", env={}, check_rc=EXIT_OK)
    assert "Usage: glance-migrator " + command in proc.stdout
    assert "Example: glance-migrator " + command in proc.stdout


def test_top_level_help_lists_every_command_and_version_prints() -> None:
    out = cli("--help", env={}, check_rc=EXIT_OK).stdout
    assert all(command in out for command in COMMANDS)
    assert cli("--version", env={}, check_rc=EXIT_OK).stdout.startswith("glance-migrator ")


def test_unknown_option_is_a_usage_error() -> None:
    proc = cli("run", "--no-such-option", env={})
    assert proc.returncode == EXIT_USAGE and "No such option" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "not-a-uuid"], "is not an image UUID"),
        (
            ["--image", "00000000-0000-4000-8000-000000000000"],
            "no image 00000000-0000-4000-8000-000000000000",
        ),
    ],
)
def test_bad_image_argument_is_refused_and_changes_nothing(
    admin_conn: Connection, env: dict[str, str], tmp_path: Path, args: list[str], message: str
) -> None:
    seeded = seed_image(admin_conn, "cli-untouched", noise(100))
    db = tmp_path / "state.db"
    proc = cli("run", "--from-store", "old", "--to-store", "new", *args, "--db", str(db), env=env)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert message in _error_line(proc.stderr)
    assert _runs(db) == 0 and stores_of(admin_conn, seeded.id) == {"old"}


@pytest.mark.parametrize(
    ("stores", "message"),
    [
        (["--from-store", "old", "--to-store", "nowhere"], "--to-store 'nowhere': Glance has no such store"),
        (["--from-store", "gone", "--to-store", "new"], "--from-store 'gone': Glance has no such store"),
        (["--from-store", "old", "--to-store", "old"], "both 'old'"),
        (["--from-store", "old"], "--from-store and --to-store are required"),
        (["--from-store", "old", "--to-store", "new", "--bwlimit", "0"], "--bwlimit '0': give a positive number"),
        (["--from-store", "old", "--to-store", "new", "--bwlimit", "fast"], "--bwlimit"),
    ],
)
def test_bad_stores_are_refused_before_anything_changes(
    env: dict[str, str], tmp_path: Path, stores: list[str], message: str
) -> None:
    db = tmp_path / "state.db"
    proc = cli("run", *stores, "--db", str(db), env=env)
    assert proc.returncode == EXIT_USAGE and message in proc.stderr, proc.stderr
    assert _runs(db) == 0


def _clouds_yaml(tmp_path: Path, auth_url: str, username: str = "admin", password: str = "secret") -> dict[str, str]:
    path = tmp_path / "clouds.yaml"
    path.write_text(
        f'clouds:\n  broken:\n    auth: {{auth_url: "{auth_url}", username: {username}, password: {password},\n'
        "           project_name: admin, user_domain_name: Default, project_domain_name: Default}\n"
        "    region_name: RegionOne\n    identity_api_version: 3\n"
    )
    return {"OS_CLIENT_CONFIG_FILE": str(path), "OS_CLOUD": "broken"}


def test_unreachable_cloud_is_a_cloud_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _clouds_yaml(tmp_path, f"http://127.0.0.1:{port}/v3")
    db = tmp_path / "state.db"
    proc = cli("run", "--from-store", "old", "--to-store", "new", "--db", str(db), env=env)
    assert proc.returncode == EXIT_CLOUD, proc.stderr
    assert "cannot reach" in _error_line(proc.stderr)
    assert _runs(db) == 0


def test_tls_is_verified_unless_the_cloud_config_turns_it_off(tmp_path: Path) -> None:
    """An identity endpoint with a self-signed certificate: refused (exit 3, nothing created), as the
    openstack CLI would; the tool has no switch of its own that turns verification off."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    handshakes: list[str] = []
    stop = threading.Event()

    def serve() -> None:  # handshakes only: a verifying client gives up right there
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    context.wrap_socket(conn, server_side=True).close()
                    handshakes.append("completed")
                except (ssl.SSLError, OSError) as e:
                    handshakes.append(f"refused by the client: {e}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        env = _clouds_yaml(tmp_path, f"https://127.0.0.1:{server.getsockname()[1]}/v3")
        db = tmp_path / "state.db"
        proc = cli("run", "--from-store", "old", "--to-store", "new", "--db", str(db), env=env)
    finally:
        stop.set()
        thread.join(5)
        server.close()
    assert proc.returncode == EXIT_CLOUD, proc.stderr
    assert "certificate" in _error_line(proc.stderr).lower(), proc.stderr
    assert handshakes and not any(h == "completed" for h in handshakes), handshakes
    assert _runs(db) == 0


def test_wrong_password_is_a_cloud_error(lab: Any, tmp_path: Path) -> None:
    env = _clouds_yaml(tmp_path, lab.keystone_url, password="wrong")
    proc = cli("run", "--from-store", "old", "--to-store", "new", "--db", str(tmp_path / "s.db"), env=env)
    assert proc.returncode == EXIT_CLOUD and "401" in proc.stderr, proc.stderr


def test_unknown_cloud_name_is_a_cloud_error(env: dict[str, str], tmp_path: Path) -> None:
    proc = cli(
        "run",
        "--from-store",
        "old",
        "--to-store",
        "new",
        "--os-cloud",
        "nope",
        "--db",
        str(tmp_path / "s.db"),
        env=env,
    )
    assert proc.returncode == EXIT_CLOUD and "nope" in proc.stderr, proc.stderr


def test_member_instead_of_admin_goes_ahead_until_glance_refuses(
    admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    """Roles are not checked by name (a site's policy may grant the rights to another role): the run tries, and
    Glance's first policy refusal stops it for every image, saying so; nothing changed, the run is resumable."""
    seeded = seed_image(admin_conn, "member-run", noise(2000), visibility="public")
    db = tmp_path / "state.db"
    demo = {**env, "OS_CLOUD": "lab-demo"}
    proc = cli("run", "--from-store", "old", "--to-store", "new", "--image", seeded.id, "--db", str(db), env=demo)
    assert proc.returncode == EXIT_CLOUD, proc.stderr
    assert "not admin" in proc.stderr and "policy refuses" in _error_line(proc.stderr), proc.stderr
    assert stores_of(admin_conn, seeded.id) == {"old"} and _runs(db) == 1
    resumed = cli("run", "--resume", "--db", str(db), env=env)  # with the rights, it finishes
    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert stores_of(admin_conn, seeded.id) == {"new"}


def test_corrupt_state_db_is_reported_and_left_alone(env: dict[str, str], tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(b"\x00garbage" * 512)
    for args in (["status"], ["run", "--resume"], ["retry", "--all-failed"]):
        proc = cli(*args, "--db", str(db), env=env)
        assert proc.returncode == EXIT_STATE_DB and "not a SQLite database" in proc.stderr, proc.stderr
    assert db.read_bytes() == b"\x00garbage" * 512


def test_newer_schema_state_db_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    cli("status", "--db", str(db), env=env)  # creates an empty, current DB
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = 'zzzz'")
    proc = cli("status", "--db", str(db), env=env)
    assert proc.returncode == EXIT_STATE_DB and "newer glance-migrator" in proc.stderr


def test_resume_and_retry_without_a_run_are_usage_errors(env: dict[str, str], tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    assert "nothing to resume" in cli("run", "--resume", "--db", db, env=env, check_rc=EXIT_USAGE).stderr
    assert "holds no run" in cli("status", "--db", db, env=env, check_rc=EXIT_USAGE).stderr
    assert "no run" in cli("retry", "--all-failed", "--db", db, env=env, check_rc=EXIT_USAGE).stderr
    assert "is not an image UUID" in cli("retry", "nope", "--db", db, env=env, check_rc=EXIT_USAGE).stderr


def test_status_json_shape_and_retry_of_unknown_or_unfailed_image(
    admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    seeded = seed_image(admin_conn, "cli-json", noise(2000))
    db = str(tmp_path / "state.db")
    cli(
        "run",
        "--from-store",
        "old",
        "--to-store",
        "new",
        "--image",
        seeded.id,
        "--db",
        db,
        env=env,
        check_rc=EXIT_OK,
    )
    doc = json.loads(cli("status", "--json", "--db", db, env=env, check_rc=EXIT_OK).stdout)
    assert set(doc) == {"run", "counts", "total", "leases", "images"}
    assert doc["leases"] == []  # the run is over: nobody holds an image
    assert set(doc["run"]) == {
        "id",
        "from_store",
        "to_store",
        "strategy",
        "cloud",
        "created_at",
        "finished_at",
        "complete",
    }
    assert doc["run"]["strategy"] == "copy-image" and doc["run"]["cloud"] == "lab-admin"
    assert set(doc["counts"]) == {
        "pending",
        "copy-requested",
        "copied",
        "old-removed",
        "done",
        "failed",
        "blocked",
        "skipped",
    }
    (image,) = doc["images"]
    assert set(image) == {
        "id",
        "name",
        "state",
        "strategy",  # per image: a location-swap run moves its 0-byte images by copy-image
        "failed_at",
        "error",
        "error_kind",
        "attempts",
        "size",
        "stores_before",
        "stores_after",
        "copy_image_id",
        "updated_at",
    }
    assert image["id"] == seeded.id and image["state"] == "done" and image["stores_after"] == "new"
    proc = cli("retry", seeded.id, "--db", db, env=env, check_rc=EXIT_USAGE)
    assert "only failed or blocked images can be retried" in proc.stderr
    proc = cli("retry", "00000000-0000-4000-8000-000000000000", "--db", db, env=env, check_rc=EXIT_USAGE)
    assert "not part of run" in proc.stderr


# What `check` says of each release the lab runs: the API version Glance's version document gives
API_OF_RELEASE = {30: "image API v2.17 (Glance 29-32, 2024.2-2026.1)", 33: "image API v2.18 (Glance 33, 2026.2)"}


@pytest.mark.core
def test_check_reports_what_the_cloud_offers_and_changes_nothing(
    lab: Any, admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    seed_image(admin_conn, "check-looks-at-me", noise(100))  # locations are judged on an image
    proc = cli("check", "--from-store", "old", "--to-store", "new", "--spool-dir", str(tmp_path / "sp"), env=env)
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"ok  glance: {API_OF_RELEASE[lab.glance_release.major]}\n" in out, out
    assert "stores: old (file, default), new (file)" in out and "copy-image" in out
    assert "run --strategy auto: would use copy-image" in out
    assert "--strategy location-swap: would not work: new is a file store" in out
    assert "images sharing a data object are found before any delete" in out
    assert not (tmp_path / "sp").exists()


def test_check_fails_for_an_unknown_store_and_doubts_a_member(env: dict[str, str]) -> None:
    proc = cli("check", "--from-store", "old", "--to-store", "nowhere", env=env)
    assert proc.returncode == EXIT_USAGE and "NO  stores: --to-store 'nowhere'" in proc.stdout
    # Roles are not judged by name (a policy may grant the rights to another role): a doubt, not a failure.
    proc = cli("check", "--from-store", "old", "--to-store", "new", "--os-cloud", "lab-demo", env=env)
    assert proc.returncode == EXIT_OK and "??  credentials: the credentials have roles" in proc.stdout, proc.stdout
    assert proc.stdout.count(" credentials: ") == 1 and "run --strategy auto: would use copy-image" in proc.stdout


def test_status_formats_report_and_log_file(admin_conn: Connection, env: dict[str, str], tmp_path: Path) -> None:
    seeded = seed_image(admin_conn, "cli-formats", noise(3000))
    db, log = str(tmp_path / "state.db"), tmp_path / "run.log"
    cli("--log-file", str(log), "run", "--from-store", "old", "--to-store", "new", "--image", seeded.id,
        "--db", db, env=env, check_rc=EXIT_OK)  # fmt: skip
    assert f"{seeded.id} (cli-formats): done" in log.read_text()
    out = cli("status", "-f", "csv", "-c", "id", "-c", "state", "--db", db, env=env, check_rc=EXIT_OK).stdout
    assert out == f"id,state\n{seeded.id},done\n"
    out = cli("status", "-f", "value", "-c", "state", "-c", "size", "--db", db, env=env, check_rc=EXIT_OK).stdout
    assert out == "done 3000\n"
    out = cli("status", "-f", "yaml", "-c", "id", "--db", db, env=env, check_rc=EXIT_OK).stdout
    assert out == f"- id: {seeded.id}\n"
    proc = cli("status", "-f", "csv", "-c", "nope", "--db", db, env=env, check_rc=EXIT_USAGE)
    assert "unknown column(s) nope" in _error_line(proc.stderr)
    assert seeded.id in cli("status", "--watch", "1", "-f", "table", "--db", db, env=env, check_rc=EXIT_OK).stdout

    cli("report", str(tmp_path / "audit.json"), "--db", db, env=env, check_rc=EXIT_OK)
    (record,) = json.loads((tmp_path / "audit.json").read_text())
    assert record["id"] == seeded.id and record["state"] == "done" and record["stores_before"] == "old"
    assert record["stores_after"] == "new" and record["os_hash_value_after"] == record["os_hash_value_before"]
    assert [e["to"] for e in record["events"]] == ["pending", "copy-requested", "copied", "old-removed", "done"]
    assert record["seconds"] is not None and record["attempts"] == 1
    cli("report", str(tmp_path / "audit.csv"), "--db", db, env=env, check_rc=EXIT_OK)
    header, row = (tmp_path / "audit.csv").read_text().splitlines()
    assert header.startswith("run,strategy,from_store,to_store,id,") and seeded.id in row


def test_interactive_terminal_gets_a_live_display_instead_of_step_lines(
    admin_conn: Connection, env: dict[str, str], tmp_path: Path
) -> None:
    seeded = [seed_image(admin_conn, f"cli-live-{i}", noise(2 * 1024 * 1024)) for i in range(3)]
    command = " ".join([*CLI, "run", "--from-store", "old", "--to-store", "new", "--workers", "2",
                        "--db", str(tmp_path / "s.db"), *[f"--image {s.id}" for s in seeded]])  # fmt: skip
    out = tmp_path / "tty.out"
    proc = subprocess.run(["script", "-qec", command, str(out)], env={**os.environ, **env},
                          capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == EXIT_OK, out.read_text(errors="replace")
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.read_text(errors="replace")).replace("\r", "\n")
    assert re.search(r"images\s.*3/3", screen) and "worker-1:" in screen, screen[-2000:]
    assert ": copy-requested: " not in screen  # the per-step log lines are for logs and pipes


def test_shell_completion_completes_commands() -> None:
    # what `--show-completion` prints in a bash (it looks for the shell among the parent processes, which an
    # orphaned test run does not have): the script, asked for by name
    script = cli(env={"_GLANCE_MIGRATOR_COMPLETE": "source_bash"}, check_rc=EXIT_OK).stdout
    assert "_glance_migrator_completion" in script
    proc = cli(env={"_GLANCE_MIGRATOR_COMPLETE": "complete_bash", "COMP_WORDS": "glance-migrator re",
                    "COMP_CWORD": "1"})  # fmt: skip
    assert proc.stdout.split() == ["report", "retry"]


def test_owner_and_visibility_filters_and_quiet(admin_conn: Connection, env: dict[str, str], tmp_path: Path) -> None:
    tag = noise(4).hex()
    public = seed_image(admin_conn, f"vis-{tag}-pub", noise(100), visibility="public")
    seed_image(admin_conn, f"vis-{tag}-priv", noise(100), visibility="private")
    owner = public.before["owner"]
    proc = cli("-q", "run", "--from-store", "old", "--to-store", "new", "--name", f"vis-{tag}-*", "--visibility",
               "public", "--owner", owner, "--db", str(tmp_path / "s.db"), env=env, check_rc=EXIT_OK)  # fmt: skip
    assert proc.stderr == ""  # -q: nothing but warnings and errors
    doc = json.loads(cli("status", "--json", "--db", str(tmp_path / "s.db"), env=env, check_rc=EXIT_OK).stdout)
    assert [img["id"] for img in doc["images"]] == [public.id]
    proc = cli("run", "--from-store", "old", "--to-store", "new", "--name", f"vis-{tag}-*", "--owner", "nobody",
               "--dry-run", env=env, check_rc=EXIT_OK)  # fmt: skip
    assert proc.stdout.splitlines()[-1].startswith("no image;")


def _big_run(path: Path, count: int) -> None:
    """A state DB holding a run of `count` images, some failed, as a long migration leaves it."""
    db = StateDB.open(str(path))
    rows = [
        (ImageRow(image_id=f"77777777-7777-4777-8777-{i:012d}", name=f"img-{i}", status="active", size=i,
                  stores="old", strategy=str(Strategy.COPY_IMAGE), state=str(State.PENDING), attempts=0), None)
        for i in range(count)
    ]  # fmt: skip
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, rows)
    for _ in range(3):
        claimed = db.claim_next(run.id, LeaseOwner.me(), set())
        assert claimed is not None
        db.transition(run.id, claimed.image_id, State.FAILED, "Glance said no")
        db.release(run.id, claimed.image_id, LeaseOwner.me())
    db.close()


def test_status_and_report_read_a_large_run_while_a_runner_holds_the_write_lock(tmp_path: Path) -> None:
    """status (summary, -f json/csv) and report read without taking the state DB's write lock, so a runner's
    transaction never waits for them (nor they for it), and they stream the images: the JSON is laid out as
    json.dump(indent=2) would, whatever the number of images."""
    db = tmp_path / "state.db"
    _big_run(db, 5000)
    runner = sqlite3.connect(db, isolation_level=None)
    runner.execute("BEGIN IMMEDIATE")  # a runner in the middle of recording a step
    try:
        env, args = {}, ("--db", str(db))
        summary = cli("status", *args, env=env, timeout=20, check_rc=EXIT_OK).stdout
        assert "5000 image(s)" in summary, summary
        assert "failed at pending: 77777777-7777-4777-8777-000000000002" in summary, summary
        shown = cli("status", "--json", *args, env=env, timeout=20, check_rc=EXIT_OK).stdout
        doc = json.loads(shown)
        assert shown == json.dumps(doc, indent=2) + "\n"
        assert doc["total"] == len(doc["images"]) == 5000 and doc["counts"]["failed"] == 3
        assert [i["id"] for i in doc["images"][:2]] == [f"77777777-7777-4777-8777-{i:012d}" for i in range(2)]
        listed = cli("status", "-f", "csv", "-c", "id", "-c", "state", *args, env=env, timeout=20, check_rc=EXIT_OK)
        assert listed.stdout.splitlines()[:2] == ["id,state", "77777777-7777-4777-8777-000000000000,failed"]
        assert len(listed.stdout.splitlines()) == 5001
        picked = json.loads(
            cli("status", "-f", "json", "-c", "id", *args, env=env, timeout=20, check_rc=EXIT_OK).stdout
        )
        assert len(picked) == 5000 and picked[0] == {"id": "77777777-7777-4777-8777-000000000000"}
        for name in ("audit.json", "audit.csv"):
            written = cli("report", str(tmp_path / name), *args, env=env, timeout=20, check_rc=EXIT_OK)
            assert "wrote 5000 image(s)" in written.stdout
        records = json.loads((tmp_path / "audit.json").read_text())
        assert len(records) == 5000 and [e["to"] for e in records[0]["events"]] == ["pending", "failed"]
        assert len((tmp_path / "audit.csv").read_text().splitlines()) == 5001
    finally:
        runner.execute("ROLLBACK")
        runner.close()


@pytest.mark.parametrize(
    ("db", "message"),
    [
        ("foo://bar", "--db foo://bar: not a state DB glance-migrator can use"),
        ("mysql://u@127.0.0.1/x", "give a SQLite file's path or postgresql+psycopg://"),
        ("postgresql+psycopg2://u:hunter2@127.0.0.1/x", "the PostgreSQL driver is not installed"),
        ("postgresql://u:hunter2@127.0.0.1:54x/x", "--db postgresql+psycopg://u:***@127.0.0.1:54x/x: not a state DB"),
        ("@/nonexistent/db-url", "--db @/nonexistent/db-url: cannot read it"),
    ],
)
def test_bad_db_url_is_a_usage_error_that_shows_no_password(
    admin_conn: Connection, env: dict[str, str], db: str, message: str
) -> None:
    seeded = seed_image(admin_conn, "cli-bad-db", noise(100))
    proc = cli("run", "--from-store", "old", "--to-store", "new", "--image", seeded.id, "--db", db, env=env)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert message in _error_line(proc.stderr) and "hunter2" not in proc.stderr + proc.stdout
    assert stores_of(admin_conn, seeded.id) == {"old"}


def test_db_url_from_the_environment_or_a_file(postgres: Postgres, tmp_path: Path) -> None:
    """`--db` stays off the command line: GLANCE_MIGRATOR_DB, or @FILE; a password typed on it is warned about."""
    url = postgres.create_database().replace("glance_migrator@", "glance_migrator:hunter2@")
    env = {"GLANCE_MIGRATOR_DB": url}
    empty = cli("status", env=env)
    assert empty.returncode == EXIT_USAGE and "holds no run yet" in empty.stderr, empty.stderr
    assert "hunter2" not in empty.stderr and "command line" not in empty.stderr
    url_file = tmp_path / "db-url"
    url_file.write_text(url + "\n")
    from_file = cli("status", "--db", f"@{url_file}", env={})
    assert from_file.returncode == EXIT_USAGE and "holds no run yet" in from_file.stderr, from_file.stderr
    typed = cli("status", "--db", url, env={})
    assert "password is on the command line" in typed.stderr and "hunter2" not in typed.stderr, typed.stderr
