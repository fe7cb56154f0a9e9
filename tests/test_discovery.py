"""Discovery of every image: large pages, followed across Glance's `next` links whatever page size Glance allows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openstack.connection import Connection

from glance_migrator.discovery import discover
from glance_migrator.errors import EXIT_OK
from glance_migrator.filters import Filters
from glance_migrator.glance import PAGE_SIZE, Glance
from glance_migrator.sharing import LocationIndex
from glance_migrator.state import State, Strategy
from tests.glancetools import cli, delete_all_images, noise, seed_image

API_LIMIT_MAX = 3  # what this lab's Glance is set to serve at most per list request, here


@pytest.fixture
def small_pages(lab: Any, admin_conn: Connection) -> Iterator[Connection]:
    """An empty Glance whose api_limit_max (1000 by default) is lowered to API_LIMIT_MAX, as a deployment may."""
    delete_all_images(admin_conn)
    lab.reconfigure({"DEFAULT": {"api_limit_max": str(API_LIMIT_MAX)}})
    try:
        yield admin_conn
    finally:
        lab.reconfigure({})


def test_discovery_follows_every_page_when_glance_serves_fewer_images_than_asked(
    lab: Any, small_pages: Connection, tmp_path: Path
) -> None:
    """8 images (3 of them hidden) listed by pages of 1000 from a Glance that serves at most 3 per request"""
    visible = [seed_image(small_pages, f"page-{i}", noise(100 + i)) for i in range(5)]
    hidden = [seed_image(small_pages, f"page-hidden-{i}", noise(10 + i), hidden=True) for i in range(3)]
    glance = Glance(small_pages)
    assert glance.page_size == PAGE_SIZE == 1000
    counts: list[int] = []
    index = LocationIndex()

    rows = list(
        discover(glance, [], "old", "new", Strategy.COPY_IMAGE, legacy=False, index=index, listed=counts.append)
    )

    assert sorted(row.image_id for row, _ in rows) == sorted(s.id for s in visible + hidden)
    assert all(row.state == State.PENDING for row, _ in rows)
    # Glance capped each page at 3 and its `next` link led on: 3 + 2 visible, then 3 hidden and an empty page.
    assert counts == [3, 5, 8, 8]
    assert index.images() == {s.id for s in visible + hidden} and index.since is not None

    # Rows come as the listing goes, none held: the first before the first page is even done.
    counts.clear()
    streamed = discover(glance, [], "old", "new", Strategy.COPY_IMAGE, legacy=False, listed=counts.append)
    next(streamed)
    assert counts == []  # (a page is counted once all its images have come)
    for _ in range(3):
        next(streamed)
    assert counts == [3]  # the 4th image, the first of the second page
    # A --limit takes the first images, and the listing still goes to its end: the sharing index holds them all.
    counts.clear()
    index = LocationIndex()
    limited = discover(
        glance, [], "old", "new", Strategy.COPY_IMAGE, legacy=False, index=index, listed=counts.append,
        filters=Filters(limit=2),
    )  # fmt: skip
    assert [row.image_id for row, _ in limited] == [row.image_id for row, _ in rows[:2]]
    assert counts == [3, 5, 8, 8] and index.images() == {s.id for s in visible + hidden}

    # The CLI says how far the listing got, on stderr.
    proc = cli("run", "--dry-run", "--from-store", "old", "--to-store", "new", env=dict(lab.env()), check_rc=EXIT_OK)
    assert "discovery: 8 image(s) listed in 4 request(s)" in proc.stderr, proc.stderr
    assert proc.stdout.count("migrate ") == 8, proc.stdout
