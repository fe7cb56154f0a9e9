"""location-swap: the original 2015 method, made safe, for clouds whose target store takes added locations.

pending -> downloaded -> created -> location-set -> location-deleted -> protected -> cleaned -> done.
A second image B is uploaded straight into the target store; its location is *added* to the image A,
and only then is A's old location removed (Glance refuses to remove the last location, and no moment
may exist with zero copies). A and B then share one data object: deleting B would leave A `active`
serving nothing, so both are protected, and B is hidden and names A in COPY_OF_PROPERTY so that a run
that crashed before recording B's id finds it again. Glance checks neither size nor hash when a
location is added, so every hash is checked here.

Spooled, the download also uploads B as it goes (a second thread fed the same chunks): the copy costs about one
transfer, not a download then an upload. B made so is only a candidate, like any copy an earlier attempt left:
create_copy adopts it once Glance's record of it (status, size, md5 and multihash, store) matches the image's,
and uploads from the spool file when it does not, or when that upload failed.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO, Final, TypeVar

import requests

from glance_migrator.deletion import discard_copy, drop_leftover_copies, remove_old_data
from glance_migrator.errors import CloudError, ImageFailure, IntegrityFailure
from glance_migrator.formats import ADVICE, FORMAT, HEAD, head_of, refusal
from glance_migrator.glance import GlanceHTTPError, GlanceUnavailable, location_store, stores_holding
from glance_migrator.models import ImageRow
from glance_migrator.sharing import COPY_OF_PROPERTY
from glance_migrator.spool import HashingStream, Relay, Spool
from glance_migrator.state import State
from glance_migrator.strategies import Step, StepContext, StepResult, current_image
from glance_migrator.verify import DataHasher, check_unchanged, differences, fingerprint, hash_file, recorded

UPLOAD_ATTEMPTS: Final = 3
TRANSFER_ATTEMPTS: Final = 3  # downloads whose connection breaks are started again this many times in all
TRANSFER_PAUSE: Final = 1.0  # seconds before a broken transfer starts again (times the attempt)

log = logging.getLogger(__name__)
T = TypeVar("T")


def _locations(image: dict[str, Any]) -> list[dict[str, Any]]:
    if "locations" not in image:
        raise ImageFailure(
            "Glance does not show image locations (show_multiple_locations = False, or policy); "
            "location-swap needs them",
            kind="refused",
        )
    return list(image["locations"])


def _in_store(ctx: StepContext, locations: list[dict[str, Any]], store: str) -> list[int]:
    return [i for i, loc in enumerate(locations) if location_store(loc, ctx.legacy) == store]


def download(ctx: StepContext, row: ImageRow) -> StepResult:
    image = current_image(ctx, row.image_id)
    check_unchanged(row, image, "before download")
    if ctx.spool is None:
        return StepResult("no spool (--no-spool): the data streams from the image into the copy, hashed on the way")
    return StepResult(_spool_file(ctx, ctx.spool, row, copy_from=image))


def _spool_file(ctx: StepContext, spool: Spool, row: ImageRow, copy_from: dict[str, Any] | None = None) -> str:
    """The image's bytes in its spool file, verified: an earlier attempt's complete file, or a new download;
    with `copy_from` (the image as just read), a new download also uploads a copy B as it goes."""
    path = spool.path(row.image_id)
    if path.exists():
        try:
            hash_file(path, row.os_hash_algo).check(row, "spool file from an earlier attempt")
            return f"spool file {path} from an earlier attempt is complete and verified"
        except IntegrityFailure:
            path.unlink()
    copied = ""

    def fetch() -> DataHasher:
        nonlocal copied
        if copy_from is not None:
            hasher, copied = _download_and_copy(ctx, spool, row, copy_from)
            return hasher
        with ctx.glance.download(row.image_id) as chunks:
            return spool.write(row, chunks)

    hasher = _transfer(ctx, "the download", fetch)
    return f"downloaded {hasher.size} bytes to {path}; {hasher.algo} and md5 match Glance's record{copied}"


def _download_and_copy(ctx: StepContext, spool: Spool, row: ImageRow, source: dict[str, Any]) -> tuple[DataHasher, str]:
    """Download into the spool file while a second thread uploads the same chunks into a new copy B. A download
    that breaks or does not verify fails the upload and deletes B; an upload that fails deletes B and leaves the
    verified spool file, which create_copy uploads. Says what became of B."""
    copy_id = _create_copy_record(ctx, row, source)["id"]
    relay = Relay(row.size or 0)
    upload_error: list[BaseException] = []

    def upload() -> None:
        try:
            _upload_data(ctx, copy_id, relay, row.size or 0)
        except BaseException as e:  # noqa: BLE001 - handed to the downloading thread, which decides
            upload_error.append(e)
        finally:
            relay.close()

    uploader = threading.Thread(target=upload, name=f"upload-{copy_id[:8]}", daemon=True)
    uploader.start()
    try:
        with ctx.glance.download(row.image_id) as chunks:
            hasher = spool.write(row, relay.feed(chunks))
    except BaseException as e:
        relay.end(e)
        uploader.join()
        discard_copy(ctx, copy_id)
        raise
    relay.end()
    uploader.join()
    if upload_error:
        discard_copy(ctx, copy_id)
        why = upload_error[0]
        log.warning("%s: the upload of a copy beside the download failed (%s); copy deleted", row.image_id, why)
        return hasher, f"; the upload of a copy beside it failed ({why}): copy deleted"
    return hasher, f"; copy {copy_id} uploaded beside it"


def _transfer(ctx: StepContext, what: str, action: Callable[[], T]) -> T:
    """A transfer of image data whose connection broke starts again from the first byte, a few times."""
    for attempt in range(1, TRANSFER_ATTEMPTS + 1):
        try:
            return action()
        except GlanceUnavailable as e:
            if attempt == TRANSFER_ATTEMPTS:
                raise
            log.warning("%s broke (%s); starting it again (%d/%d)", what, e, attempt + 1, TRANSFER_ATTEMPTS)
            ctx.sleep(TRANSFER_PAUSE * attempt)
    raise AssertionError("unreachable")


def _usable_copy(ctx: StepContext, row: ImageRow, copy: dict[str, Any]) -> bool:
    return (
        copy.get("status") == "active"
        and not differences(recorded(row), copy)  # B's multihash is Glance's current algorithm: md5 compares
        and ctx.to_store in stores_holding(copy, ctx.legacy)
    )


def create_copy(ctx: StepContext, row: ImageRow) -> StepResult:
    source = current_image(ctx, row.image_id)
    shared_urls = {loc["url"] for loc in _locations(source)}
    copies = ctx.glance.find_copies(COPY_OF_PROPERTY, row.image_id)
    usable = next((copy for copy in copies if _usable_copy(ctx, row, copy)), None)
    # of an upload that died before its copy was recorded, or a second copy of an attempt that was taken over
    drop_leftover_copies(ctx, row, [copy for copy in copies if copy is not usable], shared_urls)
    if usable is not None:  # uploaded beside the download, or by an attempt that died before recording it
        return StepResult(
            f"copy {usable['id']} in {ctx.to_store}: status, size and hashes verified", {"copy_image_id": usable["id"]}
        )
    again = _spool_again(ctx, row, source)
    last_error: Exception | None = None
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        copy = _create_copy_record(ctx, row, source)
        try:
            streamed = _upload(ctx, row, copy["id"])
        except (GlanceUnavailable, requests.RequestException, OSError) as e:  # broke mid-body: cannot be resent
            last_error = e
            discard_copy(ctx, copy["id"])
            if attempt < UPLOAD_ATTEMPTS:
                log.warning(
                    "the upload of the copy %s broke (%s); copy deleted, starting again (%d/%d)",
                    copy["id"],
                    e,
                    attempt + 1,
                    UPLOAD_ATTEMPTS,
                )
            ctx.sleep(TRANSFER_PAUSE)
            continue
        except GlanceHTTPError as e:
            discard_copy(ctx, copy["id"])
            if e.status == 415:  # Glance 30 on: the data is not what disk_format says, or fails a safety check
                found = refusal(source, _head(ctx, row))
                raise ImageFailure(
                    f"Glance refused the copy's data ({e}){f': {found}' if found else ''}; the image is intact in "
                    f"{ctx.from_store}; {ADVICE}",
                    kind=FORMAT,
                ) from e
            raise ImageFailure(f"Glance refused the upload of the copy to {ctx.to_store}: {e}", kind="refused") from e
        uploaded = current_image(ctx, copy["id"], "the copy")
        if ctx.legacy and ctx.to_store not in stores_holding(uploaded, legacy=True):
            discard_copy(ctx, copy["id"])  # the upload went to Glance's default_store, not the target
            raise CloudError(
                f"this single-store Glance wrote the copy to {sorted(stores_holding(uploaded, legacy=True))}, "
                f"not {ctx.to_store}: set [glance_store] default_store to the {ctx.to_store} backend, keep "
                f"{ctx.from_store} in `stores`, restart glance-api, then `run --resume`"
            )
        if streamed is not None:
            try:
                streamed.check(row, "the data streamed from the image")
            except IntegrityFailure:
                discard_copy(ctx, copy["id"])
                raise
        if not _usable_copy(ctx, row, uploaded):
            discard_copy(ctx, copy["id"])
            # The spool file was verified when written; if it fed these bytes it changed since: never reuse it.
            dropped = ctx.spool is not None and ctx.spool.remove(row.image_id)
            raise IntegrityFailure(
                f"the copy in {ctx.to_store} does not match the image: {fingerprint(uploaded)} "
                f"in stores {uploaded.get('stores')!r}; copy deleted"
                + ("; spool file removed, `retry` downloads the image again" if dropped else "")
            )
        return StepResult(
            f"copy {copy['id']} created in {ctx.to_store}, size and hashes verified{again}",
            {"copy_image_id": copy["id"]},
        )
    assert last_error is not None
    raise last_error


def _spool_again(ctx: StepContext, row: ImageRow, source: dict[str, Any]) -> str:
    """A spool file removed since its download (a cleaner, an operator, a lost disk) is downloaded again."""
    if ctx.spool is None or ctx.spool.path(row.image_id).exists():
        return ""
    log.warning("%s: spool file %s is missing; downloading the image again", row.image_id, ctx.spool.path(row.image_id))
    check_unchanged(row, source, "before downloading again")
    return f" (spool file was missing: {_spool_file(ctx, ctx.spool, row)})"


def _head(ctx: StepContext, row: ImageRow) -> bytes:
    """The first MiB of the image's data: from the spool file, or downloaded."""
    if ctx.spool is not None and ctx.spool.path(row.image_id).exists():
        with ctx.spool.path(row.image_id).open("rb") as f:
            return f.read(HEAD)
    with ctx.glance.download(row.image_id) as chunks:
        return head_of(chunks)


