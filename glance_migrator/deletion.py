"""Every deletion glance-migrator makes, and the rules that allow it. Nothing else in the tool deletes.

Two things are ever deleted:

1. **An image's old data** in the source store (`remove_old_data`), the one irreversible step of a move,
   and, before a copy-image, a copy in the target store that nothing proves (`remove_unproven_copy`).
   copy-image deletes it from the store (`DELETE /v2/stores/OLD/ID`, one location per call: an image can
   list several there); location-swap removes each old location (a JSON patch; Glance deletes its data).
   Each removal needs, checked here on the image as Glance shows it just before:
   - its data is the data discovery recorded (verify.check_unchanged: size and every comparable hash);
   - it holds the new copy: the target store lists it (copy-image: only a copy written by a Glance copy task
     of this run, which hashed what it wrote, gets that far), or it lists the location of the copy this run
     uploaded and verified (location-swap);
   - the data is no other image's only data: Glance deletes a location's data whoever else lists it, so
     who else does is asked first (sharing.py); if another image would be left with nothing, this image is
     blocked (kind "shared"), both copies intact.
   Afterwards the image's earlier glance-migrator copies (a previous location-swap) that listed only that
   data are deleted: they serve nothing any more.
2. **The tool's own copies**, location-swap's hidden images B (COPY_OF_PROPERTY names the image they were
   made for; nothing else is ever deleted as a copy): a copy whose upload broke or did not verify, the
   leftovers of a crashed attempt, and the copies of an image that someone deleted mid-run. A copy that
   shares its data with any other image is kept.

Glance errors map to outcomes here too: a removal Glance refuses for now (RBD clone children: 409 to a store
delete, 500 to a location remove) blocks the image; a glance-api node that lacks the source store says so (409
"not available on this node" to a store delete, 500 "Unknown scheme" to a location remove) and fails it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from glance_migrator.errors import ImageBlocked, ImageFailure
from glance_migrator.glance import (
    GlanceHTTPError,
    GlanceUnavailable,
    image_stores,
    location_store,
    stores_holding,
)
from glance_migrator.models import ImageRow
from glance_migrator.sharing import COPY_OF_PROPERTY, SHARED, SharedData, SharingUnseen
from glance_migrator.verify import check_unchanged

if TYPE_CHECKING:
    from glance_migrator.strategies import StepContext

MAX_OLD_LOCATIONS: Final = 16  # removals tried (one location each) before an image is given up on

UNKNOWN_SCHEME: Final = "Unknown scheme"  # glance_store's UnknownScheme, in a 500 from a node without the store
_CLONES = (
    "If the old store is Ceph, images cloned from this one (Nova/Cinder `rbd clone`) hold it: flatten or remove "
    "them, then `glance-migrator retry`"
)


def remove_old_data(
    ctx: StepContext,
    row: ImageRow,
    image: dict[str, Any],
    refresh: Callable[[], dict[str, Any]],
    copy_url: str | None = None,
) -> str:
    """Remove every location the image has in the source store, each only as the rules above allow, then retire
    its earlier copies. `copy_url`: location-swap's verified copy, which the image must list (copy-image: None,
    the target store must hold it). `refresh` gives the image as Glance shows it now. Says what was done."""
    removed, notes = 0, []
    if copy_url is not None and _unproven_in_target(ctx, image, copy_url):  # before the old data goes
        _may_remove(ctx, row, image, copy_url)
        _guard(ctx.shared, image, ctx.to_store, keep=copy_url)
        _remove_locations(ctx, row, image, refresh, ctx.to_store, keep=copy_url)
        notes.append(f"removed the image's other location(s) in {ctx.to_store}: nothing proved their bytes")
        image = refresh()
    while ctx.from_store in stores_holding(image, ctx.legacy):
        if removed == MAX_OLD_LOCATIONS:
            raise ImageFailure(f"still listed in {ctx.from_store} after {MAX_OLD_LOCATIONS} removals")
        _may_remove(ctx, row, image, copy_url)
        _guard(ctx.shared, image, ctx.from_store, keep=copy_url)
        if copy_url is None:
            _store_delete(ctx, row, refresh, ctx.from_store)
        else:
            _remove_locations(ctx, row, image, refresh, ctx.from_store, keep=copy_url)
        removed += 1
        image = refresh()
    if copy_url is not None and copy_url not in ctx.shared.urls(image):
        raise ImageFailure(f"after removing the old location the image no longer lists its copy in {ctx.to_store}")
    how = "deleted from store" if copy_url is None else "location removed from"
    done = f"{how} {ctx.from_store}" if removed else f"already gone from store {ctx.from_store}"
    return "; ".join(filter(None, [*notes, done, _retire_copies(ctx.shared, row.image_id, keep=row.copy_image_id)]))


def remove_unproven_copy(
    ctx: StepContext, row: ImageRow, image: dict[str, Any], refresh: Callable[[], dict[str, Any]]
) -> str:
    """copy-image found the image in the target store already, written by no Glance copy since discovery (a
    location added by hand: Glance checks nothing then; data that rotted since an earlier copy). Nothing proves
    those bytes, so they are deleted, for Glance to copy the image afresh: only while the image still has its
    data in the source store, and not when it is another image's only data. Says what was done."""
    removed = 0
    while ctx.to_store in image_stores(image):
        if ctx.from_store not in image_stores(image):
            raise ImageFailure(f"its copy in {ctx.to_store} is unproven and it is no longer in {ctx.from_store}")
        if removed == MAX_OLD_LOCATIONS:
            raise ImageFailure(f"still listed in {ctx.to_store} after {MAX_OLD_LOCATIONS} removals")
        check_unchanged(row, image, "before removing an unproven copy")
        _guard(ctx.shared, image, ctx.to_store)
        _store_delete(ctx, row, refresh, ctx.to_store)
        removed += 1
        image = refresh()
    return (
        f"deleted the copy it already had in {ctx.to_store}: no Glance copy of this run wrote it, so nothing proved it"
    )


