"""Turn the invariant checker's records (tests/invariants.py) into docs/reliability.md.

    python -m tests.reliability RECORDS.jsonl OUTPUT.md --suite-exit-code N

`./dev reliability` runs the whole suite with GLANCE_MIGRATOR_RELIABILITY_LOG set, then calls this.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

INTRO = """\
# Reliability: what the fault suite injected, and what it lost

Every scenario below is an automated test in `tests/` against the real services of the test lab (Keystone 30,
Glance 33, file stores, a SeaweedFS S3 store and a single-node Ceph, all on loopback). Each one ends with the
shared invariant checker, `tests/invariants.py`, which asks Glance directly (never through the fault proxy):

- every image of the scenario was discovered and is *done*, or *failed*, *blocked* or *skipped* with a reason;
- a done image is in the target store only, with its UUID, size, checksum, `os_hash_value`, name,
  properties, tags, visibility and members unchanged, and serves byte-identical data (sha512);
  location-swap leaves exactly one protected, hidden copy;
- a failed or skipped image still has its data in the source store;
- no active image without a location; no leftover copies, leases, spool files or partial downloads;
- `glance-migrator status` agrees with Glance.

**Lost** counts the images that, at the end, were missing, had no location, or served other bytes than the
ones seeded (an image the scenario corrupted or deleted on purpose is only required to keep its location,
or to be gone). It is counted before any assertion, so a failing scenario still reports it.
"""


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return proc.stdout.strip()


def _states(states: dict[str, int]) -> str:
    return ", ".join(f"{count} {state}" for state, count in states.items())


def _faults(faults: dict[str, int]) -> str:
    return ", ".join(f"{kind}: {count}" for kind, count in faults.items()) or "none"


def render(records: list[dict[str, Any]], suite_exit_code: int, command: str) -> str:
    commit = _git("rev-parse", "--short", "HEAD") + (
        " (with uncommitted changes)" if _git("status", "--porcelain") else ""
    )
    faults = sum(sum(r["faults"].values()) for r in records)
    images = sum(r["images"] for r in records)
    lost = sum(r["lost"] for r in records)
    suite = "passed" if suite_exit_code == 0 else f"FAILED (pytest exit code {suite_exit_code})"
    lines = [
        INTRO,
        "## The last run",
        "",
        f"- When: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}",
        f"- Reproduce: `{command}` (writes this file)",
        f"- The suite: {suite}",
        f"- Totals: {len(records)} scenario checks, {faults} faults injected, {images} images, **{lost} lost**",
        "",
        "| Scenario (test) | What happened to it | Faults injected | Images | Ended as | Lost |",
        "|---|---|---|---:|---|---:|",
    ]
    for r in sorted(records, key=lambda r: r["scenario"]):
        name = r["scenario"].removeprefix("tests/")
        lines.append(
            f"| `{name}` | {r['description']} | {_faults(r['faults'])} | {r['images']} | "
            f"{_states(r['states'])} | {r['lost']} |"
        )
    kinds: Counter[str] = Counter()
    for r in records:
        kinds.update(r["faults"])
    lines += ["", "## Faults by kind", "", "| Fault | Injected |", "|---|---:|"]
    lines += [f"| {kind} | {count} |" for kind, count in sorted(kinds.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--suite-exit-code", type=int, required=True)
    parser.add_argument("--command", default="./dev reliability")
    args = parser.parse_args()
    text = args.records.read_text() if args.records.exists() else ""
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(records, args.suite_exit_code, args.command))
    print(f"{args.output}: {len(records)} scenario checks, {sum(r['lost'] for r in records)} images lost")


if __name__ == "__main__":
    main()
