"""The private directory where location-swap keeps each image's bytes between download and upload."""

from __future__ import annotations

import os
import queue
import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Final

import platformdirs

from glance_migrator.errors import ImageFailure, UsageError
from glance_migrator.models import ImageRow
from glance_migrator.verify import DataHasher

PRIVATE_DIR: Final = 0o700
PRIVATE_FILE: Final = 0o600
HEADROOM: Final = 64 << 20  # bytes kept free beside the spool file, so the disk never fills to the last byte
WRITE_BEHIND: Final = 32 << 20  # every this many bytes, the spool file's written pages are sent to disk and dropped


def default_spool_dir() -> Path:
    return platformdirs.user_cache_path("glance-migrator") / "spool"


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        """Create the directory 0700 (image data may be private to its project); refuse a shared one."""
        try:
            self.root.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
            self.root.chmod(PRIVATE_DIR)
        except OSError as e:
            why = "exists and is not a directory" if self.root.exists() and not self.root.is_dir() else e.strerror
            raise UsageError(f"spool directory {self.root}: {why}") from e

    def path(self, image_id: str) -> Path:
        return self.root / f"{image_id}.img"

    def write(self, row: ImageRow, chunks: Iterable[bytes]) -> DataHasher:
        """Stream `chunks` to the image's spool file (0600), hashing; verified before it takes its name."""
        self.ensure()
        self._drop_dead_partials(row.image_id)
        need = (row.size or 0) + HEADROOM
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise ImageFailure(
                f"spool {self.root} has {free} bytes free, the image needs {row.size} (+{HEADROOM} headroom); "
                "free space or point --spool-dir elsewhere",
                kind="resources",
            )
        final = self.path(row.image_id)
        # one partial file per writer: a runner that froze and woke (its image taken over by another runner of
        # this host) never writes into the file the other is writing
        partial = self.root / f"{row.image_id}.{os.getpid()}-{threading.get_ident()}.part"
        hasher = DataHasher(row.os_hash_algo)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
        try:
            with os.fdopen(fd, "wb") as f:
                pending = 0
                for chunk in chunks:
                    hasher.update(chunk)
                    f.write(chunk)
                    pending += len(chunk)
                    if pending >= WRITE_BEHIND:
                        _write_behind(f)
                        pending = 0
                f.flush()
                os.fsync(f.fileno())
            hasher.check(row, "download")
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.rename(final)
        return hasher

    def _drop_dead_partials(self, image_id: str) -> None:
        """Partial files of this image whose writer is gone (killed mid-download): their space is needed now."""
        for partial in self.root.glob(f"{image_id}.*-*.part"):
            try:
                pid = int(partial.name.split(".")[1].split("-")[0])
                os.kill(pid, 0)
            except ProcessLookupError:
                partial.unlink(missing_ok=True)
            except (ValueError, IndexError, PermissionError):
                continue

    def remove(self, image_id: str) -> bool:
        path = self.path(image_id)
        existed = path.exists()
        path.unlink(missing_ok=True)
        for partial in self.root.glob(f"{image_id}.*part"):  # a writer's, left by a kill (any writer's)
            partial.unlink(missing_ok=True)
        return existed


class HashingStream:
    """`--no-spool`: a download's chunks, hashed as the upload takes them.

    It has a length, so the upload carries a Content-Length and Glance can refuse a short body. Each chunk goes on
    as it came from the download (1 MiB), without being copied.
    """

    def __init__(self, chunks: Iterable[bytes], size: int, algo: str | None) -> None:
        self._chunks = chunks
        self._size = size
        self.hasher = DataHasher(algo)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.hasher.update(chunk)
            yield chunk


def _write_behind(f: BinaryIO) -> None:
    """Start writing the file's dirty pages to disk now and drop those already written from the page cache: the
    final fsync then waits for the last few MiB, not the whole image (0.35 s per GiB here), and a 100 GiB image
    does not push everything else out of the host's page cache. Linux; elsewhere the fsync does it all."""
    f.flush()
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


class Relay:
    """The chunks of a download handed, as they come, to another thread that uploads them: a spooled location-swap
    uploads its copy while the spool file is written, instead of after it.

    At most DEPTH chunks wait (1 MiB each). The download never waits on an upload that has ended (failed): the
    rest of its chunks go only to the spool file. A download that breaks ends the upload with an error, so the
    upload does not finish a short body. Nothing here proves the bytes: the caller deletes a copy whose download
    did not verify, and adopts one only once Glance's record of it matches the image's.
    """

    DEPTH: Final = 8

    def __init__(self, size: int) -> None:
        self._size = size
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(self.DEPTH)
        self._closed = threading.Event()  # the upload took its last chunk, or ended without

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        """The upload's side: each chunk as the download hands it on; an aborted download raises its error."""
        try:
            while (item := self._queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise RelayAborted("the download feeding this upload failed") from item
                yield item
        finally:
            self.close()

    def feed(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The download's side: `chunks` passed through, each also handed on to the upload while it lasts."""
        for chunk in chunks:
            self._put(chunk)
            yield chunk

    def end(self, error: BaseException | None = None) -> None:
        """The download is over: complete (the upload may finish its body) or failed (the upload fails)."""
        self._put(error)

    def close(self) -> None:
        """The upload ended (done, failed, or never began): the download stops handing chunks on."""
        self._closed.set()

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


class RelayAborted(Exception):
    """Raised into an upload fed by a Relay whose download failed."""
