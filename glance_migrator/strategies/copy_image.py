"""copy-image: Glance copies the data itself (multi-store import), then we delete the old store's copy.

pending -> copy-requested -> copied -> old-removed -> done. The image keeps its UUID, members and
properties because it is the same image throughout. Glance streams the data from the source store to
the target and compares size, md5 and the multihash with the image's record before it adds the location.

What Glance 33 does, as measured (see docs of the test lab): the import takes a per-image lock
(`os_glance_import_task`), lists the target in `os_glance_importing_to_stores` and clears it from
`os_glance_failed_import`; `stores` gains the target shortly *before* the lock is dropped. So a copy is
finished only once the lock is gone. A second request while it holds answers 409. The lock of a task
that died (Glance restarted) stays until 60 min after its last update and is broken only by a new
import request, so while we wait we ask again now and then. A store delete does not honour the lock:
deleting while an import runs can leave a location without data, so we never delete under a lock.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any, Final

from glance_migrator.errors import ImageBlocked, ImageFailure, IntegrityFailure
from glance_migrator.glance import (
    GlanceHTTPError,
    failed_import_stores,
    image_stores,
    importing_stores,
)
from glance_migrator.models import ImageRow
from glance_migrator.sharing import guard
from glance_migrator.state import State
from glance_migrator.strategies import Step, StepContext, StepResult, current_image, left_old_store
from glance_migrator.verify import check_unchanged

log = logging.getLogger(__name__)

MAX_OLD_LOCATIONS: Final = 16  # store deletes (one location each) tried before giving up on an image
MAX_REREQUESTS: Final = 3  # times a copy that vanished (neither done, running nor failed) is asked again
LOCK_PROBE_INTERVAL: Final = 300.0  # while locked, ask again this often: breaks the lock of a dead task
# Glance breaks a task's import lock, on the next import request, once the task was last updated this long ago.
LOCK_EXPIRY: Final = {"pending": 7200.0, "processing": 3600.0}


def _current(ctx: StepContext, row: ImageRow) -> dict[str, Any]:
    return current_image(ctx, row.image_id)


def _lock_holder(image: dict[str, Any]) -> str | None:
    """The task holding Glance's per-image import lock; the property stays as '' once released."""
    return image.get("os_glance_import_task") or None


def _post_copy(ctx: StepContext, row: ImageRow) -> bool:
    """Ask for the copy once. True: accepted or already there. False: the image is locked right now."""
    try:
        ctx.glance.copy_to_store(row.image_id, ctx.to_store)
        return True
    except GlanceHTTPError as e:
        image = _current(ctx, row)
        if ctx.to_store in image_stores(image) | importing_stores(image):
            return True  # our earlier request landed ("already present", or running)
        if e.status == 409 and _lock_holder(image):
            return False  # "Image has active task": someone's import holds the lock
        if image.get("status") != "active":
            raise ImageFailure(f"image is now {image.get('status')}, Glance copies only active images: {e}") from e
        raise ImageFailure(f"Glance refused copy-image: {e}", kind="refused") from e


def request_copy(ctx: StepContext, row: ImageRow) -> StepResult:
    image = _current(ctx, row)
    check_unchanged(row, image, "before copy")
    stores = image_stores(image)
    if ctx.to_store in stores:
        return StepResult(f"already in store {ctx.to_store}")
    if ctx.to_store in importing_stores(image) and _lock_holder(image):
        return StepResult(f"a copy to {ctx.to_store} is already running (task {_lock_holder(image)})")
    if ctx.from_store not in stores:
        raise ImageFailure(f"in neither {ctx.from_store} nor {ctx.to_store} any more (stores: {sorted(stores)})")
    deadline = time.monotonic() + ctx.lock_timeout
    while not _post_copy(ctx, row):
        if time.monotonic() > deadline:
            raise ImageFailure(f"another operation kept the image locked for {ctx.lock_timeout:.0f} s")
        ctx.sleep(ctx.poll_interval)
    return StepResult(f"copy-image to {ctx.to_store} accepted")


