"""proxy.logs: every record is one whole JSON line on stdout, however many threads log at once
(lines longer than a pipe's atomic write included)."""

import json
import logging
import os
import threading

from proxy import logs


def test_lines_from_many_threads_arrive_whole():
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    handler = logs._Lines(stream)
    handler.setFormatter(logs.make_formatter())
    logger = logging.Logger("lines-test")
    logger.addHandler(handler)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")))
    reader.start()

    def emit(n):
        for i in range(50):  # short lines and lines far longer than PIPE_BUF (tracebacks, say)
            logger.info("event", extra={"writer": n, "i": i, "detail": str(n) * (20 if i % 2 else 9000)})

    writers = [threading.Thread(target=emit, args=(n,)) for n in range(8)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stream.close()
    reader.join()
    lines = b"".join(chunks).decode().splitlines()
    records = [json.loads(line) for line in lines]  # a torn or interleaved line would not parse
    assert len(records) == 8 * 50
    assert all(r["detail"] == str(r["writer"]) * (20 if r["i"] % 2 else 9000) for r in records)


def test_numbers_in_free_text_are_masked_like_address_fields():
    text = "21211 The 'To' number whatsapp:+14155550111 is not a valid phone number (nor +1 (415) 555-0122)."
    masked = logs.mask_numbers(text)
    assert "whatsapp:+1415*****11" in masked and masked.startswith("21211 The 'To' number")
    assert "4155550111" not in masked and "555-0122" not in masked


def test_json_time_is_utc_with_milliseconds_whatever_the_process_timezone(monkeypatch):
    """The lines had whole seconds in the process's own timezone (TZ=America/Los_Angeles gave -0800): lines
    of several hosts could not be ordered, nor two lines of one request told apart."""
    import time
    from datetime import datetime, timezone

    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        record = logging.LogRecord("proxy", logging.INFO, __file__, 1, "send", None, None)
        record.created = datetime(2026, 11, 26, 17, 24, 24, 123456, tzinfo=timezone.utc).timestamp()
        record.msecs = 123.0  # as LogRecord derives it from `created`
        line = json.loads(logs.make_formatter().format(record))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert line["time"] == "2026-11-26T17:24:24.123Z"


def test_json_time_of_a_logged_line_parses_as_utc():
    import io
    from datetime import datetime, timedelta, timezone

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.make_formatter())
    logger = logging.Logger("time-test")
    logger.addHandler(handler)
    before = datetime.now(timezone.utc)
    logger.info("event")
    stamp = json.loads(stream.getvalue())["time"]
    assert len(stamp) == len("2026-11-26T17:24:24.123Z") and stamp.endswith("Z")
    logged = datetime.fromisoformat(stamp)  # Python 3.11 reads the Z
    assert logged.tzinfo == timezone.utc and before - timedelta(seconds=1) <= logged <= datetime.now(timezone.utc)


def test_a_text_log_line_cannot_be_split_by_a_control_character_in_a_value():
    """LOG_FORMAT=text: an unauthenticated path with %0D in it landed raw in `auth_failed path=…`, and a
    terminal showed a forged line."""
    import logging

    from proxy import logs as proxy_logs

    formatter = proxy_logs.TextFormatter("%(message)s")
    record = logging.makeLogRecord({"msg": "auth_failed", "levelno": 30, "levelname": "WARNING",
                                    "path": "/v1/x\r2026-11-27 INFO forged", "reason": "plain"})
    line = formatter.format(record)
    assert "\r" not in line and "\n" not in line
    assert "path='/v1/x\\r2026-11-27 INFO forged'" in line and "reason=plain" in line


def test_a_command_prints_its_output_on_stdout_and_its_log_lines_on_stderr(tmp_path):
    """`windows show … | jq` broke on the CRITICAL fail_open_enabled line written to stdout before the JSON
    the command prints; `outbox list` likewise behind a migrations warning. The worker's lines stay on stdout."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import ACCOUNT_SID, AUTH_TOKEN

    root = Path(__file__).resolve().parents[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "FAIL_", "DATABASE_"))},
           "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "FAIL_OPEN": "true",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}", "PYTHONPATH": str(root)}
    flask = [sys.executable, "-m", "flask", "--app", "proxy"]

    def run(*args):
        return subprocess.run([*flask, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)

    unmigrated = run("outbox", "list")  # before the migrations: a warning, then the command's own refusal
    assert "migrations_not_at_head" not in unmigrated.stdout
    assert run("db", "upgrade").returncode == 0
    shown = run("windows", "show", "whatsapp:+14155550100", "whatsapp:+14155550111")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["open"] is False  # the whole of stdout is the command's JSON
    assert "fail_open_enabled" in shown.stderr
    # The worker serves: its lines are its output (its app is loaded as any command's, then it takes stdout back).
    worker = subprocess.Popen([*flask, "worker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=tmp_path)
    try:
        events = [json.loads(line)["event"] for line in iter(worker.stdout.readline, "") if line.startswith("{")
                  and not (json.loads(line)["event"] == "worker_started" and worker.terminate())]
    finally:
        worker.kill()
        errors = worker.communicate(timeout=30)[1]
    assert {"database_in_use", "worker_started", "worker_stopped"} <= set(events), (events, errors)
    assert '"event"' not in errors
