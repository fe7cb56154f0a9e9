"""python -m tests.lab up|down [--dir DIR]: a lab that outlives the command (for demos and manual tests).

    eval "$(python -m tests.lab up)"     # starts Keystone + Glance, prints eval-able export lines
    openstack image list                  # or the migrator, with OS_CLIENT_CONFIG_FILE / OS_CLOUD set
    python -m tests.lab down

`up` on a directory whose lab is running does nothing but print the same lines. A directory with a
dead or half-running lab is stopped and started afresh (its lab files are recreated; nothing else in
the directory is touched).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import Lab, LabError, describe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(".glance-lab"),
        help="lab directory (default: .glance-lab in the current directory)",
    )
    args = parser.parse_args(argv)
    lab = Lab(args.dir)
    if args.command == "down":
        running = lab.running_services()
        lab.stop()
        print(f"# stopped {', '.join(running) or 'nothing (no running lab)'} in {lab.root}")
        return 0
    running = lab.running_services()
    if running == ["keystone", "glance"]:
        print(f"# lab already running in {lab.root}")
    else:
        lab.stop()  # leftovers of a half-dead lab
        print(f"# starting Keystone and Glance in {lab.root} ...", file=sys.stderr, flush=True)
        try:
            lab.start()
        except LabError as exc:
            print(f"lab failed to start: {exc}", file=sys.stderr)
            return 1
        t = lab.timings
        print(
            f"# started in {t['ready']:.1f} s (glance answered after {t['glance']:.1f} s, keystone set up "
            f"after {t['keystone']:.1f} s; venv check {t['venvs']:.1f} s)"
        )
    print(describe(lab))
    return 0


if __name__ == "__main__":
    sys.exit(main())
