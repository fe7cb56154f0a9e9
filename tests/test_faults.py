"""Network faults between glance-migrator and Glance, injected by a proxy (tests/faultproxy.py).

The tool reaches Glance through the proxy only: the test's clouds.yaml is the lab's with
`image_endpoint_override` pointing at the proxy (Keystone is reached directly). Each scenario migrates a
few images while faults are injected; if the run stopped, `run --resume` follows without faults; then the
shared checkers verify the invariants (every image done, in the target store only, byte-identical,
metadata unchanged, exactly one copy for location-swap) by asking Glance directly, not through the proxy.

Scenarios: (a) 503 bursts, short and long, and a 503 to the upload of the copy; (b) connection resets in
the middle of a download; (c) in the middle of the copy's upload; (d) stalls longer than the tool's read
timeout (`--timeout`, set to STALL_TIMEOUT through GLANCE_MIGRATOR_TIMEOUT): before the answer to an API
call of a copy-image run (a GET, the import POST, the store DELETE: Glance may have acted on the last two),
and in the middle of a download's body in a location-swap run, spooled and not; each run must end well
before the stall would have, so the tool really gave up on the silent connection; (e) lost answers (Glance
acted, the answer never arrived).
"""

from __future__ import annotations

import hashlib
import http.client
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openstack.config
import openstack.connection
import pytest
import yaml
from openstack.connection import Connection

from glance_migrator.errors import EXIT_CLOUD, EXIT_OK, EXIT_PARTIAL
from tests.faultproxy import IMAGE_DATA, FaultProxy
from tests.glancetools import (
    Seeded,
    backend_objects,
    cli,
    cli_popen,
    copies_of,
    event_count,
    noise,
    seed_image,
    status_json,
    wait_for,
)
from tests.invariants import Invariants

MiB = 1 << 20
RUN_TIMEOUT = 180.0  # one CLI run of a few images, on a busy 2-CPU machine
SAVED = "progress is saved"  # what a run stopped by GlanceUnavailable says
STALL_TIMEOUT = 4  # the tool's --timeout (GLANCE_MIGRATOR_TIMEOUT) in the stall tests: a silent Glance is given up on
STALL = 90.0  # how long the proxy holds a stalled answer: a run that waited for it would take longer than this


@dataclass
class Proxied:
    lab: Any
    proxy: FaultProxy
    env: dict[str, str]  # the tool's environment: its clouds.yaml sends the Image API through the proxy
    conn: Connection  # straight to Glance, for seeding and checking
    tmp: Path
    invariants: Invariants
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def check(self, images: list[Seeded]) -> None:
        """The shared invariants (tests/invariants.py), asked of Glance directly, with the faults as injected."""
        _used_the_proxy(self, images)
        db, faults = self.tmp / "state.db", dict(self.proxy.injected)
        self.invariants.check(self.lab, self.conn, db, self.env, images, faults=faults)

    def popen(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        proc = cli_popen(*args, env=self.env, log=log)
        self.procs.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen[bytes], log: Path, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            pytest.fail(f"the run did not end within {timeout} s\n{log.read_text()}\n{self.proxy.report()}")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, env=self.env, timeout=RUN_TIMEOUT)


def proxied_clouds_yaml(lab: Any, proxy: FaultProxy, directory: Path) -> Path:
    """The lab's clouds.yaml, with every cloud's image endpoint overridden to go through the proxy."""
    config = yaml.safe_load(lab.clouds_yaml.read_text())
    for cloud in config["clouds"].values():
        cloud["image_endpoint_override"] = proxy.url
    path = directory / "clouds.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def _proxied(lab: Any, tmp_path: Path, invariants: Invariants) -> Iterator[Proxied]:
    proxy = FaultProxy(lab.glance_port).start()
    env = {**lab.env(), "OS_CLIENT_CONFIG_FILE": str(proxied_clouds_yaml(lab, proxy, tmp_path))}
    conn = lab.connect()
    here = Proxied(lab, proxy, env, conn, tmp_path, invariants)
    try:
        yield here
    finally:
        for proc in here.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        conn.close()
        proxy.stop()
        print(proxy.report())  # shown with the test's output (-s, -rA, or on a failure)


