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


def _per_test(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One entry per test: a test that checks twice (e.g. failed, then retried) injected its faults once."""
    tests: dict[str, dict[str, Any]] = {}
    for r in records:
        t = tests.setdefault(r["scenario"], {"faults": Counter(), "images": 0, "lost": 0})
        for kind, count in r["faults"].items():
            t["faults"][kind] = max(t["faults"][kind], count)
        t["images"], t["lost"] = max(t["images"], r["images"]), max(t["lost"], r["lost"])
    return tests


def render(records: list[dict[str, Any]], suite_exit_code: int, command: str) -> str:
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain") else ""
    commit = _git("rev-parse", "--short", "HEAD") + dirty
    tests = _per_test(records)
    faults = sum(sum(t["faults"].values()) for t in tests.values())
    images = sum(t["images"] for t in tests.values())
    lost = sum(t["lost"] for t in tests.values())
    suite = "passed" if suite_exit_code == 0 else f"FAILED (pytest exit code {suite_exit_code})"
    lines = [
        INTRO,
        "## The last run",
        "",
        f"- When: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}",
        f"- Reproduce: `{command}` (writes this file)",
        f"- The suite: {suite}",
        f"- Totals: {len(tests)} scenarios ({len(records)} checks), {faults} faults injected, {images} images, "
        f"**{lost} lost**",
        "",
        "| Scenario (test) | What happened to it | Faults injected | Images | Ended as | Lost |",
        "|---|---|---|---:|---|---:|",
    ]
    for r in sorted(records, key=lambda r: (r["scenario"], r["label"])):
        name = r["scenario"].removeprefix("tests/") + (f" ({r['label']})" if r["label"] else "")
        lines.append(
            f"| `{name}` | {r['description']} | {_faults(r['faults'])} | {r['images']} | "
            f"{_states(r['states'])} | {r['lost']} |"
        )
    kinds: Counter[str] = Counter()
    for t in tests.values():
        kinds.update(t["faults"])
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
    lost = sum(t["lost"] for t in _per_test(records).values())
    print(f"{args.output}: {len(records)} scenario checks, {lost} images lost")


if __name__ == "__main__":
    main()
