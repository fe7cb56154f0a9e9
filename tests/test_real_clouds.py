"""Images as years-old, many-times-upgraded clouds hold them, made by editing Glance's own DB (tests/corpus.py),
moved by both strategies: pre-Rocky images with md5 only, multihashes of an older algorithm, empty images,
several locations in the old store, and an image Glance keeps failing on while it serves the others."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openstack.connection import Connection

from glance_migrator.errors import EXIT_OK
from tests.corpus import add_location, drop_multihash, set_multihash, zero_byte_image
from tests.glancetools import Seeded, cli, raw_image, seed_image, stable
from tests.invariants import Invariants

MiB = 1 << 20


def _as_now(conn: Connection, seeded: Seeded) -> Seeded:
    """`seeded` with its metadata as Glance shows it now, after the corpus edited it."""
    image = raw_image(conn, seeded.id)
    assert image is not None
    return Seeded(seeded.id, seeded.data, stable(image), seeded.members)


@dataclass
class Cloud:
    """full_lab (stores old, new, s3, ceph) with what a scenario needs to run the CLI and check the outcome."""

    lab: Any
    conn: Connection
    env: dict[str, str]
    invariants: Invariants
    tmp: Path

    def run(self, images: list[Seeded], *args: str) -> Path:
        """`run --from-store old ARGS` on exactly `images`, which must succeed; then the shared invariants. The
        state DB's path."""
        db = self.tmp / "state.db"
        selected = [arg for s in images for arg in ("--image", s.id)]
        spool = ["--spool-dir", str(self.tmp / "spool")]
        proc = cli("run", "--from-store", "old", *args, *selected, *spool, "--db", str(db), env=self.env, timeout=600)
        assert proc.returncode == EXIT_OK, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        self.invariants.check(self.lab, self.conn, db, self.env, images, faults={})
        return db


@pytest.fixture
def cloud(
    full_lab: Any, full_admin_conn: Connection, full_env: dict[str, str], invariants: Invariants, tmp_path: Path
) -> Cloud:
    return Cloud(full_lab, full_admin_conn, full_env, invariants, tmp_path)


def _old_hash_corpus(lab: Any, conn: Connection, prefix: str) -> dict[str, Seeded]:
    md5_only = seed_image(conn, f"{prefix}-pre-rocky", os.urandom(MiB + 3))
    drop_multihash(lab, md5_only.id)
    sha256 = seed_image(conn, f"{prefix}-sha256", os.urandom(MiB // 2))
    set_multihash(lab, sha256.id, "sha256", sha256.data)
    images = {
        "md5-only": md5_only,
        "sha256": sha256,
        "empty": zero_byte_image(conn, f"{prefix}-empty"),
        "plain": seed_image(conn, f"{prefix}-plain", os.urandom(4096)),
    }
    return {kind: _as_now(conn, seeded) for kind, seeded in images.items()}


@pytest.mark.parametrize(
    ("strategy", "to_store"), [("copy-image", "new"), ("location-swap", "s3"), ("location-swap", "ceph")]
)
def test_md5_only_older_multihash_and_empty_images_move(cloud: Cloud, strategy: str, to_store: str) -> None:
    """Pre-Rocky images (md5 only), a sha256 multihash beside Glance's sha512, and a 0-byte image move like any
    other: what Glance computes on the way is new information, not corruption, and an empty upload completes."""
    corpus = _old_hash_corpus(cloud.lab, cloud.conn, f"old-hashes-{strategy}-{to_store}")
    images = list(corpus.values())
    assert corpus["md5-only"].before["os_hash_algo"] is None and corpus["md5-only"].before["checksum"]
    assert corpus["sha256"].before["os_hash_algo"] == "sha256"
    assert corpus["empty"].before["size"] == 0
    db = cloud.run(images, "--to-store", to_store, "--strategy", strategy)
    if strategy == "copy-image":  # Glance computed a multihash for the md5-only image: recorded, not refused
        audit = db.with_name("audit.json")
        cli("report", str(audit), "--db", str(db), env=cloud.env, check_rc=EXIT_OK)
        records = {record["id"]: record for record in json.loads(audit.read_text())}
        md5_only = records[corpus["md5-only"].id]
        assert md5_only["os_hash_algo_after"] == "sha512"
        assert md5_only["os_hash_value_after"] == hashlib.sha512(corpus["md5-only"].data).hexdigest()
        assert any("Glance computed a new sha512 hash" in (e["message"] or "") for e in md5_only["events"])


@pytest.mark.parametrize(("strategy", "to_store"), [("copy-image", "new"), ("location-swap", "s3")])
def test_an_image_with_two_locations_in_the_old_store_leaves_it_whole(
    cloud: Cloud, strategy: str, to_store: str
) -> None:
    """Glance's store delete removes one location per call: every location in the old store goes, both files."""
    seeded = seed_image(cloud.conn, f"two-old-locations-{strategy}", os.urandom(MiB))
    first = cloud.lab.store_dir("old") / seeded.id
    second = first.with_name(f"{seeded.id}.second")
    shutil.copyfile(first, second)
    add_location(cloud.lab, seeded.id, f"file://{second}", "old")
    image = raw_image(cloud.conn, seeded.id)
    assert image is not None and len(image["locations"]) == 2
    cloud.run([_as_now(cloud.conn, seeded)], "--to-store", to_store, "--strategy", strategy)
    assert not first.exists() and not second.exists(), "data left in the old store"
