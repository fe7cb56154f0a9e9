"""Everything glance-migrator asks of Glance (Image API v2), through an openstacksdk connection.

Images are handled as the plain JSON dicts Glance returns: every property is a top-level key, as in
the API reference. Transient failures (connection errors, 429, 500, 502, 503, 504) are retried here
with bounded exponential backoff; if they persist the run stops with GlanceUnavailable, which leaves
every image in a resumable state. Any other HTTP error becomes GlanceHTTPError for the caller to judge.
"""

from __future__ import annotations

import functools
import html
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Final

import requests
from keystoneauth1 import exceptions as ksa_exc
from tenacity import (
    before_sleep_log,
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from glance_migrator.bandwidth import DOWN, UP, Bandwidth
from glance_migrator.errors import CloudError
from glance_migrator.redaction import redact
from glance_migrator.timeouts import CONNECT_TIMEOUT, READ_TIMEOUT

if TYPE_CHECKING:
    import openstack.connection

log = logging.getLogger(__name__)

TRANSIENT_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
RETRY_ATTEMPTS: Final = 6
RETRY_WAIT_FIRST: Final = 0.5  # seconds; doubles on each attempt ...
RETRY_WAIT_MAX: Final = 15.0  # ... up to this, so a burst of ~30 s of trouble is ridden out
# Images per list request: Glance's default api_limit_max. A deployment that lowers it gets pages of its own
# maximum, and Glance's `next` link still leads on (ImagesController.index caps `limit` and gives the next marker
# whenever its DB returned that many rows); one that raises it could serve more, at a memory cost on its API node.
PAGE_SIZE: Final = 1000
IDS_PER_LIST: Final = 50  # image ids per `id=in:` list request (about 1.9 KB of URL)
CHUNK: Final = 1 << 20  # bytes per read when streaming image data
PACED_PIECE: Final = 64 << 10  # bytes an upload under --bwlimit sends at a time
ADMIN_ROLES: Final = frozenset({"admin"})
LOCATIONS_API: Final = (2, 17)  # GET /v2/images/{id}/locations (Glance 29, 2024.2)
# Glance's API version per release, for the operator: what `check` names (README "Supported Glance releases")
RELEASE_OF_API: Final = {(2, 17): "Glance 29-32, 2024.2-2026.1", (2, 18): "Glance 33, 2026.2"}


def release_of(api: tuple[int, int] | None) -> str:
    """Which Glance releases answer with this API version, in words."""
    if api is None:
        return "version unknown"
    if api < LOCATIONS_API:
        return "older than Glance 29 (2024.2)"
    return RELEASE_OF_API.get(api, "newer than Glance 33")


class GlanceHTTPError(Exception):
    """Glance answered with an error that is not transient."""

    def __init__(self, status: int, method: str, path: str, detail: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status} {detail}".strip())
        self.status = status
        self.detail = detail

    @property
    def policy_refusal(self) -> bool:
        """Glance's policy refuses the caller this kind of request (403 "not authorized"), for every image alike;
        other 403s are about one image ("only store containing it", a protected image...)."""
        return self.status == 403 and "not authorized" in self.detail.lower()


class TransientHTTPError(GlanceHTTPError):
    """429 or 5xx: worth another try."""


class GlanceUnavailable(CloudError):
    """Glance stayed unreachable or kept answering 5xx after every retry; progress so far is saved."""


def _is_transient(exc: BaseException) -> bool:
    return isinstance(
        exc,
        TransientHTTPError
        | ksa_exc.ConnectionError
        | ksa_exc.ConnectTimeout
        | requests.ConnectionError
        | requests.Timeout
        | ksa_exc.RetriableConnectionFailure,
    )


_retry_transient = retry(
    retry=retry_if_exception(_is_transient),
    stop=stop_after_attempt(RETRY_ATTEMPTS),
    wait=wait_exponential(multiplier=RETRY_WAIT_FIRST, max=RETRY_WAIT_MAX),
    before_sleep=before_sleep_log(log, logging.WARNING),
    reraise=True,
)


def _detail(response: requests.Response) -> str:
    """Glance's error bodies are HTML-ish or JSON; keep one readable line."""
    text = response.text or ""
    try:
        body = response.json()
        if isinstance(body, dict):
            for key in ("message", "title", "error"):
                if key in body:
                    text = str(body[key])
                    break
    except ValueError:
        pass
    return redact(html.unescape(" ".join(text.replace("<br />", " ").split())))[:300]


@dataclass(frozen=True)
class StoreInfo:
    id: str
    default: bool
    description: str
    type: str | None = None  # file, rbd, s3, swift, cinder...: only admins see it (/v2/info/stores/detail)


def image_stores(image: dict[str, Any]) -> set[str]:
    """The stores holding the image: Glance reports them as a comma-separated string."""
    return _csv(image.get("stores"))


# Legacy single-store Glance (no enabled_backends) names no stores: a location's backend is its URL scheme.
LEGACY_SCHEMES: Final = {
    "file": ("file", "filesystem"),
    "rbd": ("rbd",),
    "s3": ("s3", "s3+http", "s3+https"),
    "swift": ("swift", "swift+http", "swift+https", "swift+config"),
    "cinder": ("cinder",),
    "http": ("http", "https"),
}


def location_store(location: dict[str, Any], legacy: bool) -> str | None:
    """The store a location is in: its `store` metadata, or on a legacy Glance the backend of its URL scheme."""
    if not legacy:
        return (location.get("metadata") or {}).get("store")
    scheme = str(location.get("url", "")).partition("://")[0]
    return next((name for name, schemes in LEGACY_SCHEMES.items() if scheme in schemes), scheme)


def stores_holding(image: dict[str, Any], legacy: bool) -> set[str]:
    if not legacy:
        return image_stores(image)
    return {store for loc in image.get("locations") or [] if (store := location_store(loc, legacy))}


def _csv(value: Any) -> set[str]:
    return {s.strip() for s in str(value or "").split(",") if s.strip()}


def failed_import_stores(image: dict[str, Any]) -> set[str]:
    return _csv(image.get("os_glance_failed_import"))


def importing_stores(image: dict[str, Any]) -> set[str]:
    return _csv(image.get("os_glance_importing_to_stores"))


class Glance:
    def __init__(
        self,
        conn: openstack.connection.Connection,
        cloud: str | None = None,
        read_timeout: float = READ_TIMEOUT,
        service: openstack.connection.Connection | None = None,
        bandwidth: Bandwidth | None = None,
    ) -> None:
        self.conn = conn
        self.cloud = cloud
        self.timeout = (CONNECT_TIMEOUT, read_timeout)  # a silent Glance is given up on, then retried
        self.service = service  # --service-cloud: its token goes with the locations API (Glance 30.1-31)
        self.bandwidth = bandwidth  # --bwlimit: image data read and written within it
        self.page_size = PAGE_SIZE  # images per list request (Glance caps it at its api_limit_max)

    @classmethod
    def connect(
        cls,
        cloud: str | None,
        read_timeout: float = READ_TIMEOUT,
        service_cloud: str | None = None,
        bandwidth: Bandwidth | None = None,
    ) -> Glance:
        """Connect like the openstack CLI (--os-cloud, OS_CLOUD, clouds.yaml, OS_* variables) and authenticate;
        `service_cloud` too, if given (a clouds.yaml cloud whose user has the service role)."""
        conn = _connect(cloud, "")
        service = _connect(service_cloud, f"--service-cloud {service_cloud}: ") if service_cloud else None
        return cls(conn, cloud or getattr(conn.config, "name", None), read_timeout, service, bandwidth)

    def roles(self) -> set[str]:
        auth = self.conn.session.auth
        try:
            access = auth.get_access(self.conn.session)  # type: ignore[union-attr]
            return set(access.role_names or [])
        except (ksa_exc.ClientException, AttributeError):
            return set()  # an auth plugin without a token (e.g. noauth): let Glance's policy decide

    # -- plumbing ----------------------------------------------------------------------------------

    def _send(self, method: str, path: str, ok: tuple[int, ...], **kwargs: Any) -> requests.Response:
        try:
            headers = {"Accept": "application/json", **kwargs.pop("headers", {})}  # else errors come as HTML
            # keystoneauth would resend on a 503 by itself (openstacksdk asks it to, 5 times, with backoff):
            # retrying is tenacity's job here, once, with the bounds the README states.
            kwargs.setdefault("status_code_retries", 0)
            response = self.conn.image.request(
                path, method, raise_exc=False, timeout=self.timeout, headers=headers, **kwargs
            )
        except ksa_exc.EndpointNotFound as e:
            raise CloudError(f"the cloud's catalog has no image (Glance) endpoint: {e}") from e
        except ksa_exc.Unauthorized as e:
            raise CloudError("the cloud refused our credentials (HTTP 401)") from e
        if response.status_code in ok:
            return response
        error = TransientHTTPError if response.status_code in TRANSIENT_STATUSES else GlanceHTTPError
        raise error(response.status_code, method, path, _detail(response))

    @_retry_transient
    def _request(self, method: str, path: str, ok: tuple[int, ...], **kwargs: Any) -> requests.Response:
        return self._send(method, path, ok, **kwargs)

    def _call(
        self, method: str, path: str, ok: tuple[int, ...] = (200,), retry: bool = True, **kwargs: Any
    ) -> requests.Response:
        """A request whose retries, once spent, stop the run (GlanceUnavailable) instead of the image.

        `retry=False` for a request whose body is a stream: it cannot be sent twice.
        """
        try:
            return (self._request if retry else self._send)(method, path, ok, **kwargs)
        except TransientHTTPError as e:
            raise GlanceUnavailable(f"Glance keeps failing: {e}; progress is saved, run again with --resume") from e
        except (ksa_exc.ConnectionError, requests.ConnectionError, requests.Timeout) as e:
            raise GlanceUnavailable(
                f"Glance unreachable: {_short(e)}; progress is saved, run again with --resume"
            ) from e

    # -- reading -----------------------------------------------------------------------------------

    def get_image(self, image_id: str) -> dict[str, Any] | None:
        """The image as Glance shows it now, or None when it does not exist (any more)."""
        try:
            return dict(self._call("GET", f"/images/{image_id}").json())
        except GlanceHTTPError as e:
            if e.status == 404:
                return None
            raise

    def answers(self) -> bool:
        """Whether Glance answers at all (a one-image list, with the usual retries): tells a failure that
        belongs to one image from Glance being down for everyone."""
        try:
            self._call("GET", "/images?limit=1")
        except GlanceUnavailable:
            return False
        return True

    @functools.cached_property
    def api_version(self) -> tuple[int, int] | None:
        """The newest image API version this Glance offers, from its version document (keystoneauth's discovery
        reads GET /versions): (2, 17) on Glance 29-32, (2, 18) on 33, less before 29; None if unreadable."""
        try:
            data = self.conn.image.get_endpoint_data()
            version = data.api_version if data else None
        except _client_errors(AttributeError):
            return None
        return (int(version[0]), int(version[1])) if version and len(version) >= 2 else None

    @property
    def offers_locations_api(self) -> bool:
        """GET /v2/images/{id}/locations exists (API 2.17); whether its policy lets us call it, only asking tells."""
        return self.api_version is None or self.api_version >= LOCATIONS_API

    def image_locations(self, image_id: str) -> list[dict[str, Any]] | None:
        """The image's locations through `GET /v2/images/{id}/locations` (API 2.17, Glance 29 on), which does not
        need show_multiple_locations; None where Glance has no such call or its policy refuses us
        (fetch_image_location: the service role up to Glance 31, admin too from 32)."""
        if not self.offers_locations_api:
            return None
        # Glance 30.1-31 show them to a service token only ("service_roles:service"): X-Service-Token
        headers = {"X-Service-Token": self._service_token()} if self.service else {}
        try:
            return list(self._call("GET", f"/images/{image_id}/locations", headers=headers).json())
        except GlanceHTTPError as e:
            if e.status in (403, 404, 405):
                return None
            raise

    def _service_token(self) -> str:
        assert self.service is not None
        try:
            return str(self.service.session.get_token())  # keystoneauth renews it before it expires
        except _client_errors() as e:
            raise CloudError(f"--service-cloud: {_auth_failure(e)}") from e

    def image_tasks(self, image_id: str) -> list[dict[str, Any]] | None:
        """The image's tasks (imports, copies: input, status, created_at, message), oldest first; None if Glance
        will not show them. Glance keeps a task for `[task] task_time_to_live` hours (48 by default)."""
        try:
            return list(self._call("GET", f"/images/{image_id}/tasks").json().get("tasks", []))
        except GlanceHTTPError:
            return None

    def last_task_message(self, image_id: str) -> str | None:
        """The message of the image's newest task (why an import failed), if Glance shows it."""
        tasks = self.image_tasks(image_id)
        return redact(str(tasks[-1].get("message") or "")) or None if tasks else None

    def get_task(self, task_id: str) -> dict[str, Any] | None:
        """A Glance task (an import), or None if Glance no longer has it or will not show it."""
        try:
            return dict(self._call("GET", f"/tasks/{task_id}").json())
        except GlanceHTTPError as e:
            if e.status in (403, 404):  # the tasks API may be closed by policy: then we cannot tell
                return None
            raise

    def list_images(self, limit: int | None = None, changed_since: str | None = None) -> Iterator[dict[str, Any]]:
        """Every image an admin can see: all visibilities (community included), hidden or not.

        A plain list leaves out community images of other projects and every os_hidden image, which
        is how images get forgotten in a migration; so list visibility=all, once per os_hidden value.
        `changed_since` (ISO 8601, UTC): only images whose updated_at is at or after it (Glance's
        `updated_at=gte:` filter); deleted images are never listed.
        """
        for page in self.image_pages(limit, changed_since):
            yield from page

    def image_pages(self, limit: int | None = None, changed_since: str | None = None) -> Iterator[list[dict[str, Any]]]:
        """list_images, a page (one request) at a time."""
        return self._pages(f"&updated_at=gte:{changed_since}" if changed_since else "", limit)

    def newest_update(self) -> str | None:
        """The latest updated_at of any image, by Glance's clock (ISO 8601, whole seconds); None for no image."""
        newest = [
            image["updated_at"]
            for page in self._pages("&sort_key=updated_at&sort_dir=desc", 1)
            for image in page
            if image.get("updated_at")
        ]
        return max(newest, default=None)

    def images_by_id(self, image_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The images of `image_ids` (hidden ones included) that a list shows, by id, in a request or two per
        IDS_PER_LIST ids (Glance's `id=in:` filter) instead of one per image. An id it does not show is left out
        (the caller asks for that one alone); a Glance that refuses the filter (400) leaves out all the rest."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(image_ids), IDS_PER_LIST):
            for hidden in ("false", "true"):
                wanted = [i for i in dict.fromkeys(image_ids[start : start + IDS_PER_LIST]) if i not in found]
                if not wanted:
                    break
                try:
                    for page in self._pages(f"&id=in:{','.join(wanted)}", hidden=(hidden,)):
                        found.update((image["id"], image) for image in page)
                except GlanceHTTPError as e:
                    if e.status != 400:
                        raise
                    log.debug("Glance refused a list by id (%s): the images are read one at a time", e)
                    return found
        return found

    def find_copies(self, key: str, value: str) -> list[dict[str, Any]]:
        """Images (hidden ones included) whose property `key` is `value`: our own migration copies."""
        return [image for page in self._pages(f"&{key}={value}") for image in page]

    def _pages(
        self, filters: str, limit: int | None = None, hidden: Sequence[str] = ("false", "true")
    ) -> Iterator[list[dict[str, Any]]]:
        """`limit`: one page of at most that many images per os_hidden value; None: every page."""
        for hidden_value in hidden:  # os_hidden is always an equality filter: there is no "both"
            path: str | None = (
                f"/images?visibility=all&os_hidden={hidden_value}{filters}&limit={limit or self.page_size}"
            )
            while path:
                body = self._call("GET", path).json()
                yield list(body.get("images", []))
                nxt = body.get("next")
                path = nxt.removeprefix("/v2") if nxt and limit is None else None

    def stores(self) -> list[StoreInfo] | None:
        """The stores Glance is configured with, or None on a Glance without multi-store."""
        for path in ("/info/stores/detail", "/info/stores"):  # the detail (with types) is for admins only
            try:
                body = self._call("GET", path).json()
            except GlanceHTTPError as e:
                if e.status in (403, 404) and path.endswith("detail"):
                    continue
                if e.status == 404:
                    return None
                raise
            return [
                StoreInfo(s["id"], str(s.get("default")).lower() == "true", s.get("description", ""), s.get("type"))
                for s in body.get("stores", [])
            ]
        return None

    def usage(self) -> dict[str, dict[str, int]] | None:
        """The project's image quotas under Keystone unified limits (`GET /v2/info/usage`): {resource: {"usage",
        "limit"}}; {} when Glance does not enforce them (use_keystone_limits = False); None on a Glance without
        the call."""
        try:
            return dict(self._call("GET", "/info/usage").json().get("usage") or {})
        except GlanceHTTPError as e:
            if e.status in (403, 404):
                return None
            raise

    def import_methods(self) -> list[str]:
        try:
            body = self._call("GET", "/info/import").json()
        except GlanceHTTPError as e:
            if e.status == 404:
                return []
            raise
        return list(body.get("import-methods", {}).get("value", []))

    # -- changing ----------------------------------------------------------------------------------

    def copy_to_store(self, image_id: str, store: str) -> None:
        """Ask Glance to copy the image's data to `store` (import method copy-image); Glance answers 202."""
        self._call(
            "POST",
            f"/images/{image_id}/import",
            ok=(202,),
            json={"method": {"name": "copy-image"}, "stores": [store], "all_stores_must_succeed": True},
        )

    def create_image(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "/images", ok=(201,), json=body).json())

    def upload(self, image_id: str, data: BinaryIO | Iterable[bytes], size: int, store: str | None) -> None:
        """PUT the image's data (a file, or a stream of chunks); with `store`, into that store (multi-store
        header X-Image-Meta-Store)."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if store:
            headers["X-Image-Meta-Store"] = store
        blocks = iter(functools.partial(data.read, CHUNK), b"") if hasattr(data, "read") else iter(data)
        body: bytes | _Body
        if size == 0:
            # requests sends a stream of length 0 as chunked, yet with our Content-Length it frames no chunks:
            # uWSGI then waits for chunks that never come (60 s, then 500). Read what there is (a hashing
            # stream must see the end of its download) and send an empty body.
            for _ in blocks:
                pass
            body = b""
        else:
            if self.bandwidth is not None:  # paced in small pieces: no long silences a proxy could time out
                blocks = self.bandwidth.chunks(UP, _pieces(blocks, PACED_PIECE))
            body = _Body(blocks, size)
        # A stream is consumed as it is sent: neither we nor keystoneauth (which by default resends on a
        # 503 or a connection error) may send it twice. The caller makes a fresh copy and starts over.
        self._call(
            "PUT",
            f"/images/{image_id}/file",
            ok=(204,),
            retry=False,
            data=body,
            headers=headers,
            connect_retries=0,
            status_code_retries=0,
        )

    @contextmanager
    def download(self, image_id: str) -> Iterator[Iterator[bytes]]:
        """The image's data as a stream of chunks (verify it yourself: Glance's checksum header is md5 only)."""
        response = self._call("GET", f"/images/{image_id}/file", ok=(200, 204), stream=True)
        if response.status_code == 204:  # what Glance answers when the data behind the image's locations is gone
            response.close()
            raise GlanceHTTPError(204, "GET", f"/images/{image_id}/file", "no data: its store no longer holds it")
        try:
            yield _body(response) if self.bandwidth is None else self.bandwidth.chunks(DOWN, _body(response))
        finally:
            response.close()

    def patch(self, image_id: str, ops: list[dict[str, Any]], retry: bool = True) -> dict[str, Any]:
        headers = {"Content-Type": "application/openstack-images-v2.1-json-patch"}
        return dict(self._call("PATCH", f"/images/{image_id}", retry=retry, json=ops, headers=headers).json())

    def delete_image(self, image_id: str) -> None:
        self._call("DELETE", f"/images/{image_id}", ok=(204,))

    def delete_from_store(self, image_id: str, store: str) -> None:
        """Delete the image's data from one store (the image and its other copies stay)."""
        self._call("DELETE", f"/stores/{store}/{image_id}", ok=(204,))


class _Body:
    """An upload's body: its blocks as they come (1 MiB each), with a length.

    An iterable with a length makes requests send a Content-Length (Glance refuses a short body) and urllib3 send
    each block whole; a file-like body would be read and sent 16 KiB at a time, a system call and a copy per piece.
    While a block is sent, the connect timeout (10 s) bounds each block: 100 KiB/s at the least.
    """

    def __init__(self, blocks: Iterator[bytes | memoryview], size: int) -> None:
        self._blocks, self._size = blocks, size

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes | memoryview]:
        return self._blocks


