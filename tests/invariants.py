"""The invariants every scenario must end with, checked in one place (issue: Reliability).

After a scenario (a run with faults, crashes or bad input), `Invariants.check` compares three views:
the tool's own (`status --json` through the CLI), Glance's (asked directly, never through a fault proxy)
and the disk's (the state DB's leases, the spool directory, the old file store). It asserts:

- every image of the scenario was discovered and is done, or failed/blocked/skipped with a reason;
- nothing is lost: every image still exists, has at least one location and serves its original bytes
  (sha512), unless the scenario itself corrupted or deleted it; and every other active image in Glance still
  serves data (collateral damage: another image's data deleted with this one's);
- every done image is in the target store only, with its UUID, size, checksum, os_hash_value, name,
  properties, tags, visibility and members unchanged (location-swap: exactly one protected, hidden copy);
- a failed or skipped image still has its data in the source store (nothing was removed);
- no extra images (copies) of the tool, no leases, no spool files (but a failed image's verified
  download, kept for `retry`) and no half-written downloads are left behind;
- the status output agrees with Glance (state, stores after).

Each check is also recorded (scenario, faults injected, images, outcome, lost) when the environment
variable GLANCE_MIGRATOR_RELIABILITY_LOG names a file: `python -m tests.reliability` turns those records
into docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from openstack.connection import Connection

from tests.glancetools import (
    Seeded,
    assert_migrated,
    assert_swapped,
    copies_of,
    download_sha512,
    raw_image,
    status_json,
    stores_of,
)

LOG_VARIABLE: Final = "GLANCE_MIGRATOR_RELIABILITY_LOG"
NOT_DONE: Final = frozenset({"failed", "blocked", "skipped"})


@dataclass
class Outcome:
    """What a check saw, as recorded for docs/reliability.md."""

    scenario: str  # the test's node id
    label: str  # which of the test's checks, when it makes several
    description: str
    images: int
    faults: dict[str, int]
    states: dict[str, int]
    lost: int


class Invariants:
    """One per test (the `invariants` fixture): knows the test's name for the record."""

    def __init__(self, nodeid: str, description: str, record: bool = True) -> None:
        self.nodeid = nodeid
        self.description = description
        self.record = record
        self.outcomes: list[Outcome] = []

    def check(
        self,
        lab: Any,
        conn: Connection,
        db: Path | str,
        env: Mapping[str, str],
        images: list[Seeded],
        *,
        faults: Mapping[str, int],
        expect: Mapping[str, str] | None = None,
        corrupted: Collection[str] = (),
        gone: Collection[str] = (),
        label: str = "",
    ) -> Outcome:
        """Assert the invariants for the scenario's `images` and the run in `db`.

        `expect` maps an image id to the state it must end in (default: done); `corrupted` are images whose
        stored bytes the scenario changed (their bytes are not compared, their location must remain);
        `gone` are images the scenario deleted in Glance. `faults` counts what was injected, by kind.
        """
        expect = dict(expect or {})
        doc = status_json(db, dict(env))
        run = doc["run"]
        from_store, to_store = run["from_store"], run["to_store"]
        rows = {row["id"]: row for row in doc["images"]}

        # Nothing lost, counted first so that the record says so even when a detail below fails.
        lost = [s.id for s in images if s.id not in gone and not _whole(conn, s, corrupted=s.id in corrupted)]
        states = Counter(rows[s.id]["state"] if s.id in rows else "not discovered" for s in images)
        outcome = Outcome(
            scenario=self.nodeid,
            label=label,
            description=self.description,
            images=len(images),
            faults={kind: count for kind, count in faults.items() if count},
            states=dict(sorted(states.items())),
            lost=len(lost),
        )
        self.outcomes.append(outcome)
        if self.record:
            _record(outcome)
        assert not lost, f"images lost (missing, no location, or other bytes): {lost}"

        for seeded in images:
            row = rows.get(seeded.id)
            assert row is not None, f"{seeded.id} was not discovered by the run"
            want = expect.get(seeded.id, "done")
            assert row["state"] == want, f"{seeded.id}: {row['state']} ({row['error']}), expected {want}"
            if seeded.id in gone:
                assert raw_image(conn, seeded.id) is None
                continue
            if want == "done":
                check_done = assert_swapped if row["strategy"] == "location-swap" else assert_migrated
                check_done(conn, lab, seeded, from_store, to_store)
                assert set((row["stores_after"] or "").split(",")) == {to_store}, f"status disagrees: {row}"
            else:
                assert want in NOT_DONE and row["error"], f"{seeded.id}: {want} without a reason"
                if row["state"] != "blocked":  # nothing of it was removed
                    assert from_store in stores_of(conn, seeded.id), f"{seeded.id} lost its {from_store} copy"
            copies = copies_of(conn, seeded.id)
            swapped = row["strategy"] == "location-swap"  # a run's 0-byte images go by copy-image
            wanted = 1 if swapped and row["state"] in {"done", "blocked"} else None
            if wanted is not None:
                assert len(copies) == wanted, f"{seeded.id}: {len(copies)} copies"
            else:  # a failed location-swap keeps its verified copy for `retry`; copy-image makes none
                assert len(copies) <= (1 if swapped else 0), f"{seeded.id}: {len(copies)} copies"
            for copy in copies:
                assert copy["os_hidden"] is True, f"copy {copy['id']} of {seeded.id} is not hidden"
        if all(row["state"] == "done" or row["state"] in NOT_DONE for row in rows.values()):
            assert run["complete"], "every image is finished but the run is not marked complete"
        _no_leftovers(db, rows)
        empty = _active_without_data(lab, conn, exempt={*corrupted, *gone})
        assert not empty, f"active images in Glance that serve nothing (no location, or its data is gone): {empty}"
        return outcome


