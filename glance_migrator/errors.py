"""Every error the tool can stop with, each carrying its exit code (borg's habit).

A *fatal* error stops the whole command (bad usage, the cloud unreachable, a broken state DB).
A per-image failure is not an exception that escapes: it is recorded on the image's row and the
run goes on; the run's exit code then says "partial" (EXIT_PARTIAL).
"""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_PARTIAL: Final = 1  # the run finished, but some images failed or were skipped
EXIT_USAGE: Final = 2  # bad arguments: the same code click/typer use for their own usage errors
EXIT_CLOUD: Final = 3  # cannot reach or authenticate to the cloud, or Glance lacks a needed feature
EXIT_STATE_DB: Final = 4  # the state DB is corrupt, newer than this tool, locked or unwritable
EXIT_BUSY: Final = 5  # another runner holds the work this command needs
EXIT_INTERNAL: Final = 70  # a bug in glance-migrator (sysexits EX_SOFTWARE); the state DB stays consistent
EXIT_INTERRUPTED: Final = 130  # Ctrl-C, as shells report SIGINT


class MigratorError(Exception):
    """Base of every fatal error; `str()` is the one-line message shown to the operator."""

    exit_code: int = EXIT_USAGE


class UsageError(MigratorError):
    """Arguments that cannot work: unknown image, malformed UUID, unknown store, no run to resume."""

    exit_code = EXIT_USAGE


class CloudError(MigratorError):
    """The cloud is unreachable, refuses our credentials, or is missing a feature the run needs."""

    exit_code = EXIT_CLOUD


class StateDBError(MigratorError):
    """The state DB cannot be used: not a SQLite DB, made by a newer glance-migrator, or unwritable."""

    exit_code = EXIT_STATE_DB


class StateDBConnectionLost(StateDBError):
    """The connection to the state DB broke in a transaction (the server ended it, restarted, or the network
    dropped it). Nothing of that transaction is relied on: the worker lets go of its image, which continues from
    its last recorded step; only a DB that stays unreachable stops the run."""


class BusyError(MigratorError):
    """Another live runner holds the leases this command needs."""

    exit_code = EXIT_BUSY


class InternalError(MigratorError):
    """An unexpected exception: a bug. The run stops; every recorded state is still valid."""

    exit_code = EXIT_INTERNAL


class Aborted(MigratorError):
    """The operator pressed Ctrl-C (twice, during a run): stop at once. Every recorded step is kept."""

    exit_code = EXIT_INTERRUPTED


class IllegalTransition(MigratorError):
    """A state change the transition table does not allow. Raised before anything is written."""

    exit_code = EXIT_STATE_DB


class ImageFailure(Exception):
    """One image cannot proceed. The runner records it on the image's row and goes on with the others.

    `kind` groups failures for the operator ("integrity", "glance", "refused", "gone").
    """

    def __init__(self, message: str, kind: str = "glance") -> None:
        super().__init__(message)
        self.kind = kind


class IntegrityFailure(ImageFailure):
    """Hashes or sizes disagree across a trust boundary. Never retried blindly; nothing is removed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="integrity")


class ImageBlocked(ImageFailure):
    """Glance refuses, for now, to let go of the old copy (e.g. RBD snapshots with clone children).

    Both copies stay consistent; `retry` finishes the image once the operator has dealt with the cause.
    """

    def __init__(self, message: str, kind: str = "blocked") -> None:
        super().__init__(message, kind=kind)


class ImageSkipped(Exception):
    """The image is not migrated (not active, not in the source store...), with the reason why."""