def _may_remove(ctx: StepContext, row: ImageRow, image: dict[str, Any], copy_url: str | None) -> None:
    check_unchanged(row, image, "before removing the old copy")
    if copy_url is None and ctx.to_store not in image_stores(image):
        raise ImageFailure(
            f"refusing to delete from {ctx.from_store}: {ctx.to_store} no longer lists the image "
            f"(stores: {image.get('stores')})"
        )
    if copy_url is not None and copy_url not in ctx.shared.urls(image):
        raise ImageFailure(f"refusing to remove the old location: the image does not list the one in {ctx.to_store}")


def _store_delete(ctx: StepContext, row: ImageRow, refresh: Callable[[], dict[str, Any]], store: str) -> None:
    try:
        ctx.glance.delete_from_store(row.image_id, store)
    except GlanceHTTPError as e:
        if store not in image_stores(refresh()):
            return  # our earlier delete landed; only its answer was lost
        if e.status == 409 and "not available on this node" in e.detail:
            raise _node_without(store, e) from e
        if e.status == 409:
            raise ImageBlocked(f"Glance will not delete the copy in {store} yet: {e}. {_CLONES}") from e
        raise ImageFailure(f"Glance refused to delete the copy in {store}: {e}", kind="refused") from e


def _remove_locations(
    ctx: StepContext, row: ImageRow, image: dict[str, Any], refresh: Callable[[], dict[str, Any]], store: str, keep: str
) -> None:
    """Remove the image's locations in `store` (Glance deletes their data), all but the one whose URL is `keep`."""
    doomed = [
        i for i, loc in enumerate(image["locations"]) if location_store(loc, ctx.legacy) == store and loc["url"] != keep
    ]
    for index in reversed(doomed):  # highest index first, so the others keep their index
        try:  # not retried blindly: a 500 here is how Glance says an RBD clone child holds the data
            ctx.glance.patch(row.image_id, [{"op": "remove", "path": f"/locations/{index}"}], retry=False)
        except (GlanceHTTPError, GlanceUnavailable) as e:
            _location_refused(ctx, row, e, refresh, store, keep)


