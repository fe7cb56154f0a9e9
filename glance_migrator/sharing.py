"""Who else lists an image's data: the knowledge deletion.py asks for before Glance deletes anything.

Glance deletes a location's data whenever the location is removed or the image leaves a store
(`DELETE /v2/stores/...`), whoever else lists the same URL: it never looks. Shared objects are common
where locations were ever edited: the original 2015 script left each image and its copy on one
object, location-swap does the same (on purpose: see strategies/location_swap.py), and so does a
`glance location-add` by hand. What deletion.py decides from it is written there.

Who lists a URL is read from Glance's image list (one pass over every image, renewed every
INDEX_MAX_AGE seconds), every URL whatever its store metadata says, and each hit is then checked
against the image as Glance shows it now. Where Glance hides locations (show_multiple_locations = False,
fine for copy-image) they are read through the locations API (GET /v2/images/{id}/locations, admin from
Glance 32); where that is refused too, sharing cannot be seen and deletion.py stops the run before its
first delete, unless the operator accepts the risk (--accept-unseen-sharing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Collection
from typing import Any, Final

from glance_migrator.errors import CloudError
from glance_migrator.glance import Glance

log = logging.getLogger(__name__)

COPY_OF_PROPERTY: Final = "glance_migrator_copy_of"  # names the image a location-swap copy B was made for
INDEX_MAX_AGE: Final = 120.0  # seconds an index of who lists which URL is trusted before it is read again
SHARED: Final = "shared"  # error_kind of an image blocked because its old data is another image's too


class SharingUnseen(CloudError):
    """Glance shows no image's locations to us, so whether another image shares data about to be deleted cannot
    be known: the run stops before that delete (unless the operator accepted the risk)."""


# How to let the sharing check see locations Glance hides, per release (fetch_image_location's default policy)
SEE_LOCATIONS: Final = (
    "Let glance-migrator see locations: on Glance 30.1-31, --service-cloud with a cloud whose user has the service "
    "role (those releases show them to a service token only); on 29-30.0, the service role for its own user; from "
    "Glance 32 the admin role suffices; on any "
    "release, a policy granting fetch_image_location to its role, or show_multiple_locations = True on a "
    "glance-api only it uses"
)


class SharedData:
    """Which images list which URL; one per run, shared by its workers.

    Locations come from the images as Glance shows them (show_multiple_locations = True) or, where it hides them,
    from `GET /v2/images/{id}/locations`, one call per image (`mode` says which, once the first image told).
    """

    def __init__(self, glance: Glance, from_store: str, legacy: bool, accept_unseen: bool = False) -> None:
        self.glance = glance
        self.from_store = from_store
        self.legacy = legacy
        self.accept_unseen = accept_unseen  # --accept-unseen-sharing
        self.mode: str | None = None  # "shown", "api" or "unseen"
        self._lock = threading.Lock()
        self._index: dict[str, set[str]] = {}
        self._read_at: float | None = None
        self._read_took = 0.0
        self._unseen_logged = False

    def locations(self, image: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The image's locations, as shown or through the locations API; None when Glance lets us see neither."""
        if "locations" in image:
            self.mode = self.mode or "shown"
            return list(image["locations"])
        if self.mode in (None, "api"):
            found = self.glance.image_locations(image["id"])
            if found is not None:
                self.mode = "api"
                return found
        self.mode = "unseen"
        return None

    def urls(self, image: dict[str, Any]) -> set[str]:
        """The URLs of the image's locations, as far as they can be seen."""
        return {location["url"] for location in self.locations(image) or []}

    def unseen(self, image: dict[str, Any]) -> str:
        """Why deleting this image's data must wait (SharingUnseen), or "" once the operator accepted the risk
        (said once per run)."""
        message = (
            f"cannot see whether other images share the data of image {image['id']} in {self.from_store}: Glance "
            "hides locations (show_multiple_locations = False) and refuses GET /v2/images/ID/locations (policy "
            "fetch_image_location). Deleting old data now could destroy another image's only data, so nothing was "
            f"deleted. {SEE_LOCATIONS}, or accept the risk with --accept-unseen-sharing; then `glance-migrator run "
            "--resume` (with the same options)"
        )
        if not self.accept_unseen:
            return message
        with self._lock:
            if not self._unseen_logged:
                self._unseen_logged = True
                log.warning("--accept-unseen-sharing: deleting old data without knowing who else uses it")
        return ""

    def listing(self, urls: Collection[str], but: str) -> set[str]:
        """Ids of the images (other than `but`) that the index says list one of `urls`."""
        with self._lock:
            # Read again when it is old; one call per image (locations API) makes a read slow: not more often
            # than every 5 reads' time.
            if self._read_at is None or time.monotonic() - self._read_at > max(INDEX_MAX_AGE, 5 * self._read_took):
                started = time.monotonic()
                self._index = self._read()
                self._read_at = time.monotonic()
                self._read_took = self._read_at - started
            return {image_id for url in urls for image_id in self._index.get(url, ())} - {but}

    def _read(self) -> dict[str, set[str]]:
        index: dict[str, set[str]] = defaultdict(set)
        for image in self.glance.list_images():
            if "locations" not in image and self.mode != "api":
                continue  # nothing to see (deletion asks `locations` first, which sets the mode)
            for location in self.locations(image) or []:  # every URL, whatever its metadata says: the image
                index[location["url"]].add(image["id"])  # list does not fill in a converted cloud's store names
        return index
