"""How an image moves, one module per strategy. Each maps a target state to the step that reaches it.

A step looks first whether its effect is already there (after a crash it may be) and then acts; it
returns what to record, or raises ImageFailure / ImageSkipped. Steps never write the state DB: the
runner records the transition after the step returns, so a crash between the two just repeats a step
that is idempotent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from glance_migrator.errors import ImageFailure
from glance_migrator.glance import Glance
from glance_migrator.models import ImageRow
from glance_migrator.sharing import SharedData
from glance_migrator.spool import Spool
from glance_migrator.state import State, Strategy
from glance_migrator.timeouts import COPY_TIMEOUT, LOCK_TIMEOUT, STUCK_AFTER

POLL_FIRST: Final = 0.1  # seconds before the first look at what Glance was asked to do (a small image's copy) ...
POLL_AGAIN: Final = 0.04  # ... then between looks while it is young: one that missed the first look is seen soon ...
POLL_BRISK: Final = 1.0  # ... for this long (looks earlier than 0.1 s, or all at 0.04 s, slowed Glance's copy) ...
POLL_BACKOFF: Final = 1.5  # ... then each wait this much longer than the one before ...
POLL_INTERVAL: Final = 2.0  # ... up to this, for long copies


class Interrupted(Exception):
    """Stop requested while a step was waiting on Glance; the state stays as it was, resumable."""


@dataclass
class StepContext:
    glance: Glance
    from_store: str
    to_store: str
    stop: threading.Event
    shared: SharedData  # who else lists an image's old data, asked before it is deleted
    poll_first: float = POLL_FIRST
    poll_again: float = POLL_AGAIN
    poll_interval: float = POLL_INTERVAL
    copy_timeout: float = COPY_TIMEOUT
    lock_timeout: float = LOCK_TIMEOUT
    stuck_after: float = STUCK_AFTER
    spool: Spool | None = None  # location-swap's download dir; None with --no-spool
    legacy: bool = False  # a single-store Glance: stores are location URL schemes (glance.LEGACY_SCHEMES)
    lease: Callable[[], None] = lambda: None  # raises LeaseLost once another worker holds the image (runner.py)
    # the image as the previous step saw it as it ended, just before this step (StepResult.seen; runner.py)
    seen: dict[str, Any] | None = None
    # no worker took the image before: no earlier attempt, crash or failure can have left anything of it in Glance
    first_try: bool = False

    def sleep(self, seconds: float) -> None:
        """Wait, but give up at once when the operator asks to stop, or when the image's lease was taken over
        (our process was paused past it): another worker is on the image now."""
        self.lease()
        if self.stop.wait(seconds):
            raise Interrupted
        self.lease()

    def polls(self) -> Iterator[None]:
        """Wait between looks at something Glance is doing: poll_first seconds before the first look (most small
        images' copies are done by then), then every poll_again seconds until POLL_BRISK seconds have passed, so
        a small image's copy is noticed within ~0.1 s of its end, then longer (x1.5, up to poll_interval), so a
        long one costs few requests. (Measured with 1 KiB images on 2 CPUs: after a first look that missed,
        waiting 0.1 s again cost ~55 ms per such image; looking every 0.05 s from the start slowed Glance.)"""
        wait, brisk = self.poll_first, POLL_BRISK
        while True:
            self.sleep(wait)
            yield
            brisk -= wait
            wait = self.poll_again if brisk > 0 else min(max(wait, self.poll_again) * POLL_BACKOFF, self.poll_interval)

    def handed(self, image_id: str) -> dict[str, Any] | None:
        """The image the previous step read last, once: a step that starts with the state that step ended in
        need not ask Glance again (the runner only recorded the step in between)."""
        seen, self.seen = self.seen, None
        return seen if seen is not None and seen.get("id") == image_id else None


@dataclass
class StepResult:
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    seen: dict[str, Any] | None = None  # the image as Glance showed it at the step's end (nothing changed it since)


Step = Callable[[StepContext, ImageRow], StepResult]


def current_image(ctx: StepContext, image_id: str, what: str = "the image") -> dict[str, Any]:
    """The image as Glance shows it now; an image deleted under us fails the step (kind "gone")."""
    image = ctx.glance.get_image(image_id)
    if image is None:
        raise ImageFailure(f"{what} {image_id} no longer exists in Glance (deleted by someone else?)", kind="gone")
    return image


def steps_for(strategy: Strategy) -> Mapping[State, Step]:
    from glance_migrator.strategies import copy_image, location_swap  # noqa: PLC0415 - avoids an import cycle

    registry: dict[Strategy, Mapping[State, Step]] = {
        Strategy.COPY_IMAGE: copy_image.STEPS,
        Strategy.LOCATION_SWAP: location_swap.STEPS,
    }
    return registry[strategy]
