"""copy-image: glance-migrator against Glance's own copy-image and store delete driven by a bare script.

    .venv/bin/python -m benchmarks.copyimage [--large-mib 1024] [--small 100] [--small-kib 1] [--workers 1,4,8]
        [--out benchmarks/results-copyimage.md]

Starts its own lab (Keystone + Glance, file stores `old` and `new`) in a temporary directory and measures, each as
a separate process (wall time and peak RSS, benchmarks/_peak.py), on fresh images each time:
1. one large image: benchmarks/_bare_copy_image.py (import copy-image, look every 50 ms until the copy is in and
   the lock gone, delete from the old store) against `glance-migrator run --strategy copy-image`;
2. many small images at each --workers N: the bare script N images at a time against the tool with --workers N,
   as images per second.
Ratios are bare time / tool time (1.00: as fast as Glance driven by the bare script; targets of issue 11: >= 0.95
for the large image, >= 0.8 for the small ones). The tool's wall time includes what the bare script does not do:
start-up, discovery, the preflight checks, its state DB, and the checks around each step (the image unchanged,
the copy proven by Glance's task, the sharing check before the delete).
A measurement, not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench import (
    RequestLog,
    _cpu_model,
    _load,
    _mem_gib,
    measured,
    publish,
    seed,
    summarize,
    temporary_lab,
    verdict,
)  # fmt: skip
from tests.glancetools import CLI
from tests.lab import DEFAULT_STORES, Lab

HERE = Path(__file__).resolve().parent
KIB, MIB = 1 << 10, 1 << 20


@dataclass
class Pair:
    what: str
    images: int
    workers: int
    bare: float  # seconds, the bare script's whole process
    tool: float  # seconds, glance-migrator's whole process
    tool_rss_kib: int
    bare_requests: int = 0  # requests Glance answered during the bare script's run
    tool_requests: int = 0  # ... during the tool's run

    @property
    def ratio(self) -> float:
        return self.bare / self.tool


def bare(lab: Lab, conn: object, ids: list[str], workers: int, work: Path, label: str) -> float:
    env = {**os.environ, "BENCH_TOKEN": conn.session.get_token()}  # type: ignore[attr-defined]
    argv = [sys.executable, str(HERE / "_bare_copy_image.py"), lab.glance_url, "old", "new", str(workers), *ids]
    log = work / f"bare-{label}.log"
    wall, _rss, rc = measured(argv, env, log)
    if rc:
        raise RuntimeError(f"bare script failed (rc={rc}):\n{log.read_text()[-2000:]}")
    json.loads(log.read_text().strip().splitlines()[-1])  # it finished every image
    return wall


def tool(lab: Lab, ids: list[str], workers: int, work: Path, label: str) -> tuple[float, int]:
    argv = [*CLI, "run", "--from-store", "old", "--to-store", "new", "--strategy", "copy-image"]
    argv += ["--workers", str(workers), "--db", str(work / f"{label}.db")]
    argv += [arg for image_id in ids for arg in ("--image", image_id)]
    log = work / f"tool-{label}.log"
    wall, rss, rc = measured(argv, {**os.environ, **lab.env()}, log)
    if rc:
        raise RuntimeError(f"glance-migrator failed (rc={rc}):\n{log.read_text()[-3000:]}")
    return wall, rss


def pair(lab: Lab, conn: object, what: str, size: int, count: int, workers: int, work: Path) -> Pair:
    label = f"{what}-{workers}"
    print(f"bench: {label}: seeding 2 x {count} image(s) of {size} bytes", file=sys.stderr)
    a = [seed(conn, f"bench-{label}-a{i}", size) for i in range(count)]
    b = [seed(conn, f"bench-{label}-b{i}", size) for i in range(count)]
    requests = RequestLog(lab.logs_dir / "glance-uwsgi.log")
    bare_s = bare(lab, conn, a, workers, work, label)
    bare_requests = requests.since()
    tool_s, rss = tool(lab, b, workers, work, label)
    result = Pair(what, count, workers, bare_s, tool_s, rss, bare_requests, requests.since())
    print(f"bench: {label}: bare {bare_s:.1f} s, tool {tool_s:.1f} s, ratio {result.ratio:.2f}", file=sys.stderr)
    return result


def report(results: list[Pair], args: argparse.Namespace, started: dt.datetime, total: float, load: str) -> str:
    lines = [
        "# glance-migrator benchmark: copy-image against Glance's own copy driven by a bare script",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; whole benchmark {total:.0f} s",
        f"- machine: {len(os.sched_getaffinity(0))} CPUs ({_cpu_model()}), {_mem_gib():.0f} GiB RAM; the tool, the "
        f"bare script, Keystone 30 and Glance 33 (uWSGI) all on these CPUs; 1-min load average at the end: {load}",
        "- stores: file `old` -> file `new` (Glance copies through its staging dir, hashing what it writes)",
        f"- command: `.venv/bin/python -m benchmarks.copyimage --large-mib {args.large_mib} --small {args.small} "
        f"--small-kib {args.small_kib} --workers {args.workers}`",
        "",
        "bare = benchmarks/_bare_copy_image.py: import, look every 50 ms, store delete; nothing else. tool = "
        "`glance-migrator run --strategy copy-image` as a whole process (start-up, discovery, checks, state DB). "
        "ratio = bare s / tool s (1.00 = as fast as the bare script). requests/image = requests Glance answered "
        "during the process (its uWSGI request log) / images; both poll the copy (the bare script every 50 ms).",
        "",
        "| what | images | workers | bare s | tool s | bare images/s | tool images/s | ratio | bare requests/image "
        "| tool requests/image | tool peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.what} | {r.images} | {r.workers} | {r.bare:.2f} | {r.tool:.2f} | {r.images / r.bare:.2f} | "
            f"{r.images / r.tool:.2f} | {r.ratio:.2f} | {r.bare_requests / r.images:.1f} | "
            f"{r.tool_requests / r.images:.1f} | {r.tool_rss_kib / 1024:.1f} |"
        )
    small = [r for r in results if r.what.startswith("small")]
    if len(small) > 1:
        one = small[0]
        lines += ["", "Speed-up with workers (images per second against the same at the fewest workers):", ""]
        lines += [
            f"- {r.workers} worker(s): bare {one.bare / r.bare:.2f}x, tool {one.tool / r.tool:.2f}x" for r in small
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-mib", type=int, default=1024, help="size of the large image (0: leave it out)")
    parser.add_argument("--small", type=int, default=100, help="small images per measurement")
    parser.add_argument("--small-kib", type=int, default=1, help="size of each small image")
    parser.add_argument("--workers", default="1,4,8", help="concurrency of the small-image runs, comma-separated")
    parser.add_argument("--out", type=Path, default=HERE / "results-copyimage.md", help="Markdown report")
    parser.add_argument("--summary", type=Path, help=argparse.SUPPRESS)  # for python -m benchmarks
    args = parser.parse_args()
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    results: list[Pair] = []
    with temporary_lab("glance-migrator-bench-copyimage-", DEFAULT_STORES) as (root, lab):
        conn = lab.connect()
        if args.large_mib:
            results.append(pair(lab, conn, f"large ({args.large_mib} MiB)", args.large_mib * MIB, 1, 1, root))
        for workers in (int(n) for n in args.workers.split(",")):
            results.append(pair(lab, conn, f"small ({args.small_kib} KiB)", args.small_kib * KIB, args.small, workers,
                                root))  # fmt: skip
    publish(report(results, args, started, time.monotonic() - t0, _load()), args.out)
    summarize(args.summary, summary_rows(results))


def summary_rows(results: list[Pair]) -> list[dict[str, str]]:
    rows = []
    small = [r for r in results if r.what.startswith("small")]
    for r in results:
        large = r.what.startswith("large")
        section = "1. copy-image, large" if large else "3. many small images (copy-image)"
        size = r.what.removeprefix("small (").rstrip(")")
        what = r.what if large else f"{r.images} x {size}, {r.workers} worker{'s' if r.workers > 1 else ''}"
        speedup = f"; speed-up {small[0].tool / r.tool:.2f}x (bare {small[0].bare / r.bare:.2f}x)" if not large else ""
        rows.append({"section": section, "what": what, "target": ">= 0.95" if large else ">= 0.8",
                     "result": f"{r.ratio:.2f}x the bare script's speed ({r.tool:.1f} s vs {r.bare:.1f} s){speedup}; "
                     f"Glance requests per image: tool {r.tool_requests / r.images:.1f}, bare "
                     f"{r.bare_requests / r.images:.1f}",
                     "verdict": verdict(r.ratio >= (0.95 if large else 0.8))})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
