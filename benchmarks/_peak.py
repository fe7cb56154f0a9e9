"""Run a command; write its peak RSS (KiB) and wall seconds to a file: how the benchmarks measure a process.

Why not wait4() on the command directly from the benchmark: Linux keeps a process's peak RSS across exec(), and
the process spawned by subprocess starts as (or, with vfork, on) the benchmark's own memory, so wait4() would
report at least the benchmark process's size (a bare `python -c pass` spawned from a 290 MiB process reads
290 MiB). This wrapper is started with `python -I -S` (about 5 MiB) and forks the command from itself: the
command's figure is floored at this wrapper's size only.
Usage: python -I -S _peak.py OUT_FILE COMMAND [ARG...]; writes "PEAK_KIB WALL_SECONDS", exits with the command's
exit code.
"""

import os
import sys
import time
from pathlib import Path


def main():
    out, argv = sys.argv[1], sys.argv[2:]
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)  # noqa: S606 (the command as given, no shell)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    Path(out).write_text(f"{usage.ru_maxrss} {wall}\n")
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
