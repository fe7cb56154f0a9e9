"""Discovery and plan of a large catalogue: seconds, requests per image and peak memory, against a bare listing.

    .venv/bin/python -m benchmarks.discovery [--catalogues 500,5000] [--run-limit 5]
        [--out benchmarks/results-discovery.md]

Starts its own lab (Keystone + Glance, file stores `old` and `new`) in a temporary directory and grows its
catalogue to each size in turn: one image is uploaded through the API as a template, the rest are written into
Glance's own SQLite database the way tests/corpus.py edits it (an `images` row, its properties and one
`image_locations` row in store `old`, copied from the template's), each with its own 1 KiB data file in the
store's directory and that file's md5 and sha512: active images Glance serves as if uploaded. (Uploading them
through the API is timed on a few images, for the report.) At each size it measures, each as a separate process
(wall time and peak RSS, benchmarks/_peak.py):
- baseline: benchmarks/_bare_list.py, the same listing glance-migrator makes (visibility=all, os_hidden false
  then true, pages of glance_migrator.glance.PAGE_SIZE images, Glance's `next` links), nothing else;
- plan: `glance-migrator run --dry-run --strategy copy-image` (auth, the cloud's profile and preflight checks,
  the listing, the sharing index, the classification of every image, the plan printed);
- run: `glance-migrator run --strategy copy-image --limit N` on a new state DB: the listing and sharing index of
  the whole catalogue, N images migrated: the peak memory of a run as the catalogue grows.
Requests are counted from the services' own request logs (uWSGI's logs/glance-uwsgi.log and
logs/keystone-uwsgi.log), before and after each process.
A measurement, not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from glance_migrator.glance import PAGE_SIZE
from tests.glancetools import CLI
from tests.lab import DEFAULT_STORES, Lab

HERE = Path(__file__).resolve().parent
KIB = 1 << 10
SIZE = KIB  # bytes of data per seeded image
API_SAMPLE = 10  # images uploaded through the API to time that way of seeding


@dataclass
class Measure:
    images: int
    what: str
    wall: float
    rss_kib: int
    glance_requests: int
    keystone_requests: int
    said: str = ""  # the plan's last line (its totals)


class Catalogue:
    """Active images in store `old`, written into Glance's database after one template uploaded through the API."""

    def __init__(self, lab: Lab, conn: Any) -> None:
        self.lab, self.count = lab, 0
        t0 = time.monotonic()
        ids = [seed(conn, f"template-{i}", SIZE) for i in range(API_SAMPLE)]
        self.api_rate = API_SAMPLE / (time.monotonic() - t0)  # images per second through the API
        self.count = API_SAMPLE
        self.datadir = lab.store_dir("old")
        with self._db() as db:
            db.row_factory = sqlite3.Row
            self.template = dict(db.execute("SELECT * FROM images WHERE id = ?", (ids[0],)).fetchone())
            self.location = dict(db.execute("SELECT * FROM image_locations WHERE image_id = ?", (ids[0],)).fetchone())
            props = db.execute("SELECT * FROM image_properties WHERE image_id = ? AND deleted = 0", (ids[0],))
            self.properties = [dict(row) for row in props]
        self.sql_rate = 0.0

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.lab.root / "glance.sqlite", timeout=60, isolation_level=None)

    def grow_to(self, total: int) -> None:
        """Add images until there are `total`, in one transaction."""
        template_id = self.template["id"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        images, locations, properties = [], [], []
        t0 = time.monotonic()
        for n in range(self.count, total):
            image_id = str(uuid.uuid4())
            data = image_id.encode() * (SIZE // 36) + b"\0" * (SIZE % 36)
            (self.datadir / image_id).write_bytes(data)
            row = {**self.template, "id": image_id, "name": f"bench-{n:06d}", "size": SIZE, "created_at": now,
                   "updated_at": now, "checksum": hashlib.md5(data).hexdigest(),  # noqa: S324 (what Glance records)
                   "os_hash_value": hashlib.sha512(data).hexdigest()}  # fmt: skip
            images.append(row)
            location = {k: v for k, v in self.location.items() if k != "id"}
            location.update(image_id=image_id, value=self.location["value"].replace(template_id, image_id))
            location.update(created_at=now, updated_at=now)
            locations.append(location)
            for prop in self.properties:
                properties.append({**{k: v for k, v in prop.items() if k != "id"}, "image_id": image_id})
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            for table, rows in (("images", images), ("image_locations", locations), ("image_properties", properties)):
                if rows:
                    cols = list(rows[0])
                    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
                    db.executemany(sql, [tuple(r[c] for c in cols) for r in rows])
            db.execute("COMMIT")
        finally:
            db.close()
        if images:
            self.sql_rate = len(images) / (time.monotonic() - t0)
        self.count = total


def baseline(lab: Lab, conn: Any, images: int, work: Path, logs: tuple[RequestLog, RequestLog]) -> Measure:
    env = {**os.environ, "BENCH_TOKEN": conn.session.get_token()}
    log = work / f"bare-list-{images}.log"
    for request_log in logs:
        request_log.since()
    wall, rss, rc = measured([sys.executable, str(HERE / "_bare_list.py"), lab.glance_url, str(PAGE_SIZE)], env, log)
    if rc:
        raise RuntimeError(f"bare listing failed (rc={rc}):\n{log.read_text()[-2000:]}")
    seen = json.loads(log.read_text().strip().splitlines()[-1])
    if seen["images"] != images:
        raise RuntimeError(f"the bare listing saw {seen['images']} images, not {images}")
    return Measure(images, "baseline: bare listing", wall, rss, logs[0].since(), logs[1].since())


def tool(lab: Lab, images: int, what: str, argv: list[str], work: Path, logs: tuple[RequestLog, RequestLog]) -> Measure:
    log = work / f"tool-{what.split(maxsplit=1)[0]}-{images}.log"
    for request_log in logs:
        request_log.since()
    wall, rss, rc = measured([*CLI, *argv], {**os.environ, **lab.env()}, log)
    if rc:
        raise RuntimeError(f"glance-migrator {' '.join(argv)} failed (rc={rc}):\n{log.read_text()[-3000:]}")
    last = (log.read_text().strip().splitlines() or [""])[-1]
    said = last if "Nothing was changed" in last else ""
    return Measure(images, what, wall, rss, logs[0].since(), logs[1].since(), said)


def report(results: list[Measure], cat: Catalogue, args: argparse.Namespace, started: dt.datetime, total: float,
           load: list[str]) -> str:  # fmt: skip
    base = {m.images: m for m in results if m.what.startswith("baseline")}
    lines = [
        "# glance-migrator benchmark: discovery and plan of a large catalogue",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; whole benchmark {total:.0f} s",
        f"- machine: {len(os.sched_getaffinity(0))} CPUs ({_cpu_model()}), {_mem_gib():.0f} GiB RAM; the tool, "
        "Keystone 30 and Glance 33 (uWSGI, SQLite DB) all on these CPUs",
        f"- 1-min load average before the lab started, then after each catalogue size: {' / '.join(load)}",
        f"- command: `.venv/bin/python -m benchmarks.discovery --catalogues {args.catalogues} "
        f"--run-limit {args.run_limit}`",
        f"- catalogue: active images of {SIZE} B in file store `old`, each with its own data file; {API_SAMPLE} "
        f"uploaded through the API ({cat.api_rate:.1f} images/s: create + upload + GET), the rest written into "
        f"Glance's SQLite DB ({cat.sql_rate:,.0f} images/s, data files included)",
        "",
        f"baseline = benchmarks/_bare_list.py: the same listing (pages of {PAGE_SIZE}, os_hidden false then true), "
        "token handed in, nothing else. plan = `glance-migrator run --dry-run --strategy copy-image --from-store old "
        f"--to-store new` (auth, the cloud's profile, preflight, listing, sharing index, classification, the plan "
        f"printed). run = `glance-migrator run --strategy copy-image --limit {args.run_limit}` on a new state DB "
        "(the whole catalogue listed and indexed, that many images migrated). Requests counted in the services' "
        "uWSGI request logs. ratio = tool s / baseline s at the same catalogue size (1.00: as fast as the bare "
        "listing). start-up only = `glance-migrator --version`: the interpreter and the tool's imports, no request. "
        "RSS = peak resident set of the process (benchmarks/_peak.py).",
        "",
        "| images | what | wall s | ratio | Glance requests | per image | Keystone requests | peak RSS MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        b = base[m.images]
        lines.append(
            f"| {m.images:,} | {m.what} | {m.wall:.2f} | {m.wall / b.wall:.2f} | {m.glance_requests} | "
            f"{m.glance_requests / m.images:.4f} | {m.keystone_requests} | {m.rss_kib / 1024:.1f} |"
        )
    lines += ["", "What each plan said (its last line):", ""]
    lines += [f"- {m.images:,} images: {m.said}" for m in results if m.said]
    lines += ["", "Memory across catalogue sizes (peak RSS, largest catalogue vs smallest; target < 150 MiB):", ""]
    for what in dict.fromkeys(m.what for m in results):
        rss = {m.images: m.rss_kib for m in results if m.what == what}
        lo, hi = rss[min(rss)], rss[max(rss)]
        lines.append(
            f"- {what}: {lo / 1024:.1f} MiB at {min(rss):,} images -> {hi / 1024:.1f} MiB at {max(rss):,} "
            f"({(hi - lo) / 1024:+.1f} MiB for {max(rss) / min(rss):.0f}x the images); "
            f"{'under' if max(rss.values()) < 150 * 1024 else 'OVER'} 150 MiB"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogues", default="500,5000", help="catalogue sizes (images), comma-separated")
    parser.add_argument("--run-limit", type=int, default=5, help="images the measured run migrates (0: no run)")
    parser.add_argument("--out", type=Path, default=HERE / "results-discovery.md", help="Markdown report")
    parser.add_argument("--summary", type=Path, help=argparse.SUPPRESS)  # for python -m benchmarks
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.catalogues.split(","))
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    results: list[Measure] = []
    load = [_load()]
    with temporary_lab("glance-migrator-bench-discovery-", DEFAULT_STORES) as (root, lab):
        conn = lab.connect()
        cat = Catalogue(lab, conn)
        logs = (RequestLog(lab.logs_dir / "glance-uwsgi.log"), RequestLog(lab.logs_dir / "keystone-uwsgi.log"))
        common = ["--from-store", "old", "--to-store", "new", "--strategy", "copy-image"]
        for images in sizes:
            print(f"bench: {images} images: seeding", file=sys.stderr)
            cat.grow_to(images)
            results.append(baseline(lab, conn, images, root, logs))
            results.append(tool(lab, images, "start-up only (--version)", ["--version"], root, logs))
            results.append(tool(lab, images, "plan (run --dry-run)", ["run", "--dry-run", *common], root, logs))
            if args.run_limit:
                db = str(root / f"state-{images}.db")
                argv = ["run", *common, "--limit", str(args.run_limit), "--db", db]
                results.append(tool(lab, images, f"run --limit {args.run_limit}", argv, root, logs))
            print(f"bench: {images} images: " + ", ".join(f"{m.what} {m.wall:.1f} s" for m in results[-4:]),
                  file=sys.stderr)  # fmt: skip
            load.append(_load())
    publish(report(results, cat, args, started, time.monotonic() - t0, load), args.out)
    summarize(args.summary, summary_rows(results))


def summary_rows(results: list[Measure]) -> list[dict[str, str]]:
    base = {m.images: m for m in results if m.what.startswith("baseline")}
    startup = {m.images: m for m in results if m.what.startswith("start-up")}
    rows = []
    for m in results:
        if m.what.startswith("plan"):
            b, s = base[m.images], startup[m.images]
            rows.append({"section": "4. discovery and plan", "what": f"{m.images:,} images: plan (run --dry-run)",
                         "result": f"{m.wall:.2f} s ({m.wall / b.wall:.1f}x the bare listing's {b.wall:.2f} s; "
                         f"start-up alone {s.wall:.2f} s); {m.glance_requests / m.images:.4f} Glance requests per "
                         f"image ({m.glance_requests}; bare listing {b.glance_requests})",
                         "target": "", "verdict": ""})  # fmt: skip
    # Flat: what the tool's peak grows by from the smallest catalogue to the largest, beyond what the bare listing's
    # own peak grows by (a page of 1,000 images parsed at once against one of 500, the allocator's leftovers), is
    # under a tenth of its smallest peak.
    listing = {m.images: m.rss_kib for m in results if m.what.startswith("baseline")}
    for what in dict.fromkeys(m.what for m in results if m.what.startswith(("plan", "run"))):
        rss = {m.images: m.rss_kib for m in results if m.what == what}
        peak, spread = max(rss.values()), max(rss.values()) / min(rss.values())
        lo, hi = min(rss), max(rss)
        per_image = (rss[hi] - rss[lo]) / (hi - lo) if hi > lo else 0.0
        beyond = (rss[hi] - rss[lo]) - (listing[hi] - listing[lo])
        rows.append({"section": "6. memory", "what": f"{what}, catalogues {', '.join(f'{n:,}' for n in rss)} images",
                     "result": f"peak RSS {min(rss.values()) / 1024:.0f}-{peak / 1024:.0f} MiB (max/min {spread:.2f}; "
                     f"{per_image:+.2f} KiB per image more in the catalogue; {beyond / 1024:+.1f} MiB beyond the bare "
                     f"listing's own {(listing[hi] - listing[lo]) / 1024:+.1f} MiB)",
                     "target": "< 150 MiB, flat",
                     "verdict": verdict(peak < 150 * 1024 and beyond < 0.10 * min(rss.values()))})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
