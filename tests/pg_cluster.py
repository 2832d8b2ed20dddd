"""A private PostgreSQL cluster on 127.0.0.1 that a test may stop and start (fault tests)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    return Path(found[-1]) if found else None


class Cluster:
    def __init__(self):
        bin_dir = binaries()
        if bin_dir is None:
            message = "PostgreSQL server binaries not found (apt-get install postgresql, or run .ci/start-postgres)"
            if os.environ.get("CI"):
                pytest.fail(message)  # CI installs PostgreSQL first: these tests must never be skipped there
            pytest.skip(message)
        self.bin = bin_dir
        self.as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        self.dir = Path(tempfile.mkdtemp(prefix="proxy-fault-pg-"))
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.data = self.dir / "data"
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "proxy")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/proxy"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