def _location_refused(
    ctx: StepContext,
    row: ImageRow,
    error: Exception,
    refresh: Callable[[], dict[str, Any]],
    store: str,
    keep: str,
) -> None:
    """Glance did not remove a location: was it removed after all, or is the image blocked?"""
    after = refresh()["locations"]
    if not any(location_store(loc, ctx.legacy) == store and loc["url"] != keep for loc in after):
        return  # it went through; only the answer was lost
    http = error if isinstance(error, GlanceHTTPError) else error.__cause__
    if not isinstance(http, GlanceHTTPError):
        raise error  # connection trouble, not a refusal: the run stops, resumable, nothing changed
    if http.status == 500 and UNKNOWN_SCHEME in http.detail:  # not a clone: this node cannot parse the store's URL
        raise _node_without(store, http) from error
    in_ceph = any(loc["url"].startswith("rbd://") for loc in after if location_store(loc, ctx.legacy) == store)
    if http.status != 409 and not (http.status == 500 and in_ceph):  # else: how Glance says a clone holds it
        raise ImageFailure(
            f"Glance refused to remove the location in {store}: {http}. The image still has its locations; "
            "glance-api's log says why. Once that is fixed, `glance-migrator retry`",
            kind="refused",
        )
    raise ImageBlocked(
        f"Glance will not remove the location in {store} ({error}). The image still has its locations and "
        f"its copy {row.copy_image_id} is intact. {_CLONES}"
    )


def _node_without(store: str, http: GlanceHTTPError) -> ImageFailure:
    """A glance-api node behind the endpoint lacks `store` in its enabled_backends: it answers a store delete with
    409 "not available on this node" and a location remove with 500 "Unknown scheme" (glance_store there knows no
    driver for the location's URL). Either way the node removed nothing (the caller saw the location still there)."""
    return ImageFailure(
        f"a glance-api node answered that it has no store {store} ({http}): every node behind the endpoint needs "
        f"{store} in enabled_backends until the migration is done; then `retry`",
        kind="refused",
    )


def _unproven_in_target(ctx: StepContext, image: dict[str, Any], copy_url: str) -> bool:
    """location-swap: the image lists a location in the target store besides the copy this run verified (added
    by hand, or left by someone): nothing proves its bytes, and Glance may serve it first."""
    return any(
        location_store(loc, ctx.legacy) == ctx.to_store and loc["url"] != copy_url
        for loc in ctx.shared.locations(image) or []
    )


def _guard(shared: SharedData, image: dict[str, Any], store: str, keep: str | None = None) -> None:
    """Raise ImageBlocked if deleting the image's data in `store` (the doomed URLs; not `keep`) would leave
    another image with no data. Earlier copies of this image are retired afterwards (`_retire_copies`)."""
    locations = shared.locations(image)
    if locations is None:
        why = shared.unseen(image)
        if why:
            raise SharingUnseen(why)
        return
    # A location whose metadata names no store may be this store's (a converted single-store cloud): doomed too.
    doomed = {loc["url"] for loc in locations if location_store(loc, shared.legacy) in (store, None)} - {keep}
    if not doomed:
        return
    image_id = image["id"]
    stranded = []
    for other_id in sorted(shared.listing(doomed, but=image_id)):
        other = shared.glance.get_image(other_id)
        if other is None:
            shared.forget(other_id)  # deleted since the index read it
            continue
        if not shared.urls(other) & doomed:
            continue  # no longer lists the data
        if other.get(COPY_OF_PROPERTY) == image_id or shared.urls(other) - doomed:
            continue  # our own earlier copy (retired afterwards), or it keeps a location of its own
        stranded.append(f"{other_id} ({other.get('name') or 'unnamed'}, {other.get('status')})")
    if stranded:
        raise ImageBlocked(
            f"its data in {store} is also the only data of image(s) {', '.join(stranded)}: removing "
            "it would destroy theirs, so it stays. Both copies of this image are intact. Migrate those images "
            "too (in this run they get one more try at its end), then `glance-migrator retry` this one",
            kind=SHARED,
        )


