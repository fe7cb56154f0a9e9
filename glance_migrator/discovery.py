"""At the start of a run: find every image and decide what each one needs."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from glance_migrator.errors import UsageError
from glance_migrator.glance import Glance, stores_holding
from glance_migrator.models import ImageRow
from glance_migrator.state import State, Strategy
from glance_migrator.strategies.location_swap import COPY_OF_PROPERTY
from glance_migrator.verify import has_fingerprint

log = logging.getLogger(__name__)


def parse_image_ids(values: Sequence[str]) -> list[str]:
    ids = []
    for value in values:
        try:
            ids.append(str(uuid.UUID(value)))
        except ValueError:
            raise UsageError(f"{value!r} is not an image UUID") from None
    return ids


def discover(
    glance: Glance, image_ids: Sequence[str], from_store: str, to_store: str, strategy: Strategy, legacy: bool
) -> list[tuple[ImageRow, str | None]]:
    """One row per image: pending, or already done / skipped, each with the reason for the event log."""
    if image_ids:
        images: Iterable[dict[str, Any]] = [_fetch(glance, image_id) for image_id in image_ids]
    else:
        images = glance.list_images()
    rows: dict[str, tuple[ImageRow, str | None]] = {}
    copies = 0
    for image in images:
        if image.get(COPY_OF_PROPERTY) and not image_ids:
            copies += 1  # location-swap's second images move with their originals, never on their own
            continue
        rows.setdefault(image["id"], classify(image, from_store, to_store, strategy, legacy))
    if copies:
        log.info("left out %d image(s) that are glance-migrator copies (%s)", copies, COPY_OF_PROPERTY)
    return list(rows.values())


def _fetch(glance: Glance, image_id: str) -> dict[str, Any]:
    image = glance.get_image(image_id)
    if image is None:
        raise UsageError(f"no image {image_id} in Glance")
    return image


def classify(
    image: dict[str, Any], from_store: str, to_store: str, strategy: Strategy, legacy: bool = False
) -> tuple[ImageRow, str | None]:
    stores = stores_holding(image, legacy)
    state, reason = State.PENDING, None
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
