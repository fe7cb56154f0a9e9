"""Discovery of every image: large pages, followed across Glance's `next` links whatever page size Glance allows."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openstack.connection import Connection

from glance_migrator.discovery import discover
from glance_migrator.errors import EXIT_OK, UsageError
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


class _CountingGlance(Glance):
    """The real client, talking to the real Glance; it only notes each request it sends."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self.sent: list[str] = []

    def _call(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(f"{method} {path}")
        return super()._call(method, path, *args, **kwargs)


def test_images_given_by_id_are_read_in_a_few_list_requests(lab: Any, small_pages: Connection) -> None:
    """`--image` ids are read by lists of up to 50 ids (hidden images in a second list), not one request each, and
    follow the pages of a Glance that serves 3 per request; the rows keep the order the ids were given in."""
    visible = [seed_image(small_pages, f"byid-{i}", noise(100 + i)) for i in range(5)]
    hidden = [seed_image(small_pages, f"byid-hidden-{i}", noise(10 + i), hidden=True) for i in range(3)]
    given = [s.id for s in (hidden[0], *visible, *hidden[1:])] + [visible[0].id]  # mixed, and one given twice
    glance = _CountingGlance(small_pages)

    rows = list(discover(glance, given, "old", "new", Strategy.COPY_IMAGE, legacy=False))

    assert [row.image_id for row, _ in rows] == list(dict.fromkeys(given))
    assert all(row.state == State.PENDING and row.size for row, _ in rows)
    lists = [r for r in glance.sent if r.startswith("GET /images?") and "id=in:" in urllib.parse.unquote(r)]
    assert glance.sent == lists, glance.sent  # no image read on its own
    assert len(lists) == 4, lists  # visible: pages of 3 and 2; hidden: a page of 3, then the empty page it leads to

    # An id that is no image: the same clear error as before, nothing returned.
    glance.sent.clear()
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(UsageError, match=f"no image {missing} in Glance"):
        list(discover(glance, [visible[1].id, missing], "old", "new", Strategy.COPY_IMAGE, legacy=False))
    assert glance.sent[-1] == f"GET /images/{missing}", glance.sent  # read alone once no list showed it
