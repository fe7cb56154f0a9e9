"""Smoke tests of the lab's s3 store (a real SeaweedFS) and ceph store (rbd on a real single-node Ceph), and of
legacy single-store Glance, all through the real services of the `full_lab` fixture."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from openstack import exceptions

from tests.glancetools import noise
from tests.lab import CEPH_POOL, Lab
from tests.test_lab import _copy_image_status, _stores, _upload

MiB = 1024 * 1024


def _wait_for_stores(conn, image_id: str, wanted: set[str], timeout: float = 120.0):
    """Poll the image until `stores` holds all of `wanted` and its import task let go of it (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        img = conn.image.get_image(image_id)
        props = img.properties
        failed = set(props.get("os_glance_failed_import", "").split(",")) & wanted
        assert not failed, f"copy-image to {failed} failed: {props}"
        if (
            wanted <= set(_stores(img))
            and not props.get("os_glance_import_task")
            and not props.get("os_glance_importing_to_stores")
        ):
            return img
        assert time.monotonic() < deadline, f"copy-image to {sorted(wanted)} did not finish in {timeout} s: {props}"
        time.sleep(0.2)


def _sha512_of_download(conn, image) -> str:
    """sha512 of the bytes Glance serves (download_image(stream=True) checks no checksum itself)."""
    digest = hashlib.sha512()
    response = conn.image.download_image(image, stream=True)
    for chunk in response.iter_content(chunk_size=MiB):
        digest.update(chunk)
    return digest.hexdigest()


def _location_urls(conn, image_id: str) -> list[str]:
    """The URLs of the image's locations (admin sees them: show_multiple_locations = True)."""
    return [location["url"] for location in conn.image.get_image(image_id).locations or []]


def test_copy_image_to_s3_and_ceph_then_delete_from_old(full_lab: Lab, full_admin_conn, tmp_path: Path):
    conn = full_admin_conn
    data = noise(9 * MiB + 123)  # more than one 8 MiB rbd chunk
    sha512 = hashlib.sha512(data).hexdigest()
    img = _upload(conn, data)
    try:
        assert _stores(img) == ["old"]
        assert _copy_image_status(conn, img, ["s3", "ceph"]) == 202
        img = _wait_for_stores(conn, img.id, {"s3", "ceph"})
        assert sorted(_stores(img)) == ["ceph", "old", "s3"]
        assert img.hash_value == sha512

        # the bytes are in the bucket and in the pool, under the image id
        assert img.id in full_lab.s3_objects()
        assert full_lab.s3_object(img.id) == data
        assert img.id in full_lab.rbd("ls", CEPH_POOL).split()
        exported = tmp_path / "exported"
        full_lab.rbd("export", f"{CEPH_POOL}/{img.id}", str(exported))
        assert exported.read_bytes() == data
        fsid = full_lab.ceph("fsid").strip()
        urls = _location_urls(conn, img.id)
        assert f"file://{full_lab.store_dir('old') / img.id}" in urls
        assert f"rbd://{fsid}/{CEPH_POOL}/{img.id}/snap" in urls
        assert [url for url in urls if url.startswith("s3://")], urls
        assert _sha512_of_download(conn, img) == sha512

        # DELETE /v2/stores/old/{id}: the file goes, the copies in s3 and ceph serve the image
        conn.image.delete_image(img, store="old")
        img = conn.image.get_image(img.id)
        assert sorted(_stores(img)) == ["ceph", "s3"]
        assert not (full_lab.store_dir("old") / img.id).exists()
        assert _sha512_of_download(conn, img) == sha512

        # and DELETE /v2/stores/s3/{id}: the object goes, ceph alone serves the image
        conn.image.delete_image(img, store="s3")
        img = conn.image.get_image(img.id)
        assert _stores(img) == ["ceph"]
        assert img.id not in full_lab.s3_objects()
        assert _location_urls(conn, img.id) == [f"rbd://{fsid}/{CEPH_POOL}/{img.id}/snap"]
        assert _sha512_of_download(conn, img) == sha512
    finally:
        conn.image.delete_image(img.id, ignore_missing=True)
    assert img.id not in full_lab.rbd("ls", CEPH_POOL).split()


def test_rbd_clone_child_of_an_image_snapshot(full_lab: Lab, full_admin_conn):
    """What later tests build on: an RBD clone child of Glance's image snapshot (as Nova/Cinder make)."""
    conn = full_admin_conn
    data = b"parent " * 1000
    img = _upload(conn, data)
    child = f"{CEPH_POOL}/lab-child-{img.id[:8]}"
    try:
        assert _copy_image_status(conn, img, ["ceph"]) == 202
        img = _wait_for_stores(conn, img.id, {"ceph"})
        snaps = json.loads(full_lab.rbd("snap", "ls", "--format", "json", f"{CEPH_POOL}/{img.id}"))
        assert [snap["name"] for snap in snaps] == ["snap"]
        # Glance protects the snapshot itself (so a second `rbd snap protect` fails with EBUSY)
        info = json.loads(full_lab.rbd("info", "--format", "json", f"{CEPH_POOL}/{img.id}@snap"))
        assert info["protected"] == "true", info
        full_lab.rbd("clone", f"{CEPH_POOL}/{img.id}@snap", child)
        assert child in full_lab.rbd("children", f"{CEPH_POOL}/{img.id}@snap")
        # with a child, Glance cannot delete the image from ceph and leaves everything as it was
        try:
            conn.image.delete_image(img, store="ceph")
        except exceptions.HttpException as exc:
            assert exc.status_code == 409, exc
        else:
            raise AssertionError("store-delete of an image with an RBD clone child succeeded")
        assert sorted(_stores(conn.image.get_image(img.id))) == ["ceph", "old"]
    finally:
        if child.split("/")[1] in full_lab.rbd("ls", CEPH_POOL).split():
            full_lab.rbd("rm", child)
        conn.image.delete_image(img.id, ignore_missing=True)


def test_legacy_single_store_file_then_rbd(full_lab: Lab, full_admin_conn):
    """Glance as configured before multi-store (stores = file, rbd): uploads go to default_store; after a
    restart with default_store = rbd new uploads land in Ceph, older images keep their file location."""
    conn = full_admin_conn
    first_data, second_data = b"uploaded to file " * 4096, b"uploaded to rbd " * 4096
    images = []
    try:
        full_lab.reconfigure_legacy("file")
        first = _upload(conn, first_data)
        images.append(first)
        assert "stores" not in first.properties  # single-store Glance has no store names
        full_lab.reconfigure_legacy("rbd")
        second = _upload(conn, second_data)
        images.append(second)

        fsid = full_lab.ceph("fsid").strip()
        assert _location_urls(conn, first.id) == [f"file://{full_lab.store_dir('old') / first.id}"]
        assert _location_urls(conn, second.id) == [f"rbd://{fsid}/{CEPH_POOL}/{second.id}/snap"]
        assert second.id in full_lab.rbd("ls", CEPH_POOL).split()
        assert _sha512_of_download(conn, first) == hashlib.sha512(first_data).hexdigest()
        assert _sha512_of_download(conn, second) == hashlib.sha512(second_data).hexdigest()
    finally:
        for img in images:
            conn.image.delete_image(img.id, ignore_missing=True)
        full_lab.reconfigure_legacy(None)  # back to multi-store for the other tests
    assert sorted(s.id for s in conn.image.stores()) == ["ceph", "new", "old", "s3"]


def test_full_lab_helpers(full_lab: Lab):
    assert sorted(full_lab.running_services()) == ["ceph", "glance", "keystone", "s3"]
    assert full_lab.ceph_conf.is_file()
    assert "HEALTH_ERR" not in full_lab.ceph("health")
    assert full_lab.s3_url.startswith("http://127.0.0.1:")
    assert isinstance(full_lab.s3_objects(), list)
    assert full_lab.s3_object("no-such-object") is None
    # every port the lab's services listen on is its own and on 127.0.0.1 (two labs can run at once)
    ports = {*full_lab.s3_ports.values(), full_lab.ceph_ports["mon_v1"], full_lab.ceph_ports["mon_v2"]}
    assert len(ports) == len(full_lab.s3_ports) + 2
    assert full_lab.ceph_ports["min"] < full_lab.ceph_ports["max"]
