"""Helpers for tests against the real Glance: seed images, snapshot them, run the CLI, check invariants."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openstack.connection import Connection

from tests.lab import CEPH_POOL

# Keys that legitimately change when an image's data moves between stores.
VOLATILE = {
    "updated_at",
    "stores",
    "locations",
    "direct_url",
    "file",
    "schema",
    "self",
    "os_glance_import_task",
    "os_glance_importing_to_stores",
    "os_glance_failed_import",
}

# The installed tool (./dev test puts this checkout's wheel beside the test's Python); tests/test_packaging.py
# points the CLI contract tests at another install, at the dependency floors, through this variable.
CLI = [os.environ.get("GLANCE_MIGRATOR_TEST_CLI") or str(Path(sys.executable).with_name("glance-migrator"))]


def noise(size: int) -> bytes:
    """`size` random bytes that Glance takes as a raw image.

    From Glance 30 an upload is inspected, and raw data whose bytes 510-511 are the MBR signature (55 aa) must hold
    a valid partition table or it is refused (415, "Image failed safety checks"): 1 in 65,536 of random buffers.
    """
    data = bytearray(os.urandom(size))
    if data[510:512] == b"\x55\xaa":
        data[511] = 0
    return bytes(data)


@dataclass
class Seeded:
    id: str
    data: bytes
    before: dict[str, Any]
    members: list[str] = field(default_factory=list)

    @property
    def sha512(self) -> str:
        return hashlib.sha512(self.data).hexdigest()


def raw_image(conn: Connection, image_id: str) -> dict[str, Any] | None:
    resp = conn.image.get(f"/images/{image_id}")
    return None if resp.status_code == 404 else dict(resp.json())


def seed_image(
    conn: Connection,
    name: str,
    data: bytes | None,
    *,
    visibility: str = "private",
    hidden: bool = False,
    tags: list[str] | None = None,
    members: list[str] | None = None,
    protected: bool = False,
    store: str | None = None,
    **props: str,
) -> Seeded:
    """Create an image (with data unless `data` is None: it stays queued) in `store` (default: the default store)."""
    body: dict[str, Any] = {
        "name": name,
        "disk_format": "raw",
        "container_format": "bare",
        "visibility": visibility,
        "os_hidden": hidden,
        "tags": tags or [],
        **props,
    }
    resp = conn.image.post("/images", json=body)
    assert resp.status_code == 201, resp.text
    image_id = resp.json()["id"]
    if data is not None:
        resp = conn.image.put(
            f"/images/{image_id}/file",
            data=io.BytesIO(data),
            headers={"Content-Type": "application/octet-stream", **({"X-Image-Meta-Store": store} if store else {})},
        )
        assert resp.status_code == 204, resp.text
    for member in members or []:
        resp = conn.image.post(f"/images/{image_id}/members", json={"member": member})
        assert resp.status_code == 200, resp.text
    if protected:
        patch(conn, image_id, [{"op": "replace", "path": "/protected", "value": True}])
    image = raw_image(conn, image_id)
    assert image is not None
    if data is not None:
        assert image["os_hash_value"] == hashlib.sha512(data).hexdigest()
    return Seeded(image_id, data or b"", stable(image), sorted(members or []))


def patch(conn: Connection, image_id: str, ops: list[dict[str, Any]]) -> None:
    resp = conn.image.patch(
        f"/images/{image_id}",
        json=ops,
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
    )
    assert resp.status_code == 200, resp.text


def stable(image: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in image.items() if k not in VOLATILE}


def stores_of(conn: Connection, image_id: str) -> set[str]:
    image = raw_image(conn, image_id) or {}
    return {s for s in str(image.get("stores") or "").split(",") if s}


def members_of(conn: Connection, image_id: str) -> list[str]:
    resp = conn.image.get(f"/images/{image_id}/members")
    if resp.status_code == 403 and (raw_image(conn, image_id) or {}).get("visibility") != "shared":
        return []  # Glance keeps member lists for shared images only
    assert resp.status_code == 200, resp.text
    return sorted(m["member_id"] for m in resp.json().get("members", []))


def download_sha512(conn: Connection, image_id: str) -> str:
    resp = conn.image.get(f"/images/{image_id}/file", stream=True)
    assert resp.status_code == 200, resp.status_code
    digest = hashlib.sha512()
    for chunk in resp.iter_content(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def assert_migrated(conn: Connection, lab: Any, seeded: Seeded, from_store: str, to_store: str) -> None:
    """The invariants of a finished migration, for one image: same image, same bytes, new store only."""
    image = raw_image(conn, seeded.id)
    assert image is not None, f"{seeded.id} vanished"
    assert image["status"] == "active"
    assert stores_of(conn, seeded.id) == {to_store}, f"{seeded.id}: stores {image.get('stores')}"
    assert same_metadata(seeded, image), f"{seeded.id}: metadata changed"
    assert members_of(conn, seeded.id) == seeded.members
    assert download_sha512(conn, seeded.id) == seeded.sha512
    if lab.store(from_store).driver == "file":
        assert not (lab.store_dir(from_store) / seeded.id).exists(), "old data file left behind"
    if lab.store(to_store).driver == "file":
        assert (lab.store_dir(to_store) / seeded.id).exists()


def same_metadata(seeded: Seeded, image: dict[str, Any], **changed: Any) -> bool:
    """The image's metadata is as seeded (but for `changed`). An image that had no multihash (pre-Rocky: md5
    only) gets one when Glance writes its data (copy-image): of the right bytes, with Glance's algorithm."""
    now, before = stable(image), {**seeded.before, **changed}
    if before.get("os_hash_value") is None and now.get("os_hash_value") is not None:
        algo = now["os_hash_algo"]
        assert now["os_hash_value"] == hashlib.new(algo, seeded.data).hexdigest(), f"{seeded.id}: wrong {algo}"
        now.update(os_hash_algo=None, os_hash_value=None)
    return now == before