class _TaskWatch:
    """Notices a copy task that stopped making progress (its thread died, Glance lost it)."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.seen: tuple[str, Any] | None = None
        self.since = time.monotonic()

    def check(self, task_id: str) -> bool:
        """True when the task's lock has expired by Glance's rule: a new request now breaks it (and copies).
        Raises ImageFailure for a task that has not moved for ctx.stuck_after seconds."""
        task = self.ctx.glance.get_task(task_id)
        if task is None or task.get("status") in ("success", "failure"):
            return False  # finished or gone: the lock drops (or is broken by the next request)
        if _age(task) > LOCK_EXPIRY.get(str(task.get("status")), LOCK_EXPIRY["processing"]):
            return True
        mark = (task_id, task.get("updated_at"))
        if mark != self.seen:
            self.seen, self.since = mark, time.monotonic()
        elif time.monotonic() - self.since > self.ctx.stuck_after:
            raise ImageFailure(
                f"Glance's copy task {task_id} is {task.get('status')} with no progress for "
                f"{self.ctx.stuck_after:.0f} s (its glance-api worker died?). The image is intact in "
                f"{self.ctx.from_store}. Glance keeps it locked until a new import is asked for 60 min (120 if "
                f"pending) after the task's last update ({task.get('updated_at')}): `glance-migrator retry` "
                f"after that does it. A dead copy can leave a partial file of the image in {self.ctx.to_store} "
                "(a file store: named after the image in its directory) that makes the next copy fail; remove it"
            )
        return False


def _age(task: dict[str, Any]) -> float:
    """Seconds since the task's last update, by our clock (a skewed clock only makes a request come early: 409)."""
    try:
        updated = datetime.fromisoformat(str(task.get("updated_at")).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if updated.tzinfo is None:
        updated = updated.replace(tzinfo=UTC)
    return (datetime.now(UTC) - updated).total_seconds()


def wait_copied(ctx: StepContext, row: ImageRow) -> StepResult:
    deadline = time.monotonic() + ctx.copy_timeout
    next_probe = time.monotonic() + LOCK_PROBE_INTERVAL
    requests_left = MAX_REREQUESTS
    watch = _TaskWatch(ctx)
    expired: set[str] = set()  # dead tasks whose lock we asked Glance to break (then only the probes ask again)
    while True:
        image = _current(ctx, row)
        stores = image_stores(image)
        lock = _lock_holder(image)
        if lock is not None and lock not in expired and watch.check(lock):
            log.info("%s: the lock of dead copy task %s has expired; asking Glance to copy again", row.image_id, lock)
            expired.add(lock)
            _post_copy(ctx, row)  # Glance breaks the expired lock and starts a new task
        elif lock is None:
            if ctx.to_store in stores:
                computed = check_unchanged(row, image, "after copy")
                return StepResult(
                    f"in store {ctx.to_store}, verified by Glance; size and hashes unchanged"
                    + (f"; {computed}" if computed else ""),
                    {
                        "after_stores": ",".join(sorted(stores)),
                        "after_checksum": image.get("checksum"),
                        "after_hash_algo": image.get("os_hash_algo"),
                        "after_hash_value": image.get("os_hash_value"),
                        "after_size": image.get("size"),
                    },
                )
            if ctx.to_store in failed_import_stores(image):
                why = ctx.glance.last_task_message(row.image_id)
                if why and "different from current value" in why:  # Glance hashed the source: it changed
                    raise IntegrityFailure(
                        f"Glance's copy to {ctx.to_store} found data that does not match the image's record "
                        f"({why}); the source copy in {ctx.from_store} is corrupt or changed. Nothing was removed"
                    )
                raise ImageFailure(
                    f"Glance's copy to {ctx.to_store} failed (os_glance_failed_import: {why or 'no message'}); "
                    f"the image is intact in {ctx.from_store}. A file a failed copy left in the target store "
                    "makes every retry fail until it is removed"
                )
            # Neither copied, copying nor failed: the task vanished. Asking again is safe.
            if requests_left == 0:
                raise ImageFailure(f"Glance dropped the copy to {ctx.to_store} {MAX_REREQUESTS} times")
            requests_left -= 1
            _post_copy(ctx, row)
        elif time.monotonic() > next_probe:
            next_probe = time.monotonic() + LOCK_PROBE_INTERVAL
            _post_copy(ctx, row)  # 409 while the task lives; after a dead task's lock expires, restarts it
        if time.monotonic() > deadline:
            raise ImageFailure(f"copy to {ctx.to_store} did not finish within {ctx.copy_timeout:.0f} s")
        ctx.sleep(ctx.poll_interval)


def _unlocked(ctx: StepContext, row: ImageRow) -> dict[str, Any]:
    """The image once no import holds its lock (a store delete must never race an import)."""
    deadline = time.monotonic() + ctx.lock_timeout
    while True:
        image = _current(ctx, row)
        if _lock_holder(image) is None:
            return image
        if time.monotonic() > deadline:
            raise ImageFailure(f"an import kept the image locked for {ctx.lock_timeout:.0f} s; not deleting under it")
        ctx.sleep(ctx.poll_interval)


def remove_old(ctx: StepContext, row: ImageRow) -> StepResult:
    image = _unlocked(ctx, row)
    if ctx.from_store not in image_stores(image):
        check_unchanged(row, image, "before removing the old copy")
        if ctx.to_store not in image_stores(image):
            raise ImageFailure(f"in neither {ctx.from_store} nor {ctx.to_store} (stores: {image.get('stores')})")
        return left_old_store(ctx, row, f"already gone from store {ctx.from_store}")
    # Glance deletes one location per call (the first in that store): an image can list several there.
    for _ in range(MAX_OLD_LOCATIONS):
        # The one irreversible step: only with the copy in the target store and the hashes as recorded.
        check_unchanged(row, image, "before removing the old copy")
        if ctx.to_store not in image_stores(image):
            raise ImageFailure(
                f"refusing to delete from {ctx.from_store}: {ctx.to_store} no longer lists the image "
                f"(stores: {image.get('stores')})"
            )
        guard(ctx.shared, image)  # Glance deletes that data whoever else lists it
        try:
            ctx.glance.delete_from_store(row.image_id, ctx.from_store)
        except GlanceHTTPError as e:
            if ctx.from_store not in image_stores(_current(ctx, row)):
                break  # our earlier delete landed
            if e.status == 409:  # e.g. an RBD snapshot with clone children (instances, volumes) in the old store
                raise ImageBlocked(
                    f"Glance will not delete the copy in {ctx.from_store} yet: {e}. Both copies are intact. "
                    "If the old store is Ceph, images cloned from this one (Nova/Cinder `rbd clone`) hold it: "
                    "flatten or remove them, then `glance-migrator retry`"
                ) from e
            raise ImageFailure(f"Glance refused to delete the copy in {ctx.from_store}: {e}", kind="refused") from e
        image = _unlocked(ctx, row)
        if ctx.from_store not in image_stores(image):
            break
    else:
        raise ImageFailure(f"still listed in {ctx.from_store} after {MAX_OLD_LOCATIONS} store deletes")
    return left_old_store(ctx, row, f"deleted from store {ctx.from_store}")


def confirm(ctx: StepContext, row: ImageRow) -> StepResult:
    image = _current(ctx, row)
    stores = image_stores(image)
    check_unchanged(row, image, "final check")
    if ctx.to_store not in stores or ctx.from_store in stores:
        raise ImageFailure(
            f"final check: expected in {ctx.to_store} and not in {ctx.from_store}, stores: {sorted(stores)}"
        )
    return StepResult(f"stores now {','.join(sorted(stores))}", {"after_stores": ",".join(sorted(stores))})


STEPS: dict[State, Step] = {
    State.COPY_REQUESTED: request_copy,
    State.COPIED: wait_copied,
    State.OLD_REMOVED: remove_old,
    State.DONE: confirm,
}
