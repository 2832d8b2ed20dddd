"""Start the proxy exactly as the Procfile does (gunicorn, its gunicorn.conf.py worker model) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.sandbox.cli import procfile_command  # the one reader of the Procfile, shared with `sandbox up`

from tests.conftest import ACCOUNT_SID, AUTH_TOKEN

API_KEY, API_SECRET = "SK" + "7" * 32, "e2e-api-key-secret"
METRICS_TOKEN = "e2e-metrics-token"
BODY_READ_SECONDS = 3  # short, so a test can wait it out

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    def __init__(self, env: dict, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Bind to loopback only in tests; everything else is the Procfile's own command.
        command = procfile_command("web").replace("0.0.0.0:", "127.0.0.1:")
        self.log_path = log_path
        self.mark = 0
        self.log = open(log_path, "w")
        full_env = {**os.environ, **env, "PORT": str(self.port),
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.process = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT, env=full_env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gunicorn exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("gunicorn did not start listening")

    def log_lines(self) -> list[str]:
        """What the server logged since the current test started.

        Workers log as requests finish, in several processes: wait until the file stops growing."""
        self.log.flush()
        text, deadline = None, time.monotonic() + 3
        while time.monotonic() < deadline:
            time.sleep(0.1)
            current = self.log_path.read_text()
            if current == text:
                break
            text = current
        return (text or "").splitlines()[self.mark:]

    def start_test(self) -> None:
        self.log.flush()
        self.mark = len(self.log_path.read_text().splitlines())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def gunicorn_server(database_url, fake_twilio_server, tmp_path_factory):
    """One gunicorn per test module (starting one takes seconds); each test gets a clean database."""
    fake_twilio = fake_twilio_server
    metrics_dir = tmp_path_factory.mktemp("metrics")
    server = Gunicorn(
        {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "DATABASE_URL": database_url,
         "TWILIO_API_BASE_URL": fake_twilio.url,
         "TWILIO_CONTENT_BASE_URL": fake_twilio.url, "WEB_CONCURRENCY": "2", "TWILIO_TIMEOUT_SECONDS": "5",
         "TWILIO_API_KEYS": f"{API_KEY}:{API_SECRET}", "METRICS_TOKEN": METRICS_TOKEN,
         "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "BODY_READ_TIMEOUT_SECONDS": str(BODY_READ_SECONDS)},
        tmp_path_factory.mktemp("gunicorn") / "gunicorn.log",
    )
    server.metrics_dir = metrics_dir  # each worker's samples, one file per process
    yield server
    server.stop()


@pytest.fixture
def proxy_server(gunicorn_server, db_engine, fake_twilio):
    gunicorn_server.start_test()
    return gunicorn_server


def json_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("{")]


__all__ = ["procfile_command", "json_lines"]
