"""Every benchmark in one run: one summary table and every benchmark's report in benchmarks/results.md.

    .venv/bin/python -m benchmarks [--quick] [--only copyimage,locationswap,discovery,statedb,multihost] [--note TEXT]
        [--out benchmarks/results.md]

Runs, one after the other, each as its own process (each starts and stops its own lab, except statedb which needs
none), with the sizes of issue 11 (or, with --quick, smaller ones, to try the suite in a few minutes):
- copyimage: 1. copy-image of a large image and 3. many small images at 1, 4 and 8 workers, against Glance's own
  copy-image driven by a bare script (benchmarks/copyimage.py);
- locationswap: 2. location-swap of large images, spooled and --no-spool, against a plain streamed copy, and
  6. its peak memory across image sizes (benchmarks/bench.py);
- discovery: 4. discovery and plan of 5,000 and 50,000 images against a bare listing, and 6. peak memory across
  catalogue sizes (benchmarks/discovery.py);
- statedb: 5. the state DB at 1,000, 100,000 and 1,000,000 rows (benchmarks/statedb.py);
- multihost: 1, 2 and 4 runner processes on one PostgreSQL state DB against one on SQLite (issue 12;
  benchmarks/multihost.py).
Each benchmark's own report also goes to its results-*.md (as when it runs alone; not with --quick); results.md
holds the summary (each result against its baseline of the same run, and the issue's target) and all of them.
Prints the summary.
A measurement, not a test: nothing here asserts a timing; a missed target is reported, and the exit code is 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench import _cpu_model, _load, _mem_gib

HERE = Path(__file__).resolve().parent

# name: (module, its results file, arguments of a full run, arguments of a --quick run)
BENCHMARKS: dict[str, tuple[str, str, list[str], list[str]]] = {
    "copyimage": (
        "benchmarks.copyimage",
        "results-copyimage.md",
        ["--large-mib", "1024", "--small", "500", "--small-kib", "1", "--workers", "1,4,8"],
        ["--large-mib", "64", "--small", "20", "--small-kib", "1", "--workers", "1,4"],
    ),
    "locationswap": (
        "benchmarks.bench",
        "results-locationswap.md",
        ["--sizes", "64,256,1024"],
        ["--sizes", "16,64", "--repeat", "1"],
    ),
    "discovery": (
        "benchmarks.discovery",
        "results-discovery.md",
        ["--catalogues", "500,5000,50000", "--run-limit", "5"],
        ["--catalogues", "100,1000", "--run-limit", "2"],
    ),
    "statedb": (
        "benchmarks.statedb",
        "results-statedb.md",
        ["--rows", "1000,100000,1000000"],
        ["--rows", "1000,10000,100000"],
    ),
    "multihost": (
        "benchmarks.multihost",
        "results-multihost.md",
        ["--images", "40", "--processes", "1,2,4"],
        ["--images", "10", "--processes", "1,2"],
    ),
}


def _commit() -> str:
    """The checkout's commit, as the run starts (the run then rewrites the results files)."""
    try:
        git = ["git", "-C", str(HERE)]
        out = subprocess.run([*git, "log", "-1", "--format=%h"], capture_output=True, text=True, check=False)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=False).stdout.strip()  # fmt: skip
    except OSError:
        return "unknown"
    line = out.stdout.strip() or "unknown"
    return f"{line}{' (with uncommitted changes)' if dirty else ''}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="benchmarks to run, comma-separated")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: the suite in a few minutes")
    parser.add_argument(
        "--out", type=Path, help="the combined report (default: results.md, with --quick results-quick.md)"
    )
    parser.add_argument("--note", default="", help="what else the machine was doing, for the report")
    args = parser.parse_args()
    args.out = args.out or HERE / ("results-quick.md" if args.quick else "results.md")
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; there are {', '.join(BENCHMARKS)}")
    started, t0, load, commit = dt.datetime.now(dt.UTC), time.monotonic(), [_load()], _commit()
    summary: list[dict[str, str]] = []
    reports: list[str] = []
    ran: list[str] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="glance-migrator-benchmarks-") as tmp:
        for name in chosen:
            module, results, full, quick = BENCHMARKS[name]
            argv = [sys.executable, "-m", module, *(quick if args.quick else full)]
            out = HERE / results if not args.quick else Path(tmp) / results  # a quick run keeps the full reports
            summary_file = Path(tmp) / f"{name}.json"
            print(f"benchmarks: {name}: {' '.join(argv[1:])}", file=sys.stderr)
            began = time.monotonic()
            proc = subprocess.run([*argv, "--out", str(out), "--summary", str(summary_file)], cwd=HERE.parent,
                                  stdout=subprocess.DEVNULL, check=False)  # fmt: skip
            took = time.monotonic() - began
            load.append(_load())
            ran.append(f"`python -m {module} {' '.join(quick if args.quick else full)}` ({took:.0f} s)")
            if proc.returncode != 0 or not summary_file.exists():
                failed.append(f"{name} (exit code {proc.returncode}; its output above)")
                print(f"benchmarks: {name} FAILED (exit code {proc.returncode})", file=sys.stderr)
                continue
            summary += json.loads(summary_file.read_text())
            text = out.read_text()
            reports.append("#" + text if text.startswith("# ") else text)  # its title a section of results.md
    text = report(summary, reports, ran, failed, args, commit, started, time.monotonic() - t0, load)
    args.out.write_text(text)
    print(table(summary))
    print(f"benchmarks: written to {args.out}", file=sys.stderr)


def table(summary: list[dict[str, str]]) -> str:
    lines = ["| section | what | result (ratio: against the baseline of the same run) | target | |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in sorted(summary, key=lambda r: r["section"]):  # stable: each benchmark's order kept
        lines.append(
            f"| {_cell(row['section'])} | {_cell(row['what'])} | {_cell(row['result'])} | {_cell(row['target'])} | "
            f"{row['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def report(
    summary: list[dict[str, str]],
    reports: list[str],
    ran: list[str],
    failed: list[str],
    args: argparse.Namespace,
    commit: str,
    started: dt.datetime,
    total: float,
    load: list[str],
) -> str:
    lines = [
        "# glance-migrator benchmarks (issue 11)",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; all benchmarks {total / 60:.0f} min; commit {commit} of this repo",
        f"- machine: {len(os.sched_getaffinity(0))} CPUs ({_cpu_model()}), {_mem_gib():.0f} GiB RAM, Python "
        f"{platform.python_version()}; every lab service (Keystone 30, Glance 33 under uWSGI, SeaweedFS) on the "
        "same CPUs as the tool and its baselines",
        f"- 1-min load average before, then after each benchmark: {' / '.join(load)}",
        f"- command: `.venv/bin/python -m benchmarks{' --quick' if args.quick else ''}"
        f"{' --only ' + args.only if args.only != ','.join(BENCHMARKS) else ''}`",
        *([f"- note: {args.note}"] if args.note else []),
        "- ran: " + "; ".join(ran),
        *([f"- FAILED: {', '.join(failed)}"] if failed else []),
        "",
        "## Summary",
        "",
        table(summary),
    ]
    for text in reports:
        lines += ["", text.rstrip("\n")]
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    main()
