"""Who else lists an image's data: the knowledge deletion.py asks for before Glance deletes anything.

Glance deletes a location's data whenever the location is removed or the image leaves a store
(`DELETE /v2/stores/...`), whoever else lists the same URL: it never looks. Shared objects are common
where locations were ever edited: the original 2015 script left each image and its copy on one
object, location-swap does the same (on purpose: see strategies/location_swap.py), and so does a
`glance location-add` by hand. What deletion.py decides from it is written there.

Who lists a URL is read from Glance's image list, every URL whatever its store metadata says, and each
hit is then checked against the image as Glance shows it now. The index starts from one pass over every
image (discovery's own listing, or a read of its own on `run --resume`) and is then kept current by
listing only the images Glance changed since the previous read began (`updated_at=gte:`): Glance stamps
updated_at on every change of an image's locations (a location added or removed, a store delete, an
import), as its DB layer does on every image update. It is brought up to date before the first lookup and
whenever it is older than INDEX_MAX_AGE; the read runs outside the lookup lock and its result is swapped
in. Images deleted since stay in the index until a lookup finds them gone (they cannot hide anything:
every hit is checked). Where Glance hides locations (show_multiple_locations = False, fine for
copy-image) they are read through the locations API (GET /v2/images/{id}/locations, admin from Glance
32), for the changed images only after the first read; where that is refused too, sharing cannot be
seen and deletion.py stops the run before its first delete, unless the operator accepts the risk
(--accept-unseen-sharing).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from glance_migrator.errors import CloudError, UsageError
from glance_migrator.glance import Glance

log = logging.getLogger(__name__)

COPY_OF_PROPERTY: Final = "glance_migrator_copy_of"  # names the image a location-swap copy B was made for
INDEX_MAX_AGE: Final = 120.0  # seconds an index of who lists which URL is trusted before it is brought up to date
# An update asks for the images changed since the previous read began, by the earlier of our clock and the newest
# updated_at Glance showed then, less this margin: for glance-api nodes (and us) whose clocks disagree, and for a
# change that Glance stamped before its transaction committed (a DB lock wait, up to 50 s on MySQL by default).
CHANGE_MARGIN: Final = timedelta(minutes=5)
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


class LocationIndex:
    """Which images list which URL, and which are glance-migrator's copies of which image (COPY_OF_PROPERTY), as
    of a listing of every image, and from when a later read must ask for the images changed since (`since`).
    Built by discovery from its own listing (`begin`, `add` each page, `end`) or by SharedData itself; kept
    current by SharedData.

    Kept in a private temporary SQLite database, not in Python objects: a run's memory then stays the same
    however many images the cloud holds (in dicts it was about 0.4 KiB per image, 20 MiB at 50,000). SQLite
    keeps a few MiB of it cached and the rest in a file of its own that it deletes when the index is closed
    (or its process ends); `close` when done with it."""

    def __init__(self) -> None:
        # "": a temporary on-disk database, private to this connection (calls come from several threads, one at
        # a time under self._lock); nothing in it needs to survive a crash, so no journal and no fsync (after a
        # failed write the index is not trusted again: see _using)
        self._db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        self._db.executescript(
            """
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            PRAGMA cache_size = -4096;
            CREATE TABLE lists (url TEXT NOT NULL, image TEXT NOT NULL, PRIMARY KEY (url, image)) WITHOUT ROWID;
            CREATE INDEX lists_image ON lists (image);
            CREATE TABLE copies (copy TEXT PRIMARY KEY, original TEXT NOT NULL) WITHOUT ROWID;
            CREATE INDEX copies_original ON copies (original);
            """
        )
        self._lock = threading.Lock()
        self._failed: UsageError | None = None
        self.since: str | None = None  # None: no complete listing yet, the next read lists every image
        self.read_at: float | None = None  # time.monotonic() when the listing it holds began
        self._mark: tuple[str, float] | None = None
        self._complete = True

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def begin(self, glance: Glance) -> None:
        """Before a listing of every image: note from when the read after it must ask for changes."""
        self._mark, self._complete = change_mark(glance), True

    def add(self, page: Iterable[dict[str, Any]]) -> None:
        """A page of the listing; an image whose locations Glance hides leaves the index incomplete (the first
        lookup reads every image then, through the locations API)."""
        shown = []
        for image in page:
            if "locations" not in image:
                self._complete = False
            else:
                urls = {location["url"] for location in image["locations"]}
                shown.append((image["id"], urls, image.get(COPY_OF_PROPERTY)))
        self.put(shown)

    def end(self) -> None:
        """The listing saw every image: the index holds as of its beginning."""
        if self._complete and self._mark is not None:
            self.since, self.read_at = self._mark

    def put(self, images: Iterable[tuple[str, Iterable[str], str | None]]) -> None:
        """Each image (id, URLs, copy_of) lists exactly these URLs now (and is a copy made for image `copy_of`),
        all recorded at once."""
        entries = [(image_id, set(urls), copy_of) for image_id, urls, copy_of in images]
        ids = [(image_id,) for image_id, _urls, _copy_of in entries]
        with self._writing():
            self._db.executemany("DELETE FROM lists WHERE image = ?", ids)
            self._db.executemany("DELETE FROM copies WHERE copy = ?", ids)
            self._db.executemany(
                "INSERT OR IGNORE INTO lists VALUES (?, ?)",
                ((url, image_id) for image_id, urls, _copy_of in entries for url in urls),
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO copies VALUES (?, ?)",
                ((image_id, copy_of) for image_id, _urls, copy_of in entries if copy_of),
            )

    def forget(self, image_id: str) -> None:
        with self._writing():
            self._db.execute("DELETE FROM lists WHERE image = ?", (image_id,))
            self._db.execute("DELETE FROM copies WHERE copy = ?", (image_id,))

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One transaction (a statement each would be one each, many times slower)."""
        with self._using():
            self._db.execute("BEGIN")
            try:
                yield
            except BaseException as e:
                if not isinstance(e, sqlite3.Error):  # without a journal a rollback undoes nothing: see _using
                    self._failed = UsageError(
                        f"the sharing index was stopped while it was written ({type(e).__name__}); "
                        "`glance-migrator run --resume` builds it again"
                    )
                if self._db.in_transaction:  # SQLite may have ended it already (a full disk)
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _using(self) -> Iterator[None]:
        """The index's DB, one caller at a time. Its file failing (a full disk, say) stops the run, clearly, and
        the index answers nothing more: without a journal a failed write can leave it half written, and a half
        written index could miss an image that shares data about to be deleted."""
        with self._lock:
            if self._failed is not None:
                raise self._failed
            try:
                yield
            except sqlite3.Error as e:
                self._failed = UsageError(
                    f"the sharing index's temporary file failed: {e}. It lives in $SQLITE_TMPDIR, $TMPDIR or "
                    "/var/tmp (the first that is writable) and needs about 0.25 KiB per image: point SQLITE_TMPDIR "  # noqa: S108
                    "at a directory with room, then `glance-migrator run --resume`"
                )
                raise self._failed from e

    def listing(self, urls: Collection[str]) -> set[str]:
        """Ids of the images that list one of `urls`."""
        with self._using():
            return {
                image_id
                for url in urls
                for (image_id,) in self._db.execute("SELECT image FROM lists WHERE url = ?", (url,))
            }

    def copies(self, image_id: str) -> set[str]:
        """Ids of the images made as glance-migrator's copies of this one."""
        with self._using():
            return {copy for (copy,) in self._db.execute("SELECT copy FROM copies WHERE original = ?", (image_id,))}

    def images(self) -> set[str]:
        """Ids of every image that lists a URL."""
        with self._using():
            return {image_id for (image_id,) in self._db.execute("SELECT DISTINCT image FROM lists")}