def _pieces(blocks: Iterable[bytes], most: int) -> Iterator[bytes | memoryview]:
    """Each block in slices of at most `most` bytes (views: nothing is copied)."""
    for block in blocks:
        view = memoryview(block)
        for start in range(0, len(view), most):
            yield view[start : start + most]


def _client_errors(*more: type[BaseException]) -> tuple[type[BaseException], ...]:
    """What a call through openstacksdk raises when the cloud fails it. openstacksdk is imported only by the
    commands that talk to Glance: it takes a third of a second, which `status`, `report` and `retry` skip."""
    from openstack import exceptions as sdk_exc  # noqa: PLC0415

    return (ksa_exc.ClientException, sdk_exc.SDKException, requests.RequestException, *more)


def _connect(cloud: str | None, what: str) -> openstack.connection.Connection:
    import openstack  # noqa: PLC0415 - see _client_errors
    from openstack import exceptions as sdk_exc  # noqa: PLC0415

    try:
        conn = openstack.connect(cloud=cloud)  # OS_CLIENT_CONFIG_FILE, clouds.yaml, OS_*: like the CLI
        conn.authorize()
    except sdk_exc.ConfigException as e:
        raise CloudError(f"{what}cloud configuration: {e}") from e
    except _client_errors() as e:
        raise CloudError(what + _auth_failure(e)) from e
    return conn


