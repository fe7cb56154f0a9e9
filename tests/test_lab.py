"""Smoke test of the lab itself, through the real Keystone and Glance."""

from __future__ import annotations

import hashlib
import io
import time
import uuid

from openstack import exceptions

from tests.lab import Lab

MiB = 1024 * 1024


def _stores(image) -> list[str]:
    """Glance's 'stores' property (a comma-separated string, e.g. 'old,new') as a list."""
    value = image.properties.get("stores") or getattr(image, "stores", None) or ""
    return [s for s in value.split(",") if s] if isinstance(value, str) else list(value)


def _upload(conn, data: bytes):
    img = conn.image.create_image(
        name=f"lab-smoke-{uuid.uuid4().hex[:8]}",
        disk_format="raw",
        container_format="bare",
        allow_duplicates=True,
    )
    # Image.upload() returns the raw response and does NOT raise on HTTP errors (openstacksdk 4.22)
    response = img.upload(conn.image, data=io.BytesIO(data), size=len(data))
    assert response.status_code == 204, (response.status_code, response.text)
    return conn.image.get_image(img.id)


def _copy_image_status(conn, img, stores: list[str]) -> int:
    """HTTP status of POST /v2/images/{id}/import (copy-image). openstacksdk 4.22's import_image()
    returns the raw response without raising on 4xx; a later SDK may raise instead: accept both."""
    try:
        return conn.image.import_image(img, method="copy-image", stores=stores).status_code
    except exceptions.HttpException as exc:
        return exc.status_code


def test_upload_lands_in_default_store(lab: Lab, admin_conn):
    data = b"\x00\x01lab" * (MiB // 5) + b"x" * (MiB % 5)
    assert len(data) == MiB
    img = _upload(admin_conn, data)
    try:
        assert img.status == "active"
        assert img.size == MiB
        assert img.hash_algo == "sha512"  # os_hash_algo
        assert img.hash_value == hashlib.sha512(data).hexdigest()  # os_hash_value
        assert _stores(img) == ["old"]
        stored = lab.store_dir("old") / img.id
        assert stored.is_file() and stored.read_bytes() == data
        assert not (lab.store_dir("new") / img.id).exists()
    finally:
        admin_conn.image.delete_image(img.id)


def test_member_cannot_copy_but_admin_can(lab: Lab, admin_conn):
    data = b"copy me " * (MiB // 8)
    demo = lab.connect("lab-demo")
    try:
        own = _upload(demo, data)
        try:
            assert own.status == "active"
            assert _copy_image_status(demo, own, ["new"]) == 403  # policy copy_image: project admin
        finally:
            demo.image.delete_image(own.id)
    finally:
        demo.close()

    img = _upload(admin_conn, data)
    try:
        assert _copy_image_status(admin_conn, img, ["new"]) == 202
        deadline = time.monotonic() + 60
        while True:  # until 'new' is in stores and the import task let go of the image
            img = admin_conn.image.get_image(img.id)
            props = img.properties
            assert "new" not in props.get("os_glance_failed_import", ""), props
            if (
                "new" in _stores(img)
                and not props.get("os_glance_import_task")
                and not props.get("os_glance_importing_to_stores")
            ):
                break
            assert time.monotonic() < deadline, f"copy-image to 'new' did not finish: {props}"
            time.sleep(0.2)
        assert sorted(_stores(img)) == ["new", "old"]
        assert (lab.store_dir("new") / img.id).read_bytes() == data
        assert img.hash_value == hashlib.sha512(data).hexdigest()  # os_hash_value
    finally:
        admin_conn.image.delete_image(img.id)


def test_lab_helpers(lab: Lab):
    assert lab.env() == {"OS_CLIENT_CONFIG_FILE": str(lab.clouds_yaml), "OS_CLOUD": "lab-admin"}
    assert lab.clouds_yaml.is_file()
    assert lab.glance_url.startswith("http://127.0.0.1:")
    assert lab.keystone_url.startswith("http://127.0.0.1:") and lab.keystone_url.endswith("/v3")
    assert (lab.logs_dir / "glance-api.log").is_file()
    assert sorted(lab.running_services()) == ["glance", "keystone"]


def test_parallel_copies_all_succeed(lab: Lab, admin_conn):
    """Several copy-image tasks at once (what a migrator with workers does): none may fail or hang.
    Without tests/lab/lab_sqlite_immediate.py, 1-2 of these fail with 'database is locked'."""
    images = [_upload(admin_conn, bytes([i]) * (64 * 1024 * (i + 1))) for i in range(6)]
    try:
        for img in images:
            assert _copy_image_status(admin_conn, img, ["new"]) == 202
        deadline = time.monotonic() + 60
        pending = {img.id for img in images}
        while pending:
            for image_id in sorted(pending):
                props = admin_conn.image.get_image(image_id).properties
                assert "new" not in props.get("os_glance_failed_import", ""), props
                if "new" in props.get("stores", "").split(",") and not props.get("os_glance_import_task"):
                    pending.discard(image_id)
            assert time.monotonic() < deadline, f"copies still running after 60 s: {pending}"
            time.sleep(0.2)
    finally:
        for img in images:
            admin_conn.image.delete_image(img.id)


def test_restart_glance_keeps_images(lab: Lab, admin_conn):
    img = _upload(admin_conn, b"persist")
    try:
        lab.restart_glance()
        assert admin_conn.image.get_image(img.id).hash_value == hashlib.sha512(b"persist").hexdigest()
    finally:
        admin_conn.image.delete_image(img.id)
