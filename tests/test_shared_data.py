"""Images that share one data object (left by the 2015 script, by location-swap itself, or by a location added
by hand): Glance deletes an image's old data whoever else lists it, so the tool must look first."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openstack.connection import Connection

from glance_migrator import sharing
from glance_migrator.discovery import discover
from glance_migrator.errors import EXIT_OK, EXIT_PARTIAL, UsageError
from glance_migrator.glance import Glance
from glance_migrator.sharing import LocationIndex, SharedData
from glance_migrator.state import Strategy
from tests.glancetools import (
    Seeded,
    backend_objects,
    cli,
    copies_of,
    count_in_db,
    download_sha512,
    members_of,
    noise,
    patch,
    raw_image,
    seed_image,
    stable,
    status_json,
    stores_of,
)
from tests.invariants import Invariants

MiB = 1 << 20
STRATEGIES = ["copy-image", "location-swap"]
HIDDEN = {"DEFAULT": {"show_multiple_locations": "False"}}


def _snapshot(conn: Connection, image_id: str, data: bytes) -> Seeded:
    """The image as it is now: what a later migration must keep."""
    image = raw_image(conn, image_id)
    assert image is not None
    return Seeded(image_id, data, stable(image), members_of(conn, image_id))


def _in_ceph(conn: Connection, name: str, data: bytes) -> Seeded:
    """An image uploaded straight into the ceph store: its RBD image is named after it."""
    queued = seed_image(conn, name, None)
    resp = conn.image.put(
        f"/images/{queued.id}/file",
        data=io.BytesIO(data),
        headers={"Content-Type": "application/octet-stream", "X-Image-Meta-Store": "ceph"},
    )
    assert resp.status_code == 204, resp.text
    assert stores_of(conn, queued.id) == {"ceph"}
    return _snapshot(conn, queued.id, data)


def _twins_on_one_object(conn: Connection, name: str, size: int) -> tuple[Seeded, Seeded]:
    """What the 2015 script left: an image in ceph, and a second image (same bytes, its own checksum and hash)
    whose only location is the first one's data object."""
    data = noise(size)
    original, twin = _in_ceph(conn, name, data), _in_ceph(conn, f"{name}-twin", data)
    image = raw_image(conn, original.id)
    assert image is not None
    (location,) = image["locations"]
    patch(conn, twin.id, [{"op": "add", "path": "/locations/-", "value": location}])
    patch(conn, twin.id, [{"op": "remove", "path": "/locations/0"}])  # Glance deletes the twin's own object
    shared = raw_image(conn, twin.id)
    assert shared is not None and [loc["url"] for loc in shared["locations"]] == [location["url"]]
    assert download_sha512(conn, twin.id) == original.sha512
    return original, _snapshot(conn, twin.id, data)


def _run(db: Path, env: dict[str, str], spool: Path, *args: str) -> Any:
    return cli("run", "--from-store", "ceph", "--to-store", "s3", "--db", str(db), "--spool-dir", str(spool), *args,
               env=env)  # fmt: skip


