"""python -m tests.lab up|down [--dir DIR]: a lab that outlives the command (for demos and manual tests).

    eval "$(python -m tests.lab up)"     # starts Keystone + Glance, prints eval-able export lines
    openstack image list                  # or the migrator, with OS_CLIENT_CONFIG_FILE / OS_CLOUD set
    python -m tests.lab down

    python -m tests.lab up --stores old,new,s3,ceph   # also SeaweedFS (store s3) and Ceph (store ceph, rbd)
    python -m tests.lab up --glance 30                # Glance 30 (2025.1) instead of the latest

`up` on a directory whose lab is running does nothing but print the same lines. A directory with a
dead or half-running lab is stopped and started afresh (its lab files are recreated; nothing else in
the directory is touched).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import FULL_STORES, GLANCE_RELEASES, Lab, LabError, describe

KNOWN_STORES = {store.name: store for store in FULL_STORES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(".glance-lab"),
        help="lab directory (default: .glance-lab in the current directory)",
    )
    parser.add_argument(
        "--stores",
        default="old,new",
        help=f"comma-separated Glance stores of {', '.join(KNOWN_STORES)}; the first is the default store "
        "(default: old,new)",
    )
    parser.add_argument(
        "--glance",
        choices=list(GLANCE_RELEASES),
        help="the Glance release (major version; default $GLANCE_MIGRATOR_LAB_GLANCE, else the latest)",
    )
    args = parser.parse_args(argv)
    names = [name for name in args.stores.split(",") if name]
    unknown = [name for name in names if name not in KNOWN_STORES]
    if unknown or not names:
        parser.error(f"unknown stores {unknown}; choose from {', '.join(KNOWN_STORES)}")
    lab = Lab(args.dir, stores=[KNOWN_STORES[name] for name in names], glance=args.glance)
    if args.command == "down":
        running = lab.running_services()
        lab.stop()
        print(f"# stopped {', '.join(running) or 'nothing (no running lab)'} in {lab.root}")
        return 0
    running = lab.running_services()
    wanted = ["keystone", "glance"] + ["s3"] * ("s3" in names) + ["ceph"] * ("ceph" in names)
    if running == wanted:
        print(f"# lab already running in {lab.root}")
    else:
        lab.stop()  # leftovers of a half-dead lab
        print(f"# starting {', '.join(wanted)} in {lab.root} ...", file=sys.stderr, flush=True)
        try:
            lab.start()
        except LabError as exc:
            print(f"lab failed to start: {exc}", file=sys.stderr)
            return 1
        t = lab.timings
        extra = "".join(f", {name} ready after {t[name]:.1f} s" for name in ("s3", "ceph") if name in t)
        print(
            f"# started in {t['ready']:.1f} s (glance answered after {t['glance']:.1f} s, keystone set up "
            f"after {t['keystone']:.1f} s{extra}; venv check {t['venvs']:.1f} s)"
        )
    print(describe(lab))
    return 0


if __name__ == "__main__":
    sys.exit(main())
