"""A throw-away PostgreSQL server for tests and benches: Debian's `postgresql`, on loopback, no service manager.

Installed with apt-get when missing (CI has only what the project installs). initdb refuses to run
as root, so the server runs as the `postgres` user, in a data folder it owns, with trust
authentication on 127.0.0.1 only (see /work/shared/docs/peers.md).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from node_helpers import free_port, wait_for


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def ensure_installed() -> Path:
    """The folder of initdb/pg_ctl, installing Debian's postgresql first when it is not there."""
    if _bin_dir() is None:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run([*sudo, "apt-get", "update", "-q"], check=True, env=env, capture_output=True)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
                       check=True, env=env, capture_output=True)
    found = _bin_dir()
    if found is None:
        raise RuntimeError("postgresql installed but no initdb under /usr/lib/postgresql/*/bin")
    return found


class PostgresServer:
    """One server on a free loopback port; `url(db)` names a database on it (see `create_database`)."""

    def __init__(self, port: int | None = None) -> None:
        self.bin = ensure_installed()
        self.port = port or free_port()
        self.data = Path(tempfile.mkdtemp(prefix="rtprop-pg-"))
        self.user = "rtprop"
        self._as_root = os.geteuid() == 0

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        full = [str(self.bin / cmd[0]), *cmd[1:]]
        if self._as_root:
            full = ["runuser", "-u", "postgres", "--", *full]
        return subprocess.run(full, check=check, capture_output=True, text=True)

    def init(self) -> "PostgresServer":
        if self._as_root:
            shutil.chown(self.data, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("max_connections = 200\nfsync = on\nlog_min_messages = warning\n")
        return self.start()

    def start(self) -> "PostgresServer":
        self._run("pg_ctl", "-D", str(self.data), "-o",
                  f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "-l", str(self.data / "server.log"),
                  "-w", "start")
        wait_for(self.ready, 30, 0.2, what="PostgreSQL to accept connections")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def ready(self) -> bool:
        return self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False).returncode == 0

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().splitlines()[0])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres", autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def query(self, url: str, sql: str, args: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as con:
            return list(con.execute(sql, args).fetchall())

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data, ignore_errors=True)