@pytest.mark.core
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_images_on_one_data_object_both_move_and_neither_loses_its_data(
    full_lab: Any,
    full_admin_conn: Connection,
    full_env: dict[str, str],
    tmp_path: Path,
    strategy: str,
    invariants: Invariants,
) -> None:
    """Two images whose only location is one shared RBD image, both in the run, moved off Ceph"""
    original, twin = _twins_on_one_object(full_admin_conn, f"shared-{strategy}", 2 * MiB + 7)
    db = tmp_path / "state.db"
    proc = _run(db, full_env, tmp_path / "spool", "--strategy", strategy, "--image", original.id, "--image", twin.id)
    assert proc.returncode == EXIT_OK, proc.stderr
    # The first to reach the delete waited (blocked) for the other to hold a copy of its own; the end of the
    # run gave it its one more try.
    assert count_in_db(db, "SELECT count(*) FROM events WHERE to_state = 'blocked'") == 1
    invariants.check(
        full_lab, full_admin_conn, db, full_env, [original, twin], faults={"images sharing one data object": 2}
    )
    assert original.id not in backend_objects(full_lab, "ceph")  # the shared object went, once nobody needed it


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_image_whose_old_data_is_another_images_only_data_is_blocked_until_that_one_moves(
    full_lab: Any,
    full_admin_conn: Connection,
    full_env: dict[str, str],
    tmp_path: Path,
    strategy: str,
    invariants: Invariants,
) -> None:
    """An image whose data object is also the only data of an image outside the run"""
    original, twin = _twins_on_one_object(full_admin_conn, f"only-data-{strategy}", MiB + 3)
    db, twin_db, spool = tmp_path / "state.db", tmp_path / "twin.db", tmp_path / "spool"
    faults = {"image outside the run sharing the data object": 1}

    proc = _run(db, full_env, spool, "--strategy", strategy, "--image", original.id)
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    (row,) = status_json(db, full_env)["images"]
    assert row["state"] == "blocked" and row["error_kind"] == "shared" and twin.id in row["error"], row
    assert download_sha512(full_admin_conn, twin.id) == twin.sha512  # the twin still has its data
    assert stores_of(full_admin_conn, twin.id) == {"ceph"}
    assert stores_of(full_admin_conn, original.id) == {"ceph", "s3"}
    blocked = {original.id: "blocked"}
    invariants.check(
        full_lab, full_admin_conn, db, full_env, [original], faults=faults, expect=blocked, label="blocked"
    )

    # Once the twin has moved (it may: the original keeps a copy in s3), `retry` finishes the original.
    cli("run", "--from-store", "ceph", "--to-store", "s3", "--strategy", strategy, "--image", twin.id,
        "--db", str(twin_db), "--spool-dir", str(spool), env=full_env, check_rc=EXIT_OK)  # fmt: skip
    cli("retry", original.id, "--db", str(db), env=full_env, check_rc=EXIT_OK)
    invariants.check(full_lab, full_admin_conn, twin_db, full_env, [twin], faults=faults, label="twin moved")
    invariants.check(full_lab, full_admin_conn, db, full_env, [original], faults=faults, label="retried")
    assert original.id not in backend_objects(full_lab, "ceph")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_moving_on_from_an_earlier_location_swap_retires_its_old_copy(
    full_lab: Any,
    full_admin_conn: Connection,
    full_env: dict[str, str],
    tmp_path: Path,
    strategy: str,
    invariants: Invariants,
) -> None:
    """A second migration (ceph -> s3) of an image that an earlier location-swap moved (old -> ceph)"""
    data = noise(3 * MiB)
    seeded = seed_image(full_admin_conn, f"two-hops-{strategy}", data)
    spool = tmp_path / "spool"
    cli("run", "--from-store", "old", "--to-store", "ceph", "--strategy", "location-swap", "--image", seeded.id,
        "--db", str(tmp_path / "first.db"), "--spool-dir", str(spool), env=full_env, check_rc=EXIT_OK)  # fmt: skip
    (first_copy,) = copies_of(full_admin_conn, seeded.id)  # hidden, protected, sharing the image's RBD image
    assert first_copy["id"] in backend_objects(full_lab, "ceph")
    moved = _snapshot(full_admin_conn, seeded.id, data)  # protected now, on purpose

    db = tmp_path / "second.db"
    proc = _run(db, full_env, spool, "--strategy", strategy, "--image", seeded.id)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert raw_image(full_admin_conn, first_copy["id"]) is None  # it served nothing any more: deleted, not left hidden
    assert first_copy["id"] not in backend_objects(full_lab, "ceph")
    (row,) = status_json(db, full_env)["images"]
    events = [e["message"] for e in _events(db, full_env, seeded.id)]
    assert any(f"deleted its old copy {first_copy['id']}" in (m or "") for m in events), events
    invariants.check(
        full_lab, full_admin_conn, db, full_env, [moved], faults={"second migration of a swapped image": 1}
    )
    assert row["state"] == "done"


def _events(db: Path, env: dict[str, str], image_id: str) -> list[dict[str, Any]]:
    """The image's events, as `report` writes them."""
    out = db.with_suffix(".audit.json")
    cli("report", str(out), "--db", str(db), env=env, check_rc=EXIT_OK)
    (record,) = [r for r in json.loads(out.read_text()) if r["id"] == image_id]
    return list(record["events"])


def test_a_full_disk_under_the_sharing_index_is_a_clear_error_and_the_index_answers_nothing_after() -> None:
    """The index lives in a temporary SQLite file: when it cannot grow (here SQLite's own page limit, as a full
    disk would), the run is told what to do, and no lookup is answered after: a half-written index could miss an
    image that shares the data about to be deleted."""
    index = LocationIndex()
    index.add([{"id": "a", "locations": [{"url": "rbd://fsid/images/a/snap"}]}])
    assert index.listing({"rbd://fsid/images/a/snap"}) == {"a"}
    index._db.execute("PRAGMA max_page_count = 8")  # the index's file may not grow past 32 KiB
    page = [{"id": f"img-{n}", "locations": [{"url": f"rbd://fsid/images/{n:0120d}/snap"}]} for n in range(2000)]
    full = r"sharing index.s temporary file failed: database or disk is full.*SQLITE_TMPDIR.*run --resume"
    with pytest.raises(UsageError, match=full):
        index.add(page)
    with pytest.raises(UsageError, match=full):
        index.listing({"rbd://fsid/images/a/snap"})
    with pytest.raises(UsageError, match=full):
        index.copies("a")
    index.close()


