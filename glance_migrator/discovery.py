"""At the start of a run: find every image and decide what each one needs."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final

from glance_migrator.errors import UsageError
from glance_migrator.filters import NO_FILTERS, Filters
from glance_migrator.glance import Glance, stores_holding
from glance_migrator.models import ImageRow
from glance_migrator.sharing import COPY_OF_PROPERTY, LocationIndex
from glance_migrator.state import State, Strategy
from glance_migrator.verify import has_fingerprint

log = logging.getLogger(__name__)

LOG_EVERY_PAGES: Final = 10  # discovery logs its progress every this many list requests (10,000 images)


def parse_image_ids(values: Sequence[str]) -> list[str]:
    ids = []
    for value in values:
        try:
            ids.append(str(uuid.UUID(value)))
        except ValueError:
            raise UsageError(f"{value!r} is not an image UUID") from None
    return ids


def discover(
    glance: Glance,
    image_ids: Sequence[str],
    from_store: str,
    to_store: str,
    strategy: Strategy,
    legacy: bool,
    filters: Filters = NO_FILTERS,
    empty_strategy: Strategy | None = None,
    index: LocationIndex | None = None,
    listed: Callable[[int], None] | None = None,
) -> Iterator[tuple[ImageRow, str | None]]:
    """One row per image: pending, or already done / skipped, each with the reason for the event log.

    The rows come in the order they are to be recorded, and workers take images in it (see `Filters.order`).
    They come as Glance's listing goes, a page at a time, and none is kept, only the ids of those taken (to take
    each once, about 0.1 KiB an image): memory hardly grows with the catalogue, except with `filters.order`,
    which sees every image before the first row (holding each as its row, about 1.5 KiB). With location-swap,
    0-byte images go by `empty_strategy` (copy-image) or are skipped: see `classify`. A listing of every image
    (no `image_ids`) also fills `index` (the run's sharing index: every image, whatever the filters), and tells
    `listed` how many images it has seen after each page; it is read to its end whatever `filters.limit` says,
    so the index is whole once the rows have all come.
    """
    if image_ids:
        listed_ids = glance.images_by_id(image_ids)
        # all, or none: an id that no list showed is read alone (a Glance without `id=in:`), or is no image
        images: Iterable[dict[str, Any]] = [listed_ids.get(i) or _fetch(glance, i) for i in image_ids]
    else:
        images = _list_every_image(glance, index, listed)
    # with an order, the limit applies once every image is sorted
    chosen = _chosen(images, filters, listed_all=not image_ids, take=None if filters.order else filters.limit)

    def _classified(image: dict[str, Any]) -> tuple[ImageRow, str | None]:
        return classify(image, from_store, to_store, strategy, legacy, empty_strategy)

    if filters.order:
        keyed = [(filters.sort_key(image), _classified(image)) for image in chosen]
        keyed.sort(key=lambda pair: pair[0])
        yield from (row for _key, row in keyed[: filters.limit])
        return
    yield from (_classified(image) for image in chosen)


def _chosen(
    images: Iterable[dict[str, Any]], filters: Filters, listed_all: bool, take: int | None
) -> Iterator[dict[str, Any]]:
    """The images the filters accept, each once, the first `take` of them (all: None); glance-migrator's own copies
    left out of a listing of every image (location-swap's second images move with their originals, never on their
    own). Past `take`, the listing is still read to its end, none of it held: it fills the sharing index."""
    seen: set[str] = set()
    copies = 0
    for image in images:
        if image.get(COPY_OF_PROPERTY) and listed_all:
            copies += 1
        elif take is not None and len(seen) >= take:
            continue
        elif image["id"] not in seen and filters.accepts(image):
            seen.add(image["id"])
            yield image
    if copies:
        log.info("left out %d image(s) that are glance-migrator copies (%s)", copies, COPY_OF_PROPERTY)


def _list_every_image(
    glance: Glance, index: LocationIndex | None, listed: Callable[[int], None] | None
) -> Iterator[dict[str, Any]]:
    """Every image, a page at a time, each page added to `index`; how many so far is logged every LOG_EVERY_PAGES pages
    (and told to `listed` after each page), a 50,000-image catalogue being a minute or more of listing."""
    if index is not None:
        index.begin(glance)
    count = pages = 0
    for page in glance.image_pages():
        if index is not None:
            index.add(page)
        yield from page
        count, pages = count + len(page), pages + 1
        if listed is not None:
            listed(count)
        if pages % LOG_EVERY_PAGES == 0:
            log.info("discovery: %d image(s) listed so far", count)
    if index is not None:
        index.end()
    log.info("discovery: %d image(s) listed in %d request(s)", count, pages)


def _fetch(glance: Glance, image_id: str) -> dict[str, Any]:
    image = glance.get_image(image_id)
    if image is None:
        raise UsageError(f"no image {image_id} in Glance")
    return image


def classify(
    image: dict[str, Any],
    from_store: str,
    to_store: str,
    strategy: Strategy,
    legacy: bool = False,
    empty_strategy: Strategy | None = None,
) -> tuple[ImageRow, str | None]:
    stores = stores_holding(image, legacy)
    state, reason = State.PENDING, None
    if strategy == Strategy.LOCATION_SWAP and image.get("size") == 0 and empty_strategy is not None:
        strategy, reason = empty_strategy, f"0 bytes: moved by {empty_strategy} (Glance refuses empty locations)"
    if image.get(COPY_OF_PROPERTY):
        state, reason = State.SKIPPED, f"a glance-migrator copy of image {image[COPY_OF_PROPERTY]}"
    elif image.get("status") != "active":
        state, reason = State.SKIPPED, f"status is {image.get('status')}, not active"
    elif to_store in stores and from_store not in stores:
        state, reason = State.DONE, f"already in {to_store} only"
    elif from_store not in stores:
        state, reason = (
            State.SKIPPED,
            f"not in store {from_store} (stores: {','.join(sorted(stores)) or 'none'})",
        )
    elif strategy == Strategy.LOCATION_SWAP and image.get("size") == 0:
        state, reason = (
            State.SKIPPED,
            "0 bytes: Glance refuses to add a location whose data is empty (HTTP 400 Invalid location), so "
            "location-swap cannot move it; copy-image can, on a multi-store Glance that offers it",
        )
    elif not has_fingerprint(image):
        state, reason = (
            State.SKIPPED,
            "Glance recorded no size or checksum for it, so a copy cannot be verified",
        )
    row = ImageRow(
        image_id=image["id"],
        name=image.get("name"),
        status=image.get("status") or "unknown",
        size=image.get("size"),
        checksum=image.get("checksum"),
        os_hash_algo=image.get("os_hash_algo"),
        os_hash_value=image.get("os_hash_value"),
        stores=",".join(sorted(stores)),
        owner=image.get("owner"),
        visibility=image.get("visibility"),
        os_hidden=bool(image.get("os_hidden")),
        strategy=str(strategy),
        state=str(state),
        error=reason if state == State.SKIPPED else None,
        error_kind="skipped" if state == State.SKIPPED else None,
        attempts=0,
    )
    return row, reason