def _create_copy_record(ctx: StepContext, row: ImageRow, source: dict[str, Any]) -> dict[str, Any]:
    """Create B (no data yet) under an id chosen here: a create whose answer was lost and was sent again
    answers 409 for an id that exists, instead of leaving a second, orphaned copy."""
    copy_id = str(uuid.uuid4())
    body = {
        "id": copy_id,
        "name": f"{source.get('name') or row.image_id} (glance-migrator copy)",
        "disk_format": source.get("disk_format"),
        "container_format": source.get("container_format"),
        "visibility": "private",
        "os_hidden": True,
        COPY_OF_PROPERTY: row.image_id,
    }
    try:
        return ctx.glance.create_image(body)
    except GlanceHTTPError as e:
        existing = ctx.glance.get_image(copy_id) if e.status == 409 else None
        if existing is None:
            raise ImageFailure(f"Glance refused to create the copy: {e}", kind="refused") from e
        return existing


def _upload(ctx: StepContext, row: ImageRow, copy_id: str) -> DataHasher | None:
    """Upload the image's data into the copy: from the spool file, or (--no-spool) straight from Glance."""
    if ctx.spool is not None:
        path = ctx.spool.path(row.image_id)
        with path.open("rb") as data:
            _upload_data(ctx, copy_id, data, path.stat().st_size)
        return None
    with ctx.glance.download(row.image_id) as chunks:
        stream = HashingStream(chunks, row.size or 0, row.os_hash_algo)
        _upload_data(ctx, copy_id, stream, row.size or 0)
    return stream.hasher