def _body(response: requests.Response) -> Iterator[bytes]:
    """The body's chunks; a connection that breaks while they stream is reported as Glance being unavailable."""
    try:
        yield from response.iter_content(CHUNK)
    except (requests.RequestException, OSError) as e:  # ChunkedEncodingError, ConnectionError, ReadTimeout...
        raise GlanceUnavailable(f"the transfer of image data broke: {_short(e)}") from e


def _auth_failure(exc: BaseException) -> str:
    """Name the real cause: openstacksdk wraps keystoneauth's errors in a generic SDKException."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ksa_exc.Unauthorized):
            return "the cloud refused our credentials (HTTP 401); check the user name, password and project"
        if isinstance(seen, ksa_exc.SSLError | requests.exceptions.SSLError):
            found = re.search(r"certificate verify failed: ([^()'\"]+)", str(seen))
            why = f" ({found.group(1).strip()})" if found else ""
            return (
                f"the cloud's TLS certificate could not be verified{why}; give clouds.yaml `cacert` "
                "(or OS_CACERT) the CA that signed it"
            )
        if isinstance(seen, ksa_exc.ConnectionError | requests.ConnectionError):
            return f"cannot reach the cloud's identity service: {_short(seen)}"
        seen = seen.__cause__ or seen.__context__
    return f"cannot authenticate to the cloud: {_short(exc)}"


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
