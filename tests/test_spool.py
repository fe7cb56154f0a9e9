"""The Relay that lets a spooled location-swap upload its copy while the download is still being written.

Plain threads and queues, no service: what matters is what the upload's side sees when the download's side ends,
fails, or outlives it.
"""

from __future__ import annotations

import threading

import pytest

from glance_migrator.spool import Relay, RelayAborted

CHUNKS = [bytes([i]) * 1000 for i in range(3 * Relay.DEPTH)]  # more than fit in the relay at once


def _consume(relay: Relay, got: list[bytes], errors: list[BaseException], stop_after: int | None = None) -> None:
    try:
        for i, chunk in enumerate(relay):
            got.append(chunk)
            if stop_after is not None and i + 1 == stop_after:
                raise OSError("the upload broke")
    except BaseException as e:  # noqa: BLE001 - recorded for the test to look at
        errors.append(e)
    finally:
        relay.close()


def _start(relay: Relay, stop_after: int | None = None) -> tuple[threading.Thread, list[bytes], list[BaseException]]:
    got: list[bytes] = []
    errors: list[BaseException] = []
    thread = threading.Thread(target=_consume, args=(relay, got, errors, stop_after), daemon=True)
    thread.start()
    return thread, got, errors


def test_the_upload_gets_every_chunk_in_order_and_its_length() -> None:
    relay = Relay(sum(map(len, CHUNKS)))
    thread, got, errors = _start(relay)
    assert list(relay.feed(CHUNKS)) == CHUNKS  # the download's side: every chunk passes through unchanged
    relay.end()
    thread.join(5)
    assert not thread.is_alive() and errors == [] and got == CHUNKS
    assert len(relay) == 3 * Relay.DEPTH * 1000


def test_a_failed_download_fails_the_upload_instead_of_ending_its_body() -> None:
    relay = Relay(sum(map(len, CHUNKS)))
    thread, got, errors = _start(relay)
    fed = relay.feed(CHUNKS)
    for _ in range(5):
        next(fed)
    broken = ConnectionError("the download broke")
    relay.end(broken)
    thread.join(5)
    assert not thread.is_alive() and got == CHUNKS[:5]
    assert len(errors) == 1 and isinstance(errors[0], RelayAborted) and errors[0].__cause__ is broken


def test_the_download_goes_on_alone_once_the_upload_ended() -> None:
    """An upload that broke after two chunks: the download must not wait for it (the relay is full by then)."""
    relay = Relay(sum(map(len, CHUNKS)))
    thread, got, errors = _start(relay, stop_after=2)
    done = threading.Event()
    passed: list[bytes] = []

    def download() -> None:
        passed.extend(relay.feed(CHUNKS))
        relay.end()
        done.set()

    threading.Thread(target=download, daemon=True).start()
    assert done.wait(5), "the download waited on an upload that had ended"
    thread.join(5)
    assert passed == CHUNKS and got == CHUNKS[:2]
    assert len(errors) == 1 and isinstance(errors[0], OSError)


@pytest.mark.parametrize("error", [None, ValueError("late")])
def test_ending_after_the_upload_closed_does_not_block(error: BaseException | None) -> None:
    relay = Relay(0)
    relay.close()
    done = threading.Event()

    def download() -> None:
        assert list(relay.feed([b"x"] * (Relay.DEPTH + 2))) == [b"x"] * (Relay.DEPTH + 2)  # dropped, not queued
        relay.end(error)
        done.set()

    threading.Thread(target=download, daemon=True).start()
    assert done.wait(5), "the download waited on a closed relay"