def backend_objects(lab: Any, store: str) -> set[str]:
    """The image ids whose data the backend of `store` (s3 or rbd) holds: S3 object keys' last part, or the
    RBD image names in the Ceph pool. Taken before and after a scenario: what a broken transfer left behind."""
    if lab.store(store).driver == "s3":
        return {key.rsplit("/", 1)[-1] for key in lab.s3_objects()}
    return set(lab.rbd("ls", CEPH_POOL).split())


def delete_all_images(conn: Connection) -> None:
    """Leave Glance empty, so a test that discovers every image sees only its own."""
    for hidden in ("false", "true"):
        while True:
            images = conn.image.get(f"/images?visibility=all&os_hidden={hidden}&limit=200").json()["images"]
            if not images:
                break
            for image in images:
                if image.get("protected"):
                    patch(conn, image["id"], [{"op": "replace", "path": "/protected", "value": False}])
                if image.get("status") == "deactivated":
                    conn.image.post(f"/images/{image['id']}/actions/reactivate")
                resp = conn.image.delete(f"/images/{image['id']}")
                assert resp.status_code in (204, 404), resp.text


def cli(
    *args: str, env: dict[str, str], timeout: float = 300, check_rc: int | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*CLI, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def cli_popen(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        [*CLI, *args],
        env={**os.environ, **env},
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def count_in_db(db: Path, query: str, *params: Any) -> int:
    """A `SELECT count(*)` on the state DB, read the way an outsider would (plain sqlite3, WAL-aware);
    0 while the DB or its schema does not exist yet."""
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn, conn:
            return int(conn.execute(query, params).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def event_count(db: Path) -> int:
    """Transitions recorded so far."""
    return count_in_db(db, "SELECT count(*) FROM events WHERE from_state IS NOT NULL")


@contextlib.contextmanager
def realtime() -> Iterator[None]:
    """Run the calling thread under SCHED_FIFO meanwhile (root may): on a loaded machine its short sleeps then end
    on time, instead of the runner it watches going on for a scheduler slice or more."""
    try:
        before = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (PermissionError, AttributeError, OSError):
        yield
        return
    try:
        yield
    finally:
        os.sched_setscheduler(0, before[0], before[1])


def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def status_json(db: Path | str, env: dict[str, str]) -> dict[str, Any]:
    proc = cli("status", "--json", "--db", str(db), env=env, check_rc=0)
    return dict(json.loads(proc.stdout))


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


COPY_OF = "glance_migrator_copy_of"


def copies_of(conn: Connection, image_id: str) -> list[dict[str, Any]]:
    found = []
    for hidden in ("true", "false"):
        resp = conn.image.get(f"/images?visibility=all&os_hidden={hidden}&{COPY_OF}={image_id}")
        found += resp.json()["images"]
    return found


def assert_swapped(conn: Connection, lab: Any, seeded: Seeded, from_store: str, to_store: str) -> None:
    """The invariants of a finished location-swap, for one image and its one protected, hidden copy."""
    image = raw_image(conn, seeded.id)
    assert image is not None, f"{seeded.id} vanished"
    assert image["status"] == "active" and image["protected"] is True
    assert stores_of(conn, seeded.id) == {to_store}, f"{seeded.id}: stores {image.get('stores')}"
    assert same_metadata(seeded, image, protected=True), f"{seeded.id}: metadata changed"
    assert members_of(conn, seeded.id) == seeded.members
    assert download_sha512(conn, seeded.id) == seeded.sha512
    if lab.store(from_store).driver == "file":
        assert not (lab.store_dir(from_store) / seeded.id).exists(), "old data file left behind"
    (copy,) = copies_of(conn, seeded.id)  # exactly one copy: none left over from a crashed attempt
    assert copy["protected"] is True and copy["os_hidden"] is True and copy["status"] == "active"
    assert copy["checksum"] == image["checksum"] and copy["size"] == image["size"]
    if copy["os_hash_algo"] == image["os_hash_algo"]:  # the copy's multihash is of Glance's current algorithm
        assert copy["os_hash_value"] == image["os_hash_value"]
    assert copy["os_hash_value"] == hashlib.new(copy["os_hash_algo"], seeded.data).hexdigest()
    assert [loc["url"] for loc in image["locations"]] == [loc["url"] for loc in copy["locations"]]
