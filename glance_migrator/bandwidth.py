"""--bwlimit: the bytes per second the tool itself moves through Glance, shared by every worker.

Each direction has its own budget: downloads (image data read from Glance, including the final hashed read)
and uploads (a copy's data written to Glance). A transfer waits before each chunk until its share of the budget
is due, so the average over any second stays at the limit whatever the number of workers. copy-image's bytes
move inside Glance and are not counted: there, --workers bounds how many copies Glance makes at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

DOWN: Final = "down"
UP: Final = "up"


class Bandwidth:
    def __init__(
        self,
        rate: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("a bandwidth limit is a positive number of bytes per second")
        self.rate = rate
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._due = {DOWN: 0.0, UP: 0.0}  # when the next byte of each direction may go

    def pace(self, direction: str, size: int) -> None:
        """Wait until `size` more bytes in `direction` keep within the limit (no credit is saved up while idle)."""
        with self._lock:
            now = self._clock()
            start = max(now, self._due[direction])
            self._due[direction] = start + size / self.rate
        if start > now:
            self._sleep(start - now)

    def chunks(self, direction: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.pace(direction, len(chunk))
            yield chunk

    def reader(self, data: Any, size: int) -> PacedReader:
        return PacedReader(self, data, size)


class PacedReader:
    """A file-like body for an upload that reads `data` within the upload budget (it keeps a length, so the
    request carries Content-Length)."""

    def __init__(self, bandwidth: Bandwidth, data: Any, size: int) -> None:
        self._bandwidth, self._data, self._size = bandwidth, data, size

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        block = bytes(self._data.read(n))
        if block:
            self._bandwidth.pace(UP, len(block))
        return block
