"""`./dev demo`: a real migration, end to end, on a local Keystone + Glance.

Starts (or reuses) the lab in .glance-lab, seeds a few images of different kinds into store `old`,
runs `glance-migrator run --from-store old --to-store new`, then `glance-migrator status`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.glancetools import CLI, noise, seed_image
from tests.lab import Lab, LabError


def main() -> int:
    lab = Lab(Path(".glance-lab"))
    if lab.running_services() != ["keystone", "glance"]:
        lab.stop()
        print(
            "demo: starting Keystone and Glance on loopback (first time: builds their venvs, ~1-2 min)",
            flush=True,
        )
        try:
            lab.start()
        except LabError as e:
            print(f"demo: lab failed to start: {e}", file=sys.stderr)
            return 1
    conn = lab.connect()
    demo_project = conn.identity.find_project("demo")
    print("demo: seeding images into store 'old'", flush=True)
    kinds = [
        ("demo-cirros", noise(13 << 20), {}),
        ("demo-hidden", noise(3 << 20), {"hidden": True}),
        ("demo-community", noise(1 << 20), {"visibility": "community"}),
        ("demo-shared", noise(5 << 20), {"visibility": "shared", "members": [demo_project.id]}),
        ("demo-tagged", noise(7 << 20), {"tags": ["gold"], "os_distro": "cirros"}),
    ]
    for name, data, extra in kinds:
        seed_image(conn, name, data, **extra)  # type: ignore[arg-type]
    seed_image(conn, "demo-queued", None)  # no data: skipped, with the reason
    env = {**os.environ, **lab.env()}
    db = str(lab.root / "demo-state.db")
    print(f"demo: $ glance-migrator run --from-store old --to-store new --db {db}", flush=True)
    rc = subprocess.call([*CLI, "run", "--from-store", "old", "--to-store", "new", "--db", db], env=env)
    print(f"demo: exit code {rc} (0: every image done, or skipped with its reason: the queued one)", flush=True)
    print(f"demo: $ glance-migrator status --db {db}", flush=True)
    subprocess.call([*CLI, "status", "--db", db], env=env)
    exports = " ".join(f"{k}={v}" for k, v in lab.env().items())
    print(
        f"\ndemo: try it yourself:  export {exports}\n      then `.venv/bin/glance-migrator --help`;"
        " `./dev demo-stop` stops the services"
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
