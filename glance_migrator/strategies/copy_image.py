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

from glance_migrator.deletion import remove_old_data, remove_unproven_copy
from glance_migrator.errors import ImageFailure, IntegrityFailure
from glance_migrator.formats import ADVICE, FORMAT, refusal_of
from glance_migrator.glance import (
    GlanceHTTPError,
    failed_import_stores,
    image_stores,
    importing_stores,
)
from glance_migrator.models import ImageRow
from glance_migrator.state import State
from glance_migrator.strategies import Step, StepContext, StepResult, current_image
from glance_migrator.verify import check_unchanged

log = logging.getLogger(__name__)

MAX_REREQUESTS: Final = 3  # times a copy that vanished (neither done, running nor failed) is asked again
TASK_LOOK: Final = 10.0  # seconds between reads of a running copy task, to see it is alive
LOCK_PROBE_INTERVAL: Final = 300.0  # while locked, ask again this often: breaks the lock of a dead task
# Glance breaks a task's import lock, on the next import request, once the task was last updated this long ago.
LOCK_EXPIRY: Final = {"pending": 7200.0, "processing": 3600.0}
# oslo.limit's ProjectOverLimit, in the message of a copy task that Glance's Keystone unified limits refused
OVER_LIMIT: Final = "is over a limit for"
STAGING_QUOTA_HINT: Final = (
    "copy-image stages each image's data, which counts against the migrating project's image_stage_total "
    "(MiB) and image_count_uploading (`glance-migrator check` shows them); raise them for the migration, then "
    "`glance-migrator retry`"
)


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


def _proving_task(ctx: StepContext, row: ImageRow) -> str | None:
    """A copy-image task into the target store that succeeded since the image was discovered (it may have been
    running then: someone else's copy is adopted): Glance hashed what it wrote against the image's record. Its
    id; "" when Glance shows the image's tasks and none is such; None when Glance shows no tasks to us."""
    tasks = ctx.glance.image_tasks(row.image_id)
    if tasks is None:
        return None
    discovered = row.created_at.replace(tzinfo=UTC)
    for task in reversed(tasks):
        request = (task.get("input") or {}).get("import_req") or {}
        if (
            task.get("status") == "success"
            and (request.get("method") or {}).get("name") == "copy-image"
            and ctx.to_store in (request.get("stores") or [])
            and _when(task.get("updated_at")) >= discovered  # it finished since: a copy we saw running counts
        ):
            return str(task.get("id"))
    return ""


def request_copy(ctx: StepContext, row: ImageRow) -> StepResult:
    """On an image's first try the copy is asked for at once, and the image read only if Glance refuses: accepted
    (202), the target did not hold the image, which is all a read before would have shown (a request less per
    image). Refused, or on a retry or a resume (where a dead copy's lock or an earlier copy may be waiting), the
    image is read first and each case met: already in the target (proven by a task of this run, or deleted as
    unproven), a copy already running, a lock held by another import, no longer in the source store or active.
    The record is checked against discovery's after the copy too (wait_copied), and Glance hashes what it copies
    against it. On a first try, an image moved from the source store to a third one since discovery is copied
    from there (Glance reads any of its locations); nothing is deleted from the third store."""
    if ctx.first_try:
        try:
            ctx.glance.copy_to_store(row.image_id, ctx.to_store)
            return StepResult(f"copy-image to {ctx.to_store} accepted")
        except GlanceHTTPError as e:
            log.debug("%s: Glance refused the copy (%s); looking at the image", row.image_id, e)
    image = _current(ctx, row)
    check_unchanged(row, image, "before copy")
    stores = image_stores(image)
    done = ""
    if ctx.to_store in stores:
        task = _proving_task(ctx, row)
        if task:
            return StepResult(f"already in store {ctx.to_store}, written by Glance's copy task {task}")
        # Added by hand, or copied before this run and rotted since: only a copy Glance makes now is trusted.
        done = remove_unproven_copy(ctx, row, image, refresh=lambda: _unlocked(ctx, row)) + "; "
        image = _current(ctx, row)
        stores = image_stores(image)
    if ctx.to_store in importing_stores(image) and _lock_holder(image):
        return StepResult(f"a copy to {ctx.to_store} is already running (task {_lock_holder(image)})")
    if ctx.from_store not in stores:
        raise ImageFailure(f"in neither {ctx.from_store} nor {ctx.to_store} any more (stores: {sorted(stores)})")
    deadline = time.monotonic() + ctx.lock_timeout
    polls = ctx.polls()
    while not _post_copy(ctx, row):
        if time.monotonic() > deadline:
            raise ImageFailure(f"another operation kept the image locked for {ctx.lock_timeout:.0f} s")
        next(polls)
    return StepResult(f"{done}copy-image to {ctx.to_store} accepted")


class _TaskWatch:
    """Notices a copy task that stopped making progress (its thread died, Glance lost it). It reads the task at
    most every TASK_LOOK seconds (a tenth of stuck_after if that is shorter): a task updates itself about once a
    minute, and a small image's copy ends before the first look."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.seen: tuple[str, Any] | None = None
        self.since = time.monotonic()
        self.every = min(TASK_LOOK, ctx.stuck_after / 10)
        self.next_look = time.monotonic() + self.every

    def check(self, task_id: str) -> bool:
        """True when the task's lock has expired by Glance's rule: a new request now breaks it (and copies).
        Raises ImageFailure for a task that has not moved for ctx.stuck_after seconds."""
        if time.monotonic() < self.next_look:
            return False
        self.next_look = time.monotonic() + self.every
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


def _when(stamp: Any) -> datetime:
    """A Glance timestamp (ISO 8601, UTC, with or without its zone); the epoch when it cannot be read."""
    try:
        when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return datetime.fromtimestamp(0, UTC)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _age(task: dict[str, Any]) -> float:
    """Seconds since the task's last update, by our clock (a skewed clock only makes a request come early: 409)."""
    if _when(task.get("updated_at")) == datetime.fromtimestamp(0, UTC):
        return 0.0
    return (datetime.now(UTC) - _when(task.get("updated_at"))).total_seconds()


