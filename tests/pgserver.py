"""A real PostgreSQL server for the database sink tests: initdb into a fresh directory, then
``postgres`` listening on a Unix socket only (no port to collide on), stopped after.

PostgreSQL refuses to run as root. Run as root (CI, this machine), the server and initdb run
as the ``postgres`` user (Debian's package creates it; else ``nobody``) through ``setpriv``,
on a directory under /tmp handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

__all__ = ("PostgresServer", "postgres_bin")


def postgres_bin() -> Path | None:
    """The directory of the ``postgres`` and ``initdb`` binaries (Debian keeps them in
    /usr/lib/postgresql/N/bin, off the PATH), the newest version first."""
    found = shutil.which("postgres")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(candidates[-1]).parent if candidates else None


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, reached through its Unix socket."""

    def __init__(self) -> None:
        bindir = postgres_bin()
        if bindir is None:
            pytest.skip("PostgreSQL server binary not found (Debian: apt-get install postgresql)")
        self.bindir = bindir
        self.directory = Path(tempfile.mkdtemp(prefix="trio-gateway-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                user = pwd.getpwnam("nobody")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            self._prefix = [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--clear-groups",
            ]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.directory}"

    def _run(self, *args: str) -> list[str]:
        return [*self._prefix, *args]

    def start(self, timeout: float = 30.0) -> None:
        subprocess.run(
            self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self._run(
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-k",
                    str(self.directory),
                    "-c",
                    "listen_addresses=",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=50",
                ),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postgres did not start: {self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def query(self, sql: str) -> list[tuple[object, ...]]:
        """Read rows back with a separate, plain psycopg connection."""
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql).fetchall()

    def execute(self, sql: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql)