def change_mark(glance: Glance) -> tuple[str, float]:
    """Taken before a read: the updated_at from which the next read asks for changed images (ISO 8601, UTC), and
    the time.monotonic() the read began. Glance stamps updated_at with its own clock, which ours need not
    match: the earlier of the two, less CHANGE_MARGIN."""
    started = time.monotonic()
    ours = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    newest = glance.newest_update()
    theirs = _utc(datetime.fromisoformat(newest)) if newest else ours
    return (min(ours, theirs) - CHANGE_MARGIN).isoformat() + "Z", started


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


class SharedData:
    """Which images list which URL; one per run, shared by its workers.

    Locations come from the images as Glance shows them (show_multiple_locations = True) or, where it hides them,
    from `GET /v2/images/{id}/locations`, one call per image (`mode` says which, once the first image told).
    """

    def __init__(
        self,
        glance: Glance,
        from_store: str,
        legacy: bool,
        accept_unseen: bool = False,
        index: LocationIndex | None = None,
    ) -> None:
        self.glance = glance
        self.from_store = from_store
        self.legacy = legacy
        self.accept_unseen = accept_unseen  # --accept-unseen-sharing
        self.mode: str | None = None  # "shown", "api" or "unseen"
        self._lock = threading.Lock()  # lookups and changes of the index
        self._reading = threading.Lock()  # one read of Glance at a time: a lookup waits for the one under way
        self._index = index or LocationIndex()  # discovery's, when this process listed every image
        self._updated = False  # brought up to date once: discovery's listing is not trusted as it is
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
        self._bring_up_to_date()
        with self._lock:
            return self._index.listing(urls) - {but}

    def copies_of(self, image_id: str) -> set[str]:
        """Ids of the images the index says are glance-migrator's copies of this one (location-swap's copies B
        of an earlier run: those that deletion.py may retire exist since before this run's discovery)."""
        self._bring_up_to_date()
        with self._lock:
            return self._index.copies(image_id)

    def forget(self, image_id: str) -> None:
        """The image is gone (Glance says so): out of the index."""
        with self._lock:
            self._index.forget(image_id)

    def _bring_up_to_date(self) -> None:
        """Read what changed before the first lookup (discovery's listing may be hours old by then) and once the
        index is older than INDEX_MAX_AGE. A read through the locations API makes one call per image: not more
        often than every 5 reads' time."""
        with self._reading:
            index = self._index
            age = None if index.read_at is None else time.monotonic() - index.read_at
            if self._updated and age is not None and age <= max(INDEX_MAX_AGE, 5 * self._read_took):
                return
            since, started = change_mark(self.glance)
            if index.since is None:  # nothing read yet (`run --resume`, --image, hidden locations): every image
                fresh = LocationIndex()
                for page in self._read(None):
                    fresh.put(page)
                with self._lock:
                    self._index, old = fresh, index
                index = fresh
                old.close()  # what an incomplete listing left in it
            else:
                # a page at a time: after a bulk change (or a catalogue written minutes ago) that is every image
                # again. No lookup sees a page applied and the next not: lookups wait for this read
                # (self._reading) before they look.
                changed = 0
                for page in self._read(index.since):
                    index.put(page)
                    changed += len(page)
                log.debug("sharing index: %d image(s) changed since %s", changed, index.since)
            index.since, index.read_at = since, started
            self._read_took = time.monotonic() - started
            self._updated = True

    def _read(self, changed_since: str | None) -> Iterator[list[tuple[str, set[str], str | None]]]:
        """Every image (or those changed since) as listed, a page at a time, each as `LocationIndex.put` takes it:
        its id, the URLs of its locations as far as they can be seen (every URL, whatever its metadata says: the
        list does not fill in a converted cloud's stores) and the image it is a copy of."""
        for page in self.glance.image_pages(changed_since=changed_since):
            # none where Glance hides them and the locations API is not known to answer (deletion asks
            # `locations` first, which sets the mode); whether it is a copy can be seen all the same
            yield [
                (
                    image["id"],
                    self.urls(image) if "locations" in image or self.mode == "api" else set(),
                    image.get(COPY_OF_PROPERTY),
                )
                for image in page
            ]
