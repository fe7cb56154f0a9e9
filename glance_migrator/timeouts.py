"""How long the tool waits on Glance before it gives up: the defaults of --timeout and --stuck-after among them."""

from __future__ import annotations

from typing import Final

CONNECT_TIMEOUT: Final = 10.0
READ_TIMEOUT: Final = 300.0  # default wait for an answer or the next body bytes: a store delete can take minutes
COPY_TIMEOUT: Final = 6 * 3600.0  # a copy-image task that has not finished in 6 h is reported as failed
LOCK_TIMEOUT: Final = 3600.0  # how long to wait for another operation's import lock on an image
STUCK_AFTER: Final = 600.0  # a running copy task updates itself about every 60 s; 10 min silent = dead
