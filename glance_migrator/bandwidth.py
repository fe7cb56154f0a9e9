"""--bwlimit: the bytes per second the tool itself moves through Glance, shared by every worker.

Each direction has its own budget: downloads (image data read from Glance, including the final hashed read)
and uploads (a copy's data written to Glance). A transfer waits before each chunk until its share of the budget
is due, so the average over any second stays at the limit whatever the number of workers. copy-image's bytes
move inside Glance and are not counted: there, --workers bounds how many copies Glance makes at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Final, TypeVar

DOWN: Final = "down"
UP: Final = "up"

Chunk = TypeVar("Chunk", bound=Sized)  # bytes, or a view of them


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

    def chunks(self, direction: str, chunks: Iterable[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            self.pace(direction, len(chunk))
            yield chunk