def test_the_sharing_index_sees_images_that_start_sharing_data_after_discovery(
    full_admin_conn: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images that start listing a migrating image's data after discovery listed every image: the index made from
    that listing is brought up to date from the images Glance changed since, not by listing every image again."""
    original = _in_ceph(full_admin_conn, "late-sharing", noise(MiB + 11))
    later = _in_ceph(full_admin_conn, "late-sharing-later", noise(1000))
    glance = Glance(full_admin_conn)
    reads: list[str | None] = []
    list_images, image_pages = glance.list_images, glance.image_pages

    def listed(limit: int | None = None, changed_since: str | None = None) -> Iterator[list[dict[str, Any]]]:
        reads.append(changed_since)  # which reads the index makes (Glance answers them as ever)
        return image_pages(limit, changed_since)

    index = LocationIndex()
    rows = list(discover(glance, [], "ceph", "s3", Strategy.COPY_IMAGE, legacy=False, index=index))
    assert original.id in {row.image_id for row, _ in rows}
    image = raw_image(full_admin_conn, original.id)
    assert image is not None
    (location,) = image["locations"]
    url = location["url"]
    assert index.listing({url}) == {original.id}

    # After discovery (hours before the first delete, on a big cloud), someone adds its data to another image:
    # Glance stamps that image's updated_at (to the second), which its list filter compares.
    patch(full_admin_conn, later.id, [{"op": "add", "path": "/locations/-", "value": location}])
    stamped = (raw_image(full_admin_conn, later.id) or {})["updated_at"]
    assert later.id in {i["id"] for i in list_images(changed_since=stamped)}
    assert not list(list_images(changed_since="2999-01-01T00:00:00Z"))  # the filter is applied, not ignored
    monkeypatch.setattr(glance, "image_pages", listed)  # the index's reads from now on
    shared = SharedData(glance, "ceph", legacy=False, index=index)
    assert shared.locations(image) is not None  # what deletion asks first
    assert shared.listing({url}, but=original.id) == {later.id}
    assert len(reads) == 1 and reads[0] is not None  # only the images changed since discovery were listed

    # And one more, made after that: seen once the index is older than INDEX_MAX_AGE (0 here).
    third = _in_ceph(full_admin_conn, "late-sharing-third", noise(1000))
    patch(full_admin_conn, third.id, [{"op": "add", "path": "/locations/-", "value": location}])
    assert shared.listing({url}, but=original.id) == {later.id}  # trusted for INDEX_MAX_AGE
    monkeypatch.setattr(sharing, "INDEX_MAX_AGE", 0.0)
    assert shared.listing({url}, but=original.id) == {later.id, third.id}
    assert len(reads) == 2 and reads[1] is not None and reads[1] >= reads[0]


def test_where_glance_hides_locations_the_index_reads_changed_images_through_the_locations_api(
    full_lab: Any, full_admin_conn: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """show_multiple_locations = False: discovery's listing shows no location, so the first lookup reads every
    image through GET /v2/images/ID/locations; later reads ask it only for the images changed since"""
    original = _in_ceph(full_admin_conn, "hidden-sharing", noise(MiB + 5))
    later = _in_ceph(full_admin_conn, "hidden-sharing-later", noise(1000))
    image = raw_image(full_admin_conn, original.id)
    assert image is not None
    (location,) = image["locations"]
    # the service token goes along, as with --service-cloud: Glance 30.1-31 show hidden locations to it only
    glance = Glance(full_admin_conn, service=full_lab.connect("lab-service"))
    reads: list[str | None] = []
    asked: list[str] = []
    image_pages, image_locations = glance.image_pages, glance.image_locations

    def listed(limit: int | None = None, changed_since: str | None = None) -> Iterator[list[dict[str, Any]]]:
        reads.append(changed_since)
        return image_pages(limit, changed_since)

    def locations_of(image_id: str) -> list[dict[str, Any]] | None:
        asked.append(image_id)
        return image_locations(image_id)

    monkeypatch.setattr(glance, "image_locations", locations_of)
    monkeypatch.setattr(sharing, "INDEX_MAX_AGE", 0.0)
    full_lab.reconfigure(HIDDEN)
    try:
        index = LocationIndex()
        list(discover(glance, [], "ceph", "s3", Strategy.COPY_IMAGE, legacy=False, index=index))
        monkeypatch.setattr(glance, "image_pages", listed)  # the index's reads from now on
        assert index.since is None  # nothing seen: no index to trust
        shared = SharedData(glance, "ceph", legacy=False, index=index)
        hidden = raw_image(full_admin_conn, original.id)
        assert hidden is not None and "locations" not in hidden
        assert shared.locations(hidden) == [location] and shared.mode == "api"
        assert shared.listing({location["url"]}, but=original.id) == set()
        assert reads == [None] and later.id in asked  # every image, each through the locations API

        full_lab.reconfigure({})  # Glance refuses location edits while it hides them
        patch(full_admin_conn, later.id, [{"op": "add", "path": "/locations/-", "value": location}])
        full_lab.reconfigure(HIDDEN)
        asked.clear()
        # a read through the locations API is repeated no sooner than 5 times its duration: by the end of the
        # suite the lab holds hundreds of images and the first read took many seconds; here it is due now
        shared._read_took = 0.0
        assert shared.listing({location["url"]}, but=original.id) == {later.id}
        assert len(reads) == 2 and reads[1] is not None and later.id in asked
    finally:
        full_lab.reconfigure({})