def wait_copied(ctx: StepContext, row: ImageRow) -> StepResult:
    deadline = time.monotonic() + ctx.copy_timeout
    next_probe = time.monotonic() + LOCK_PROBE_INTERVAL
    requests_left = MAX_REREQUESTS
    watch = _TaskWatch(ctx)
    expired: set[str] = set()  # dead tasks whose lock we asked Glance to break (then only the probes ask again)
    polls = ctx.polls()
    while True:
        next(polls)  # first too: no copy is done the instant it was asked for (resumed, 0.1 s is nothing)
        image = _current(ctx, row)
        stores = image_stores(image)
        lock = _lock_holder(image)
        if lock is not None and lock not in expired and watch.check(lock):
            log.info("%s: the lock of dead copy task %s has expired; asking Glance to copy again", row.image_id, lock)
            expired.add(lock)
            _post_copy(ctx, row)  # Glance breaks the expired lock and starts a new task
        elif lock is None:
            if ctx.to_store in stores and _proving_task(ctx, row) == "":
                # Glance shows its tasks, and none of this run wrote the copy that appeared: not ours, not trusted
                log.warning(
                    "%s: a copy in %s that no copy task wrote appeared; copying again", row.image_id, ctx.to_store
                )
                remove_unproven_copy(ctx, row, image, refresh=lambda: _unlocked(ctx, row))
                stores = set()  # and ask again below, as for a copy that vanished
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
                    seen=image,
                )
            if ctx.to_store in failed_import_stores(image):
                why = ctx.glance.last_task_message(row.image_id)
                if why and "different from current value" in why:  # Glance hashed the source: it changed
                    raise IntegrityFailure(
                        f"Glance's copy to {ctx.to_store} found data that does not match the image's record "
                        f"({why}); the source copy in {ctx.from_store} is corrupt or changed. Nothing was removed"
                    )
                refused = refusal_of(ctx.glance, image)
                if refused:
                    raise ImageFailure(
                        f"Glance's copy to {ctx.to_store} failed (task: {why or 'no message'}) and its format check "
                        f"refuses the data: {refused}. The image is intact in {ctx.from_store}; {ADVICE}",
                        kind=FORMAT,
                    )
                raise ImageFailure(
                    f"Glance's copy to {ctx.to_store} failed (os_glance_failed_import: {why or 'no message'}); "
                    f"the image is intact in {ctx.from_store}. A file a failed copy left in the target store "
                    "makes every retry fail until it is removed"
                )
            # Neither copied, copying nor failed: the task vanished, or Glance's quota check refused it as it
            # started (after the 202: that undoes the import properties, only the task's message says why).
            why = ctx.glance.last_task_message(row.image_id)
            if why and OVER_LIMIT in why:
                raise ImageFailure(
                    f"Glance's image quota (Keystone unified limits) refused the copy to {ctx.to_store} (task: {why}); "
                    f"the image is intact in {ctx.from_store}. {STAGING_QUOTA_HINT}",
                    kind="quota",
                )
            # Else asking again is safe.
            if requests_left == 0:
                raise ImageFailure(f"Glance dropped the copy to {ctx.to_store} {MAX_REREQUESTS} times")
            requests_left -= 1
            _post_copy(ctx, row)
        elif time.monotonic() > next_probe:
            next_probe = time.monotonic() + LOCK_PROBE_INTERVAL
            _post_copy(ctx, row)  # 409 while the task lives; after a dead task's lock expires, restarts it
        if time.monotonic() > deadline:
            raise ImageFailure(f"copy to {ctx.to_store} did not finish within {ctx.copy_timeout:.0f} s")


def _unlocked(ctx: StepContext, row: ImageRow, seen: dict[str, Any] | None = None) -> dict[str, Any]:
    """The image once no import holds its lock (a store delete must never race an import); `seen`: as the step
    before saw it as it ended, instead of a first read."""
    deadline = time.monotonic() + ctx.lock_timeout
    polls = ctx.polls()
    image = seen or _current(ctx, row)
    while _lock_holder(image) is not None:
        if time.monotonic() > deadline:
            raise ImageFailure(f"an import kept the image locked for {ctx.lock_timeout:.0f} s; not deleting under it")
        next(polls)
        image = _current(ctx, row)
    return image


def remove_old(ctx: StepContext, row: ImageRow) -> StepResult:
    # a store delete must never race an import (Glance does not lock it): the image copied and unlocked as the
    # copy step ended, or as Glance shows it now
    image = _unlocked(ctx, row, ctx.handed(row.image_id))
    stores = image_stores(image)
    if ctx.from_store not in stores and ctx.to_store not in stores:
        raise ImageFailure(f"in neither {ctx.from_store} nor {ctx.to_store} (stores: {sorted(stores)})")
    last = image

    def refresh() -> dict[str, Any]:
        nonlocal last
        last = _unlocked(ctx, row)
        return last

    done = remove_old_data(ctx, row, image, refresh=refresh)
    return StepResult(done, seen=last if last is not image else None)  # the read that saw the old store gone


def confirm(ctx: StepContext, row: ImageRow) -> StepResult:
    # the last look: as Glance showed the image after the delete, ms ago (no request then), or, resumed, now
    image = ctx.handed(row.image_id) or _current(ctx, row)
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