@pytest.fixture
def via_proxy(lab: Any, tmp_path: Path, invariants: Invariants) -> Iterator[Proxied]:
    """The `lab` (stores old, new) behind a fault proxy."""
    with _proxied(lab, tmp_path, invariants) as here:
        yield here


@pytest.fixture
def full_via_proxy(full_lab: Any, tmp_path: Path, invariants: Invariants) -> Iterator[Proxied]:
    """The `full_lab` (stores old, new, s3, ceph) behind a fault proxy."""
    with _proxied(full_lab, tmp_path, invariants) as here:
        yield here


def _seed(conn: Connection, prefix: str, sizes: list[int]) -> list[Seeded]:
    identity: Any = conn.identity  # (a v2 or v3 proxy to mypy; the lab speaks v3)
    demo = identity.find_project("demo").id
    kinds: list[dict[str, Any]] = [
        {"visibility": "shared", "members": [demo], "tags": ["gold"]},
        {"hidden": True, "os_distro": "cirros"},
        {"visibility": "community"},
        {},
    ]
    return [seed_image(conn, f"{prefix}-{i}", noise(n), **kinds[i % len(kinds)]) for i, n in enumerate(sizes)]


def _select(images: list[Seeded]) -> list[str]:
    return [arg for s in images for arg in ("--image", s.id)]


def _used_the_proxy(p: Proxied, images: list[Seeded]) -> None:
    """The tool's Image API calls really went through the proxy (else the faults proved nothing)."""
    seen = "\n".join(p.proxy.requests)
    assert all(s.id in seen for s in images), f"the tool bypassed the proxy?\n{p.proxy.report()}"


def _clean_stop(rc: int, output: str, report: str) -> None:
    """A run hit by network faults either rides them out (0) or stops resumable (3, saying so); never a crash."""
    assert rc in (EXIT_OK, EXIT_CLOUD), f"exit code {rc}\n{output}\n{report}"
    assert "Traceback" not in output and "internal error" not in output, f"{output}\n{report}"
    if rc == EXIT_CLOUD:
        assert SAVED in output, output


# --------------------------------------------------------------------------------------------------
# the proxy itself: it injects what it is told, and nothing else
# --------------------------------------------------------------------------------------------------


