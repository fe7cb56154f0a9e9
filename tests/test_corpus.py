"""tests/corpus.py: each way of making an old cloud's image, checked against what the real Glance 33 then serves."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
from openstack.connection import Connection

from tests import corpus
from tests.glancetools import delete_all_images, download_sha512, noise, raw_image, seed_image, wait_for
from tests.lab import Lab


def _sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


def _image(conn: Connection, image_id: str) -> dict[str, Any]:
    image = raw_image(conn, image_id)
    assert image is not None, f"{image_id} vanished"
    return image


def _location_rows(lab: Lab, image_id: str) -> list[tuple[str, dict[str, Any]]]:
    with corpus.glance_db(lab) as db:
        rows = db.execute(
            "SELECT value, meta_data FROM image_locations WHERE image_id = ? AND deleted = 0 ORDER BY id",
            (image_id,),
        ).fetchall()
    return [(row["value"], json.loads(row["meta_data"])) for row in rows]


@pytest.fixture
def conn(lab: Lab, admin_conn: Connection) -> Iterator[Connection]:
    """admin_conn on an empty Glance, emptied again (and its configuration restored) afterwards."""
    delete_all_images(admin_conn)
    try:
        yield admin_conn
    finally:
        if lab.glance_overrides:
            lab.reconfigure({})
        delete_all_images(admin_conn)


@pytest.fixture
def full_conn(full_admin_conn: Connection) -> Iterator[Connection]:
    delete_all_images(full_admin_conn)
    try:
        yield full_admin_conn
    finally:
        delete_all_images(full_admin_conn)


def test_drop_multihash_leaves_md5_only_and_the_data_served(lab: Lab, conn: Connection) -> None:
    seeded = seed_image(conn, "pre-rocky", noise(3000))
    checksum = _image(conn, seeded.id)["checksum"]
    corpus.drop_multihash(lab, seeded.id)
    image = _image(conn, seeded.id)
    assert image["os_hash_algo"] is None and image["os_hash_value"] is None
    assert image["checksum"] == checksum == hashlib.md5(seeded.data).hexdigest()  # noqa: S324 (Glance's md5)
    assert image["status"] == "active"
    assert download_sha512(conn, seeded.id) == seeded.sha512


def test_set_multihash_shows_another_algorithm(lab: Lab, conn: Connection) -> None:
    seeded = seed_image(conn, "hashed-sha256", noise(3000))
    value = corpus.set_multihash(lab, seeded.id, "sha256", seeded.data)
    image = _image(conn, seeded.id)
    assert (image["os_hash_algo"], image["os_hash_value"]) == ("sha256", hashlib.sha256(seeded.data).hexdigest())
    assert value == image["os_hash_value"]
    assert download_sha512(conn, seeded.id) == seeded.sha512


def test_strip_store_metadata_list_hides_the_store_and_a_get_writes_it_back(lab: Lab, conn: Connection) -> None:
    seeded = seed_image(conn, "single-store", noise(3000))
    (url, meta), *_ = _location_rows(lab, seeded.id)
    assert meta == {"store": "old"}
    corpus.strip_store_metadata(lab, seeded.id)
    assert _location_rows(lab, seeded.id) == [(url, {})]
    # the list shows the rows as they are: no store anywhere
    (listed,) = conn.image.get("/images?limit=50").json()["images"]
    assert listed["locations"] == [{"url": url, "metadata": {}}]
    assert "stores" not in listed
    assert _location_rows(lab, seeded.id) == [(url, {})]  # a list writes nothing
    # a single GET fills the store in from the URL ... and saves it
    image = _image(conn, seeded.id)
    assert image["stores"] == "old"
    assert image["locations"] == [{"url": url, "metadata": {"store": "old"}}]
    assert _location_rows(lab, seeded.id) == [(url, {"store": "old"})]
    assert download_sha512(conn, seeded.id) == seeded.sha512


def test_add_location_appends_rows_glance_shows_and_serves(lab: Lab, conn: Connection) -> None:
    seeded = seed_image(conn, "two-copies", noise(3000))
    (url, _), *_ = _location_rows(lab, seeded.id)
    in_new = lab.store_dir("new") / seeded.id
    second_old = lab.store_dir("old") / f"{seeded.id}.copy"
    for copy in (in_new, second_old):
        shutil.copyfile(lab.store_dir("old") / seeded.id, copy)
    corpus.add_location(lab, seeded.id, in_new.as_uri(), "new")
    corpus.add_location(lab, seeded.id, second_old.as_uri(), None)
    assert _location_rows(lab, seeded.id)[1:] == [(in_new.as_uri(), {"store": "new"}), (second_old.as_uri(), {})]
    image = _image(conn, seeded.id)
    assert [(loc["url"], loc["metadata"]) for loc in image["locations"]] == [
        (url, {"store": "old"}),
        (in_new.as_uri(), {"store": "new"}),
        (second_old.as_uri(), {"store": "old"}),  # filled in by the GET, as for strip_store_metadata
    ]
    assert set(image["stores"].split(",")) == {"old", "new"}
    assert download_sha512(conn, seeded.id) == seeded.sha512


def test_make_twin_two_images_one_data_object(lab: Lab, conn: Connection) -> None:
    seeded = seed_image(conn, "original", noise(5000))
    original = _image(conn, seeded.id)
    twin_id = corpus.make_twin(lab, seeded.id, "twin")
    twin = _image(conn, twin_id)
    assert twin["name"] == "twin" and twin["status"] == "active" and twin["visibility"] == "private"
    same = ("size", "checksum", "os_hash_algo", "os_hash_value", "disk_format", "container_format", "owner")
    assert {k: twin[k] for k in same} == {k: original[k] for k in same}
    assert twin["locations"] == original["locations"]
    assert twin["stores"] == "old"
    assert download_sha512(conn, twin_id) == download_sha512(conn, seeded.id) == seeded.sha512


def test_rot_file_store_serves_the_new_bytes(lab: Lab, conn: Connection) -> None:
    seeded = seed_image(conn, "rotten", noise(4096))
    rotten = noise(4096)
    (url,) = corpus.rot(lab, seeded.id, "old", rotten)
    assert (lab.store_dir("old") / seeded.id).read_bytes() == rotten and url.endswith(seeded.id)
    image = _image(conn, seeded.id)
    assert image["os_hash_value"] == seeded.sha512 and image["size"] == len(seeded.data)  # Glance knows nothing
    assert download_sha512(conn, seeded.id) == _sha512(rotten)


def test_rot_s3_and_rbd_serve_the_new_bytes(full_lab: Lab, full_conn: Connection) -> None:
    for store in ("s3", "ceph"):
        data, rotten = noise(20000), noise(20000)
        queued = seed_image(full_conn, f"rotten-{store}", None)
        resp = full_conn.image.put(
            f"/images/{queued.id}/file",
            data=io.BytesIO(data),
            headers={"Content-Type": "application/octet-stream", "X-Image-Meta-Store": store},
        )
        assert resp.status_code == 204, resp.text
        assert download_sha512(full_conn, queued.id) == _sha512(data)
        (url,) = corpus.rot(full_lab, queued.id, store, rotten)
        assert url.startswith("s3://" if store == "s3" else "rbd://"), url
        if store == "s3":
            assert full_lab.s3_object(url.rsplit("/glance/", 1)[1]) == rotten
        image = _image(full_conn, queued.id)
        assert image["os_hash_value"] == _sha512(data) and image["stores"] == store
        assert download_sha512(full_conn, queued.id) == _sha512(rotten), store


def test_zero_byte_image_is_active_with_the_empty_hashes(lab: Lab, conn: Connection) -> None:
    seeded = corpus.zero_byte_image(conn, "empty")
    image = _image(conn, seeded.id)
    assert image["status"] == "active" and image["size"] == 0
    assert image["checksum"] == corpus.EMPTY_MD5 == "d41d8cd98f00b204e9800998ecf8427e"
    assert (image["os_hash_algo"], image["os_hash_value"]) == ("sha512", corpus.EMPTY_SHA512)
    assert image["stores"] == "old" and len(image["locations"]) == 1
    assert (lab.store_dir("old") / seeded.id).stat().st_size == 0
    assert download_sha512(conn, seeded.id) == _sha512(b"")


def test_reconfigure_hides_locations_and_back(lab: Lab, conn: Connection) -> None:
    seeded = seed_image(conn, "configured", noise(1000))
    assert "locations" in _image(conn, seeded.id)
    lab.reconfigure({"DEFAULT": {"show_multiple_locations": "False"}})
    assert "show_multiple_locations = False" in lab.glance_conf.read_text()
    assert "show_multiple_locations = True" not in lab.glance_conf.read_text()
    image = _image(conn, seeded.id)
    assert "locations" not in image
    assert image["stores"] == "old"
    lab.reconfigure({})
    assert lab.glance_overrides == {}
    assert "show_multiple_locations = True" in lab.glance_conf.read_text()
    assert [loc["metadata"] for loc in _image(conn, seeded.id)["locations"]] == [{"store": "old"}]


def test_format_mismatch_image_glance_now_refuses_and_will_not_copy(lab: Lab, conn: Connection) -> None:
    # with the checks on (the lab's default), Glance 33 refuses the upload
    refused = seed_image(conn, "refused", None, disk_format="qcow2")
    resp = conn.image.put(
        f"/images/{refused.id}/file",
        data=io.BytesIO(noise(64 << 10)),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 415, resp.text
    expected = corpus.FORMAT_MISMATCH_MESSAGE.format(disk_format="qcow2", detected="raw")
    assert expected in resp.text
    assert _image(conn, refused.id)["status"] == "queued"
    # made with the checks off: active, and Glance is back to its own configuration
    seeded = corpus.format_mismatch_image(lab, conn, "mismatch")
    assert lab.glance_overrides == {}
    assert "require_image_format_match" not in lab.glance_conf.read_text()
    image = _image(conn, seeded.id)
    assert (image["status"], image["disk_format"], image["virtual_size"]) == ("active", "qcow2", None)
    assert download_sha512(conn, seeded.id) == seeded.sha512
    # ... and a copy-image to another store now fails on the same check
    image = _copy_outcome(conn, seeded.id)
    assert image["os_glance_failed_import"] == "new" and image["stores"] == "old"
    # Glance marks the image (os_glance_failed_import) a moment before it ends the task: wait for that
    assert wait_for(lambda: _tasks(conn, seeded.id)[0]["status"] != "processing", timeout=30)
    (task,) = _tasks(conn, seeded.id)
    assert task["status"] == "failure"  # its message: "Task failed due to Internal Error"; the cause is logged
    # a raw image holding a real qcow2 is accepted with the checks on (Glance only logs a warning)
    qcow2_as_raw = seed_image(conn, "qcow2-as-raw", corpus.QCOW2_HEADER + bytes(4096 - len(corpus.QCOW2_HEADER)))
    assert _image(conn, qcow2_as_raw.id)["status"] == "active"


def _tasks(conn: Connection, image_id: str) -> list[dict[str, Any]]:
    return list(conn.image.get(f"/images/{image_id}/tasks").json()["tasks"])


def _copy_outcome(conn: Connection, image_id: str) -> dict[str, Any]:
    """Ask Glance for a copy-image to store new; the image once the copy is done or failed."""
    resp = conn.image.post(f"/images/{image_id}/import", json={"method": {"name": "copy-image"}, "stores": ["new"]})
    assert resp.status_code == 202, resp.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        image = _image(conn, image_id)
        if image.get("os_glance_failed_import") or "new" in image.get("stores", "").split(","):
            break
        time.sleep(0.2)
    return image


def test_copy_image_of_old_hashes_keeps_sha256_and_fills_in_a_missing_multihash(lab: Lab, conn: Connection) -> None:
    """What Glance 33's copy-image does with the images of drop_multihash and set_multihash: both copy; the
    sha256 one keeps its sha256 multihash, the pre-Rocky one gets a sha512 multihash written by the copy."""
    hashed = seed_image(conn, "hashed-sha256", noise(3000))
    corpus.set_multihash(lab, hashed.id, "sha256", hashed.data)
    old = seed_image(conn, "pre-rocky", noise(3000))
    corpus.drop_multihash(lab, old.id)
    image = _copy_outcome(conn, hashed.id)
    assert (image["stores"], image["os_glance_failed_import"]) == ("old,new", "")
    assert (image["os_hash_algo"], image["os_hash_value"]) == ("sha256", hashlib.sha256(hashed.data).hexdigest())
    image = _copy_outcome(conn, old.id)
    assert (image["stores"], image["os_glance_failed_import"]) == ("old,new", "")
    assert (image["os_hash_algo"], image["os_hash_value"]) == ("sha512", old.sha512)
