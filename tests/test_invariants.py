"""The shared invariant checker (tests/invariants.py) must catch what it claims to: each breach below is
made by hand after a good run, and the checker has to fail on it, so that a scenario passing it means something."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from openstack.connection import Connection

from glance_migrator.errors import EXIT_OK
from tests.glancetools import cli, noise, patch, seed_image
from tests.invariants import Invariants, _active_without_data

MiB = 1 << 20


@pytest.fixture
def migrated(lab: Any, admin_conn: Connection, tmp_path: Path) -> tuple[Path, list[Any]]:
    images = [seed_image(admin_conn, f"checked-{i}", noise(MiB)) for i in range(2)]
    db = tmp_path / "state.db"
    selection = [a for s in images for a in ("--image", s.id)]
    cli("run", "--from-store", "old", "--to-store", "new", *selection, "--db", str(db), env=lab.env(), check_rc=EXIT_OK)
    return db, images


def _checker() -> Invariants:
    return Invariants("self-test", "the checker's own test", record=False)  # its breaches are made by hand


def test_a_good_run_passes_and_is_recorded(lab: Any, admin_conn: Connection, migrated: tuple[Path, list[Any]]) -> None:
    db, images = migrated
    outcome = _checker().check(lab, admin_conn, db, lab.env(), images, faults={"none": 0})
    assert outcome.lost == 0 and outcome.states == {"done": 2} and outcome.faults == {}


def test_changed_bytes_count_as_lost(lab: Any, admin_conn: Connection, migrated: tuple[Path, list[Any]]) -> None:
    db, images = migrated
    (lab.store_dir("new") / images[0].id).write_bytes(noise(MiB))
    checker = _checker()
    with pytest.raises(AssertionError, match="images lost"):
        checker.check(lab, admin_conn, db, lab.env(), images, faults={})
    assert checker.outcomes[0].lost == 1  # recorded before the assertion


def test_changed_metadata_a_leftover_lease_and_a_wrong_state_are_caught(
    lab: Any, admin_conn: Connection, migrated: tuple[Path, list[Any]]
) -> None:
    db, images = migrated
    check = _checker().check
    with pytest.raises(AssertionError, match="expected failed"):
        check(lab, admin_conn, db, lab.env(), images, faults={}, expect={images[0].id: "failed"})
    with contextlib.closing(sqlite3.connect(db)) as state, state:
        state.execute("UPDATE images SET lease_owner = 'host:1:x' WHERE image_id = ?", (images[1].id,))
    with pytest.raises(AssertionError, match="leases left behind"):
        check(lab, admin_conn, db, lab.env(), images, faults={})
    patch(admin_conn, images[0].id, [{"op": "add", "path": "/extra", "value": "x"}])
    with pytest.raises(AssertionError, match="metadata changed"):
        check(lab, admin_conn, db, lab.env(), images, faults={})


def test_data_gone_counts_as_lost_and_collateral_damage_is_caught(
    lab: Any, admin_conn: Connection, migrated: tuple[Path, list[Any]]
) -> None:
    """An image whose location points at data that is gone is lost (Glance answers its download with 204), and
    so is any other active image in Glance, not only the scenario's: deleting a twin's data is caught."""
    db, images = migrated
    bystander = seed_image(admin_conn, "checked-bystander", noise(1000))
    try:
        (lab.store_dir("old") / bystander.id).unlink()  # another image's data, deleted behind its back
        with pytest.raises(AssertionError, match=f"serve nothing.*{bystander.id}"):
            _checker().check(lab, admin_conn, db, lab.env(), images, faults={})
        (lab.store_dir("new") / images[0].id).unlink()
        checker = _checker()
        with pytest.raises(AssertionError, match="images lost"):
            checker.check(lab, admin_conn, db, lab.env(), images, faults={})
        assert checker.outcomes[0].lost == 1
    finally:  # leave no broken image for the scenarios that share this lab
        for image_id in (bystander.id, images[0].id):
            assert admin_conn.image.delete(f"/images/{image_id}").status_code in (204, 404)


def test_data_gone_from_s3_or_ceph_is_caught_without_reading_every_image(
    full_lab: Any, full_admin_conn: Connection
) -> None:
    """The collateral-damage check lists the S3 bucket and the Ceph pool instead of downloading every image:
    an object or RBD image deleted behind Glance's back is still caught."""
    conn = full_admin_conn
    in_s3, in_ceph = (seed_image(conn, f"gone-from-{store}", noise(1000), store=store) for store in ("s3", "ceph"))
    try:
        assert _active_without_data(full_lab, conn, exempt=()) == []
        full_lab.s3_delete(in_s3.id)
        full_lab.rbd("snap", "unprotect", f"images/{in_ceph.id}@snap")
        full_lab.rbd("snap", "purge", f"images/{in_ceph.id}")
        full_lab.rbd("rm", f"images/{in_ceph.id}")
        gone = " ".join(_active_without_data(full_lab, conn, exempt=()))
        assert in_s3.id in gone and in_ceph.id in gone, gone
    finally:
        for image_id in (in_s3.id, in_ceph.id):
            assert conn.image.delete(f"/images/{image_id}").status_code in (204, 404)