def _retire_copies(shared: SharedData, image_id: str, keep: str | None) -> str:
    """After the image left the source store: delete its earlier glance-migrator copies that listed only data
    in that store (shared with it, now deleted; or a leftover of their own), unless someone else lists that
    data. `keep` is the current location-swap copy. Says what it did, "" for nothing. Idempotent.

    The copies come from the sharing index (copies of earlier runs are in the listing it starts from), each then
    read as Glance shows it now: no search of the whole catalogue per image."""
    notes = []
    for copy_id in sorted(shared.copies_of(image_id) - {keep or ""}):
        copy = shared.glance.get_image(copy_id)
        if copy is None:
            shared.forget(copy_id)
            continue
        copy_urls = shared.urls(copy)
        if copy["id"] == keep or copy.get(COPY_OF_PROPERTY) != image_id or not copy_urls:
            continue
        if any(location_store(loc, shared.legacy) != shared.from_store for loc in shared.locations(copy) or []):
            continue  # it holds data elsewhere: not the old store's leftover
        done = f"deleted its old copy {copy['id']} (it shared the data removed from {shared.from_store})"
        notes.append(_delete_unused_copy(shared, copy, done))
    return "; ".join(notes)


def _lists(shared: SharedData, image_id: str, wanted: set[str]) -> bool:
    other = shared.glance.get_image(image_id)
    return other is not None and bool(shared.urls(other) & wanted)


def discard_copy(ctx: StepContext, copy_id: str) -> None:
    """A copy this step just created whose upload broke, did not verify or went to the wrong store: nothing but
    the tool knows it yet (the image lists its location only from location-set on)."""
    ctx.glance.delete_image(copy_id)


def drop_leftover_copies(ctx: StepContext, row: ImageRow, copies: list[dict[str, Any]], image_urls: set[str]) -> None:
    """Copies left by an attempt that died before its copy was verified and recorded: unprotected (a copy is
    protected before the image lists its location) and sharing no data with the image."""
    for copy in copies:
        if (
            copy.get(COPY_OF_PROPERTY) == row.image_id
            and not copy.get("protected")
            and not ctx.shared.urls(copy) & image_urls
        ):
            ctx.glance.delete_image(copy["id"])


def drop_copies_of_gone_image(ctx: StepContext, row: ImageRow) -> str | None:
    """Someone deleted the image mid-migration: remove its copies B, which nothing else uses. Says what it did;
    None when the image is not gone.

    Only once Glance says the image itself is gone (a step fails as "gone" also when B vanished). Before the
    location swap B's data is B's alone; after it Glance deleted that shared data object with the image (it
    deletes every location's data), so B would stay hidden and protected forever, `active` and serving nothing.
    Only images naming this one in COPY_OF_PROPERTY are touched, and none whose data another image lists.
    Repeated after a crash, it finds less to do.
    """
    if ctx.glance.get_image(row.image_id) is not None:
        return None  # a step failed as "gone" because its copy vanished: the image and its copies stay
    copies = {copy["id"]: copy for copy in ctx.glance.find_copies(COPY_OF_PROPERTY, row.image_id)}
    if row.copy_image_id and row.copy_image_id not in copies:
        recorded = ctx.glance.get_image(row.copy_image_id)
        if recorded is not None:
            copies[row.copy_image_id] = recorded
    notes = []
    for copy_id, copy in copies.items():
        if copy.get(COPY_OF_PROPERTY) != row.image_id:
            continue  # not a copy of this image: never ours to delete
        notes.append(_delete_unused_copy(ctx.shared, copy, f"removed its copy {copy_id}"))
    return "; ".join(notes)


def _delete_unused_copy(shared: SharedData, copy: dict[str, Any], done: str) -> str:
    """Unprotect and delete one of the tool's copies unless another image lists its data; `done` on success (or
    when it was gone already), else what stopped it."""
    copy_urls = shared.urls(copy)
    users = [u for u in shared.listing(copy_urls, but=copy["id"]) if _lists(shared, u, copy_urls)]
    if users:
        return f"kept its copy {copy['id']}: image(s) {', '.join(sorted(users))} use its data"
    try:
        if copy.get("protected"):
            shared.glance.patch(copy["id"], [{"op": "replace", "path": "/protected", "value": False}])
        shared.glance.delete_image(copy["id"])
    except GlanceHTTPError as e:
        if e.status != 404:  # 404: gone meanwhile, which is what we wanted
            return f"could not delete its copy {copy['id']} ({e}): delete it by hand"
    return done