def _whole(conn: Connection, seeded: Seeded, *, corrupted: bool) -> bool:
    """The image exists, is active, has a location and (unless corrupted on purpose) serves its bytes."""
    image = raw_image(conn, seeded.id)
    if image is None or image["status"] != "active" or not stores_of(conn, seeded.id):
        return False
    if corrupted:
        return True
    served = conn.image.get(f"/images/{seeded.id}/file", stream=True)  # 204: its locations point at nothing
    served.close()
    return served.status_code == 200 and download_sha512(conn, seeded.id) == seeded.sha512


def _active_without_data(lab: Any, conn: Connection, exempt: Collection[str]) -> list[str]:
    """Every active image in Glance (hidden ones too, any owner, not only the scenario's) that has no location
    left, or whose data is gone, so that collateral damage (another image's data deleted) is seen in every check.
    The stores are looked at directly (a stat per file, one listing of the S3 bucket and of the Ceph pool: the lab
    holds hundreds of images by the end of the suite, and reading each through Glance took minutes per check);
    an image whose data is not all found there is read through Glance (its first byte, 8 at a time)."""
    found, readable = [], []
    present = _StoreContents(lab)
    for hidden in ("false", "true"):
        marker = ""
        while True:
            page = conn.image.get(f"/images?visibility=all&os_hidden={hidden}&status=active&limit=200{marker}")
            images = page.json()["images"]
            for image in images:
                if image["id"] in exempt:
                    continue
                if not image.get("stores") and not image.get("locations"):
                    found.append(image["id"])
                elif image.get("size") and not present.holds(image):
                    readable.append(image["id"])
            if len(images) < 200:
                break
            marker = f"&marker={images[-1]['id']}"
    with ThreadPoolExecutor(8) as pool:
        for image_id, (status, first) in zip(readable, pool.map(lambda i: _first_byte(conn, i), readable), strict=True):
            if status != 200 or len(first) != 1:
                found.append(f"{image_id} (download: HTTP {status}, {len(first)} byte(s))")
    return found


class _StoreContents:
    """What the lab's stores hold, read once per check: file:// by stat, s3:// from one listing per bucket,
    rbd:// from one `rbd ls` per pool."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self._listed: dict[str, set[str]] = {}

    def holds(self, image: dict[str, Any]) -> bool:
        """Every location of the image has its data in the store (False also when that cannot be told here)."""
        urls = [str(loc.get("url", "")) for loc in image.get("locations") or []]
        return bool(urls) and all(self._has(url) for url in urls)

    def _has(self, url: str) -> bool:
        scheme, _, rest = url.partition("://")
        if scheme == "file":
            return Path(rest).is_file()
        path = rest.rpartition("@")[2].split("/")  # s3: [KEY:SECRET@]host/bucket/key; rbd: fsid/pool/image/snap
        if scheme == "s3" and len(path) >= 3:
            return "/".join(path[2:]) in self._listing("s3", path[1])
        if scheme == "rbd" and len(path) >= 3:
            return path[2] in self._listing("rbd", path[1])
        return False

    def _listing(self, kind: str, container: str) -> set[str]:
        key = f"{kind}:{container}"
        if key not in self._listed:
            if kind == "s3":
                self._listed[key] = set(self.lab.s3_objects(container))
            else:
                self._listed[key] = set(self.lab.rbd("ls", container).split())
        return self._listed[key]


def _first_byte(conn: Connection, image_id: str) -> tuple[int, bytes]:
    """The status of the image's download and its first byte (the rest is not read: ranges are not served by
    every store)."""
    served = conn.image.get(f"/images/{image_id}/file", stream=True)
    try:
        return served.status_code, next(served.iter_content(1), b"") if served.status_code == 200 else b""
    finally:
        served.close()


def _no_leftovers(db: Path | str, rows: Mapping[str, Mapping[str, Any]]) -> None:
    leased = _query(db, "SELECT image_id FROM images WHERE lease_owner IS NOT NULL")
    spools = [Path(r[0]) for r in _query(db, "SELECT spool_dir FROM runs WHERE spool_dir IS NOT NULL")]
    assert not leased, f"leases left behind: {leased}"
    for spool in spools:
        if not spool.exists():
            continue
        assert spool.stat().st_mode & 0o777 == 0o700, f"spool {spool} is not private"
        for path in spool.iterdir():
            image_id = path.name.split(".")[0]
            kept = path.suffix == ".img" and rows.get(image_id, {}).get("state") in {"failed", "blocked"}
            assert kept, f"left behind in the spool: {path.name}"
            assert path.stat().st_mode & 0o777 == 0o600, f"spool file {path} is not private"


def _query(db: Path | str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of the state DB, read as an outsider: plain sqlite3 for a file, SQLAlchemy for a server's URL."""
    if "://" in str(db):
        engine = sa.create_engine(str(db))
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.exec_driver_sql(sql)]
        finally:
            engine.dispose()
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as state:  # closed: the DB may be unmounted next
        return state.execute(sql).fetchall()


def _record(outcome: Outcome) -> None:
    target = os.environ.get(LOG_VARIABLE)
    if target:
        with Path(target).open("a", encoding="utf-8") as f:
            f.write(json.dumps(outcome.__dict__, sort_keys=True) + "\n")
