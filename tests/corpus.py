"""Images as years-old, upgraded clouds left them, made in the lab by editing Glance's own database.

Glance 33 only writes images the way Glance 33 writes them; the images a migration meets in a real cloud were
written by a dozen releases before it, by operators' scripts and by hand. Each function here makes one such
image, either through Glance's API where Glance still accepts it (a 0-byte image; a format mismatch with
the checks off, see format_mismatch_image) or by editing Glance's SQLite database directly (``glance_db``),
never by mocking an API: what the tests then see is what a real Glance 33 serves for such rows.

Facts about Glance 33's database (``<lab.root>/glance.sqlite``, the same schema as on MySQL) used here:
- ``images``: id, name, size, virtual_size, status, disk_format, container_format, owner, visibility,
  protected, os_hidden, min_disk, min_ram, checksum (md5 hex), os_hash_algo, os_hash_value, created_at,
  updated_at, deleted_at, deleted (0/1). Timestamps are naive UTC text ``YYYY-MM-DD HH:MM:SS.ffffff``.
- ``image_locations``: id (integer, autoincrement order = the order of ``locations``), image_id, value (the
  location URL), meta_data (JSON text, ``{"store": "<store id>"}`` as multi-store Glance writes it), status
  ('active'; 'pending_delete'/'deleted' for removed ones), created_at, updated_at, deleted_at, deleted.
- ``image_properties``: image_id, name, value, ... , deleted (one row per extra property).
- URLs: ``file:///<datadir>/<image id>``; ``s3://<host:port>/<bucket>/<image id>`` (no credentials in the
  URL with Glance 33; ``s3://<key>:<secret>@<host:port>/...`` before: lab.s3_location() writes the right one);
  ``rbd://<fsid>/<pool>/<image id>/snap`` (Glance reads the protected snapshot "snap").

Glance keeps no cache in front of its database in the lab (no image cache middleware), so an edit here is
what the next API call sees.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import sqlite3
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from openstack.connection import Connection

from tests.glancetools import Seeded, noise, raw_image, seed_image
from tests.lab import Lab, LabError

# what Glance 33 records for empty data (md5 and sha512 of b"")
EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"  # md5 of b""
EMPTY_SHA512 = hashlib.sha512(b"").hexdigest()

# the Glance 33 option that turns off the upload inspection of a `bare` image's data against its disk_format
# ([image_format] require_image_format_match, default True; glance/location.py ImageProxy.set_data)
FORMAT_CHECKS_OFF: dict[str, dict[str, str]] = {"image_format": {"require_image_format_match": "False"}}
# what Glance 33 answers to such an upload with the checks on: HTTP 415 and, in its HTML body, this line
FORMAT_MISMATCH_MESSAGE = "Image disk_format {disk_format} does not match stream data {detected}"

# the first bytes of a real qcow2 (version 3) image: magic, version, no backing file, 64 KiB clusters, 1 MiB
QCOW2_HEADER = (
    b"QFI\xfb"
    + (3).to_bytes(4, "big")  # version
    + (0).to_bytes(8, "big")  # backing_file_offset
    + (0).to_bytes(4, "big")  # backing_file_size
    + (16).to_bytes(4, "big")  # cluster_bits
    + (1 << 20).to_bytes(8, "big")  # size (virtual)
    + (0).to_bytes(4, "big")  # crypt_method
    + (1).to_bytes(4, "big")  # l1_size
    + (0x30000).to_bytes(8, "big")  # l1_table_offset
    + (0x10000).to_bytes(8, "big")  # refcount_table_offset
    + (1).to_bytes(4, "big")  # refcount_table_clusters
    + (0).to_bytes(4, "big")  # nb_snapshots
    + (0).to_bytes(8, "big")  # snapshots_offset
    + (0).to_bytes(8, "big")  # incompatible_features
    + (0).to_bytes(8, "big")  # compatible_features
    + (0).to_bytes(8, "big")  # autoclear_features
    + (4).to_bytes(4, "big")  # refcount_order
    + (104).to_bytes(4, "big")  # header_length
)

# rewrites an RBD image's data and its protected snapshot through Debian's python3-rbd (one process instead of
# six `rbd` CLI calls); fails if the snapshot has clone children (it cannot be unprotected then)
_RBD_REWRITE = """
import sys, rados, rbd
conf, pool, name, snap = sys.argv[1:]
data = sys.stdin.buffer.read()
cluster = rados.Rados(conffile=conf, rados_id="admin")
cluster.connect(timeout=30)
try:
    with cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, name) as image:
        if snap:
            if image.is_protected_snap(snap):
                image.unprotect_snap(snap)
            image.remove_snap(snap)
        image.resize(len(data))
        for offset in range(0, len(data), 4 << 20):
            image.write(data[offset : offset + (4 << 20)], offset)
        image.flush()
        if snap:
            image.create_snap(snap)
            image.protect_snap(snap)