def _upload_data(ctx: StepContext, copy_id: str, data: BinaryIO | Iterable[bytes], size: int) -> None:
    """PUT the copy's data into the target store (a single-store Glance writes to its default_store: no header)."""
    ctx.glance.upload(copy_id, data, size, None if ctx.legacy else ctx.to_store)


def _copy(ctx: StepContext, row: ImageRow) -> dict[str, Any]:
    if not row.copy_image_id:
        raise ImageFailure("no copy recorded for this image", kind="internal")
    copy = current_image(ctx, row.copy_image_id, "the copy")
    if not _usable_copy(ctx, row, copy):
        raise IntegrityFailure(f"the copy {row.copy_image_id} no longer matches the image or left {ctx.to_store}")
    return copy


def _copy_location(ctx: StepContext, copy: dict[str, Any]) -> dict[str, Any]:
    locations = _locations(copy)
    found = _in_store(ctx, locations, ctx.to_store)
    if not found:
        raise ImageFailure(f"the copy {copy['id']} has no location in {ctx.to_store}")
    return locations[found[0]]


def set_location(ctx: StepContext, row: ImageRow) -> StepResult:
    copy = _copy(ctx, row)
    copy_location = _copy_location(ctx, copy)
    image = current_image(ctx, row.image_id)
    check_unchanged(row, image, "before adding the new location")
    if any(loc["url"] == copy_location["url"] for loc in _locations(image)):
        return StepResult(f"already lists the location in {ctx.to_store}")
    if not copy.get("protected"):  # from this patch on the image shares B's data: B must not be deletable
        ctx.glance.patch(copy["id"], [{"op": "replace", "path": "/protected", "value": True}])
    value = {"url": copy_location["url"], "metadata": {} if ctx.legacy else {"store": ctx.to_store}}
    try:
        ctx.glance.patch(row.image_id, [{"op": "add", "path": "/locations/-", "value": value}])
    except GlanceHTTPError as e:
        after = current_image(ctx, row.image_id)
        if not any(loc["url"] == copy_location["url"] for loc in _locations(after)):
            raise ImageFailure(f"Glance refused to add the location in {ctx.to_store}: {e}", kind="refused") from e
        # else: an earlier attempt added it and only its answer was lost ("already exists")
    after = current_image(ctx, row.image_id)
    if not any(loc["url"] == copy_location["url"] for loc in _locations(after)):
        raise ImageFailure("Glance accepted the new location but does not list it")
    return StepResult(f"location in {ctx.to_store} added beside the old one")


