"""--bwlimit's pacing, on a clock the test drives (no timing is asserted: the waits it asks for are)."""

from __future__ import annotations

import threading

import pytest

from glance_migrator.bandwidth import DOWN, UP, Bandwidth
from glance_migrator.glance import _pieces


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_each_chunk_waits_for_its_share_and_directions_have_their_own_budget() -> None:
    clock = Clock()
    limit = Bandwidth(1000, clock=clock, sleep=clock.sleep)
    assert list(limit.chunks(DOWN, iter([b"x" * 500, b"x" * 500, b"x" * 1000]))) == [b"x" * 500] * 2 + [b"x" * 1000]
    assert clock.slept == [0.5, 0.5]  # the first chunk goes at once; 2,000 bytes at 1,000 B/s end after 2 s
    limit.pace(UP, 1000)  # uploads are not held up by downloads
    assert clock.slept == [0.5, 0.5]


def test_no_credit_is_saved_up_while_idle() -> None:
    clock = Clock()
    limit = Bandwidth(1000, clock=clock, sleep=clock.sleep)
    limit.pace(DOWN, 1000)
    clock.now += 60  # idle for a minute: the next second's budget is still 1,000 bytes
    limit.pace(DOWN, 1000)
    limit.pace(DOWN, 1000)
    assert clock.slept == [1.0]


def test_workers_share_one_budget() -> None:
    clock, lock = Clock(), threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            clock.slept.append(round(seconds, 6))

    limit = Bandwidth(1000, clock=clock, sleep=sleep)
    threads = [threading.Thread(target=limit.pace, args=(DOWN, 1000)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(clock.slept) == [1.0, 2.0, 3.0]  # four workers, 4,000 bytes: the last goes 3 s after the first


def test_a_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Bandwidth(0)


def test_an_upload_under_a_limit_is_paced_in_small_pieces_of_its_blocks() -> None:
    clock = Clock()
    limit = Bandwidth(100, clock=clock, sleep=clock.sleep)
    pieces = list(limit.chunks(UP, _pieces([b"y" * 250], 100)))
    assert [bytes(p) for p in pieces] == [b"y" * 100, b"y" * 100, b"y" * 50]
    assert clock.slept == [1.0, 1.0]  # a 1 MiB block is not sent in one burst after a long silence
