"""Fixtures for storage tests: a migrated SQLite file and, when the binaries exist, a real PostgreSQL."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from storage import make_engine, make_session_factory, upgrade
from storage.db import sqlite_url


@pytest.fixture
def sqlite_engine(tmp_path):
    engine = make_engine(sqlite_url(tmp_path / "data"))
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_sessions(sqlite_engine):
    return make_session_factory(sqlite_engine)


def _pg_bin() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "pg_ctl").exists() and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """Start a throw-away PostgreSQL server (trust auth, loopback only); skip when impossible."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin or PATH")
    prefix: list[str] = []
    root = tempfile.mkdtemp(prefix="sharedllm-pg-")
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the 'postgres' (or 'nobody') user
        import pwd

        user = next((u for u in ("postgres", "nobody") if _has_user(pwd, u)), None)
        runuser = shutil.which("runuser")
        if user is None or runuser is None:
            pytest.skip("running as root and no 'postgres' user / runuser to start PostgreSQL with")
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        os.chmod(root, 0o700)
        prefix = [runuser, "-u", user, "--"]
    datadir, port = Path(root) / "pgdata", _free_port()
    log = Path(root) / "server.log"

    def run(*args: str) -> None:
        subprocess.run(prefix + list(args), check=True, capture_output=True, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--no-instructions")
        run(str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(log), "-w", "-t", "60",
            "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off", "start")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')[-500:]}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(pwd, name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