finally:
    cluster.shutdown()
"""
_SYSTEM_PYTHON = "/usr/bin/python3"  # the Python Debian's rbd/rados modules are built for


def _now() -> str:
    """A timestamp as Glance writes them (naive UTC)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


@contextlib.contextmanager
def glance_db(lab: Lab) -> Iterator[sqlite3.Connection]:
    """A sqlite3 connection to the lab's Glance database, in one transaction (BEGIN IMMEDIATE: it waits up to
    30 s for Glance's own writers, then holds the write lock), committed on a normal exit, rolled back on
    an exception. Rows come back as sqlite3.Row."""
    conn = sqlite3.connect(lab.root / "glance.sqlite", timeout=30, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()


def _image_row(db: sqlite3.Connection, image_id: str) -> sqlite3.Row:
    row: sqlite3.Row | None = db.execute("SELECT * FROM images WHERE id = ? AND deleted = 0", (image_id,)).fetchone()
    if row is None:
        raise LookupError(f"no image {image_id} in Glance's database")
    return row


def _locations(db: sqlite3.Connection, image_id: str) -> list[sqlite3.Row]:
    """The image's live location rows, in Glance's order."""
    return db.execute(
        "SELECT * FROM image_locations WHERE image_id = ? AND deleted = 0 AND status = 'active' ORDER BY id",
        (image_id,),
    ).fetchall()


def drop_multihash(lab: Lab, image_id: str) -> None:
    """Make the image look uploaded before Rocky (Glance 17), which had no multihash: os_hash_algo and
    os_hash_value NULL, the md5 `checksum` kept. Glance 33 then shows os_hash_algo/os_hash_value None and
    still serves the data (it does not verify hashes on download). A copy-image of it succeeds and WRITES a
    multihash into the image (sha512, the lab's hashing_algorithm): the image's metadata changes."""
    with glance_db(lab) as db:
        _image_row(db, image_id)
        db.execute("UPDATE images SET os_hash_algo = NULL, os_hash_value = NULL WHERE id = ?", (image_id,))


def set_multihash(lab: Lab, image_id: str, algo: str, data: bytes) -> str:
    """Give the image the multihash of another algorithm (e.g. "sha256" of its `data`), as images uploaded
    while the cloud had another ``[DEFAULT] hashing_algorithm`` carry it. Returns the hex digest written.
    Glance 33 shows it as is, and its copy-image hashes the copy with the image's algorithm: the copy succeeds
    and the multihash stays sha256 (checked by tests/test_corpus.py)."""
    value = hashlib.new(algo, data).hexdigest()
    with glance_db(lab) as db:
        _image_row(db, image_id)
        db.execute("UPDATE images SET os_hash_algo = ?, os_hash_value = ? WHERE id = ?", (algo, value, image_id))
    return value


def strip_store_metadata(lab: Lab, image_id: str) -> None:
    """Remove the 'store' key from the metadata of all the image's locations (other keys kept), as clouds
    converted from single-store Glance (before Rocky's multi-store, or configured without enabled_backends)
    left them.

    What Glance 33 (multi-store) then shows, as checked by tests/test_corpus.py:
    - the image list (GET /v2/images) shows the rows as stored: each location's metadata without 'store', and
      no 'stores' key at all in the image;
    - a single-image GET (GET /v2/images/ID) fills the store back in (glance.location.ImageRepoProxy.get ->
      store_utils.update_store_in_locations: the store whose URL prefix the location starts with) and shows
      'stores' again, AND WRITES IT BACK to the database (image_repo.save: meta_data becomes
      {"store": ...} again, the location's updated_at changes) when the caller may modify the image (an
      admin may; for others, per Glance's code, the change is shown but not saved). So one GET by an admin undoes this
      function: re-strip after any GET if a test needs the rows to stay that way.
    """
    with glance_db(lab) as db:
        _image_row(db, image_id)
        for row in _locations(db, image_id):
            meta = json.loads(row["meta_data"] or "{}")
            meta.pop("store", None)
            db.execute("UPDATE image_locations SET meta_data = ? WHERE id = ?", (json.dumps(meta), row["id"]))


def add_location(lab: Lab, image_id: str, url: str, store: str | None) -> None:
    """Append a location row (last in the image's 'locations') with metadata {"store": store}, or {} for None
    (a location as a single-store cloud or a hand-made `glance location-add` left it): e.g. a second copy in
    the same store, or a copy an operator put into another store by hand. Nothing is checked: the URL need
    not exist (Glance would then fail only when it reads from it)."""
    meta = {"store": store} if store is not None else {}
    now = _now()
    with glance_db(lab) as db:
        _image_row(db, image_id)
        db.execute(
            "INSERT INTO image_locations (image_id, value, created_at, updated_at, deleted, meta_data, status)"
            " VALUES (?, ?, ?, ?, 0, ?, 'active')",
            (image_id, url, now, now, json.dumps(meta)),
        )


def make_twin(lab: Lab, image_id: str, name: str) -> str:
    """A second image record on the same data object as `image_id`: active, private, same size, virtual
    size, checksum, multihash, disk/container format and owner, no properties or tags, and as its only
    location the same URL (and metadata) as image_id's first location. Two images on one data object, as
    the 2015 import script or a hand-added location left them (deleting either through Glance deletes the
    data of both). Returns the new image's id."""
    twin_id = str(uuid.uuid4())
    now = _now()
    with glance_db(lab) as db:
        image = _image_row(db, image_id)
        locations = _locations(db, image_id)
        if not locations:
            raise LookupError(f"image {image_id} has no location to share")
        db.execute(
            "INSERT INTO images (id, name, size, status, created_at, updated_at, deleted, disk_format,"
            " container_format, checksum, owner, min_disk, min_ram, protected, virtual_size, visibility,"
            " os_hidden, os_hash_algo, os_hash_value)"
            " VALUES (?, ?, ?, 'active', ?, ?, 0, ?, ?, ?, ?, ?, ?, 0, ?, 'private', 0, ?, ?)",
            (
                twin_id,
                name,
                image["size"],
                now,
                now,
                image["disk_format"],
                image["container_format"],
                image["checksum"],
                image["owner"],
                image["min_disk"],
                image["min_ram"],
                image["virtual_size"],
                image["os_hash_algo"],
                image["os_hash_value"],
            ),
        )
        db.execute(
            "INSERT INTO image_locations (image_id, value, created_at, updated_at, deleted, meta_data, status)"
            " VALUES (?, ?, ?, ?, 0, ?, 'active')",
            (twin_id, locations[0]["value"], now, now, locations[0]["meta_data"]),
        )
    return twin_id


def _in_store(lab: Lab, store: str, url: str, meta: Mapping[str, object]) -> bool:
    """Whether a location (URL + metadata) is in `store`: by its 'store' key, or without one, by its URL."""
    if "store" in meta:
        return meta["store"] == store
    driver = lab.store(store).driver
    if driver == "file":
        return url.startswith(f"file://{lab.store_dir(store)}/")
    return urllib.parse.urlparse(url).scheme == {"s3": "s3", "rbd": "rbd"}.get(driver)


def rot(lab: Lab, image_id: str, store: str, data: bytes) -> list[str]:
    """Replace the bytes behind the image's location(s) in `store` by `data`, without Glance knowing (its size,
    checksum and hashes stay): bit rot, or an operator's mistake. Returns the URLs rewritten.

    file store: the file of the file:// URL is rewritten; s3: the object of the s3://host/bucket/key URL is
    PUT again (Lab.s3_put); rbd: the RBD image of the rbd://fsid/pool/image/snap URL is resized and rewritten
    and its protected snapshot (which Glance reads) dropped and made again (python3-rbd as client.admin;
    fails while the snapshot has clone children). Other drivers: NotImplementedError.
    """
    with glance_db(lab) as db:
        rows = [(row["value"], json.loads(row["meta_data"] or "{}")) for row in _locations(db, image_id)]
    urls = [url for url, meta in rows if _in_store(lab, store, url, meta)]
    if not urls:
        raise LookupError(f"image {image_id} has no location in store {store!r}: {[url for url, _ in rows]}")
    driver = lab.store(store).driver
    for url in urls:
        parsed = urllib.parse.urlparse(url)
        if driver == "file":
            Path(urllib.parse.unquote(parsed.path)).write_bytes(data)
        elif driver == "s3":
            bucket, _, key = parsed.path.lstrip("/").partition("/")
            lab.s3_put(key, data, bucket=bucket)
        elif driver == "rbd":
            pool, name, *snap = parsed.path.strip("/").split("/")
            proc = subprocess.run(
                [_SYSTEM_PYTHON, "-I", "-c", _RBD_REWRITE, str(lab.ceph_conf), pool, name, snap[0] if snap else ""],
                input=data,
                capture_output=True,
                timeout=120,
                env={k: v for k, v in os.environ.items() if not k.startswith(("CEPH_", "PYTHON"))},
                check=False,
            )
            if proc.returncode:
                raise LabError(f"rewriting {url} failed: {proc.stderr.decode(errors='replace')[-2000:]}")
        else:
            raise NotImplementedError(f"rot() cannot write to a {driver!r} store")
    return urls


def zero_byte_image(conn: Connection, name: str) -> Seeded:
    """An image uploaded normally with 0 bytes of data into the default store. Glance 33 records it active,
    size 0, virtual_size None, checksum EMPTY_MD5 (d41d8cd98f00b204e9800998ecf8427e), os_hash_algo sha512 and
    os_hash_value EMPTY_SHA512, with one location (a 0-byte file in a file store)."""
    return seed_image(conn, name, b"")


def format_mismatch_image(
    lab: Lab, conn: Connection, name: str, data: bytes | None = None, disk_format: str = "qcow2"
) -> Seeded:
    """An active image whose data does not match its disk_format (default: disk_format qcow2, 64 KiB of random
    bytes, which Glance's inspector detects as raw), uploaded while Glance ran with FORMAT_CHECKS_OFF, as
    older Glance releases, without the upload-time format inspection, accepted it. Glance is restarted twice
    (checks off, then back to the overrides it had before), a few seconds each.

    With the checks on (the default), Glance 33 refuses such an upload: HTTP 415 Unsupported Media Type, the
    body (HTML) ends with "Image disk_format qcow2 does not match stream data raw" (FORMAT_MISMATCH_MESSAGE);
    the image goes back to 'queued' (in the lab its location row and data file were seen left behind).
    A copy-image of the image made here fails the same check now: the task ends 'failure' ("Task failed due
    to Internal Error"; the cause is only in Glance's log) and the image gets os_glance_failed_import = the
    target store, its data staying where it was. The image shows virtual_size None.
    A disk_format 'raw' image whose data is a real qcow2 (QCOW2_HEADER + ...) is NOT refused, checks on or
    off: Glance only logs a warning, so it needs no toggle (seed_image(..., disk_format="raw") makes one).
    """
    if data is None:
        data = noise(64 << 10)
    previous = {section: dict(values) for section, values in lab.glance_overrides.items()}
    checks_off = {**previous, **{s: {**previous.get(s, {}), **v} for s, v in FORMAT_CHECKS_OFF.items()}}
    lab.reconfigure(checks_off)
    try:
        seeded = seed_image(conn, name, data, disk_format=disk_format)
    finally:
        lab.reconfigure(previous)
    image = raw_image(conn, seeded.id)
    assert image is not None and image["status"] == "active" and image["disk_format"] == disk_format, image
    return seeded


__all__ = [
    "EMPTY_MD5",
    "EMPTY_SHA512",
    "FORMAT_CHECKS_OFF",
    "FORMAT_MISMATCH_MESSAGE",
    "QCOW2_HEADER",
    "add_location",
    "drop_multihash",
    "format_mismatch_image",
    "glance_db",
    "make_twin",
    "rot",
    "set_multihash",
    "strip_store_metadata",
    "zero_byte_image",
]
