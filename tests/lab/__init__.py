"""A real Keystone 30 and a real Glance 33 on 127.0.0.1, for the tests and the README demo.

    lab = Lab(Path("/tmp/x"))
    lab.start()                 # ~free ports, keystone + glance, clouds.yaml (lab-admin, lab-demo)
    conn = lab.connect()        # openstack.connection.Connection as lab-admin
    ...
    lab.stop()

From a shell: ``python -m tests.lab up [--dir DIR]`` / ``python -m tests.lab down [--dir DIR]``.

The services run from two venvs in a cache directory (env ``GLANCE_MIGRATOR_LAB_CACHE``, default
``~/.cache/glance-migrator-lab``): ``ks-venv`` (keystone) and ``glance-venv`` (glance). They are
created on first use (python -m venv + pip install of pinned versions; ~30 s for both, built in
parallel), under a file lock; a marker file written after a successful install tells a finished venv
from a half-built one.

Startup time (2 CPUs): ~4.5 s from start() to both services ready (~6.5 s the first time per venv).
What makes it fast: db_sync runs once per venv and its result is copied afterwards; the fernet and
credential keys are written directly (what keystone-manage fernet_setup/credential_setup would write);
keystone-manage bootstrap, Keystone's and Glance's uWSGI start-ups overlap; the registrations go
straight to Keystone's REST API (3 concurrent chains); bcrypt cost 4 in keystone.conf.

SQLite stands in for MySQL/PostgreSQL; both uWSGIs import lab_sqlite_immediate.py so that concurrent
requests and import tasks queue for the database instead of failing with "database is locked".

Layout of a lab directory (everything the lab writes is below it):
    clouds.yaml          lab-admin (admin/admin) and lab-demo (demo/demo), password 'secret'
    etc/                 glance-api.conf, glance-api-paste.ini, *-uwsgi.ini, keystone.conf, SQLite hook
    keystone/            keystone.sqlite, fernet and credential keys
    glance.sqlite
    data/<store>/        filesystem_store_datadir of each file store; staging, tasks, cache, lock
    logs/                keystone*.log, glance*.log, *-manage*.log
    run/                 keystone.pid, glance.pid (process-group ids), lab.json (ports)
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
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
# boto3: for a later s3 store (glance_store's s3 driver needs it)
GLANCE_REQUIREMENTS = ("glance==33.0.0", "uWSGI==2.0.31", "boto3")

CACHE_ENV = "GLANCE_MIGRATOR_LAB_CACHE"
_MARKER = ".glance-migrator-lab-ready"
# what the lab creates inside its root; only these are removed by a fresh start (never the root itself)
_LAB_ENTRIES = ("clouds.yaml", "etc", "keystone", "glance.sqlite", "data", "logs", "run")


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
        if not k.startswith("OS_")
        and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONSAFEPATH")
    }
    env.update(extra)
    return env


def _venv_matches(venv: Path, requirements: Sequence[str]) -> bool:
    """True if a venv without our marker (e.g. built by hand) has exactly the pinned versions."""
    python = venv / "bin" / "python"
    if not (python.exists() and (venv / "bin" / "uwsgi").exists()):
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


def ensure_venv(name: str, requirements: Sequence[str], cache: Path | None = None) -> Path:
    """Return cache/name, a venv with `requirements` installed; build it if needed.

    Safe against concurrent callers (fcntl lock on cache/.name.lock) and against interrupted builds
    (the marker file is written only after pip succeeded; a venv without it is rebuilt, unless it
    already holds exactly the pinned versions, as the prebuilt venvs on a dev machine do).
    """
    cache = Path(cache) if cache else cache_dir()
    venv = cache / name
    marker = venv / _MARKER
    wanted = json.dumps(list(requirements))
    if marker.exists() and marker.read_text() == wanted:  # fast path, no lock
        return venv
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if marker.exists() and marker.read_text() == wanted:  # built by someone else meanwhile
            return venv
        if not marker.exists() and _venv_matches(venv, requirements):
            marker.write_text(wanted)
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        log = cache / f"{name}-install.log"
        with log.open("w") as out:
            for argv in (
                [sys.executable, "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *requirements],
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

    Extension point: pass Lab(stores=[*DEFAULT_STORES, Store("s3", "s3", {...})]) to add a store. For
    "file" stores without a filesystem_store_datadir option the lab uses root/data/<name>. (An s3 store
    needs a running S3 endpoint; a ceph store ("rbd") also needs the rbd/rados modules on uWSGI's
    pythonpath and a running cluster -- see start-s3.sh / start-ceph.sh of the reference lab. Neither
    is implemented here yet.)
    """

    name: str
    driver: str = "file"
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""