def delete_old_location(ctx: StepContext, row: ImageRow) -> StepResult:
    copy_location = _copy_location(ctx, _copy(ctx, row))  # B intact, hashes as recorded
    image = current_image(ctx, row.image_id)
    _locations(image)  # shown, or this step cannot tell which location is which
    refresh = lambda: current_image(ctx, row.image_id)  # noqa: E731 - the image as Glance shows it now
    return StepResult(remove_old_data(ctx, row, image, refresh, copy_url=copy_location["url"]))


def protect(ctx: StepContext, row: ImageRow) -> StepResult:
    done = []
    for image_id in (row.image_id, row.copy_image_id or ""):
        image = current_image(ctx, image_id)
        if not image.get("protected"):
            ctx.glance.patch(image_id, [{"op": "replace", "path": "/protected", "value": True}])
            done.append(image_id)
    return StepResult(f"protected: {', '.join(done) or 'both already'} (the image and its copy share one data object)")


def clean(ctx: StepContext, row: ImageRow) -> StepResult:
    if ctx.spool is None:
        return StepResult("no spool file (--no-spool)")
    removed = ctx.spool.remove(row.image_id)
    return StepResult("spool file removed" if removed else "no spool file left")


def confirm(ctx: StepContext, row: ImageRow) -> StepResult:
    image = current_image(ctx, row.image_id)
    check_unchanged(row, image, "final check")
    stores = stores_holding(image, ctx.legacy)
    if ctx.to_store not in stores or ctx.from_store in stores:  # locations in other stores stay
        raise ImageFailure(
            f"final check: expected in {ctx.to_store} and not in {ctx.from_store}, found {sorted(stores)}"
        )

    def fetch() -> DataHasher:
        hasher = DataHasher(row.os_hash_algo)
        with ctx.glance.download(row.image_id) as chunks:
            for chunk in chunks:
                hasher.update(chunk)
        return hasher

    hasher = _transfer(ctx, "the final download", fetch)
    hasher.check(row, "final download")
    where = ",".join(sorted(stores))  # the target's location, and any in other stores, which stay
    return StepResult(f"in {where}, serves {hasher.size} bytes, hashes match", {"after_stores": where})


STEPS: dict[State, Step] = {
    State.DOWNLOADED: download,
    State.CREATED: create_copy,
    State.LOCATION_SET: set_location,
    State.LOCATION_DELETED: delete_old_location,
    State.PROTECTED: protect,
    State.CLEANED: clean,
    State.DONE: confirm,
}
