"""The tool as users install it: the sdist and the wheel built from this checkout, each installed into a fresh
venv outside it, start and answer every command; the CLI the rest of the suite runs is that wheel; and its
read-only commands start without the cloud libraries.

`./dev test` installs the wheel into .venv non-editable; in-process tests import the source tree, every CLI
call runs the installed copy. So a module left out of the wheel, or a stale install, fails here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
import typer
from packaging.utils import canonicalize_name
from packaging.version import Version

from glance_migrator.cli import app
from glance_migrator.models import ImageRow
from glance_migrator.state import State, Strategy
from glance_migrator.statedb import StateDB
from tests.glancetools import CLI

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CLOUD_LIBRARIES = ("requests", "keystoneauth1", "openstack", "tenacity")  # what glance.py loads
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _shipped_sources() -> dict[str, Path]:
    """Every file the wheel must hold, by its path in the wheel: the package, and the Alembic scripts, which
    ship as glance_migrator/migrations."""
    found = {}
    for top, inside in (("glance_migrator", "glance_migrator"), ("migrations", "glance_migrator/migrations")):
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                found[f"{inside}/{path.relative_to(ROOT / top).as_posix()}"] = path
    return found


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sdist and wheel, built as `python -m build` builds them: the wheel from the unpacked sdist."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_wheel_holds_every_module_of_the_source_tree_and_nothing_else(dists: dict[str, Path]) -> None:
    names = {n for n in zipfile.ZipFile(dists["wheel"]).namelist() if ".dist-info/" not in n}
    expected = set(_shipped_sources())
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert not names - expected, f"shipped but not part of the tool: {sorted(names - expected)}"
    assert "glance_migrator/strategies/copy_image.py" in names and "glance_migrator/migrations/env.py" in names


def test_sdist_holds_the_sources_and_no_tests_benchmarks_or_dev_script(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = {p.relative_to(ROOT).as_posix() for p in _shipped_sources().values()}
    assert not sources - names, f"missing from the sdist: {sorted(sources - names)}"
    assert {"pyproject.toml", "README.md"} <= names
    unwanted = [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "docs", "dev", ".ci")]
    assert not unwanted, unwanted


def _checkout_copy(to: Path) -> Path:
    """The checkout as a clone has it: without .git, the venv, caches or build output (no git needed)."""
    unwanted = (".git", ".venv", ".glance-lab", "dist", "build", "*.egg-info", "__pycache__", ".*_cache")  # .gitignore
    return Path(shutil.copytree(ROOT, to, ignore=shutil.ignore_patterns(*unwanted)))


@pytest.mark.parametrize("kind", ["wheel", "sdist", "checkout"])
def test_installed_into_a_fresh_venv_every_command_starts(kind: str, dists: dict[str, Path], tmp_path: Path) -> None:
    """pip install of the wheel, the sdist or a checkout (`pip install ./glance-migrator`, as README's Install
    section says: pip builds it in isolation, hatchling from PyPI) into a new venv, run from a directory outside
    the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    source = _checkout_copy(tmp_path / "glance-migrator") if kind == "checkout" else dists[kind]
    pip = subprocess.run(
        [venv / "bin/pip", "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=tmp_path,
    )
    assert pip.returncode == 0, pip.stderr

    def run(*argv: str | Path, rc: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(argv, capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
        assert proc.returncode == rc, f"{argv}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc

    version = f"glance-migrator {PROJECT['version']}"
    assert run(venv / "bin/glance-migrator", "--version").stdout.strip() == version
    assert run(venv / "bin/python", "-m", "glance_migrator", "--version").stdout.strip() == version
    for command in COMMANDS:
        assert f"Usage: glance-migrator {command}" in run(venv / "bin/glance-migrator", command, "--help").stdout
    # A new state DB is built by the Alembic scripts shipped in the package.
    db = tmp_path / "state.db"
    status = run(venv / "bin/glance-migrator", "status", "--db", db, rc=2)
    assert "holds no run yet" in status.stderr
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()
    where = run(venv / "bin/python", "-c", "import glance_migrator; print(glance_migrator.__file__)").stdout
    assert Path(where.strip()).is_relative_to(venv)


def test_the_cli_every_test_runs_is_the_installed_wheel_of_this_checkout(tmp_path: Path) -> None:
    """Not an editable install, not the source tree, and byte for byte the sources of this checkout
    (`./dev test` rebuilds it when they change): a module missing from the wheel, or a stale one, fails here."""
    python = Path(CLI[0]).with_name("python")
    probe = (
        "import glance_migrator, importlib.metadata as m, json; d = m.distribution('glance-migrator'); "
        "print(json.dumps([glance_migrator.__file__, d.read_text('direct_url.json')]))"
    )
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    package_file, direct_url = json.loads(proc.stdout)
    package = Path(package_file).parent
    assert not package.is_relative_to(ROOT / "glance_migrator"), f"the CLI runs the source tree ({package})"
    assert not json.loads(direct_url or "{}").get("dir_info", {}).get("editable"), "an editable install"
    differing = [
        name
        for name, source in _shipped_sources().items()
        if not (installed := package.parent / name).is_file() or installed.read_bytes() != source.read_bytes()
    ]
    assert not differing, f"the installed tool is not this checkout's (run ./dev test to rebuild): {differing}"


def test_status_and_report_start_without_the_cloud_libraries(tmp_path: Path) -> None:
    """The installed CLI's module, and status and report on a state DB, import none of the libraries that talk to
    Glance (a quarter of a second of start-up): only run, check and retry load them."""
    python = Path(CLI[0]).with_name("python")
    db = tmp_path / "state.db"
    state = StateDB.open(str(db))
    rows = [
        (ImageRow(image_id=f"66666666-6666-4666-8666-{i:012d}", name=f"img-{i}", status="active", size=i,
                  stores="old", strategy=str(Strategy.COPY_IMAGE), state=str(st), attempts=0), None)
        for i, st in enumerate((State.PENDING, State.SKIPPED))
    ]  # fmt: skip
    state.create_run("old", "new", Strategy.COPY_IMAGE, None, rows)
    state.close()
    probe = f"import glance_migrator.cli, sys; print([m for m in {CLOUD_LIBRARIES!r} if m in sys.modules])"
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"import glance_migrator.cli loads {proc.stdout.strip()}"
    for command in (["status", "--db", str(db)], ["report", str(tmp_path / "audit.json"), "--db", str(db)]):
        proc = subprocess.run(
            [python, "-X", "importtime", "-m", "glance_migrator", *command],
            capture_output=True,
            text=True,
            env=_clean_env(),
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import ")}
        assert "glance_migrator.reports" in imported, proc.stderr[-2000:]  # the list is what the command imported
        loaded = sorted({name.partition(".")[0] for name in imported} & set(CLOUD_LIBRARIES))
        assert not loaded, f"{command[0]} imports the cloud libraries: {loaded}"


def _floors() -> list[str]:
    """`name==lowest` for each dependency of pyproject.toml and of its `postgresql` extra (every one is
    `name>=lowest`, or `name[extras]>=lowest`, with at most a ceiling after it: `,<first-refused`)."""
    pins = []
    for requirement in [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["postgresql"]]:
        found = re.fullmatch(
            r"([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?>=([0-9.]+)(?:,<[0-9.]+)?", requirement.replace(" ", "")
        )
        assert found, f"{requirement!r}: a dependency without a tested floor"
        pins.append(f"{found[1]}=={found[2]}")
    return pins


def test_cli_contract_holds_at_the_dependency_floors(dists: dict[str, Path], tmp_path: Path) -> None:
    """The wheel installed (with its PostgreSQL extra) with every dependency at the lowest release pyproject.toml
    allows, and the CLI contract
    tests (tests/test_cli.py, against the real lab) run with that install as the CLI."""
    venv, constraints = tmp_path / "floors", tmp_path / "floors.txt"
    with_postgresql = f"{dists['wheel']}[postgresql]"
    constraints.write_text("\n".join(_floors()) + "\n")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [venv / "bin/pip", "install", "-q", "--disable-pip-version-check", "-c", constraints, with_postgresql],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=tmp_path,
    )
    assert pip.returncode == 0, pip.stderr
    freeze = subprocess.run([venv / "bin/pip", "freeze"], capture_output=True, text=True, check=True).stdout
    pinned = (line.partition("==") for line in freeze.splitlines() if "==" in line)  # not "glance-migrator @ file:"
    installed = {canonicalize_name(name): Version(version) for name, _, version in pinned}
    for pin in _floors():
        name, _, version = pin.partition("==")
        assert installed.get(canonicalize_name(name)) == Version(version), f"{pin} not installed:\n{freeze}"
    pytest_args = ["-q", "-p", "no:cacheprovider", "-x", "--basetemp", tmp_path / "inner", ROOT / "tests/test_cli.py"]
    contract = subprocess.run(
        [sys.executable, "-m", "pytest", *pytest_args],
        capture_output=True,
        text=True,
        env={**_clean_env(), "GLANCE_MIGRATOR_TEST_CLI": str(venv / "bin/glance-migrator")},
        cwd=ROOT,
    )
    assert contract.returncode == 0, contract.stdout[-6000:] + contract.stderr[-2000:]
    assert " passed" in contract.stdout, contract.stdout[-2000:]
