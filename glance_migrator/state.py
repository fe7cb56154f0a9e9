"""The states an image goes through, and the one table that says which changes are legal (h11's habit).

Each strategy is a straight path of progress states from PENDING to DONE. A state is named for what is
true once it is reached: COPIED means the target store holds a verified copy. Besides the path:
  - any unfinished state may go to FAILED (the row keeps `failed_at`, the state it failed from),
    and a non-started image to SKIPPED (not active, not in the source store...);
  - PENDING may go straight to DONE when the image is already where it must be;
  - FAILED goes back to the state it failed at (or where RETRY_FROM says) on the operator's `retry`.
`check_transition` is the only judge; the DB layer calls it before writing anything.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from enum import StrEnum
from typing import Final

from glance_migrator.errors import IllegalTransition


class Strategy(StrEnum):
    COPY_IMAGE = "copy-image"
    LOCATION_SWAP = "location-swap"


class State(StrEnum):
    PENDING = "pending"
    COPY_REQUESTED = "copy-requested"  # Glance accepted (or is already running) a copy-image task
    COPIED = "copied"  # the target store holds the image, hashes as recorded at discovery
    OLD_REMOVED = "old-removed"  # the source store no longer holds it
    # location-swap (the original 2015 method, made safe)
    DOWNLOADED = "downloaded"  # a private spool file holds the image, hashes verified
    CREATED = "created"  # a hidden second image B in the target store holds the same bytes, verified
    LOCATION_SET = "location-set"  # the image lists B's location beside its old one
    LOCATION_DELETED = "location-deleted"  # the old location (and its data) is gone
    PROTECTED = "protected"  # the image and B are protected: B shares the image's data object
    CLEANED = "cleaned"  # the spool file is gone
    DONE = "done"
    FAILED = "failed"
    BLOCKED = "blocked"  # Glance will not let go of the old copy yet (e.g. RBD clone children); nothing lost
    SKIPPED = "skipped"


PATHS: Final[Mapping[Strategy, tuple[State, ...]]] = {
    Strategy.COPY_IMAGE: (State.PENDING, State.COPY_REQUESTED, State.COPIED, State.OLD_REMOVED, State.DONE),
    Strategy.LOCATION_SWAP: (
        State.PENDING,
        State.DOWNLOADED,
        State.CREATED,
        State.LOCATION_SET,
        State.LOCATION_DELETED,
        State.PROTECTED,
        State.CLEANED,
        State.DONE,
    ),
}

# Where `retry` resumes an image that failed while at a given state, when that is not the state itself:
# a copy-image task that failed left a stale os_glance_failed_import mark, so the copy must be asked
# for again (pending -> copy-requested) rather than waited for.
RETRY_FROM: Final[Mapping[tuple[Strategy, State], State]] = {
    (Strategy.COPY_IMAGE, State.COPY_REQUESTED): State.PENDING,
}

# Where an image can be blocked: only at the step that removes the old copy.
BLOCKED_AT: Final = frozenset({(Strategy.COPY_IMAGE, State.COPIED), (Strategy.LOCATION_SWAP, State.LOCATION_SET)})

TERMINAL: Final = frozenset({State.DONE, State.FAILED, State.BLOCKED, State.SKIPPED})
RETRYABLE: Final = frozenset({State.FAILED, State.BLOCKED})  # what `retry` puts back on the path


def next_state(strategy: Strategy, state: State) -> State | None:
    """The state the next step of `strategy` leads to from `state`, or None at the end of the path."""
    path = PATHS[strategy]
    if state not in path:
        return None
    i = path.index(state)
    return path[i + 1] if i + 1 < len(path) else None


def retry_state(strategy: Strategy, failed_at: State) -> State:
    """The state a failed image goes back to on `retry`."""
    return RETRY_FROM.get((strategy, failed_at), failed_at)


def check_transition(strategy: Strategy, current: State, target: State, failed_at: State | None = None) -> None:
    """Raise IllegalTransition unless the table allows `current -> target` for `strategy`."""
    path = PATHS[strategy]
    allowed = (
        (current in path and target == next_state(strategy, current))
        or (current not in TERMINAL and target == State.FAILED)
        or (target == State.BLOCKED and (strategy, current) in BLOCKED_AT)
        or (current == State.PENDING and target in (State.SKIPPED, State.DONE))
        or (current in RETRYABLE and failed_at is not None and target == retry_state(strategy, failed_at))
    )
    if not allowed:
        raise IllegalTransition(f"illegal transition {current} -> {target} for strategy {strategy}")


def transitions(strategy: Strategy) -> list[tuple[State, State]]:
    """Every legal edge of `strategy`, for the README's state diagram and its drift test."""
    path = PATHS[strategy]
    edges = list(itertools.pairwise(path))
    edges += [(State.PENDING, State.SKIPPED), (State.PENDING, State.DONE)]
    edges += [(s, State.FAILED) for s in path if s not in TERMINAL]
    edges += sorted({(State.FAILED, retry_state(strategy, s)) for s in path if s not in TERMINAL})
    blocked_at = [s for s in path if (strategy, s) in BLOCKED_AT]
    edges += [(s, State.BLOCKED) for s in blocked_at] + [(State.BLOCKED, s) for s in blocked_at]
    return edges


def mermaid(strategy: Strategy) -> str:
    """The state diagram of `strategy` as a Mermaid block; README.md embeds it and a test checks it."""
    lines = ["```mermaid", "stateDiagram-v2", f"    [*] --> {_node(State.PENDING)}"]
    for a, b in transitions(strategy):
        label = " : retry" if a in RETRYABLE else ""
        lines.append(f"    {_node(a)} --> {_node(b)}{label}")
    lines += [f"    {_node(State.DONE)} --> [*]", "```"]
    return "\n".join(lines)


def _node(state: State) -> str:
    return state.value.replace("-", "_")  # Mermaid ids cannot contain '-'