DEFAULT_STORES: tuple[Store, ...] = (
    Store("old", description="old file store"),
    Store("new", description="new file store"),
)
# imported by both uWSGIs: SQLite transactions BEGIN IMMEDIATE (see the module's docstring)
_SQLITE_HOOK = "lab_sqlite_immediate"
# Glance's reserved stores (needed with enabled_backends) -> their datadir below root/data
_RESERVED_STORES = {"os_glance_staging_store": "staging", "os_glance_tasks_store": "tasks"}


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

    Glance stores: `stores` (default: "old" and "new", both file stores; "old" is default_backend).
    Users: admin (project admin, role admin), demo (project demo, role member), glance (project
    service, roles admin + service); all with password 'secret'.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        stores: Sequence[Store] = DEFAULT_STORES,
        default_store: str | None = None,
        timeout: float = 60.0,
        cache: Path | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.stores: list[Store] = list(stores)
        self.default_store = default_store or self.stores[0].name
        self.timeout = timeout
        self.cache = Path(cache) if cache else cache_dir()
        self.timings: dict[str, float] = {}
        self.keystone_port: int | None = None
        self.glance_port: int | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._ks_venv: Path | None = None
        self._glance_venv: Path | None = None
        state = self.run_dir / "lab.json"
        if state.exists():  # a lab started earlier in this dir (python -m tests.lab)
            with contextlib.suppress(ValueError, OSError):
                ports = json.loads(state.read_text())
                self.keystone_port, self.glance_port = ports["keystone_port"], ports["glance_port"]

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
    def keystone_url(self) -> str:
        """The identity auth_url, e.g. http://127.0.0.1:PORT/v3."""
        return f"http://{HOST}:{self._port('keystone')}/v3"

    @property
    def glance_url(self) -> str:
        """The image endpoint (as in the catalog), e.g. http://127.0.0.1:PORT."""
        return f"http://{HOST}:{self._port('glance')}"

    def _port(self, name: str) -> int:
        port = self.keystone_port if name == "keystone" else self.glance_port
        if port is None:
            raise LabError("the lab has not been started")
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

    # ---- life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Fresh Keystone + Glance on new free ports. Raises LabError (with log tails) on failure."""
        if self.running_services():
            raise LabError(f"a lab is already running in {self.root} ({self.running_services()}); stop it first")
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # on CI both are built at once
            ks = pool.submit(ensure_venv, "ks-venv", KEYSTONE_REQUIREMENTS, self.cache)
            gl = pool.submit(ensure_venv, "glance-venv", GLANCE_REQUIREMENTS, self.cache)
            self._ks_venv, self._glance_venv = ks.result(), gl.result()
        self.timings = {"venvs": time.monotonic() - t0}
        t0 = time.monotonic()
        self._reset_dir()
        self.keystone_port, self.glance_port = _free_ports(2)
        (self.run_dir / "lab.json").write_text(
            json.dumps({"keystone_port": self.keystone_port, "glance_port": self.glance_port})
        )
        try:
            self._write_keystone_config()
            self.write_glance_config()
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
            self._spawn("glance")  # needs no keystone until the first authenticated call
            self._finish(bootstrap)
            self._wait_ready("glance", "/", 300)
            self.timings["glance"] = time.monotonic() - t0
            self._wait_ready("keystone", "/v3/", 200)
            token = self._register()
            self._write_clouds_yaml()
            self.timings["keystone"] = time.monotonic() - t0
            self._check_stores(token)
            self.timings["ready"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop Glance and Keystone, both at once (each: SIGTERM, wait, SIGKILL its group). Idempotent."""
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(self._stop_service, name) for name in ("glance", "keystone")]:
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

    def running_services(self) -> list[str]:
        """The services of this lab whose process group is alive (read from root/run/*.pid)."""
        return [name for name in ("keystone", "glance") if self._live_members(name)]

    # ---- configuration --------------------------------------------------------------------------------

    def write_glance_config(self) -> None:
        """(Re)write etc/glance-api.conf, -paste.ini and -uwsgi.ini from the templates and self.stores."""
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        sections = []
        for store in self.stores:
            options = dict(store.options)
            if store.driver == "file":
                options.setdefault("filesystem_store_datadir", str(self.store_dir(store.name)))
                Path(options["filesystem_store_datadir"]).mkdir(parents=True, exist_ok=True)
            if store.description:
                options.setdefault("store_description", f'"{store.description}"')
            sections.append(self._section(store.name, options))
        for name, sub in _RESERVED_STORES.items():
            datadir = self.root / "data" / sub
            datadir.mkdir(parents=True, exist_ok=True)
            sections.append(self._section(name, {"filesystem_store_datadir": str(datadir)}))
        for sub in ("cache", "lock"):
            (self.root / "data" / sub).mkdir(parents=True, exist_ok=True)
        self.store(self.default_store)  # must exist
        values = {
            "LAB": str(self.root),
            "PORT": str(self._port("glance")),
            "KEYSTONE_URL": f"http://{HOST}:{self._port('keystone')}",
            "PASSWORD": PASSWORD,
            "ENABLED_BACKENDS": ", ".join(f"{s.name}:{s.driver}" for s in self.stores),
            "DEFAULT_BACKEND": self.default_store,
            "STORE_SECTIONS": "\n\n".join(sections),
        }
        self.glance_conf.write_text(_render(HERE / "glance-api.conf.in", values))
        (self.etc_dir / "glance-api-paste.ini").write_text(
            _render(HERE / "glance-api-paste.ini.in", {"LAB": str(self.root)})
        )
        shutil.copyfile(HERE / "glance-uwsgi.ini", self.etc_dir / "glance-uwsgi.ini")
        shutil.copyfile(HERE / f"{_SQLITE_HOOK}.py", self.etc_dir / f"{_SQLITE_HOOK}.py")

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
        """What `keystone-manage fernet_setup` / `credential_setup` leave behind, without two ~1.7 s
        Python start-ups on the critical path (bootstrap and the server refuse to start without keys):
        per repository a staged key "0" and a primary key "1", each a Fernet key (urlsafe base64 of 32
        random bytes), mode 0600 in a 0700 directory.
        """
        for repo in ("fernet", "credential"):
            directory = self.root / "keystone" / repo
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            for index in ("0", "1"):
                fd = os.open(directory / index, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as key:
                    key.write(base64.urlsafe_b64encode(os.urandom(32)))

    def _write_clouds_yaml(self) -> None:
        clouds = []
        for cloud, user in (("lab-admin", "admin"), ("lab-demo", "demo")):
            clouds.append(
                f"  {cloud}:\n"
                f"    auth:\n"
                f"      auth_url: {self.keystone_url}\n"
                f"      username: {user}\n"
                f"      password: {PASSWORD}\n"
                f"      project_name: {user}\n"
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
        venv = self._ks_venv if service == "keystone" else self._glance_venv
        if venv is None:  # e.g. start_glance() on a Lab attached to a directory
            if service == "keystone":
                venv = self._ks_venv = ensure_venv("ks-venv", KEYSTONE_REQUIREMENTS, self.cache)
            else:
                venv = self._glance_venv = ensure_venv("glance-venv", GLANCE_REQUIREMENTS, self.cache)
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
        if name == "keystone":
            env = _clean_env(OS_KEYSTONE_CONFIG_FILES=str(self.etc_dir / "keystone.conf"))
        else:
            env = _clean_env(OS_GLANCE_CONFIG_DIR=str(self.etc_dir))
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
        return _tail(self.logs_dir / ("keystone.log" if name == "keystone" else "glance-api.log"), 20)

    def _live_members(self, name: str) -> list[int]:
        try:
            pgid = int((self.run_dir / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return []
        # only processes whose command line names this lab's config (guards against reused pids)
        return _group_members(pgid, str(self.etc_dir / f"{name}-uwsgi.ini"))

    def _stop_service(self, name: str, term_wait: float = 10.0) -> None:
        """SIGTERM to the uWSGI master (the process-group leader); SIGKILL to whatever of the group is
        left after `term_wait` s. A normal shutdown takes ~1 s.

        Not SIGTERM to the whole group: a worker that gets SIGTERM itself while its master is shutting it
        down can deadlock on uWSGI's accept lock (seen here in ~1 of 10 stops under CPU load: "killing
        workers..." and then the worker hangs in futex_lock_pi until the SIGKILL).
        """
        pidfile = self.run_dir / f"{name}.pid"
        proc = self._procs.pop(name, None)
        members = self._live_members(name)
        if members:
            pgid = int(pidfile.read_text())
            if pgid in members:
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
        This is also Glance's first authenticated request (it fetches its own service token)."""
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
    return (
        f"# keystone {lab.keystone_url}  glance {lab.glance_url}  logs {lab.logs_dir}\n"
        f"# clouds.yaml: {lab.clouds_yaml} (clouds lab-admin, lab-demo; password {PASSWORD})\n"
        f"export OS_CLIENT_CONFIG_FILE={lab.clouds_yaml} OS_CLOUD=lab-admin"
    )


__all__ = ["DEFAULT_STORES", "Lab", "LabError", "Store", "cache_dir", "describe", "ensure_venv"]
