"""Several runner processes on one PostgreSQL state DB against one process on SQLite: images per second.

    .venv/bin/python -m benchmarks.multihost [--images 40] [--size-kib 256] [--processes 1,2,4]
        [--strategy copy-image] [--out benchmarks/results-multihost.md]

Starts its own lab (Keystone + Glance, file stores `old` and `new`) and a PostgreSQL server (Debian's packages,
tests/lab/postgres.py) in a temporary directory. For each configuration it seeds a fresh set of images into `old`
and migrates them to `new`: first one process on a SQLite state DB (the baseline), then 1, 2 and 4 processes on
one PostgreSQL database, each process `--workers 1`, as hosts would be: the first starts the run, the others join
it with `run --resume` once the run is recorded. Wall time is from the first process's start to the last one's
exit; images per second = images / wall; each ratio is to the SQLite baseline of the same run.
Every runner here shares the machine's CPUs with Glance, Keystone and PostgreSQL: on a small machine the
processes compete with the Glance they drive, which bounds the speed-up (the report gives the CPU count).
A measurement, not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from benchmarks.bench import _cpu_model, _load, _mem_gib, publish, seed, summarize, temporary_lab
from tests.glancetools import CLI
from tests.lab import DEFAULT_STORES, Lab
from tests.lab.postgres import Postgres

HERE = Path(__file__).resolve().parent
KIB = 1 << 10


@dataclass
class Result:
    engine: str
    processes: int
    images: int
    wall: float

    @property
    def rate(self) -> float:
        return self.images / self.wall


def migrate(lab: Lab, db: str, image_ids: list[str], processes: int, strategy: str, work: Path, label: str) -> Result:
    env = {**os.environ, **lab.env()}
    common = ["--db", db, "--workers", "1"]
    chosen = [arg for image_id in image_ids for arg in ("--image", image_id)]
    logs = []
    t0 = time.monotonic()
    first_log = (work / f"{label}-1.log").open("wb")
    logs.append(first_log)
    start = [*CLI, "run", "--from-store", "old", "--to-store", "new", "--strategy", strategy, *chosen, *common]
    procs = [subprocess.Popen(start, env=env, stdout=first_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)]
    if processes > 1:
        _wait_for_run(db, len(image_ids))
        for n in range(2, processes + 1):
            log = (work / f"{label}-{n}.log").open("wb")
            logs.append(log)
            join = [*CLI, "run", "--resume", *common]
            proc = subprocess.Popen(join, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            procs.append(proc)
    codes = [proc.wait() for proc in procs]
    wall = time.monotonic() - t0
    for log in logs:
        log.close()
    if any(codes):
        tails = "\n".join((work / f"{label}-{n}.log").read_text()[-2000:] for n in range(1, processes + 1))
        raise RuntimeError(f"{label}: exit codes {codes}\n{tails}")
    return Result("SQLite" if "://" not in db else "PostgreSQL", processes, len(image_ids), wall)


def _wait_for_run(db: str, images: int) -> None:
    """Until the first runner has recorded the run's images: then the others can join it."""
    engine = sa.create_engine(db)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with engine.connect() as conn:
                    if conn.exec_driver_sql("SELECT count(*) FROM images").scalar() == images:
                        return
            except sa.exc.ProgrammingError:
                pass  # no schema yet
            time.sleep(0.05)
        raise RuntimeError("the first runner did not record the run within 120 s")
    finally:
        engine.dispose()


def report(results: list[Result], args: argparse.Namespace, started: dt.datetime, total: float, load: str) -> str:
    base = results[0]
    lines = [
        "# glance-migrator benchmark: runner processes on one PostgreSQL state DB",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; whole benchmark {total:.0f} s",
        f"- machine: {len(os.sched_getaffinity(0))} CPUs ({_cpu_model()}), {_mem_gib():.0f} GiB RAM; the runners, "
        "Keystone 30, Glance 33 (uWSGI) and PostgreSQL all on these CPUs",
        f"- {args.images} images of {args.size_kib} KiB per configuration, {args.strategy}, file store `old` -> "
        f"`new`; each process `--workers 1`; 1-min load average at the end: {load}",
        f"- command: `.venv/bin/python -m benchmarks.multihost --images {args.images} --size-kib {args.size_kib} "
        f"--processes {args.processes} --strategy {args.strategy}`",
        "",
        "wall = first process started -> last process exited (discovery and the run's set-up included).",
        "Processes on one machine measure what sharing a PostgreSQL run costs (claims, leases, joins), not what",
        "several hosts gain: here every runner competes with Glance, Keystone and PostgreSQL for the same CPUs,",
        "while on real hosts each brings its own CPU and network (and, for copy-image, its copies run on the",
        "glance-api nodes).",
        *([f"- note: {args.note}"] if args.note else []),
        "",
        "| state DB | processes | images | wall s | images/s | ratio to 1 process on SQLite |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.engine} | {r.processes} | {r.images} | {r.wall:.1f} | {r.rate:.2f} | {r.rate / base.rate:.2f} |"
        for r in results
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40, help="images per configuration")
    parser.add_argument("--size-kib", type=int, default=256, help="size of each image")
    parser.add_argument("--processes", default="1,2,4", help="runner processes on PostgreSQL, comma-separated")
    parser.add_argument("--strategy", default="copy-image", choices=["copy-image", "location-swap"])
    parser.add_argument("--out", type=Path, default=HERE / "results-multihost.md", help="Markdown report")
    parser.add_argument("--note", default="", help="what else the machine was doing, for the report")
    parser.add_argument("--summary", type=Path, help=argparse.SUPPRESS)  # for python -m benchmarks
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    results: list[Result] = []
    with temporary_lab("glance-migrator-bench-multihost-", DEFAULT_STORES) as (root, lab):
        postgres = Postgres(root / "postgres")
        postgres.start()
        try:
            conn = lab.connect()
            for engine, processes in [("sqlite", 1)] + [("postgresql", n) for n in counts]:
                label = f"{engine}-{processes}"
                print(f"bench: {label}: seeding {args.images} images", file=sys.stderr)
                ids = [seed(conn, f"bench-{label}-{i}", args.size_kib * KIB) for i in range(args.images)]
                db = str(root / f"{label}.db") if engine == "sqlite" else postgres.create_database()
                results.append(migrate(lab, db, ids, processes, args.strategy, root, label))
                rate = f"{results[-1].wall:.1f} s, {results[-1].rate:.2f} images/s"
                print(f"bench: {label}: {rate}", file=sys.stderr)
        finally:
            postgres.stop()
    publish(report(results, args, started, time.monotonic() - t0, _load()), args.out)
    summarize(args.summary, summary_rows(results))


def summary_rows(results: list[Result]) -> list[dict[str, str]]:
    """One row per PostgreSQL configuration, against the one SQLite process of the same run (no target: issue 12
    asks for the measurement)."""
    base = results[0]
    return [
        {
            "section": "7. several runner processes (issue 12)",
            "what": f"{r.processes} process(es) on one PostgreSQL DB, {r.images} images",
            "result": f"{r.rate / base.rate:.2f}x one process on SQLite ({r.rate:.2f} against {base.rate:.2f} "
            "images/s); every process on the same 2 CPUs as Glance",
            "target": "",
            "verdict": "",
        }
        for r in results[1:]
    ]


if __name__ == "__main__":
    main()