def test_the_proxy_injects_what_it_is_told(via_proxy: Proxied) -> None:
    p = via_proxy
    data = noise(3 * MiB)
    seeded = seed_image(p.conn, "proxy-self-test", data)
    token = p.conn.session.get_token()
    assert token is not None
    headers = {"X-Auth-Token": token}

    def get(path: str, timeout: float = 30) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", p.proxy.port, timeout=timeout)
        try:
            c.request("GET", path, headers=headers)
            response = c.getresponse()
            return response.status, response.read()
        finally:
            c.close()

    # The proxied clouds.yaml sends openstacksdk's image calls to the proxy.
    config = openstack.config.OpenStackConfig(
        config_files=[p.env["OS_CLIENT_CONFIG_FILE"]], vendor_files=[], secure_files=[], load_envvars=False
    )
    sdk = openstack.connection.Connection(config=config.get_one("lab-admin"))
    assert str(sdk.image.get_endpoint()).startswith(p.proxy.url)
    assert sdk.image.get(f"/images/{seeded.id}").json()["id"] == seeded.id
    sdk.close()

    # Pass-through: the bytes arrive intact.
    status, body = get(f"/v2/images/{seeded.id}/file")
    assert status == 200 and hashlib.sha512(body).hexdigest() == seeded.sha512

    # A reset mid-body: the client gets part of the body, then ECONNRESET (or a short read).
    p.proxy.reset_response(MiB)
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
        get(f"/v2/images/{seeded.id}/file")
    status, body = get(f"/v2/images/{seeded.id}/file")  # used up: the next one passes
    assert status == 200 and len(body) == len(data)

    # A burst of 503s, not forwarded, then normal answers.
    p.proxy.burst_503(2)
    assert [get(f"/v2/images/{seeded.id}")[0] for _ in range(3)] == [503, 503, 200]

    # A stall longer than the client's read timeout: before the answer, or in the middle of its body.
    p.proxy.stall(4.0)
    with pytest.raises(TimeoutError):
        get(f"/v2/images/{seeded.id}", timeout=1.0)
    p.proxy.stall(4.0, after_bytes=MiB, path=IMAGE_DATA)
    with pytest.raises(TimeoutError):
        get(f"/v2/images/{seeded.id}/file", timeout=1.0)
    assert get(f"/v2/images/{seeded.id}")[0] == 200

    # A lost answer: Glance acts, the client sees a reset instead of the answer.
    p.proxy.drop_response(method="PATCH")
    c = http.client.HTTPConnection("127.0.0.1", p.proxy.port, timeout=30)
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        ops = b'[{"op": "add", "path": "/lost_answer", "value": "yes"}]'
        content_type = "application/openstack-images-v2.1-json-patch"
        c.request("PATCH", f"/v2/images/{seeded.id}", body=ops, headers={**headers, "Content-Type": content_type})
        c.getresponse().read()
    c.close()
    assert p.conn.image.get(f"/images/{seeded.id}").json()["lost_answer"] == "yes"

    # An upload cut mid-body: the client's send breaks; Glance never gets the whole image.
    resp = p.conn.image.post(
        "/images", json={"name": "proxy-cut-upload", "disk_format": "raw", "container_format": "bare"}
    )
    upload_id = resp.json()["id"]
    p.proxy.reset_request(MiB)
    c = http.client.HTTPConnection("127.0.0.1", p.proxy.port, timeout=30)
    with pytest.raises((ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        c.request(
            "PUT",
            f"/v2/images/{upload_id}/file",
            body=data,
            headers={**headers, "Content-Type": "application/octet-stream"},
        )
        c.getresponse().read()
    c.close()
    assert wait_for(lambda: p.conn.image.get(f"/images/{upload_id}").json()["status"] == "queued", timeout=30)
    assert p.conn.image.delete(f"/images/{upload_id}").status_code == 204

    assert dict(p.proxy.injected) == {"reset_response": 1, "503": 2, "stall": 2, "drop_response": 1, "reset_request": 1}
    assert p.proxy.armed() == 0


# --------------------------------------------------------------------------------------------------
# (a) 503 bursts
# --------------------------------------------------------------------------------------------------


def test_short_503_bursts_are_retried_transparently(via_proxy: Proxied) -> None:
    """Short bursts of 503s (Glance restarting behind a load balancer): retried, the run finishes (exit 0).

    The tool turns keystoneauth's own 503 retries off and retries each call 6 times in all (tenacity), so a
    burst shorter than that, whichever calls it lands on, is ridden out; the longer outage is the next test.
    """
    p = via_proxy
    images = _seed(p.conn, "burst", [5 * MiB, 3 * MiB + 17, 64 * 1024, MiB])
    db, log = p.tmp / "state.db", p.tmp / "run.log"
    p.proxy.burst_503(3)  # hits the preflight
    proc = p.popen("run", "--from-store", "old", "--to-store", "new", *_select(images), "--db", str(db),
                   "--workers", "2", log=log)  # fmt: skip
    bursts: list[tuple[int, dict[str, Any]]] = [(2, {}), (6, {"retry_after": 0, "count": 5})]
    for threshold, burst in bursts:  # and two more in mid-run
        assert wait_for(lambda t=threshold: event_count(db) >= t or proc.poll() is not None, timeout=90)
        assert proc.poll() is None, f"the run ended before the burst at {threshold} events\n{log.read_text()}"
        p.proxy.burst_503(**{"count": 3, **burst})
    rc = p.wait(proc, log)
    output = log.read_text()
    assert rc == EXIT_OK, f"{output}\n{p.proxy.report()}"
    assert p.proxy.injected["503"] == 11 and p.proxy.armed() == 0, p.proxy.report()
    assert "Retrying" in output and "Traceback" not in output, output  # the tool's own retry (tenacity)
    p.check(images)
    doc = status_json(db, p.env)
    assert doc["run"]["complete"] and doc["counts"]["done"] == len(images)


def test_copy_image_asks_glance_per_image_only_about_that_image(via_proxy: Proxied) -> None:
    """What a copy-image run asks Glance, counted at the proxy: per image, its import, its own image, its tasks
    (once, the proof of the copy) and its store delete; never a search of the whole catalogue (those cost two
    list calls each, hidden and not, and grow with the cloud). The catalogue is listed a bounded number of times
    (discovery, the sharing index), whatever the number of images."""
    p = via_proxy
    images = _seed(p.conn, "requests", [4096] * 6)
    p.proxy.requests.clear()
    p.run("run", "--from-store", "old", "--to-store", "new", *_select(images), "--db", str(p.tmp / "state.db"))
    seen = list(p.proxy.requests)
    assert not [r for r in seen if "glance_migrator_copy_of" in r], seen  # no search for copies per image
    lists = [r for r in seen if r.startswith("GET /v2/images?")]
    assert len(lists) <= 8, lists  # discovery, the index's reads: a few, not some per image
    # discovery reads the --image ids in one list, then the two hidden ones, which it did not show, in another
    by_id = [r for r in lists if "id=in:" in r]
    assert len(by_id) == 2 and "os_hidden=false" in by_id[0] and "os_hidden=true" in by_id[1], by_id
    assert all(seeded.id in by_id[0] for seeded in images), by_id
    assert sorted(seeded.id for seeded in images if seeded.id in by_id[1]) == sorted(s.id for s in images[1::4])
    for seeded in images:
        mine = [r for r in seen if seeded.id in r and r not in lists]
        assert [r.split("?")[0] for r in mine if "/tasks" in r] == [f"GET /v2/images/{seeded.id}/tasks"], mine
        assert sum(r.startswith("POST") for r in mine) == 1 and sum(r.startswith("DELETE") for r in mine) == 1, mine
        # the copy asked for at once, no read of the image first: a read before it shows nothing more
        assert mine[0] == f"POST /v2/images/{seeded.id}/import", mine
        # the delete starts from the image as the copy step last read it (copied, unlocked), not a read again ms
        # later; after it, one read to see the old store gone, which the final check starts from
        proof = next(i for i, r in enumerate(mine) if "/tasks" in r)
        delete = next(i for i, r in enumerate(mine) if r.startswith("DELETE"))
        assert proof < delete and mine[proof + 1 : delete] == [], mine
        assert mine[delete + 1 :] == [f"GET /v2/images/{seeded.id}"], mine
    p.check(images)


def test_an_image_glance_keeps_failing_fails_alone_and_the_run_goes_on(via_proxy: Proxied) -> None:
    """Glance answers 503 to every copy request of one image while it serves everything else: that image fails
    after bounded retries with the reason, the others move; `retry` finishes it once Glance is well again."""
    p = via_proxy
    images = _seed(p.conn, "one-bad", [MiB, 64 * 1024, 3 * MiB])
    bad = images[1]
    p.proxy.burst_503(100_000, path=f"/v2/images/{bad.id}/import", method="POST")
    db = p.tmp / "state.db"
    proc = p.run("run", "--from-store", "old", "--to-store", "new", *_select(images), "--db", str(db))
    assert proc.returncode == EXIT_PARTIAL, f"exit code {proc.returncode}\n{proc.stderr}\n{p.proxy.report()}"
    assert "Traceback" not in proc.stderr and SAVED not in proc.stderr, proc.stderr
    rows = {row["id"]: row for row in status_json(db, p.env)["images"]}
    assert rows[bad.id]["state"] == "failed" and "while it answered other requests" in rows[bad.id]["error"]
    assert all(rows[s.id]["state"] == "done" for s in images if s is not bad), rows
    assert p.proxy.injected["503"] >= 12, p.proxy.report()  # two attempts of the step, each with its retries
    p.invariants.check(p.lab, p.conn, db, p.env, images, faults=dict(p.proxy.injected), expect={bad.id: "failed"})

    # A retry loop (`until glance-migrator run --resume; do sleep 60; done`) ends: a resume cannot move it.
    resumed = p.run("run", "--resume", "--db", str(db))
    assert resumed.returncode == EXIT_OK and "1 failed or blocked image(s) wait for" in resumed.stderr, resumed.stderr

    p.proxy.pass_through()
    retried = p.run("retry", bad.id, "--db", str(db))
    assert retried.returncode == EXIT_OK, retried.stderr
    p.check(images)


def test_long_503_outage_stops_the_run_resumably_then_resume_finishes(via_proxy: Proxied) -> None:
    """Glance answers only 503 for longer than the retries last: exit 3, 'progress is saved'; resume finishes."""
    p = via_proxy
    images = _seed(p.conn, "outage", [5 * MiB, 3 * MiB + 17, 64 * 1024, MiB])
    db, log = p.tmp / "state.db", p.tmp / "run.log"
    proc = p.popen("run", "--from-store", "old", "--to-store", "new", *_select(images), "--db", str(db), log=log)
    assert wait_for(lambda: event_count(db) >= 3 or proc.poll() is not None, timeout=90)
    assert proc.poll() is None, f"the run ended before the outage\n{log.read_text()}"
    # Every Image API call, until disarmed. The tool turns keystoneauth's own 503 retries off, so the outage
    # is declared after its 6 attempts (0.5 + 1 + 2 + 4 + 8 s of backoff), as the README says.
    p.proxy.burst_503(100_000, retry_after=0)
    rc = p.wait(proc, log, timeout=150)
    output = log.read_text()
    assert rc == EXIT_CLOUD, f"exit code {rc}\n{output}\n{p.proxy.report()}"
    assert SAVED in output and "--resume" in output and "Traceback" not in output, output
    assert p.proxy.injected["503"] >= 6, p.proxy.report()  # every retry was spent
    doc = status_json(db, p.env)
    assert not doc["run"]["complete"] and doc["counts"]["done"] < len(images), doc["counts"]

    p.proxy.pass_through()
    resumed = p.run("run", "--resume", "--db", str(db))
    assert resumed.returncode == EXIT_OK, resumed.stderr
    p.check(images)
    doc = status_json(db, p.env)
    assert doc["run"]["complete"] and doc["counts"]["done"] == len(images)


# --------------------------------------------------------------------------------------------------
# (b), (c) connection resets in the middle of image data (location-swap to S3)
# --------------------------------------------------------------------------------------------------


def _swap_with_faults(p: Proxied, images: list[Seeded], spooled: bool, target: str = "s3") -> tuple[int, str]:
    """Run a location-swap to `target` with the faults armed; then, if it stopped, resume without faults."""
    db = p.tmp / "state.db"
    spool = ["--spool-dir", str(p.tmp / "spool")] if spooled else ["--no-spool"]
    first = p.run("run", "--from-store", "old", "--to-store", target, "--strategy", "location-swap",
                  *_select(images), *spool, "--db", str(db))  # fmt: skip
    (p.tmp / "run.log").write_text(first.stderr)
    report = p.proxy.report()
    p.proxy.pass_through()
    _clean_stop(first.returncode, first.stderr, report)
    if first.returncode != EXIT_OK:
        resumed = p.run("run", "--resume", "--db", str(db))
        (p.tmp / "resume.log").write_text(resumed.stderr)
        assert resumed.returncode == EXIT_OK, resumed.stderr
    return first.returncode, first.stderr


def _check_swapped(p: Proxied, images: list[Seeded], before: set[str], spooled: bool, target: str = "s3") -> None:
    """The invariants, and no object left in the backend (`before`: backend_objects then) by a broken transfer."""
    for seeded in images:
        copies = copies_of(p.conn, seeded.id)  # (assert_swapped checks this too, with a terse message)
        assert len(copies) == 1, f"{seeded.id}: {len(copies)} copies: " + "; ".join(
            f"{c['id']} status={c['status']} protected={c['protected']} stores={c.get('stores')!r}" for c in copies
        )
    p.check(images)
    db = p.tmp / "state.db"
    doc = status_json(db, p.env)
    assert doc["run"]["complete"] and doc["counts"]["done"] == len(images)
    # No object left in the backend by a broken transfer: every new object is the data of one of our copies.
    copy_ids = {img["copy_image_id"] for img in doc["images"]}
    new_objects = backend_objects(p.lab, target) - before
    assert new_objects == copy_ids, (new_objects, copy_ids)
    if spooled:
        assert list((p.tmp / "spool").iterdir()) == []


@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no-spool"])
def test_connection_reset_mid_download(full_via_proxy: Proxied, spooled: bool) -> None:
    """(b) Two downloads of image data break after 1 MiB (RST); the run rides it out or stops resumably."""
    p = full_via_proxy
    images = _seed(p.conn, f"reset-get-{spooled}", [5 * MiB, 3 * MiB + 1, 64 * 1024])
    s3_before = backend_objects(p.lab, "s3")
    p.proxy.reset_response(MiB, times=2, path=IMAGE_DATA, method="GET")
    _swap_with_faults(p, images, spooled)
    assert p.proxy.injected["reset_response"] >= 1, p.proxy.report()
    _check_swapped(p, images, s3_before, spooled)


@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no-spool"])
def test_connection_reset_mid_upload_of_the_copy(full_via_proxy: Proxied, spooled: bool) -> None:
    """(c) Two uploads of the copy into s3 break after 1 MiB (RST): the broken copy is deleted, the upload redone."""
    p = full_via_proxy
    images = _seed(p.conn, f"reset-put-{spooled}", [5 * MiB, 3 * MiB + 1, 64 * 1024])
    s3_before = backend_objects(p.lab, "s3")
    p.proxy.reset_request(MiB, times=2, path=IMAGE_DATA, method="PUT")
    _swap_with_faults(p, images, spooled)
    assert p.proxy.injected["reset_request"] >= 1, p.proxy.report()
    _check_swapped(p, images, s3_before, spooled)


def _resent_uploads(proxy: FaultProxy) -> list[str]:
    """Uploads sent twice to the same image: a resend of a stream that was already consumed."""
    puts = [r for r in proxy.requests if r.startswith("PUT ") and r.endswith("/file")]
    return sorted({r for r in puts if puts.count(r) > 1})


@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no-spool"])
def test_503_on_the_upload_of_the_copy(full_via_proxy: Proxied, spooled: bool) -> None:
    """(a) One 503 answers the upload of the copy. Its body is a stream, consumed by then: the tool must not
    send that request again (it makes a new copy and uploads that instead)."""
    p = full_via_proxy
    images = _seed(p.conn, f"put-503-{spooled}", [5 * MiB, 64 * 1024])
    s3_before = backend_objects(p.lab, "s3")
    p.proxy.burst_503(1, path=IMAGE_DATA, method="PUT")
    db, log = p.tmp / "state.db", p.tmp / "run.log"
    spool = ["--spool-dir", str(p.tmp / "spool")] if spooled else ["--no-spool"]
    proc = p.popen("run", "--from-store", "old", "--to-store", "s3", "--strategy", "location-swap",
                   *_select(images), *spool, "--db", str(db), log=log)  # fmt: skip
    # A resent upload has no body left to send: Glance waits for it until its socket timeout (60 s in the lab).
    wait_for(lambda: proc.poll() is not None or _resent_uploads(p.proxy), timeout=RUN_TIMEOUT, interval=0.2)
    assert not _resent_uploads(p.proxy), (
        f"an upload whose body was already consumed was sent again: {_resent_uploads(p.proxy)}\n"
        f"{p.proxy.report()}\n{log.read_text()}\nthe request heads:\n"
        + "\n".join(h for h in p.proxy.heads if h.startswith("PUT "))
    )
    rc = p.wait(proc, log)
    p.proxy.pass_through()
    _clean_stop(rc, log.read_text(), p.proxy.report())
    assert p.proxy.injected["503"] == 1, p.proxy.report()
    if rc != EXIT_OK:
        resumed = p.run("run", "--resume", "--db", str(db))
        assert resumed.returncode == EXIT_OK, resumed.stderr
    _check_swapped(p, images, s3_before, spooled)


# --------------------------------------------------------------------------------------------------
# (d) stalls: the answer stops coming, for far longer than the tool's read timeout
# --------------------------------------------------------------------------------------------------


def _gave_up_on_the_stalls(p: Proxied, times: int, elapsed: float, output: str) -> None:
    """The stalls were injected, the tool timed out on them (saying so), and did not sit them out."""
    assert p.proxy.injected["stall"] == times and p.proxy.armed() == 0, p.proxy.report()
    assert "timed out" in output, f"no read timeout reported\n{output}\n{p.proxy.report()}"
    # Had the tool waited for a stalled answer, the proxy would have cut it (RST) only after STALL seconds.
    assert elapsed < STALL, f"the run took {elapsed:.0f} s: it sat out a {STALL:.0f} s stall\n{output}"


@pytest.mark.parametrize(
    ("method", "path", "times"),
    [
        ("GET", r"^/v2/images/[0-9a-f-]+$", 2),
        ("POST", r"^/v2/images/[0-9a-f-]+/import$", 2),
        ("DELETE", r"^/v2/stores/", 1),
    ],
    ids=["get-image", "import", "store-delete"],
)
def test_stall_before_the_answer_copy_image(via_proxy: Proxied, method: str, path: str, times: int) -> None:
    """(d) Answers to a copy-image run's API calls are held back for STALL s (then cut), far beyond --timeout.

    The tool gives up on each silent request after STALL_TIMEOUT s and sends it again. Glance had acted on a
    stalled import POST or store DELETE: the repeated request meets the running copy (409) or the deleted
    copy (404), and the tool must see that its first request landed.
    """
    p = via_proxy
    p.env["GLANCE_MIGRATOR_TIMEOUT"] = str(STALL_TIMEOUT)
    images = _seed(p.conn, f"stall-{method}", [5 * MiB, 64 * 1024, MiB])
    db, log = p.tmp / "state.db", p.tmp / "run.log"
    started = time.monotonic()
    proc = p.popen("run", "--from-store", "old", "--to-store", "new", *_select(images), "--db", str(db), log=log)
    # Armed once the first image has its copy requested: the stalls hit the steps, not discovery.
    assert wait_for(lambda: event_count(db) >= 1 or proc.poll() is not None, timeout=90)
    assert proc.poll() is None, f"the run ended before the stall was armed\n{log.read_text()}"
    p.proxy.stall(STALL, times=times, method=method, path=path)
    rc = p.wait(proc, log)
    elapsed = time.monotonic() - started
    output = log.read_text()
    report = p.proxy.report()
    p.proxy.pass_through()
    _clean_stop(rc, output, report)
    _gave_up_on_the_stalls(p, times, elapsed, output)
    if rc != EXIT_OK:
        resumed = p.run("run", "--resume", "--db", str(db))
        assert resumed.returncode == EXIT_OK, resumed.stderr
    p.check(images)
    doc = status_json(db, p.env)
    assert doc["run"]["complete"] and doc["counts"]["done"] == len(images), doc["counts"]


@pytest.mark.parametrize(("target", "spooled"), [("s3", True), ("ceph", False)], ids=["s3-spool", "ceph-no-spool"])
def test_stall_in_the_middle_of_a_download_location_swap(full_via_proxy: Proxied, target: str, spooled: bool) -> None:
    """(d) Two downloads of image data stall after 1 MiB of their body, for STALL s, far beyond --timeout.

    The tool gives up on each after STALL_TIMEOUT s and downloads again from the first byte; with --no-spool the
    upload the download was feeding is abandoned and its copy deleted. Nothing is left in the target store but
    the one copy of each image.
    """
    p = full_via_proxy
    p.env["GLANCE_MIGRATOR_TIMEOUT"] = str(STALL_TIMEOUT)
    images = _seed(p.conn, f"stall-body-{target}", [5 * MiB, 3 * MiB + 1, 64 * 1024])
    before = backend_objects(p.lab, target)
    p.proxy.stall(STALL, after_bytes=MiB, times=2, path=IMAGE_DATA, method="GET")
    started = time.monotonic()
    _, output = _swap_with_faults(p, images, spooled, target)
    _gave_up_on_the_stalls(p, 2, time.monotonic() - started, output)
    _check_swapped(p, images, before, spooled, target)


# --------------------------------------------------------------------------------------------------
# (e) lost answers: Glance did what was asked, but the answer never arrived (RST before its first byte)
# --------------------------------------------------------------------------------------------------


def test_lost_answers_copy_image(via_proxy: Proxied) -> None:
    """The answers to copy-image requests and to store deletes are lost; the tool asks again and copes."""
    p = via_proxy
    images = _seed(p.conn, "lost-copy", [5 * MiB, 64 * 1024, MiB])
    db, log = p.tmp / "state.db", p.tmp / "run.log"
    p.proxy.drop_response(times=2, method="POST", path=r"^/v2/images/[0-9a-f-]+/import$")
    p.proxy.drop_response(times=2, method="DELETE", path=r"^/v2/stores/")
    proc = p.popen("run", "--from-store", "old", "--to-store", "new", *_select(images), "--db", str(db), log=log)
    rc = p.wait(proc, log)
    p.proxy.pass_through()
    _clean_stop(rc, log.read_text(), p.proxy.report())
    assert p.proxy.injected["drop_response"] == 4, p.proxy.report()
    if rc != EXIT_OK:
        resumed = p.run("run", "--resume", "--db", str(db))
        assert resumed.returncode == EXIT_OK, resumed.stderr
    p.check(images)


@pytest.mark.parametrize(
    ("method", "path", "times"),
    [("POST", r"^/v2/images$", 2), ("PATCH", r"^/v2/images/[0-9a-f-]+$", 6)],
    ids=["create-copy", "patch"],
)
def test_lost_answers_location_swap(full_via_proxy: Proxied, method: str, path: str, times: int) -> None:
    """Every other answer to the copy's creation, or to the patches (protect, add and remove locations), is lost."""
    p = full_via_proxy
    images = _seed(p.conn, f"lost-{method}", [5 * MiB, 64 * 1024, MiB])
    s3_before = backend_objects(p.lab, "s3")
    p.proxy.drop_response(times=times, method=method, path=path, every=2)
    _swap_with_faults(p, images, spooled=True)
    assert p.proxy.injected["drop_response"] == times, p.proxy.report()
    _check_swapped(p, images, s3_before, spooled=True)
