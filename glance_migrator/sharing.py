"""Data objects that more than one image lists, and the rule that keeps their other users whole.

Glance deletes a location's data whenever the location is removed or the image leaves a store
(`DELETE /v2/stores/...`), whoever else lists the same URL: it never looks. Shared objects are common
where locations were ever edited: the original 2015 script left each image and its copy on one
object, location-swap does the same (on purpose: see strategies/location_swap.py), and so does a
`glance location-add` by hand. So before either strategy removes an image's old data (the doomed
URLs), it asks who else lists them, and for each such image:

- an earlier glance-migrator copy of this same image (a location-swap of a previous migration): once
  the data is gone it serves nothing, so it is retired (unprotected, deleted) after the removal;
- an image that also lists some other location: it keeps serving from that one (Glance reads an
  image's locations in order and skips those whose data is missing);
- any other image: the removal would destroy its only data, so this image is blocked (kind "shared")
  with their ids, both of its copies intact. At the end of a run such images get one more try (see
  runner.py): images of the same run that shared the data have moved by then.

Who lists a URL is read from Glance's image list (one pass over every image, renewed every
INDEX_MAX_AGE seconds) and each hit is then checked against the image as Glance shows it now. When
Glance hides locations (show_multiple_locations = False, fine for copy-image), sharing cannot be seen;
the run says so once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Collection
from typing import Any, Final

from glance_migrator.errors import ImageBlocked
from glance_migrator.glance import Glance, GlanceHTTPError, location_store

log = logging.getLogger(__name__)

COPY_OF_PROPERTY: Final = "glance_migrator_copy_of"  # names the image a location-swap copy B was made for
INDEX_MAX_AGE: Final = 120.0  # seconds an index of who lists which URL is trusted before it is read again
SHARED: Final = "shared"  # error_kind of an image blocked because its old data is another image's too


class SharedData:
    """Which images list which URL in the source store; one per run, shared by its workers."""

    def __init__(self, glance: Glance, from_store: str, legacy: bool) -> None:
        self.glance = glance
        self.from_store = from_store
        self.legacy = legacy
        self._lock = threading.Lock()
        self._index: dict[str, set[str]] = {}
        self._read_at: float | None = None
        self._hidden_logged = False

    def listing(self, urls: Collection[str], but: str) -> set[str]:
        """Ids of the images (other than `but`) that the index says list one of `urls`."""
        with self._lock:
            if self._read_at is None or time.monotonic() - self._read_at > INDEX_MAX_AGE:
                self._index = self._read()
                self._read_at = time.monotonic()
            return {image_id for url in urls for image_id in self._index.get(url, ())} - {but}

    def _read(self) -> dict[str, set[str]]:
        index: dict[str, set[str]] = defaultdict(set)
        for image in self.glance.list_images():
            for location in image.get("locations") or []:
                if location_store(location, self.legacy) == self.from_store:
                    index[location["url"]].add(image["id"])
        return index

    def hidden(self, image: dict[str, Any]) -> bool:
        """True (said once per run) when Glance shows no locations: then nobody's sharing can be seen."""
        if "locations" in image:
            return False
        with self._lock:
            if not self._hidden_logged:
                self._hidden_logged = True
                log.info(
                    "Glance hides image locations (show_multiple_locations = False): glance-migrator cannot see "
                    "whether another image shares an image's data in %s before it is deleted",
                    self.from_store,
                )
        return True


def urls(image: dict[str, Any]) -> set[str]:
    return {location["url"] for location in image.get("locations") or []}


def guard(shared: SharedData, image: dict[str, Any]) -> None:
    """Raise ImageBlocked if deleting the image's data in the source store (the doomed URLs) would leave another
    image with no data. Earlier copies of this image are left for `retire_copies`, after the removal."""
    if shared.hidden(image):
        return
    doomed = {loc["url"] for loc in image["locations"] if location_store(loc, shared.legacy) == shared.from_store}
    if not doomed:
        return
    image_id = image["id"]
    copies = shared.glance.find_copies(COPY_OF_PROPERTY, image_id)
    candidates = shared.listing(doomed, but=image_id) | {copy["id"] for copy in copies}
    stranded = []
    for other_id in sorted(candidates):
        other = shared.glance.get_image(other_id)
        if other is None or not urls(other) & doomed:
            continue  # gone, or no longer lists the data
        if other.get(COPY_OF_PROPERTY) == image_id or urls(other) - doomed:
            continue  # our own earlier copy (retired afterwards), or it keeps a location of its own
        stranded.append(f"{other_id} ({other.get('name') or 'unnamed'}, {other.get('status')})")
    if stranded:
        raise ImageBlocked(
            f"its data in {shared.from_store} is also the only data of image(s) {', '.join(stranded)}: removing "
            "it would destroy theirs, so it stays. Both copies of this image are intact. Migrate those images "
            "too (in this run they get one more try at its end), then `glance-migrator retry` this one",
            kind=SHARED,
        )


def retire_copies(shared: SharedData, image_id: str, keep: str | None) -> str:
    """After the image left the source store: delete its earlier glance-migrator copies that listed only data
    in that store (shared with it, now deleted; or a leftover of their own), unless someone else lists that
    data. `keep` is the current location-swap copy. Says what it did, "" for nothing. Idempotent."""
    notes = []
    for copy in shared.glance.find_copies(COPY_OF_PROPERTY, image_id):
        copy_urls = urls(copy)
        if copy["id"] == keep or copy.get(COPY_OF_PROPERTY) != image_id or not copy_urls:
            continue
        if any(location_store(loc, shared.legacy) != shared.from_store for loc in copy["locations"]):
            continue  # it holds data elsewhere: not the old store's leftover
        users = [u for u in shared.listing(copy_urls, but=copy["id"]) if _lists(shared, u, copy_urls)]
        if users:
            notes.append(f"kept its old copy {copy['id']}: image(s) {', '.join(sorted(users))} use its data")
            continue
        try:
            if copy.get("protected"):
                shared.glance.patch(copy["id"], [{"op": "replace", "path": "/protected", "value": False}])
            shared.glance.delete_image(copy["id"])
        except GlanceHTTPError as e:
            if e.status != 404:
                notes.append(f"could not delete its old copy {copy['id']} ({e}): delete it by hand")
                continue
        notes.append(f"deleted its old copy {copy['id']} (it shared the data removed from {shared.from_store})")
    return "; ".join(notes)


def _lists(shared: SharedData, image_id: str, wanted: set[str]) -> bool:
    other = shared.glance.get_image(image_id)
    return other is not None and bool(urls(other) & wanted)
